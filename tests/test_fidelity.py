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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hessian_top_eigenvalue_matches_the_exact_one_of_a_quadratic(seed):
    from privlora.hessian import top_eigenvalue

    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=torch.float64))
    eig = torch.tensor([5.0, 1.5, 1.0, 0.5, 0.2, -0.3, 0.1], dtype=torch.float64)
    a = q @ torch.diag(eig) @ q.T  # L(x, y) = ½ [x;y]ᵀ A [x;y] over two parameter tensors (3 + 4 entries)
    x = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 2, generator=g, dtype=torch.float64, requires_grad=True)

    def loss():
        z = torch.cat([x, y.flatten()])
        return 0.5 * z @ a @ z + (z ** 2).sum() * 0.0

    got = top_eigenvalue(loss, [x, y], iters=60, generator=torch.Generator().manual_seed(0))
    assert got == pytest.approx(torch.linalg.eigvalsh(a).max().item(), rel=1e-6)


def test_curves_plot_adds_a_hessian_panel_only_when_a_run_has_estimates():
    from privlora.protocol import curves_png

    epochs = [{"epoch": e, "L_ada": 1.0 / e, "grad_norm": 0.5, "member_gap": 0.0} for e in (1, 2)]
    without = curves_png({"lora": {"history": {"epochs": epochs}}})
    with_h = curves_png({"lora": {"history": {"epochs": epochs, "hessian": [{"step": 2, "hessian_top_eig": 3.0}]}}})
    from PIL import Image
    import io
    assert Image.open(io.BytesIO(with_h)).width > Image.open(io.BytesIO(without)).width
