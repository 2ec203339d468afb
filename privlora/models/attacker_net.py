"""The membership attacker network: an MLP on a (pooled) per-element loss map.

Shared by both sides: MP-/SMP-LoRA train it as the proxy attacker during training (``privlora.objectives``),
and the audit's ``mlp`` attack trains a fresh one (``privlora.attacks.mlp``). Reference form (Luo et al. 2025):
Linear(4·64·64 → 512) → ReLU → Dropout(0.5) → Linear(512 → 256) → ReLU → Dropout(0.5) → Linear(256 → 2).
Pooling the loss map to a fixed pool×pool grid makes the input size independent of the resolution.
``ScalarAttacker`` (``attacker_features = "scalar"``) is the stronger proxy attacker's alternative: an MLP on
per-draw summary statistics of the map.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

MEMBER, NONMEMBER = 1, 0


class LossMapAttacker(nn.Module):
    """The paper's attacker (``draws = 1``, ``timestep = False``). With K draws it sees the K pooled maps side by
    side; with ``timestep`` each draw's t/T is appended and the draws are put in timestep order."""

    def __init__(self, channels: int = 4, pool: int = 64, hidden: Sequence[int] = (512, 256), dropout: float = 0.5,
                 draws: int = 1, timestep: bool = False):
        super().__init__()
        self.pool, self.draws, self.timestep = pool, draws, timestep
        self.mlp = mlp(draws * (channels * pool * pool + int(timestep)), hidden, dropout)

    def features(self, maps: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        if maps.dim() == 4 and not self.timestep:  # the paper's input, exactly
            if maps.shape[-2:] != (self.pool, self.pool):
                maps = F.adaptive_avg_pool2d(maps, self.pool)
            return maps.flatten(1)
        maps = by_draw(maps)
        b, k = maps.shape[:2]
        pooled = F.adaptive_avg_pool2d(maps.flatten(0, 1), self.pool).view(b, k, -1)
        return order_draws(pooled, t if self.timestep else None, append=self.timestep).flatten(1)

    def forward(self, maps: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return self.mlp(self.features(maps.float(), t) if t is not None else self.features(maps.float()))

    def member_probability(self, maps: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return (self(maps) if t is None else self(maps, t)).softmax(-1)[:, MEMBER]


QUANTILES = (0.1, 0.5, 0.9)
STATISTICS = ("mean", "std", *(f"q{round(q * 100)}" for q in QUANTILES))  # per draw, of its whole loss map


class ScalarAttacker(nn.Module):
    """An MLP on per-draw summary statistics of the loss map (what the audit's loss / ref_loss attacks score).

    Per draw: mean, std and the 10/50/90 % quantiles of the map (plus t/T with ``timestep``). The K per-draw
    vectors are put in a fixed order — by timestep with ``timestep``, else by mean loss — so the input does not
    depend on the (arbitrary) order of exchangeable draws. Features are standardised by running statistics
    (buffers, updated only by ``observe`` on the attacker's own training batches), so the calibrated maps'
    tiny differences and the raw maps' large ones both reach the MLP at unit scale.
    """

    shift: torch.Tensor  # buffers: the running feature mean, variance, and how many batches moved them
    var: torch.Tensor
    seen: torch.Tensor

    def __init__(self, draws: int = 1, timestep: bool = False, hidden: Sequence[int] = (512, 256),
                 dropout: float = 0.5, momentum: float = 0.01):
        super().__init__()
        self.draws, self.timestep, self.momentum = draws, timestep, momentum
        width = draws * (len(STATISTICS) + int(timestep))
        self.register_buffer("shift", torch.zeros(width))
        self.register_buffer("var", torch.ones(width))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.mlp = mlp(width, hidden, dropout)

    def raw_features(self, maps: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        maps = by_draw(maps.float())
        flat = maps.flatten(2)
        qs = torch.quantile(flat, torch.tensor(QUANTILES, device=flat.device), dim=-1)
        stats = torch.stack([flat.mean(-1), flat.std(-1), *qs], -1)  # (B, K, statistics)
        key = t if self.timestep else stats[..., 0]
        return order_draws(stats, key, append=self.timestep).flatten(1)

    @torch.no_grad()
    def observe(self, maps: torch.Tensor, t: torch.Tensor | None = None) -> None:
        """Move the standardisation towards this batch's features (the first batch sets it)."""
        x = self.raw_features(maps, t)
        m = max(1.0 / (int(self.seen) + 1), self.momentum)
        self.shift.mul_(1 - m).add_(m * x.mean(0))
        self.var.mul_(1 - m).add_(m * (x.var(0, unbiased=False) if x.shape[0] > 1 else torch.ones_like(x[0])))
        self.seen += 1

    def features(self, maps: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return (self.raw_features(maps, t) - self.shift) / self.var.sqrt().clamp_min(1e-8)

    def forward(self, maps: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return self.mlp(self.features(maps, t))

    def member_probability(self, maps: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return self(maps, t).softmax(-1)[:, MEMBER]


def mlp(width: int, hidden: Sequence[int], dropout: float) -> nn.Sequential:
    """Linear → ReLU → Dropout per hidden width, then Linear(→ 2)."""
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
        width = h
    layers.append(nn.Linear(width, 2))
    return nn.Sequential(*layers)


def by_draw(maps: torch.Tensor) -> torch.Tensor:
    """(B, K, C, H, W): one draw's (B, C, H, W) maps get K = 1."""
    return maps.unsqueeze(1) if maps.dim() == 4 else maps


def order_draws(x: torch.Tensor, key: torch.Tensor | None, append: bool = False) -> torch.Tensor:
    """(B, K, F) per-draw features sorted along K by ``key`` (B, K) (None: as given); ``append``: key as a feature."""
    if key is None:
        return x
    key = key.to(x.device, x.dtype).view(x.shape[0], x.shape[1])
    if append:
        x = torch.cat([x, key.unsqueeze(-1)], -1)
    order = key.argsort(dim=1, stable=True).unsqueeze(-1).expand_as(x)
    return x.gather(1, order)
