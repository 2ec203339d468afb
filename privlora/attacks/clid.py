"""``clid``: conditional likelihood discrepancy (CLiD, Zhai et al., NeurIPS 2024), threshold form.

Text-to-image fine-tuning overfits the *conditional* distribution: a member's loss drops much more with its
own caption than without it. At timesteps around T/2 (default 440, 450, 460, one seeded noise each, shared by
all caption variants) we measure the loss with the full caption, L_full, and the discrepancy
D = mean over variants (L_variant − L_full), variants being the empty caption and the caption with a seeded half
of its words dropped (the paper drops the most *important* words, which needs an extra saliency model).
Like CLiD_th, the score is (1−α)·(−L_full) + α·D on robustly scaled features; the scaler and α are fitted on
the auxiliary roles only (α = 1, pure discrepancy, with calibrate=False).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from privlora.attacks.base import Attack, Batch, Query, require_aux
from privlora.errors import PrivloraError

ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(11))


@dataclass
class ClidAttack(Attack):
    name = "clid"
    summary = "(1-a)(-loss with caption) + a(loss without/partial caption - loss with caption), a fitted on aux"
    fits = True
    timesteps: tuple[int, ...] = (440, 450, 460)
    variants: tuple[str, ...] = ("partial:0.5", "empty")
    calibrate: bool = True

    def __post_init__(self):
        self._alpha, self._center, self._scale = 1.0, torch.zeros(2), torch.ones(2)

    def check(self, num_train_timesteps: int) -> None:
        if not self.timesteps or not self.variants:
            raise PrivloraError("attack clid: needs at least one timestep and one caption variant")
        super().check(num_train_timesteps)

    def timesteps_used(self) -> list[int]:
        return list(self.timesteps)

    def queries_per_sample(self) -> int:
        return len(self.timesteps) * (1 + len(self.variants))

    def _mean_loss(self, model, batch: Batch, variant: str) -> torch.Tensor:
        queries = [Query(t, draw=i, caption=variant) for i, t in enumerate(self.timesteps)]
        return model.loss_maps(batch, queries).mean(dim=(1, 2, 3, 4))

    def features(self, model, batch: Batch) -> torch.Tensor:
        """(B, 2): full-caption loss, mean discrepancy."""
        full = self._mean_loss(model, batch, "full")
        disc = torch.stack([self._mean_loss(model, batch, v) - full for v in self.variants]).mean(0)
        return torch.stack([full, disc], dim=1)

    def _combine(self, f: torch.Tensor, alpha: float) -> torch.Tensor:
        f = (f - self._center) / self._scale
        return (1 - alpha) * -f[:, 0] + alpha * f[:, 1]

    def fit(self, model, member: list[Batch], nonmember: list[Batch]) -> dict[str, Any]:
        from sklearn.metrics import roc_auc_score

        require_aux(self.name, member + nonmember)
        fm = torch.cat([self.features(model, b) for b in member])
        fn = torch.cat([self.features(model, b) for b in nonmember])
        if not self.calibrate:
            return {"alpha": 1.0}
        f = torch.cat([fm, fn]).double()
        q25, q50, q75 = (torch.quantile(f, q, dim=0) for q in (0.25, 0.5, 0.75))
        self._center, self._scale = q50.float(), (q75 - q25).clamp_min(1e-12).float()
        labels = np.r_[np.ones(len(fm)), np.zeros(len(fn))]
        aucs = {a: float(roc_auc_score(labels, self._combine(f.float(), a).numpy())) for a in ALPHA_GRID}
        self._alpha = max(ALPHA_GRID, key=lambda a: (aucs[a], a))  # ties: prefer more discrepancy
        return {"alpha": self._alpha, "aux_auc": aucs[self._alpha], "n_member": len(fm), "n_nonmember": len(fn)}

    def score(self, model, batch: Batch) -> torch.Tensor:
        return self._combine(self.features(model, batch), self._alpha)
