"""What an attack's ROC suggests about differential privacy: a HEURISTIC empirical lower bound on ε.

Heuristic, because it treats the per-example scores of one trained model as independent trials, which they are
not (the examples were trained on together). The sound one-run bound is the canary audit (``attacks/canary.py``);
this one stays as a quick flag on any audit. Over several attacks the confidence is split (Bonferroni): the best
attack's bound holds at the stated confidence only if each attack's is computed at confidence 1 − (1 − c)/n.

An (ε, δ)-DP training run bounds every membership test: TPR ≤ e^ε·FPR + δ and TNR ≤ e^ε·FNR + δ (Kairouz et
al. 2015). So each threshold of an attack's ROC gives ε ≥ ln((TPR − δ)/FPR) and ε ≥ ln((TNR − δ)/FNR). The
conservative bound replaces TPR/TNR by Clopper–Pearson lower and FPR/FNR by upper confidence limits, with a
Bonferroni correction over every threshold and both inequalities, so it holds at the stated confidence for the
whole curve (Jagielski et al. 2020 use the same construction). Small audits certify little: even a perfect
attack certifies only 3.0 at 200 members vs 200 non-members.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import beta

from privlora.attacks.metrics import roc


def _cp_lower(k: np.ndarray, n: int, alpha: float) -> np.ndarray:
    return np.where(k > 0, beta.ppf(alpha, k, n - k + 1), 0.0)


def _cp_upper(k: np.ndarray, n: int, alpha: float) -> np.ndarray:
    return np.where(k < n, beta.ppf(1 - alpha, k + 1, n - k), 1.0)


def _log_ratio(num: np.ndarray, den: np.ndarray) -> float:
    ok = (num > 0) & (den > 0)
    return float(np.max(np.log(num[ok] / den[ok]), initial=0.0))


def empirical_epsilon(member, nonmember, delta: float = 0.0, confidence: float = 0.95) -> dict[str, Any]:
    member, nonmember = np.asarray(member, float), np.asarray(nonmember, float)
    n1, n0 = len(member), len(nonmember)
    fpr, tpr, _ = roc(member, nonmember)
    tp, fp = np.rint(tpr * n1), np.rint(fpr * n0)
    point = max(_log_ratio(tpr - delta, fpr), _log_ratio(1 - fpr - delta, 1 - tpr))
    alpha = (1 - confidence) / (2 * len(fpr))
    tpr_lo, fpr_hi = _cp_lower(tp, n1, alpha), _cp_upper(fp, n0, alpha)
    tnr_lo, fnr_hi = _cp_lower(n0 - fp, n0, alpha), _cp_upper(n1 - tp, n1, alpha)
    lower = max(_log_ratio(tpr_lo - delta, fpr_hi), _log_ratio(tnr_lo - delta, fnr_hi))
    return {"epsilon_lower_bound": lower, "epsilon_point": point, "delta": delta, "confidence": confidence,
            "n_member": n1, "n_nonmember": n0}


def claimed_dp(metadata: dict[str, str]) -> tuple[float, float] | None:
    """(ε, δ) a DP-LoRA file states in its metadata, or None."""
    try:
        return float(metadata["privlora_dp_epsilon"]), float(metadata["privlora_dp_delta"])
    except (KeyError, ValueError):
        return None


def dp_check(scores: dict[str, dict[str, np.ndarray]], metadata: dict[str, str], tpr_at_1pct: dict[str, float],
             confidence: float = 0.95) -> dict[str, Any]:
    """The largest certified ε over the attacks, and for a DP-LoRA file whether it is consistent with its claim."""
    claim = claimed_dp(metadata)
    delta = claim[1] if claim else 0.0
    each = 1 - (1 - confidence) / len(scores)  # Bonferroni over the attacks: the best one is picked afterwards
    bounds = {a: empirical_epsilon(s["member_test"], s["nonmember_test"], delta, each) for a, s in scores.items()}
    best = max(bounds, key=lambda a: bounds[a]["epsilon_lower_bound"])
    out: dict[str, Any] = {"attack": best, **bounds[best], "confidence": confidence, "confidence_per_attack": each,
                           "kind": "heuristic: one model's per-example scores treated as independent trials; "
                                   f"Bonferroni over {len(scores)} attack(s)",
                           "per_attack": {a: b["epsilon_lower_bound"] for a, b in bounds.items()}}
    if claim:
        eps, delta = claim
        limit = min(1.0, math.exp(eps) * 0.01 + delta) if math.isfinite(eps) else 1.0
        out.update(claimed_epsilon=eps, claimed_delta=delta, tpr_at_1pct_fpr_limit=limit,
                   consistent=bounds[best]["epsilon_lower_bound"] <= eps,
                   tpr_at_1pct_fpr_within_limit=all(v <= limit for v in tpr_at_1pct.values()))
    return out
