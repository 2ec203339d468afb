"""The membership attacker network: an MLP on a (pooled) per-element loss map.

Shared by both sides: MP-/SMP-LoRA train it as the proxy attacker during training (``privlora.objectives``),
and the audit's ``mlp`` attack trains a fresh one (``privlora.attacks.mlp``). Reference form (Luo et al. 2025):
Linear(4·64·64 → 512) → ReLU → Dropout(0.5) → Linear(512 → 256) → ReLU → Dropout(0.5) → Linear(256 → 2).
Pooling the loss map to a fixed pool×pool grid makes the input size independent of the resolution.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

MEMBER, NONMEMBER = 1, 0


class LossMapAttacker(nn.Module):
    def __init__(self, channels: int = 4, pool: int = 64, hidden: Sequence[int] = (512, 256), dropout: float = 0.5):
        super().__init__()
        self.pool = pool
        layers: list[nn.Module] = []
        width = channels * pool * pool
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, 2))
        self.mlp = nn.Sequential(*layers)

    def features(self, maps: torch.Tensor) -> torch.Tensor:
        if maps.shape[-2:] != (self.pool, self.pool):
            maps = F.adaptive_avg_pool2d(maps, self.pool)
        return maps.flatten(1)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(maps.float()))

    def member_probability(self, maps: torch.Tensor) -> torch.Tensor:
        return self(maps).softmax(-1)[:, MEMBER]
