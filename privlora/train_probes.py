"""What the loop measures besides training: the fixed-noise probe of every role at each evaluation and the
per-period means of the step logs."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from privlora.config import TrainConfig
from privlora.data.cache import RoleData
from privlora.denoiser import Denoiser

if TYPE_CHECKING:

    pass


PERIOD_SKIP = ("lr",)  # schedules, not measurements


PERIOD_MAXIMA = ("grad_norm",)  # spikes matter here, so history.json also gets <key>_max


def add_to_period(period: dict, logs: dict) -> None:
    """Add one step's numeric logs to the running [sum, count, max] of the current evaluation period."""
    for key, value in logs.items():
        if key in PERIOD_SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        total, count, high = period.get(key, (0.0, 0, float(value)))
        period[key] = [total + float(value), count + 1, max(high, float(value))]


def period_summary(period: dict) -> dict[str, float]:
    """``<key>_mean`` of every per-step log over the period (and ``<key>_max`` for PERIOD_MAXIMA)."""
    out = {f"{key}_mean": total / count for key, (total, count, _) in period.items() if count}
    out.update({f"{key}_max": period[key][2] for key in PERIOD_MAXIMA if key in period})
    return out


def probe_roles(roles: dict[str, RoleData], cfg: TrainConfig) -> dict[str, RoleData]:
    """The fixed-noise probe's samples: a random subset of eval_samples per role, drawn with the run's seed."""
    gen = torch.Generator().manual_seed(cfg.seed + 4)
    return {r: d.subset(min(cfg.eval_samples, len(d)), gen) for r, d in roles.items()}


class FixedNoiseProbe:
    """Loss maps of fixed samples under fixed noise and timesteps: comparable from one epoch to the next.

    The samples are a seeded random subset of each role (``probe_roles``), not the first ones in file order.
    """

    def __init__(self, roles: dict[str, RoleData], seed: int, num_train_timesteps: int = 1000):
        self.roles, self.seed = roles, seed
        gen = torch.Generator().manual_seed(seed)
        self.noise: dict[str, torch.Tensor | None] = {}
        self.timesteps: dict[str, torch.Tensor] = {}
        for role, data in roles.items():
            first = data[0]
            self.timesteps[role] = torch.randint(0, num_train_timesteps, (len(data),), generator=gen)
            self.noise[role] = (torch.randn((len(data), *first["latents"].shape), generator=gen)
                                if "latents" in first else None)

    @torch.no_grad()
    def maps(self, denoiser: Denoiser, batch_size: int = 64) -> dict[str, torch.Tensor]:
        out = {}
        for role, data in self.roles.items():
            chunks = []
            for s in range(0, len(data), batch_size):
                idx = list(range(s, min(s + batch_size, len(data))))
                batch = torch.utils.data.default_collate([data[i] for i in idx])
                role_noise = self.noise[role]
                noise = None if role_noise is None else role_noise[idx]
                g = torch.Generator().manual_seed(self.seed + s)
                chunks.append(denoiser.loss_map(batch, noise=noise, timesteps=self.timesteps[role][idx],
                                                generator=g)[0])
            out[role] = torch.cat(chunks).float()
        return out


def evaluate_epoch(epoch: int, step: int, probe: FixedNoiseProbe, denoiser: Denoiser, objective,
                   base_maps: dict[str, torch.Tensor], last_logs: dict) -> dict:
    maps = probe.maps(denoiser)
    record: dict[str, Any] = {"epoch": epoch, "step": step}
    record.update({k: v for k, v in last_logs.items() if k != "lr"})
    record.update({f"{r}_loss": m.mean().item() for r, m in maps.items()})
    record["member_gap"] = record["nonmember_test_loss"] - record["member_test_loss"]
    record.update(objective.evaluate(maps, base_maps, probe.timesteps))
    return record

