"""Plain LoRA: minimise the adaptation (denoising) loss."""
from __future__ import annotations

from privlora.objectives.base import DenoiserLike, Objective, StepOutput


class LoraObjective(Objective):
    name = "lora"
    summary = "plain LoRA: minimise the denoising loss"

    def lora_loss(self, batch: dict, denoiser: DenoiserLike) -> StepOutput:
        maps, t = denoiser.loss_map(batch)
        l_ada = denoiser.adaptation_loss(maps, t)
        return StepOutput(l_ada, {"L_ada": l_ada.item()})
