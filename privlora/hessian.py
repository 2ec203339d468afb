"""The largest Hessian eigenvalue of a loss w.r.t. some parameters: power iteration on Hessian-vector products.

Each product is a double backward (the gradient of ⟨∇L, v⟩), so one iteration costs about two backward passes.
The estimate is the Rayleigh quotient vᵀHv of the last unit vector; power iteration converges to the eigenvalue
of largest magnitude, so a strongly negative-curved loss can report a negative value.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def hessian_vector_product(grads: list[torch.Tensor], params: list[torch.Tensor],
                           v: list[torch.Tensor]) -> list[torch.Tensor]:
    dot = sum((g * x).sum() for g, x in zip(grads, v))
    hv = torch.autograd.grad(dot, params, retain_graph=True, allow_unused=True)  # type: ignore[arg-type]  # sum() of tensors: Tensor
    return [torch.zeros_like(p) if h is None else h for h, p in zip(hv, params)]


def top_eigenvalue(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor], iters: int = 10,
                   generator: torch.Generator | None = None) -> float:
    """vᵀHv after ``iters`` power-iteration steps from a random (seeded) start; ``loss_fn`` is called once."""
    params = [p for p in params if p.requires_grad]
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    v = _normalise([torch.randn(p.shape, generator=generator).to(p.device, p.dtype) for p in params])
    eigenvalue = 0.0
    for _ in range(iters):
        hv = hessian_vector_product(list(grads), params, v)
        eigenvalue = float(sum((h * x).sum() for h, x in zip(hv, v)))
        v = _normalise(hv)
    return eigenvalue


def _normalise(vs: list[torch.Tensor]) -> list[torch.Tensor]:
    norm = torch.sqrt(sum((x.detach().float() ** 2).sum() for x in vs)).clamp_min(1e-12)  # type: ignore[arg-type]
    return [(x.detach() / norm).to(x.dtype) for x in vs]
