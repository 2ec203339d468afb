"""The one interface between the training loop and a training objective.

The loop hands each training batch to ``lora_loss``, back-propagates what it returns into the LoRA
weights, and then calls ``after_lora_step`` (where MP-/SMP-LoRA train their proxy attacker). It never
looks at which objective it runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class StepOutput:
    loss: torch.Tensor  # what the LoRA optimiser minimises
    logs: dict[str, float] = field(default_factory=dict)


class DenoiserLike(Protocol):
    def loss_map(self, batch: dict, *, generator: torch.Generator | None = None,
                 noise: torch.Tensor | None = None, timesteps: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]: ...
    def adaptation_loss(self, maps: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...


class Objective:
    """Plain LoRA's behaviour; privacy objectives override what they need."""

    name = "base"

    def lora_loss(self, batch: dict, denoiser: DenoiserLike) -> StepOutput:
        raise NotImplementedError

    def after_lora_step(self, denoiser: DenoiserLike) -> dict[str, float]:
        return {}

    def evaluate(self, maps: dict[str, torch.Tensor], reference: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Epoch-end metrics from fixed-noise loss maps of the aux and test roles (``reference``: the same under
        the base model); no training here."""
        return {}

    def modules(self) -> dict[str, torch.nn.Module]:
        """Extra trained modules to save beside the LoRA (the attacker)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
