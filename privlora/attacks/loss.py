"""``loss``: the loss-threshold attack (Yeom et al. 2018; Matsumoto et al. 2023 for diffusion models).

Members were fitted, so their denoising loss is lower. Score: minus the training loss (ε- or v-target, as the
model was trained) averaged over a fixed set of timesteps, each with its own seeded noise per sample.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from privlora.attacks.base import Attack, Batch, Query

DEFAULT_TIMESTEPS = (50, 175, 300, 425, 550, 675, 800, 925)


@dataclass
class LossAttack(Attack):
    name = "loss"
    summary = "minus the mean denoising loss over fixed timesteps and seeded noises"
    timesteps: tuple[int, ...] = DEFAULT_TIMESTEPS
    noises_per_timestep: int = 1

    def queries(self) -> list[Query]:
        n = self.noises_per_timestep
        return [Query(t, draw=i * n + j) for i, t in enumerate(self.timesteps) for j in range(n)]

    def queries_per_sample(self) -> int:
        return len(self.timesteps) * self.noises_per_timestep

    def timesteps_used(self) -> list[int]:
        return list(self.timesteps)

    def mean_loss(self, model, batch: Batch) -> torch.Tensor:
        return model.loss_maps(batch, self.queries()).mean(dim=(1, 2, 3, 4))

    def score(self, model, batch: Batch) -> torch.Tensor:
        return -self.mean_loss(model, batch)
