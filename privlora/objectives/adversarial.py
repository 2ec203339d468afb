"""What MP-LoRA and SMP-LoRA share: a proxy attacker trained against the LoRA, step by step.

Per LoRA step (``adv_step``):
- ``reference``: L_ada from the batch's loss map; L_adv from a second UNet pass over the same batch with
  fresh noise (run as one doubled batch, which is the same computation and lets DDP see one forward per
  backward); the attacker then trains on no-grad maps of a member_aux and a nonmember_aux batch.
- ``fused`` (default): the batch's own loss map gives both L_ada and L_adv; the attacker trains on that
  (detached) member map plus one no-grad map of a nonmember_aux batch. One UNet fwd+bwd and one no-grad
  forward per step instead of two fwd+bwd and two no-grad forwards.
Subclasses only say how L_ada and L_adv combine into the LoRA's loss.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator

import torch

from privlora.objectives.attacker import (LossMapAttacker, adversarial_loss, attacker_accuracy,
                                          attacker_update)
from privlora.objectives.base import BuildContext, DenoiserLike, Objective, StepOutput

if TYPE_CHECKING:
    from privlora.config import TrainConfig


def make_attacker(cfg: TrainConfig, latent_channels: int) -> LossMapAttacker:
    return LossMapAttacker(latent_channels, cfg.attacker_pool, cfg.attacker_hidden, cfg.attacker_dropout)


class AdversarialObjective(Objective):
    settings = ("privacy_alpha", "privacy_beta", "k_steps", "adv_step", "attacker_lr", "attacker_weight_decay",
                "attacker_hidden", "attacker_dropout", "attacker_pool", "attacker_batch_size", "attacker_input")

    @classmethod
    def from_config(cls, cfg: TrainConfig, ctx: BuildContext) -> AdversarialObjective:
        return cls(make_attacker(cfg, ctx.latent_channels), alpha=cfg.privacy_alpha, beta=cfg.privacy_beta,
                   k_steps=cfg.k_steps, adv_step=cfg.adv_step, lr=cfg.attacker_lr,
                   weight_decay=cfg.attacker_weight_decay, member_aux=ctx.member_aux,
                   nonmember_aux=ctx.nonmember_aux, grad_sync=ctx.grad_sync, attacker_input=cfg.attacker_input)

    def __init__(self, attacker: LossMapAttacker, *, alpha: float, beta: float, k_steps: int, adv_step: str,
                 lr: float, weight_decay: float, member_aux: Iterator[dict], nonmember_aux: Iterator[dict],
                 grad_sync: Callable[[torch.nn.Module], None] | None = None, attacker_input: str = "loss_map"):
        self.attacker = attacker
        self.alpha, self.beta, self.k_steps, self.adv_step = alpha, beta, k_steps, adv_step
        self.optimizer = torch.optim.Adam(attacker.parameters(), lr=lr, weight_decay=weight_decay)
        self.member_aux, self.nonmember_aux = member_aux, nonmember_aux
        self.attacker_input = attacker_input
        self.grad_sync = grad_sync  # multi-process: average the attacker's gradients so every copy stays equal
        self._last_member_maps: torch.Tensor | None = None

    def combine(self, l_ada: torch.Tensor, l_adv: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def attacker_view(self, batch: dict, denoiser: DenoiserLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss maps under the LoRA, what the attacker sees of them, timesteps).

        ``attacker_input = "loss_map"`` (the paper) shows the attacker the maps themselves; ``"calibrated"`` shows
        the maps minus the public base model's on the same noise — the signal of the audit's ``ref_loss``, the
        strongest attack on a LoRA — at one extra no-grad forward.
        """
        if self.attacker_input == "loss_map":
            maps, t = denoiser.loss_map(batch)
            return maps, maps, t
        noise, t = denoiser.draw(batch)
        maps, t = denoiser.loss_map(batch, noise=noise, timesteps=t)
        return maps, maps - denoiser.reference_map(batch, noise, t), t

    def lora_loss(self, batch: dict, denoiser: DenoiserLike) -> StepOutput:
        if self.adv_step == "fused":
            maps, adv_maps, t = self.attacker_view(batch, denoiser)
        else:  # the reference's second forward (same batch, fresh noise), batched into one UNet call
            both, seen, t2 = self.attacker_view(repeat_batch(batch), denoiser)
            n = both.shape[0] // 2
            maps, adv_maps, t = both[:n], seen[n:], t2[:n]
        l_ada = denoiser.adaptation_loss(maps, t)
        l_adv = adversarial_loss(self.attacker, adv_maps)
        self._last_member_maps = adv_maps.detach()
        loss = self.combine(l_ada, l_adv)
        return StepOutput(loss, {"L_ada": l_ada.item(), "L_adv": l_adv.item(), "loss": loss.item()})

    def after_lora_step(self, denoiser: DenoiserLike) -> dict[str, float]:
        with torch.no_grad():
            if self.adv_step == "fused" and self._last_member_maps is not None:
                members = self._last_member_maps
            else:
                members = self.attacker_view(next(self.member_aux), denoiser)[1]
            nonmembers = self.attacker_view(next(self.nonmember_aux), denoiser)[1]
        return attacker_update(self.attacker, self.optimizer, members, nonmembers, self.k_steps, self.grad_sync)

    def evaluate(self, maps: dict[str, torch.Tensor], reference: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        if self.attacker_input == "calibrated" and reference is not None:
            maps = {role: m - reference[role] for role, m in maps.items()}
        out = {}
        if "member_aux" in maps and "nonmember_aux" in maps:
            out["attacker_train_acc"] = attacker_accuracy(self.attacker, maps["member_aux"], maps["nonmember_aux"])
        if "member_test" in maps and "nonmember_test" in maps:
            out["attacker_test_acc"] = attacker_accuracy(self.attacker, maps["member_test"], maps["nonmember_test"])
        return out

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"attacker": self.attacker}

    def state_dict(self) -> dict:
        return {"attacker": self.attacker.state_dict(), "attacker_optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.attacker.load_state_dict(state["attacker"])
        self.optimizer.load_state_dict(state["attacker_optimizer"])


def repeat_batch(batch: dict) -> dict:
    """The batch twice over (tensors concatenated, caption lists repeated)."""
    return {k: torch.cat([v, v]) if torch.is_tensor(v) else list(v) + list(v) for k, v in batch.items()}
