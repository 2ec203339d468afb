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
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from collections.abc import Callable, Iterator

import torch

from privlora.captions import shuffled_once
from privlora.objectives.attacker import (Attacker, LossMapAttacker, ScalarAttacker, Seen, adversarial_loss,
                                          attacker_accuracy, attacker_update)
from privlora.data.cache import CountingIterator
from privlora.objectives.attacker_eval import KEYS as FRESH_KEYS
from privlora.objectives.attacker_eval import eval_roles, fresh_noise_maps, repeat_batch
from privlora.objectives.base import BuildContext, DenoiserLike, Objective, StepOutput
from privlora.settings import MethodSettings

if TYPE_CHECKING:
    from privlora.settings import TrainConfig


ATTACKER_FEATURES = ("map", "scalar")


def _help(text: str) -> Any:
    return {"help": text}


@dataclass
class AdversarialSettings(MethodSettings):
    """MP-LoRA's and SMP-LoRA's keys: the privacy weight(s) and the proxy attacker trained against the LoRA."""

    privacy_alpha: float = field(default=1.0, metadata=_help("α: weight of the attacker's loss L_adv"))
    privacy_beta: float = field(default=1.0, metadata=_help("β of SMP-LoRA's L_ada / (β + α·L_adv)"))
    k_steps: int = field(default=1, metadata=_help("attacker steps per LoRA step"))
    adv_step: str = field(default="fused", metadata=_help(
        "reference (the paper's step) | fused (one UNet pass per step, a faster variant that changes the method)"))
    attacker_lr: float = 1e-5
    attacker_weight_decay: float = 1e-4
    attacker_hidden: list[int] = field(default_factory=lambda: [512, 256])
    attacker_dropout: float = 0.5
    attacker_pool: int = field(default=64, metadata=_help(
        "loss maps are pooled to pool×pool (64 = the reference at 512²)"))
    attacker_batch_size: int | None = field(default=None, metadata=_help("default: train_batch_size"))
    attacker_input: str = field(default="loss_map", metadata=_help(
        "loss_map (the paper) | calibrated (minus the base model's map; +1 no-grad forward)"))
    # stronger proxy attackers (departures from the paper, off by default; docs/fidelity.md)
    attacker_draws: int = field(default=1, metadata=_help(
        "K noise/timestep draws per image shown to the attacker together (L_adv: K× batch)"))
    attacker_timestep: bool = field(default=False, metadata=_help("the attacker also sees each draw's t/T"))
    attacker_features: str = field(default="map", metadata=_help(
        "map (MLP on pooled maps) | scalar (MLP on per-draw mean/std/quantiles)"))
    attacker_dropout_in_adv: bool = field(default=False, metadata=_help(
        "L_adv runs the attacker with dropout active (the reference); seeded masks"))
    attacker_eval_samples: int | None = field(default=None, metadata=_help(
        "per role, for the co-trained attacker's evaluation; default: all"))

    resume_free = ("attacker_eval_samples",)  # evaluation only

    def check(self, cfg: TrainConfig) -> str | None:
        if self.adv_step not in ("fused", "reference"):
            return f"adv_step {self.adv_step!r} is not fused or reference"
        if self.attacker_input not in ("loss_map", "calibrated"):
            return f"attacker_input {self.attacker_input!r} is not loss_map or calibrated"
        if self.attacker_features not in ATTACKER_FEATURES:
            return f"attacker_features {self.attacker_features!r} is not map or scalar"
        for key in ("k_steps", "attacker_pool", "attacker_draws"):
            if getattr(self, key) < 1:
                return f"{key} must be ≥ 1"
        if self.attacker_eval_samples is not None and self.attacker_eval_samples < 1:
            return "attacker_eval_samples must be ≥ 1"
        if self.attacker_batch_size is not None and self.attacker_batch_size < 1:
            return "attacker_batch_size must be ≥ 1"
        return None

    def kind(self) -> dict[str, str]:
        """The saved attacker's metadata for the stronger attackers (empty for the paper's: its file stays as
        before)."""
        kind = {"draws": str(self.attacker_draws), "timestep": str(self.attacker_timestep).lower(),
                "features": self.attacker_features}
        return {} if kind == {"draws": "1", "timestep": "false", "features": "map"} else kind


def make_attacker(s: AdversarialSettings, latent_channels: int) -> Attacker:
    if s.attacker_features == "scalar":
        return ScalarAttacker(s.attacker_draws, s.attacker_timestep, s.attacker_hidden, s.attacker_dropout)
    if s.attacker_draws == 1 and not s.attacker_timestep:  # the paper's attacker, built exactly as before
        return LossMapAttacker(latent_channels, s.attacker_pool, s.attacker_hidden, s.attacker_dropout)
    return LossMapAttacker(latent_channels, s.attacker_pool, s.attacker_hidden, s.attacker_dropout,
                           s.attacker_draws, s.attacker_timestep)


class AdversarialObjective(Objective):
    num_train_timesteps = 1000  # t/T's T: the denoiser's, once a step has seen it
    settings_cls = AdversarialSettings
    log_keys = ("L_ada", "L_adv", "attacker_loss")

    @classmethod
    def from_config(cls, cfg: TrainConfig, ctx: BuildContext) -> AdversarialObjective:
        s = cfg.settings(AdversarialSettings)
        member_aux, nonmember_aux = ctx.member_aux, ctx.nonmember_aux
        if member_aux is None or nonmember_aux is None:  # seeded per role and process, counted for resuming
            batch_size = s.attacker_batch_size or cfg.train_batch_size
            member_aux, nonmember_aux = (
                CountingIterator(ctx.roles[role], batch_size, cfg.seed + 1 + i + 10 * ctx.process_index)
                for i, role in enumerate(("member_aux", "nonmember_aux")))
        objective = cls(make_attacker(s, ctx.latent_channels), alpha=s.privacy_alpha, beta=s.privacy_beta,
                        k_steps=s.k_steps, adv_step=s.adv_step, lr=s.attacker_lr,
                        weight_decay=s.attacker_weight_decay, member_aux=member_aux, nonmember_aux=nonmember_aux,
                        grad_sync=ctx.grad_sync, attacker_input=s.attacker_input,
                        dropout_generator=dropout_generator_for(s, cfg.seed), draws=s.attacker_draws,
                        timestep=s.attacker_timestep)
        objective.eval_roles = eval_roles(ctx.roles, s.attacker_eval_samples, cfg.seed + 6) if ctx.roles else {}
        objective.file_metadata = {"channels": str(ctx.latent_channels), "pool": str(s.attacker_pool),
                                   "hidden": json.dumps(s.attacker_hidden), "dropout": str(s.attacker_dropout),
                                   "attacker_input": s.attacker_input, **s.kind()}
        return objective

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
        self.eval_roles: dict = {}  # role -> RoleData of the fresh-noise evaluation (evaluate_own)
        self.file_metadata: dict[str, str] = {}
        # the best fresh-noise test accuracy so far; the reference keeps a best attacker only above chance (50 %)
        self.best_test_acc = 0.5

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

    def evaluate_own(self, denoiser: DenoiserLike, seed: int) -> dict[str, float]:
        """``attacker_test_acc_fresh`` (member_test ∪ nonmember_test) and ``attacker_aux_acc_fresh`` on noise drawn
        from ``seed``; the attacker gets its own input kind (as many draws per sample as it trains on)."""
        if not self.eval_roles:
            return {}
        maps, refs, steps = fresh_noise_maps(self.eval_roles, denoiser, seed, self.attacker_input == "calibrated",
                                             draws=self.draws)
        return {FRESH_KEYS[k]: v for k, v in self.evaluate(maps, refs, steps).items() if k in FRESH_KEYS}

    def best_snapshot(self, record: dict[str, Any]) -> dict[str, str] | None:
        """The reference's ``attack_model_best``: the attacker with the best fresh-noise test accuracy so far, once
        one beats chance (none is saved while every evaluation is at or below 50 %)."""
        acc = record.get("attacker_test_acc_fresh")
        if acc is None or acc <= self.best_test_acc:
            return None
        self.best_test_acc = acc
        return {"privlora_attacker_test_acc_fresh": str(acc), "privlora_step": str(record.get("step"))}

    def generators(self) -> list[torch.Generator]:
        return [] if self.dropout_generator is None else [self.dropout_generator]

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"attacker": self.attacker}

    def module_metadata(self) -> dict[str, str]:
        return dict(self.file_metadata)

    def state_dict(self) -> dict:
        state: dict[str, Any] = {"attacker": self.attacker.state_dict(),
                                 "attacker_optimizer": self.optimizer.state_dict(),
                                 "best_test_acc": self.best_test_acc,
                                 "aux_served": {role: getattr(it, "served", 0) for role, it in self._aux()}}
        if self.dropout_generator is not None:
            state["dropout_generator"] = self.dropout_generator.get_state()
        return state

    def _aux(self) -> list[tuple[str, Iterator[dict]]]:
        return [("member_aux", self.member_aux), ("nonmember_aux", self.nonmember_aux)]

    def load_state_dict(self, state: dict) -> None:
        self.attacker.load_state_dict(state["attacker"])
        self.optimizer.load_state_dict(state["attacker_optimizer"])
        self.best_test_acc = state.get("best_test_acc", self.best_test_acc)
        for role, it in self._aux():
            if hasattr(it, "fast_forward"):
                it.fast_forward(state.get("aux_served", {}).get(role, 0))
        if self.dropout_generator is not None and "dropout_generator" in state:
            self.dropout_generator.set_state(state["dropout_generator"])


def autocast_of(denoiser: DenoiserLike):
    """The run's mixed-precision context (accelerate's autocast; a no-op without mixed precision)."""
    return getattr(denoiser, "autocast", contextlib.nullcontext)


def dropout_generator_for(s: AdversarialSettings, seed: int) -> torch.Generator | None:
    """The seeded source of L_adv's dropout masks when ``attacker_dropout_in_adv`` is on (else None)."""
    if not s.attacker_dropout_in_adv:
        return None
    return torch.Generator().manual_seed(seed + 5)


def detached(seen: torch.Tensor | Seen) -> torch.Tensor | Seen:
    return Seen(seen.maps.detach(), seen.t) if isinstance(seen, Seen) else seen.detach()
