"""The paper's own evaluation of the co-trained attacker: its accuracy on whole roles, with fresh noise.

The reference measures, every epoch, the proxy attacker's accuracy on all of D^m_te ∪ D^nm_te and on the aux
sets, each time on a fresh noise draw, and keeps the best attacker (``attack_model_best``). Here the noise is
drawn from a generator seeded by (seed, step): fresh at each evaluation, yet identical on a resumed run.
The adversarial objectives run it as their ``evaluate_own`` hook (``fresh_accuracy``). The fixed-noise probe in
``train`` is a different measurement (same noise every evaluation, a subset).
"""
from __future__ import annotations

import torch

from privlora.data.cache import RoleData

KEYS = {"attacker_train_acc": "attacker_aux_acc_fresh", "attacker_test_acc": "attacker_test_acc_fresh"}


def eval_roles(roles: dict[str, RoleData], n: int | None, seed: int) -> dict[str, RoleData]:
    """Every role whole (the reference), or a seeded random subset of n per role."""
    if n is None:
        return dict(roles)
    gen = torch.Generator().manual_seed(seed)
    return {r: d.subset(min(n, len(d)), gen) for r, d in roles.items()}


Maps = dict[str, torch.Tensor]


@torch.no_grad()
def fresh_noise_maps(roles: dict[str, RoleData], denoiser, seed: int, calibrated: bool, batch_size: int = 64,
                     draws: int = 1) -> tuple[Maps, Maps | None, Maps]:
    """Loss maps of every sample on noise drawn from ``seed`` (and the base model's on the same noise), with their
    timesteps: (N, C, H, W) and (N,) for one draw; (N, K, C, H, W) and (N, K) for K draws per sample."""
    gen = torch.Generator().manual_seed(seed)
    maps: Maps = {}
    refs: Maps = {}
    steps: Maps = {}
    for role, data in roles.items():
        chunks: list[tuple[torch.Tensor, ...]] = []
        for s in range(0, len(data), batch_size):
            batch = torch.utils.data.default_collate([data[i] for i in range(s, min(s + batch_size, len(data)))])
            chunks.append(draw_maps(batch, denoiser, gen, calibrated, draws))
        maps[role], steps[role] = torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
        if calibrated:
            refs[role] = torch.cat([c[2] for c in chunks])
    return maps, (refs if calibrated else None), steps


def draw_maps(batch: dict, denoiser, gen: torch.Generator, calibrated: bool, draws: int) -> tuple[torch.Tensor, ...]:
    """(maps, timesteps[, base maps]) of one batch; K draws come from one call on the batch repeated K times."""
    big = batch if draws == 1 else repeat_batch(batch, draws)
    noise, t = denoiser.draw(big, gen)
    out = [denoiser.loss_map(big, noise=noise, timesteps=t)[0].float(), t]
    if calibrated:
        out.append(denoiser.reference_map(big, noise, t).float())
    if draws == 1:
        return tuple(out)
    b = out[0].shape[0] // draws
    return tuple(x.reshape(draws, b, *x.shape[1:]).transpose(0, 1) for x in out)


def repeat_batch(batch: dict, times: int = 2) -> dict:
    """The batch ``times`` over, copy after copy (tensors concatenated, caption lists repeated)."""
    return {k: torch.cat([v] * times) if torch.is_tensor(v) else list(v) * times for k, v in batch.items()}
