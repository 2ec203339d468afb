"""The proxy membership attacker h_ω of MP-/SMP-LoRA: an MLP on a (pooled) per-element loss map.

Reference form (Luo et al. 2025): Linear(4·64·64 → 512) → ReLU → Dropout(0.5) → Linear(512 → 256) → ReLU
→ Dropout(0.5) → Linear(256 → 2), cross-entropy, Adam(lr 1e-5, weight decay 1e-4). Pooling the loss map to
a fixed pool×pool grid makes the input size independent of the resolution; at 512² (64×64 latents) with
pool = 64 it is exactly the reference layout.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from privlora.models.attacker_net import MEMBER, NONMEMBER, LossMapAttacker, ScalarAttacker  # noqa: F401

Attacker = LossMapAttacker | ScalarAttacker


class Seen(NamedTuple):
    """What the attacker is shown: loss maps ((B, C, H, W), or (B, K, C, H, W) for K draws) and each draw's t/T."""

    maps: torch.Tensor
    t: torch.Tensor | None = None  # (B, K); None: the paper's attacker, which is not shown timesteps


def as_seen(x: Seen | torch.Tensor) -> Seen:
    return x if isinstance(x, Seen) else Seen(x)


def join(a: Seen | torch.Tensor, b: Seen | torch.Tensor) -> Seen:
    a, b = as_seen(a), as_seen(b)
    t = None if a.t is None or b.t is None else torch.cat([a.t, b.t])
    return Seen(torch.cat([a.maps, b.maps]), t)


def adversarial_loss(attacker: Attacker, member_maps: Seen | torch.Tensor,
                     dropout_generator: torch.Generator | None = None) -> torch.Tensor:
    """L_adv: the attacker's cross-entropy against the label *member* on the training batch.

    Its gradient flows into the loss maps (hence the LoRA) only: the attacker's weights are used as constants.
    Without ``dropout_generator`` the attacker runs without dropout (the attacker the LoRA will face); with one
    it runs in train mode as the reference does, its dropout masks drawn from that (CPU, seeded) generator so
    a resumed run draws the same masks.
    """
    seen = as_seen(member_maps)
    logits = (detached_forward(attacker, seen.maps, dropout_generator) if seen.t is None
              else detached_forward(attacker, seen.maps, dropout_generator, seen.t))
    labels = torch.full((seen.maps.shape[0],), MEMBER, dtype=torch.long, device=seen.maps.device)
    return F.cross_entropy(logits, labels)


def detached_forward(attacker: Attacker, maps: torch.Tensor, dropout_generator: torch.Generator | None = None,
                     t: torch.Tensor | None = None) -> torch.Tensor:
    """The attacker's logits with its weights (and feature scale) as constants; dropout masks from
    ``dropout_generator`` if given."""
    x = attacker.features(maps.float()) if t is None else attacker.features(maps.float(), t)
    for layer in attacker.mlp:
        if isinstance(layer, nn.Linear):
            x = F.linear(x, layer.weight.detach(), layer.bias.detach())
        elif isinstance(layer, nn.Dropout):
            if dropout_generator is not None and layer.p > 0:
                keep = torch.rand(x.shape, generator=dropout_generator) >= layer.p
                x = x * keep.to(x.device, x.dtype) / (1.0 - layer.p)
        else:
            x = layer(x)
    return x


def attacker_update(attacker: Attacker, optimizer: torch.optim.Optimizer, member_maps: Seen | torch.Tensor,
                    nonmember_maps: Seen | torch.Tensor, k_steps: int, grad_sync=None,
                    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                    ) -> dict[str, float]:
    """k Adam steps of the attacker on detached member (label 1) / non-member (label 0) loss maps.

    Forward and loss run under ``autocast`` (the run's mixed precision, as the reference's attacker step does),
    the backward is a plain ``.backward()`` as there."""
    seen = join(member_maps, nonmember_maps)
    maps, t = seen.maps.detach(), seen.t
    labels = torch.cat([
        torch.full((as_seen(member_maps).maps.shape[0],), MEMBER, dtype=torch.long),
        torch.full((as_seen(nonmember_maps).maps.shape[0],), NONMEMBER, dtype=torch.long),
    ]).to(maps.device)
    attacker.train()
    if isinstance(attacker, ScalarAttacker):
        attacker.observe(maps, t)
    for _ in range(k_steps):
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            logits = logits_of(attacker, Seen(maps, t))
            loss = F.cross_entropy(logits, labels)
        loss.backward()
        if grad_sync is not None:
            grad_sync(attacker)
        optimizer.step()
    acc = (logits.argmax(-1) == labels).float().mean()
    return {"attacker_loss": loss.item(), "attacker_batch_acc": acc.item()}


@torch.no_grad()
def attacker_accuracy(attacker: Attacker, member_maps: Seen | torch.Tensor,
                      nonmember_maps: Seen | torch.Tensor) -> float:
    attacker.eval()
    pred_m = logits_of(attacker, as_seen(member_maps)).argmax(-1) == MEMBER
    pred_n = logits_of(attacker, as_seen(nonmember_maps)).argmax(-1) == NONMEMBER
    return torch.cat([pred_m, pred_n]).float().mean().item()


def logits_of(attacker: Attacker, seen: Seen) -> torch.Tensor:
    return attacker(seen.maps) if seen.t is None else attacker(seen.maps, seen.t)
