"""``ref_loss``: the loss attack calibrated by the public base model (the offline idea of LiRA, Carlini et al. 2022).

Some images are simply easy to denoise; the base model knows which. Score: the sample's loss under the base
model minus its loss under the audited model, on identical queries — how much fine-tuning lowered *this*
sample's loss. Auditing the base model itself gives all-zero scores (AUC 0.5) by construction.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from privlora.attacks.base import Batch
from privlora.attacks.loss import LossAttack


@dataclass
class RefLossAttack(LossAttack):
    name = "ref_loss"
    summary = "loss under the base model minus loss under the audited model (same queries)"

    def queries_per_sample(self) -> int:
        return 2 * super().queries_per_sample()

    def score(self, model, batch: Batch) -> torch.Tensor:
        return self.mean_loss(model.reference, batch) - self.mean_loss(model, batch)
