"""A sound empirical ε from one training run: the canary audit of Steinke, Nasr & Jagielski, "Privacy Auditing with
One (1) Training Run" (NeurIPS 2023, arXiv 2305.08846).

m canaries are each put into the training set independently with probability ½ (the mask stays private). After
training, an auditor scores every canary, guesses IN for the k₊ highest scores and OUT for the k₋ lowest and
abstains on the rest. If training is (ε, δ)-DP, the number W of correct guesses among the r = k₊ + k₋ made obeys

    P[W ≥ v] ≤ P[Binomial(r, q) ≥ v] + 2·m·δ·max_{i=1..v} P[v − i ≤ Binomial(r, q) < v] / i,   q = e^ε / (1 + e^ε)

(their Theorem 3.1 with its δ term), i.e. it is no better than ε-randomized response on r independent guesses. So a
count v whose bound is below the level β rejects ε; the ε lower bound is the largest rejected ε. Unlike a bound
read off a ROC of per-example scores (``dp_audit``), this needs no independence between examples: the canaries'
independent coin flips are the trials.

Several guess sizes (k₊, k₋) may be tried; the confidence is then split over them (a union bound), so the best of
them still holds at the stated confidence.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import binom


def p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """An upper bound on P[≥ v of r guesses correct] for an (ε, δ)-DP run with m canaries."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 ≤ v ≤ r ≤ m, got v={v}, r={r}, m={m}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    below = np.cumsum(binom.pmf(v - np.arange(1, v + 1), r, q))  # P[v − i ≤ Bin < v] for i = 1..v
    worst = float(np.max(below / np.arange(1, v + 1)))
    return min(tail + 2 * m * delta * worst, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float = 0.0, level: float = 0.05,
                        tolerance: float = 1e-6) -> float:
    """The largest ε that v correct guesses out of r reject at ``level`` (0 when none is rejected)."""
    if r == 0 or p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < level:  # every ε up to `high` is rejected: look further
        low, high = high, 2 * high
        if high > 1e3:
            return math.inf
    while high - low > tolerance:
        mid = (low + high) / 2
        low, high = (mid, high) if p_value(m, r, v, mid, delta) < level else (low, mid)
    return low


def guess_sizes(m: int) -> list[tuple[int, int]]:
    """(k₊, k₋) tried, fixed before looking at the scores: 5, 10, 25 and 50 % of the canaries on each side."""
    sizes = sorted({max(1, round(m * f)) for f in (0.05, 0.1, 0.25, 0.5)})
    return [(k, k) for k in sizes if 2 * k <= m]


def audit(scores: np.ndarray, included: np.ndarray, delta: float = 0.0, confidence: float = 0.95) -> dict[str, Any]:
    """Guess on the highest (IN) and lowest (OUT) canary scores for every size of ``guess_sizes``; the ε lower
    bound at ``confidence`` holds for the best of them (the level is split over the sizes)."""
    scores, included = np.asarray(scores, float), np.asarray(included, bool)
    m = len(scores)
    order = np.argsort(-scores, kind="stable")  # most member-like first
    sizes = guess_sizes(m)
    level = (1 - confidence) / max(len(sizes), 1)
    tried = []
    for k_in, k_out in sizes:
        correct = int(included[order[:k_in]].sum() + (~included[order[m - k_out:]]).sum())
        eps = epsilon_lower_bound(m, k_in + k_out, correct, delta, level)
        tried.append({"k_in": k_in, "k_out": k_out, "guesses": k_in + k_out, "correct": correct, "epsilon": eps})
    best = max(tried, key=lambda t: t["epsilon"], default=None)
    return {"canaries": m, "included": int(included.sum()), "delta": delta, "confidence": confidence,
            "level_per_size": level, "tried": tried,
            "epsilon_lower_bound": best["epsilon"] if best else 0.0,
            "best": best}


def max_provable_epsilon(m: int, delta: float = 0.0, confidence: float = 0.95) -> float:
    """What a perfect auditor (every guess right) can prove with m canaries under ``guess_sizes``."""
    sizes = guess_sizes(m)
    level = (1 - confidence) / max(len(sizes), 1)
    return max((epsilon_lower_bound(m, 2 * k, 2 * k, delta, level) for k, _ in sizes), default=0.0)
