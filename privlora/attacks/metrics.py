"""Membership-inference metrics from member / non-member scores (higher score = "member").

AUC is scikit-learn's ``roc_auc_score``; the ROC is ``roc_curve`` with every threshold kept. ASR is the accuracy
of the best single threshold (SecMI/PIA's definition). TPR at a fixed FPR is read off the ROC by linear
interpolation between its points; where the ROC is vertical at exactly that FPR, the highest TPR reached there.
Confidence intervals: percentile bootstrap, members and non-members resampled separately, seeded; and for every
TPR at a fixed FPR an exact Clopper–Pearson interval on the members caught at that operating point, reported only
where the non-members can resolve the FPR (at least 1/FPR of them), else "not estimable" with the count needed.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import beta
from sklearn.metrics import auc as area_under, roc_auc_score, roc_curve

# 5%: the MP-LoRA paper's tables; 1% and 0.1%: the low-FPR regime (Carlini et al.).
FPR_TARGETS = {"tpr_at_5pct_fpr": 0.05, "tpr_at_1pct_fpr": 0.01, "tpr_at_0.1pct_fpr": 0.001}
METRICS = ("auc", "asr", *FPR_TARGETS)


def is_held_out(result: dict[str, Any]) -> bool:
    """Whether an attack's result (an entry of a report's ``results``) is a held-out measurement: true unless the
    attack's details say ``held_out: False`` (it was trained or chosen on the test samples with their labels).
    The one rule: the audit's notes and ε bound, the report, ``privlora select`` and the bench's table use it."""
    return (result.get("details") or {}).get("held_out", True) is not False


def _labelled(member: np.ndarray, nonmember: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.concatenate([np.ones(len(member)), np.zeros(len(nonmember))])
    return labels, np.concatenate([member, nonmember]).astype(np.float64)


def roc(member: np.ndarray, nonmember: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) with every distinct threshold (a sample is called a member when score ≥ threshold)."""
    labels, scores = _labelled(member, nonmember)
    return roc_curve(labels, scores, drop_intermediate=False)


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """TPR at FPR = target on the piecewise-linear ROC through (fpr, tpr), both non-decreasing."""
    at_or_below = np.flatnonzero(fpr <= target)
    i = at_or_below[-1]  # roc_curve starts at (0, 0), so there is always one
    if fpr[i] == target or i + 1 == len(fpr):
        return float(tpr[i])
    j = i + 1
    weight = (target - fpr[i]) / (fpr[j] - fpr[i])
    return float(tpr[i] + weight * (tpr[j] - tpr[i]))


def best_accuracy(fpr: np.ndarray, tpr: np.ndarray, n_member: int, n_nonmember: int) -> float:
    correct = tpr * n_member + (1.0 - fpr) * n_nonmember
    return float(correct.max() / (n_member + n_nonmember))


def point_metrics(member: np.ndarray, nonmember: np.ndarray, *, fast_auc: bool = False) -> dict[str, float]:
    fpr, tpr, _ = roc(member, nonmember)
    if fast_auc:  # the trapezoid of the same ROC: equal to roc_auc_score, without recomputing the curve
        auc_value = float(area_under(fpr, tpr))
    else:
        auc_value = float(roc_auc_score(*_labelled(member, nonmember)))
    out = {"auc": auc_value, "asr": best_accuracy(fpr, tpr, len(member), len(nonmember))}
    out.update({name: tpr_at_fpr(fpr, tpr, target) for name, target in FPR_TARGETS.items()})
    return out


def bootstrap(member: np.ndarray, nonmember: np.ndarray, n: int, seed: int,
              level: float = 0.95) -> dict[str, list[float]]:
    """Percentile intervals of every metric over n stratified resamples."""
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {m: [] for m in METRICS}
    for _ in range(n):
        m = member[rng.integers(0, len(member), len(member))]
        nm = nonmember[rng.integers(0, len(nonmember), len(nonmember))]
        for name, value in point_metrics(m, nm, fast_auc=True).items():
            draws[name].append(value)
    tail = (1.0 - level) / 2 * 100
    return {name: [float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))] for name, v in draws.items()}


def nonmembers_needed(target: float) -> int:
    """Non-members needed before FPR = target is one false positive or more (below it, not estimable)."""
    return math.ceil(round(1.0 / target, 9))


def clopper_pearson(k: int, n: int, level: float = 0.95) -> list[float]:
    """The exact (Clopper–Pearson) interval of a binomial proportion k/n."""
    tail = (1.0 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(tail, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1.0 - tail, k + 1, n - k))
    return [lo, hi]


def members_caught(member: np.ndarray, nonmember: np.ndarray, target: float) -> int:
    """Members called members by the most permissive threshold whose FPR on these non-members is ≤ target (the
    ROC point at or left of the target, not the interpolation)."""
    fpr, tpr, _ = roc(member, nonmember)
    return int(round(float(tpr[np.flatnonzero(fpr <= target)[-1]]) * len(member)))


def low_fpr_intervals(member: np.ndarray, nonmember: np.ndarray, level: float = 0.95) -> dict[str, Any]:
    """Per FPR level: whether the non-members can resolve it, how many it needs, and a Clopper–Pearson interval on
    the TPR at that operating point (None where not estimable)."""
    estimable = {name: len(nonmember) >= nonmembers_needed(t) for name, t in FPR_TARGETS.items()}
    cp = {name: clopper_pearson(members_caught(member, nonmember, t), len(member), level) if estimable[name]
          else None for name, t in FPR_TARGETS.items()}
    return {"estimable": estimable, "nonmembers_needed": {n: nonmembers_needed(t) for n, t in FPR_TARGETS.items()},
            "tpr_cp95": cp}


def small_set_notes(n_nonmember: int) -> list[str]:
    notes = []
    for name, target in FPR_TARGETS.items():
        if n_nonmember * target < 1:
            notes.append(f"{name}: only {n_nonmember} non-members (< {round(1 / target)}), so FPR {target:g} is below "
                         "one "
                         "false positive; the value is interpolated towards the (0, 0) corner and is not a reliable "
                         "estimate")
    return notes


def sanitize(scores: np.ndarray) -> tuple[np.ndarray, int]:
    """Non-finite scores (a model producing NaN) become the least member-like finite value; returns the count."""
    scores = np.asarray(scores, dtype=np.float64)
    bad = ~np.isfinite(scores)
    if bad.any():
        finite = scores[~bad]
        low = finite.min() - 1.0 if finite.size else 0.0
        scores = np.where(bad, low, scores)
    return scores, int(bad.sum())


def decision_accuracy(member: np.ndarray, nonmember: np.ndarray, threshold: float) -> float:
    """Accuracy of a fixed rule "member if score > threshold" (an attacker's own decision, e.g. argmax)."""
    correct = np.count_nonzero(member > threshold) + np.count_nonzero(nonmember <= threshold)
    return correct / (len(member) + len(nonmember))


def evaluate(member, nonmember, *, seed: int, n_bootstrap: int = 1000,
             threshold: float | None = None) -> dict[str, Any]:
    """Every metric, its bootstrap interval, and notes on anything that limits it; with ``threshold``, also the
    accuracy of the attack's own decision rule (``decision_accuracy``)."""
    both, bad = sanitize(np.concatenate([np.asarray(member, float), np.asarray(nonmember, float)]))
    member, nonmember = both[:len(member)], both[len(member):]
    result: dict[str, Any] = {"n_member": len(member), "n_nonmember": len(nonmember)}
    result.update(point_metrics(member, nonmember))
    if threshold is not None:
        result["decision_accuracy"] = decision_accuracy(member, nonmember, threshold)
    if n_bootstrap:
        result["ci95"] = bootstrap(member, nonmember, n_bootstrap, seed)
    notes = small_set_notes(len(nonmember))
    if bad:
        notes.append(f"{bad} non-finite scores were counted as least member-like")
    result["reliable"] = {name: len(nonmember) * target >= 1 for name, target in FPR_TARGETS.items()}
    result.update(low_fpr_intervals(member, nonmember))
    # two-sided leakage: an attack whose scores run the wrong way is exploitable by flipping them
    result["abs_auc_gap"] = abs(result["auc"] - 0.5)
    flipped = point_metrics(-member, -nonmember, fast_auc=True)
    result["inverted"] = {name: flipped[name] for name in FPR_TARGETS}
    result["notes"] = notes
    return result
