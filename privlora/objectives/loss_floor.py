"""Per-image loss floor (after RelaxLoss, Chen et al., ICLR 2022, and the low-loss skipping of IET-AGC, ECCV 2024).

A membership attack reads how much lower a member's denoising loss is than a non-member's at the same timestep.
Plain LoRA keeps pushing every training image's loss down, so the images it has learned best end far below the
non-members. Here each training image's loss at the step's (timestep, noise) is compared with a floor: the
non-members' loss level at that timestep, measured on nonmember_aux images (no gradient, fresh noise, the same
timesteps as the batch) and tracked as a running mean per timestep bucket, minus ``loss_floor_margin``. An image
below its floor stops pulling the LoRA towards itself: its gradient is dropped (IET-AGC's skipping). Images above
the floor train as in plain LoRA, so the mean loss still drops. Cost: one extra no-grad UNet pass per step.

RelaxLoss' other option, reversing the gradient of an image below the floor (ascent), is not offered: the floor here
moves with the model (it is the model's own non-member loss), and ascent through the shared weights raises the
non-members' loss with the members', so the gap never closes and the loss diverges (tests/test_loss_floor.py's toy:
from 5.28 to 9.05 for members and 8.23 for non-members in 600 steps). RelaxLoss ascends towards a fixed target.

The nonmember_aux images are never trained on; only their loss level sets the floor. min_snr_gamma is refused: it
would weight an image's loss differently from the loss it is compared with.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from collections.abc import Iterator

import torch

from privlora.data.cache import CountingIterator
from privlora.objectives.base import BuildContext, DenoiserLike, Objective, StepOutput
from privlora.settings import MethodSettings

if TYPE_CHECKING:
    from privlora.settings import TrainConfig

BUCKETS = 10  # timestep buckets of the running non-member loss level
MOMENTUM = 0.1  # weight of each new non-member measurement in its bucket's running mean


@dataclass
class LossFloorSettings(MethodSettings):
    loss_floor_margin: float = field(default=0.0, metadata={
        "help": "floor = the non-members' loss at the same timestep minus this (absolute loss units)"})

    def check(self, cfg: TrainConfig) -> str | None:
        if self.loss_floor_margin < 0:
            return f"loss_floor_margin {self.loss_floor_margin} must be ≥ 0"
        if cfg.hessian_every_n_steps:
            return "loss_floor's floor moves with every loss evaluation (it reads a non-member batch), so the " \
                   "Hessian probe would not see one fixed loss: set hessian_every_n_steps = 0"
        if cfg.min_snr_gamma is not None:
            return "loss_floor compares each image's plain loss with the non-members' at its timestep; " \
                   "min_snr_gamma would weight them differently: unset it"
        return None


class LossFloorObjective(Objective):
    name = "loss_floor"
    summary = "loss floor: an image whose loss falls below the non-members' at its timestep stops pulling " \
              "(after RelaxLoss, IET-AGC)"
    settings_cls = LossFloorSettings
    log_keys = ("L_ada", "below_floor")

    def __init__(self, nonmember_aux: Iterator[dict], margin: float = 0.0):
        self.nonmember_aux, self.margin = nonmember_aux, margin
        self.level = torch.zeros(BUCKETS)  # running mean non-member loss per timestep bucket
        self.seen = torch.zeros(BUCKETS, dtype=torch.bool)

    @classmethod
    def from_config(cls, cfg: TrainConfig, ctx: BuildContext) -> LossFloorObjective:
        s = cfg.settings(LossFloorSettings)
        nonmembers = ctx.nonmember_aux
        if nonmembers is None:
            nonmembers = CountingIterator(ctx.roles["nonmember_aux"], cfg.train_batch_size,
                                          cfg.seed + 2 + 10 * ctx.process_index)
        return cls(nonmembers, s.loss_floor_margin)

    def buckets(self, t: torch.Tensor, denoiser: DenoiserLike) -> torch.Tensor:
        steps = getattr(denoiser, "num_train_timesteps", 1000)
        return (t.detach().cpu().long() * BUCKETS // steps).clamp(0, BUCKETS - 1)

    @torch.no_grad()
    def observe(self, t: torch.Tensor, denoiser: DenoiserLike) -> None:
        """Non-member losses at the batch's timesteps update the running level of their buckets."""
        batch = next(self.nonmember_aux)
        n = next(len(v) for v in batch.values())
        steps = t[torch.arange(n) % len(t)]
        maps, _ = denoiser.loss_map(batch, timesteps=steps)
        losses = maps.float().flatten(1).mean(1).cpu()
        for b, loss in zip(self.buckets(steps, denoiser).tolist(), losses.tolist()):
            self.level[b] = loss if not self.seen[b] else (1 - MOMENTUM) * self.level[b] + MOMENTUM * loss
            self.seen[b] = True

    def lora_loss(self, batch: dict, denoiser: DenoiserLike) -> StepOutput:
        maps, t = denoiser.loss_map(batch)
        per_image = maps.float().flatten(1).mean(1)
        self.observe(t, denoiser)
        b = self.buckets(t, denoiser)
        floor = (self.level[b] - self.margin).to(per_image.device)
        below = self.seen[b].to(per_image.device) & (per_image.detach() < floor)
        loss = (per_image * (~below).to(per_image.dtype)).mean()
        return StepOutput(loss, {"L_ada": per_image.mean().item(), "below_floor": below.float().mean().item(),
                                 "loss_floor": float(floor.mean())})

    def state_dict(self) -> dict[str, Any]:
        return {"level": self.level.clone(), "seen": self.seen.clone(),
                "nonmember_served": getattr(self.nonmember_aux, "served", 0)}

    def load_state_dict(self, state: dict) -> None:
        self.level, self.seen = state["level"].clone(), state["seen"].clone()
        if hasattr(self.nonmember_aux, "fast_forward"):
            self.nonmember_aux.fast_forward(state.get("nonmember_served", 0))
