"""``pia``: PIA, the proximal initialization attack (Kong et al., ICLR 2024).

ε_θ(x_0, 0) is taken as the sample's "proximal initial" noise; x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε_θ(x_0, 0) is then
built deterministically and the model should predict that same noise back. Members match better. Score: minus
Σ_t ‖ε_θ(x_t, t) − ε_θ(x_0, 0)‖_p^p over the attacked timesteps (p = 4 as in the paper). v-prediction output
is converted to ε.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from privlora.attacks.base import Attack, Batch
from privlora.errors import PrivloraError


@dataclass
class PIAAttack(Attack):
    name = "pia"
    summary = "minus the l_p distance (p=4) between eps(x_0, 0) and eps(x_t, t) on the proximal x_t"
    timesteps: tuple[int, ...] = (200,)
    p: float = 4.0

    def check(self, num_train_timesteps: int) -> None:
        if not self.timesteps or self.p <= 0:
            raise PrivloraError("attack pia: needs at least one timestep and p > 0")
        super().check(num_train_timesteps)

    def timesteps_used(self) -> list[int]:
        return [0, *self.timesteps]

    def queries_per_sample(self) -> int:
        return 1 + len(self.timesteps)

    def score(self, model, batch: Batch) -> torch.Tensor:
        emb = model.text(batch)
        x0 = batch.latents.float()
        eps0 = model.eps(x0, 0, emb)
        distance = torch.zeros(len(batch))
        for t in self.timesteps:
            a = model.alpha_bar(t).float()
            eps_t = model.eps(a.sqrt() * x0 + (1 - a).sqrt() * eps0, t, emb)
            distance += (eps_t - eps0).abs().pow(self.p).flatten(1).sum(1)
        return -distance
