"""Differential-privacy accounting for DP-LoRA, with Opacus' accountants used standalone (no model wrapping).

An accountant composes the Poisson-subsampled Gaussian mechanism over the steps taken: each step has noise
multiplier σ (noise std = σ·C for clipping norm C) and sampling rate q (each training image is in a batch
independently with probability q). ``rdp`` is Rényi-DP accounting (Mironov 2017; conservative), ``prv`` the
privacy-random-variable accountant (Gopi et al. 2021; tighter).
"""
from __future__ import annotations

import warnings

from privlora.errors import PrivloraError

ACCOUNTANTS = ("rdp", "prv")


def make_accountant(kind: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    if kind not in ACCOUNTANTS:
        raise PrivloraError(f"dp_accountant {kind!r} is not one of {', '.join(ACCOUNTANTS)}")
    return RDPAccountant() if kind == "rdp" else PRVAccountant()


DEFAULT_DELTA = 1e-5  # common practice for datasets up to ~10⁴ images: δ ≪ 1/N


def max_delta(num_images: int) -> float:
    """The largest δ accepted: 1/(10·N). A mechanism that leaks one whole image with probability δ is expected to
    leak N·δ images; at δ = 1/N that is one, so δ must sit well below it."""
    return 1.0 / (10 * max(num_images, 1))


def epsilon_spent(accountant, delta: float) -> float:
    if not accountant.history:
        return 0.0
    return float(accountant.get_epsilon(delta=delta))


def epsilon_for(noise_multiplier: float, sample_rate: float, steps: int, delta: float, kind: str) -> float:
    """ε after ``steps`` steps at (σ, q), without running them."""
    acc = make_accountant(kind)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return epsilon_spent(acc, delta)


def noise_multiplier_for(target_epsilon: float, delta: float, sample_rate: float, steps: int, kind: str) -> float:
    """The smallest σ (to 0.5 % of ε) whose ε after ``steps`` steps at rate q stays at or below the target."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():  # Opacus' RDP bracket search warns about its alpha grid; harmless here
            warnings.simplefilter("ignore", UserWarning)
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=sample_rate,
                                          steps=steps, accountant=kind,
                                              epsilon_tolerance=0.005 * target_epsilon))
    except ValueError as e:
        raise PrivloraError(f"dp_target_epsilon {target_epsilon}: no noise multiplier reaches it ({e})") from None
