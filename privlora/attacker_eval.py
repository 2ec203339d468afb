"""The paper's own evaluation of the co-trained attacker: its accuracy on whole roles, with fresh noise.

The reference measures, every epoch, the proxy attacker's accuracy on all of D^m_te ∪ D^nm_te and on the aux
sets, each time on a fresh noise draw, and keeps the best attacker (``attack_model_best``). Here the noise is
drawn from a generator seeded by (seed, step): fresh at each evaluation, yet identical on a resumed run.
The fixed-noise probe in ``train`` is a different measurement (same noise every evaluation, a subset).
"""
from __future__ import annotations

import torch

from privlora.data.cache import RoleData

KEYS = {"attacker_train_acc": "attacker_aux_acc_fresh", "attacker_test_acc": "attacker_test_acc_fresh"}
BEST_SUFFIX = "_best"  # <name>.attacker_best.safetensors (the reference's attack_model_best)


def eval_roles(roles: dict[str, RoleData], n: int | None, seed: int) -> dict[str, RoleData]:
    """Every role whole (the reference), or a seeded random subset of n per role."""
    if n is None:
        return dict(roles)
    gen = torch.Generator().manual_seed(seed)
    return {r: d.subset(min(n, len(d)), gen) for r, d in roles.items()}


@torch.no_grad()
def fresh_noise_maps(roles: dict[str, RoleData], denoiser, seed: int, calibrated: bool,
                     batch_size: int = 64) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Loss maps of every sample on noise drawn from ``seed`` (and the base model's on the same noise)."""
    gen = torch.Generator().manual_seed(seed)
    maps: dict[str, torch.Tensor] = {}
    refs: dict[str, torch.Tensor] = {}
    for role, data in roles.items():
        chunks, ref_chunks = [], []
        for s in range(0, len(data), batch_size):
            batch = torch.utils.data.default_collate([data[i] for i in range(s, min(s + batch_size, len(data)))])
            noise, t = denoiser.draw(batch, gen)
            chunks.append(denoiser.loss_map(batch, noise=noise, timesteps=t)[0].float())
            if calibrated:
                ref_chunks.append(denoiser.reference_map(batch, noise, t).float())
        maps[role] = torch.cat(chunks)
        if calibrated:
            refs[role] = torch.cat(ref_chunks)
    return maps, (refs if calibrated else None)


def evaluate_attacker(objective, roles: dict[str, RoleData], denoiser, seed: int) -> dict[str, float]:
    """``attacker_test_acc_fresh`` (member_test ∪ nonmember_test) and ``attacker_aux_acc_fresh``; {} without one."""
    if not objective.modules():
        return {}
    calibrated = getattr(objective, "attacker_input", "loss_map") == "calibrated"
    maps, refs = fresh_noise_maps(roles, denoiser, seed, calibrated)
    return {KEYS[k]: v for k, v in objective.evaluate(maps, refs).items() if k in KEYS}
