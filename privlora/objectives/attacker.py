"""The proxy membership attacker h_ω of MP-/SMP-LoRA: an MLP on a (pooled) per-element loss map.

Reference form (Luo et al. 2025): Linear(4·64·64 → 512) → ReLU → Dropout(0.5) → Linear(512 → 256) → ReLU
→ Dropout(0.5) → Linear(256 → 2), cross-entropy, Adam(lr 1e-5, weight decay 1e-4). Pooling the loss map to
a fixed pool×pool grid makes the input size independent of the resolution; at 512² (64×64 latents) with
pool = 64 it is exactly the reference layout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from privlora.models.attacker_net import MEMBER, NONMEMBER, LossMapAttacker  # noqa: F401  (re-exported)


def adversarial_loss(attacker: LossMapAttacker, member_maps: torch.Tensor,
                     dropout_generator: torch.Generator | None = None) -> torch.Tensor:
    """L_adv: the attacker's cross-entropy against the label *member* on the training batch.

    Its gradient flows into the loss maps (hence the LoRA) only: the attacker's weights are used as constants.
    Without ``dropout_generator`` the attacker runs without dropout (the attacker the LoRA will face); with one
    it runs in train mode as the reference does, its dropout masks drawn from that (CPU, seeded) generator so
    a resumed run draws the same masks.
    """
    logits = detached_forward(attacker, member_maps, dropout_generator)
    labels = torch.full((member_maps.shape[0],), MEMBER, dtype=torch.long, device=member_maps.device)
    return F.cross_entropy(logits, labels)


def detached_forward(attacker: LossMapAttacker, maps: torch.Tensor,
                     dropout_generator: torch.Generator | None = None) -> torch.Tensor:
    """The attacker's logits with its weights as constants; dropout masks from ``dropout_generator`` if given."""
    x = attacker.features(maps.float())
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


def attacker_update(attacker: LossMapAttacker, optimizer: torch.optim.Optimizer, member_maps: torch.Tensor,
                    nonmember_maps: torch.Tensor, k_steps: int, grad_sync=None) -> dict[str, float]:
    """k Adam steps of the attacker on detached member (label 1) / non-member (label 0) loss maps."""
    maps = torch.cat([member_maps, nonmember_maps]).detach()
    labels = torch.cat([
        torch.full((member_maps.shape[0],), MEMBER, dtype=torch.long),
        torch.full((nonmember_maps.shape[0],), NONMEMBER, dtype=torch.long),
    ]).to(maps.device)
    attacker.train()
    for _ in range(k_steps):
        optimizer.zero_grad(set_to_none=True)
        logits = attacker(maps)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        if grad_sync is not None:
            grad_sync(attacker)
        optimizer.step()
    acc = (logits.argmax(-1) == labels).float().mean()
    return {"attacker_loss": loss.item(), "attacker_batch_acc": acc.item()}


@torch.no_grad()
def attacker_accuracy(attacker: LossMapAttacker, member_maps: torch.Tensor, nonmember_maps: torch.Tensor) -> float:
    attacker.eval()
    pred_m = attacker(member_maps).argmax(-1) == MEMBER
    pred_n = attacker(nonmember_maps).argmax(-1) == NONMEMBER
    return torch.cat([pred_m, pred_n]).float().mean().item()
