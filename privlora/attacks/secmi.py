"""``secmi``: SecMI_stat (Duan et al., ICML 2023), the step-wise error of deterministic DDIM round trips.

x̃_t is the deterministic DDIM inversion of the clean latent from t=0 up to t_sec in steps of ``interval``.
One denoise step (t_sec → t_sec−interval) and one re-noise step back give x̂_t; the t-error is ‖x̂_t − x̃_t‖².
Members sit where the model's score field is consistent, so their t-error is lower. Score: minus the t-error.
For v-prediction models the UNet output is converted to ε before each DDIM step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from privlora.attacks.base import Attack, Batch
from privlora.errors import PrivloraError


def ddim_step(model, x: torch.Tensor, t_from: int, t_to: int, emb: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (η = 0) move from timestep t_from to t_to, either direction."""
    eps = model.eps(x, t_from, emb)
    a_from, a_to = model.alpha_bar(t_from).float(), model.alpha_bar(t_to).float()
    x0 = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
    return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps


@dataclass
class SecMIAttack(Attack):
    name = "secmi"
    summary = "minus the t-error of a DDIM denoise/re-noise round trip at t_sec (SecMI_stat)"
    t_sec: int = 100
    interval: int = 10

    def check(self, num_train_timesteps: int) -> None:
        if self.interval < 1 or self.t_sec < self.interval or self.t_sec % self.interval:
            raise PrivloraError(f"attack secmi: t_sec ({self.t_sec}) must be a positive multiple of interval "
                                f"({self.interval})")
        super().check(num_train_timesteps)

    def timesteps_used(self) -> list[int]:
        return list(range(0, self.t_sec + 1, self.interval))

    def queries_per_sample(self) -> int:
        return self.t_sec // self.interval + 2

    def score(self, model, batch: Batch) -> torch.Tensor:
        emb = model.text(batch)
        steps = self.timesteps_used()
        x = batch.latents.float()
        for t_from, t_to in zip(steps[:-1], steps[1:]):
            x = ddim_step(model, x, t_from, t_to, emb)
        back = ddim_step(model, x, self.t_sec, self.t_sec - self.interval, emb)
        again = ddim_step(model, back, self.t_sec - self.interval, self.t_sec, emb)
        return -(again - x).pow(2).flatten(1).sum(1)
