"""Issue #12 pieces that need no model: the evaluation subsets, the Hessian estimate, caption handling."""
from pathlib import Path

import pytest
import torch

from privlora.config import TrainConfig
from privlora.data.cache import RoleData
from privlora.data.readers import Example
from privlora.train import probe_roles


def role(n, tag):
    examples = [Example(Path(f"/d/{tag}{i:03d}.png"), f"{tag} {i}") for i in range(n)]
    return RoleData(examples, resolution=8, latents=torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1))


def test_probe_subset_is_a_seeded_random_subset_not_the_first_in_path_order():
    roles = {"member_test": role(50, "m"), "nonmember_test": role(50, "n")}
    a = probe_roles(roles, TrainConfig(eval_samples=10, seed=1))
    b = probe_roles(roles, TrainConfig(eval_samples=10, seed=1))
    c = probe_roles(roles, TrainConfig(eval_samples=10, seed=2))
    picked = [e.path.name for e in a["member_test"].examples]
    assert picked == [e.path.name for e in b["member_test"].examples]  # seeded
    assert picked != [e.path.name for e in c["member_test"].examples]
    assert picked != [f"m{i:03d}.png" for i in range(10)] and len(set(picked)) == 10
    # latents travel with their examples
    sub = a["member_test"]
    assert [int(sub[i]["latents"].item()) for i in range(10)] == [int(p[1:4]) for p in picked]
