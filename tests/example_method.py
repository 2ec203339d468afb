"""The smallest complete method, as docs/architecture.md walks through it: plain LoRA whose denoising loss only
counts timesteps from ``count_from_timestep`` on (a toy of the "timestep shaping" defences). One settings class, one
``Objective`` subclass; ``register_method(TimestepFloorObjective)`` is the one registry line."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from privlora.objectives.base import BuildContext, DenoiserLike, Objective, StepOutput
from privlora.settings import MethodSettings, TrainConfig


@dataclass
class TimestepFloorSettings(MethodSettings):
    count_from_timestep: int = field(default=0, metadata={"help": "timesteps below this do not count in the loss"})

    def check(self, cfg: TrainConfig) -> str | None:
        if not 0 <= self.count_from_timestep < 1000:
            return f"count_from_timestep {self.count_from_timestep} is not in [0, 1000)"
        return None


class TimestepFloorObjective(Objective):
    name = "timestep_floor"
    summary = "plain LoRA, but only timesteps ≥ count_from_timestep count (the example method of the docs)"
    settings_cls = TimestepFloorSettings

    def __init__(self, count_from_timestep: int):
        self.count_from_timestep = count_from_timestep

    @classmethod
    def from_config(cls, cfg: TrainConfig, ctx: BuildContext) -> TimestepFloorObjective:
        return cls(cfg.settings(TimestepFloorSettings).count_from_timestep)

    def lora_loss(self, batch: dict, denoiser: DenoiserLike) -> StepOutput:
        maps, t = denoiser.loss_map(batch)
        kept = (t >= self.count_from_timestep).to(maps.dtype)
        per_image = maps.flatten(1).mean(1) * kept
        loss = per_image.sum() / kept.sum().clamp(min=1.0)
        return StepOutput(loss, {"L_ada": loss.item(), "kept": kept.mean().item()})

    def metadata(self) -> dict[str, str]:
        return {"privlora_count_from_timestep": str(self.count_from_timestep)}


def loss_of(objective: Objective, maps: torch.Tensor, t: torch.Tensor) -> float:
    """The objective's loss on given maps and timesteps (a stand-in denoiser that returns them)."""
    fake = type("Fixed", (), {"loss_map": lambda self, batch: (maps, t)})()
    return objective.lora_loss({}, fake).loss.item()
