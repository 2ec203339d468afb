"""What MP-LoRA and SMP-LoRA share: a proxy attacker trained against the LoRA, step by step.

Per LoRA step (``adv_step``):
- ``reference`` (the paper presets): L_ada from the batch's loss map; L_adv from a second UNet pass over the
  same batch with fresh noise and timesteps (run as one doubled batch, which is the same computation and lets
  DDP see one forward per backward); then, for each of the k attacker steps, a fresh member_aux and a fresh
  nonmember_aux batch, each through a fresh no-grad forward (fresh noise), and one attacker step on them.
- ``fused`` (TrainConfig's default, an opt-in speed variant): the batch's own loss map gives both L_ada and
  L_adv; the attacker trains on that (detached) member map plus one no-grad map of a nonmember_aux batch.
  One UNet fwd+bwd and one no-grad forward per step instead of two fwd+bwd and 2k no-grad forwards. It is
  not the paper's method: (1) the attacker's members are every training image, member_test included, so the
  attacker's member_test accuracy is no longer held out; (2) member maps come from the weights before the
  LoRA step, non-member maps from after it; (3) L_ada and L_adv share one noise draw and timestep. With
  k > 1 it reuses that one pair of maps for all k attacker steps.
``dropout_generator`` set: L_adv runs the attacker with dropout active (seeded masks), as the reference does.

Stronger proxy attackers (departures, off in the paper presets; docs/fidelity.md): ``draws`` = K noise/timestep
draws per image, shown to the attacker together (L_adv: the batch repeated K times in the same UNet call; fused:
L_ada then averages all K draws); ``timestep``: each draw's t/T is shown too; ``ScalarAttacker``: per-draw
summary statistics of the map instead of the pooled map.
Subclasses only say how L_ada and L_adv combine into the LoRA's loss.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any
from collections.abc import Callable, Iterator

import torch

from privlora.captions import shuffled_once
from privlora.objectives.attacker import (Attacker, LossMapAttacker, ScalarAttacker, Seen, adversarial_loss,
                                          attacker_accuracy, attacker_update)
from privlora.objectives.base import BuildContext, DenoiserLike, Objective, StepOutput

if TYPE_CHECKING:
    from privlora.config import TrainConfig


ATTACKER_FEATURES = ("map", "scalar")


def make_attacker(cfg: TrainConfig, latent_channels: int) -> Attacker:
    draws, timestep = getattr(cfg, "attacker_draws", 1), getattr(cfg, "attacker_timestep", False)
    if getattr(cfg, "attacker_features", "map") == "scalar":
        return ScalarAttacker(draws, timestep, cfg.attacker_hidden, cfg.attacker_dropout)
    if draws == 1 and not timestep:  # the paper's attacker, built exactly as before
        return LossMapAttacker(latent_channels, cfg.attacker_pool, cfg.attacker_hidden, cfg.attacker_dropout)
    return LossMapAttacker(latent_channels, cfg.attacker_pool, cfg.attacker_hidden, cfg.attacker_dropout,
                           draws, timestep)


def attacker_kind(cfg: TrainConfig) -> dict[str, str]:
    """The saved attacker's metadata for the stronger attackers (empty for the paper's: its file stays as before)."""
    kind = {"draws": str(cfg.attacker_draws), "timestep": str(cfg.attacker_timestep).lower(),
            "features": cfg.attacker_features}
    return {} if kind == {"draws": "1", "timestep": "false", "features": "map"} else kind


class AdversarialObjective(Objective):
    num_train_timesteps = 1000  # t/T's T: the denoiser's, once a step has seen it
    settings = ("privacy_alpha", "privacy_beta", "k_steps", "adv_step", "attacker_lr", "attacker_weight_decay",
                "attacker_hidden", "attacker_dropout", "attacker_pool", "attacker_batch_size", "attacker_input",
                "attacker_dropout_in_adv", "attacker_eval_samples", "attacker_draws", "attacker_timestep",
                "attacker_features")

    @classmethod
    def from_config(cls, cfg: TrainConfig, ctx: BuildContext) -> AdversarialObjective:
        assert ctx.member_aux is not None and ctx.nonmember_aux is not None, "the attacker needs its aux batches"
        return cls(make_attacker(cfg, ctx.latent_channels), alpha=cfg.privacy_alpha, beta=cfg.privacy_beta,
                   k_steps=cfg.k_steps, adv_step=cfg.adv_step, lr=cfg.attacker_lr,
                   weight_decay=cfg.attacker_weight_decay, member_aux=ctx.member_aux,
                   nonmember_aux=ctx.nonmember_aux, grad_sync=ctx.grad_sync, attacker_input=cfg.attacker_input,
                   dropout_generator=dropout_generator_for(cfg), draws=cfg.attacker_draws,
                   timestep=cfg.attacker_timestep)

    def __init__(self, attacker: Attacker, *, alpha: float, beta: float, k_steps: int, adv_step: str,
                 lr: float, weight_decay: float, member_aux: Iterator[dict], nonmember_aux: Iterator[dict],
                 grad_sync: Callable[[torch.nn.Module], None] | None = None, attacker_input: str = "loss_map",
                 dropout_generator: torch.Generator | None = None, draws: int = 1, timestep: bool = False):
        self.attacker = attacker
        self.alpha, self.beta, self.k_steps, self.adv_step = alpha, beta, k_steps, adv_step
        self.optimizer = torch.optim.Adam(attacker.parameters(), lr=lr, weight_decay=weight_decay)
        self.member_aux, self.nonmember_aux = member_aux, nonmember_aux
        self.attacker_input = attacker_input
        self.grad_sync = grad_sync  # multi-process: average the attacker's gradients so every copy stays equal
        self.draws, self.timestep = draws, timestep  # K draws per image shown together; show each draw's t/T
        self._last_member_maps: torch.Tensor | Seen | None = None
        self.dropout_generator = dropout_generator  # None: L_adv sees the attacker without dropout

    def combine(self, l_ada: torch.Tensor, l_adv: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def attacker_view(self, batch: dict, denoiser: DenoiserLike,
                      draws: int = 1) -> tuple[torch.Tensor, torch.Tensor | Seen, torch.Tensor]:
        """(loss maps under the LoRA, what the attacker sees of them, timesteps) for ``draws`` draws per image.

        The maps and timesteps have K·B rows (draw-major: one UNet call on the batch repeated K times); the
        attacker's view gathers them per image, (B, K, C, H, W) for K > 1, and adds t/T with ``timestep``.
        """
        maps, seen, t = self.raw_view(batch if draws == 1 else repeat_batch(batch, draws), denoiser)
        return maps, self.shown(seen, t, draws), t

    def raw_view(self, batch: dict, denoiser: DenoiserLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One draw per row: (maps, maps as the attacker input kind, timesteps).

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

    def shown(self, maps: torch.Tensor, t: torch.Tensor, draws: int) -> torch.Tensor | Seen:
        """Draw-major rows → the attacker's input: per image its K maps and (with ``timestep``) their t/T."""
        b = maps.shape[0] // draws
        if draws > 1:
            maps = maps.reshape(draws, b, *maps.shape[1:]).transpose(0, 1)
        if not self.timestep:
            return maps
        frac = t.float().reshape(draws, b).T / self.num_train_timesteps
        return Seen(maps, frac.to(maps.device))

    def lora_loss(self, batch: dict, denoiser: DenoiserLike) -> StepOutput:
        self.num_train_timesteps = getattr(denoiser, "num_train_timesteps", 1000)
        k = self.draws
        if self.adv_step == "fused":  # L_ada over all K draws (K = 1: the batch's own map)
            maps, adv_maps, t = self.attacker_view(batch, denoiser, k)
        else:  # the reference's second forward (same batch, K fresh draws), batched into one UNet call;
            # kohya shuffles a caption once when the batch is fetched, and both forwards reuse it
            every, seen, t_all = self.raw_view(repeat_batch(shuffled_once(batch, denoiser), 1 + k), denoiser)
            n = every.shape[0] // (1 + k)
            maps, t = every[:n], t_all[:n]
            adv_maps = self.shown(seen[n:], t_all[n:], k)
        l_ada = denoiser.adaptation_loss(maps, t)
        with autocast_of(denoiser)():  # the reference's mixed precision
            l_adv = adversarial_loss(self.attacker, adv_maps, self.dropout_generator)
        self._last_member_maps = detached(adv_maps)
        loss = self.combine(l_ada, l_adv)
        return StepOutput(loss, {"L_ada": l_ada.item(), "L_adv": l_adv.item(), "loss": loss.item()})

    def after_lora_step(self, denoiser: DenoiserLike) -> dict[str, float]:
        if self.adv_step == "fused":
            return self._fused_attacker_update(denoiser)
        logs: dict[str, float] = {}
        for _ in range(self.k_steps):  # the reference: fresh aux batches and fresh noise for every attacker step
            members, nonmembers = self._aux_views(denoiser)
            logs = attacker_update(self.attacker, self.optimizer, members, nonmembers, 1, self.grad_sync,
                                   autocast_of(denoiser))
        return logs

    def _fused_attacker_update(self, denoiser: DenoiserLike) -> dict[str, float]:
        with torch.no_grad():
            if self._last_member_maps is not None:
                members = self._last_member_maps
            else:
                members = self.attacker_view(next(self.member_aux), denoiser, self.draws)[1]
            nonmembers = self.attacker_view(next(self.nonmember_aux), denoiser, self.draws)[1]
        self._last_member_maps = None
        return attacker_update(self.attacker, self.optimizer, members, nonmembers, self.k_steps, self.grad_sync,
                               autocast_of(denoiser))

    @torch.no_grad()
    def _aux_views(self, denoiser: DenoiserLike) -> tuple[torch.Tensor | Seen, torch.Tensor | Seen]:
        members = self.attacker_view(next(self.member_aux), denoiser, self.draws)[1]
        return members, self.attacker_view(next(self.nonmember_aux), denoiser, self.draws)[1]

    def evaluate(self, maps: dict[str, torch.Tensor], reference: dict[str, torch.Tensor] | None = None,
                 timesteps: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """The attacker's accuracy on role maps: (N, C, H, W), or (N, K, C, H, W) with ``timesteps`` (N, K).

        Maps that are not the attacker's input kind (fewer draws than it takes; no timesteps for a
        timestep-aware attacker) give no accuracy rather than a wrong one.
        """
        if self.attacker_input == "calibrated" and reference is not None:
            maps = {role: m - reference[role] for role, m in maps.items()}
        seen = {role: self.eval_view(m, None if timesteps is None else timesteps.get(role))
                for role, m in maps.items()}
        out = {}
        for key, (m, n) in {"attacker_train_acc": ("member_aux", "nonmember_aux"),
                            "attacker_test_acc": ("member_test", "nonmember_test")}.items():
            members, nonmembers = seen.get(m), seen.get(n)
            if members is not None and nonmembers is not None:
                out[key] = attacker_accuracy(self.attacker, members, nonmembers)
        return out

    def eval_view(self, maps: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor | Seen | None:
        draws = 1 if maps.dim() == 4 else maps.shape[1]
        if draws != self.draws or (self.timestep and t is None):
            return None
        if t is None or not self.timestep:
            return maps
        frac = t.float().reshape(maps.shape[0], draws) / self.num_train_timesteps
        return Seen(maps, frac.to(maps.device))

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"attacker": self.attacker}

    def state_dict(self) -> dict:
        state: dict[str, Any] = {"attacker": self.attacker.state_dict(),
                                 "attacker_optimizer": self.optimizer.state_dict()}
        if self.dropout_generator is not None:
            state["dropout_generator"] = self.dropout_generator.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.attacker.load_state_dict(state["attacker"])
        self.optimizer.load_state_dict(state["attacker_optimizer"])
        if self.dropout_generator is not None and "dropout_generator" in state:
            self.dropout_generator.set_state(state["dropout_generator"])


def autocast_of(denoiser: DenoiserLike):
    """The run's mixed-precision context (accelerate's autocast; a no-op without mixed precision)."""
    return getattr(denoiser, "autocast", contextlib.nullcontext)


def dropout_generator_for(cfg) -> torch.Generator | None:
    """The seeded source of L_adv's dropout masks when ``attacker_dropout_in_adv`` is on (else None)."""
    if not getattr(cfg, "attacker_dropout_in_adv", False):
        return None
    return torch.Generator().manual_seed(cfg.seed + 5)


def repeat_batch(batch: dict, times: int = 2) -> dict:
    """The batch ``times`` over, copy after copy (tensors concatenated, caption lists repeated)."""
    return {k: torch.cat([v] * times) if torch.is_tensor(v) else list(v) * times for k, v in batch.items()}


def detached(seen: torch.Tensor | Seen) -> torch.Tensor | Seen:
    return Seen(seen.maps.detach(), seen.t) if isinstance(seen, Seen) else seen.detach()
