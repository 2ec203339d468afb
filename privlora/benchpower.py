"""Verdicts with power: each run's leakage over seeds × images, and its paired distance from the train-less frontier.

A bench with several seeds has one replicate per seed: its own split (with ``--resplit``), its own trainings and
its own audit of the same roles for every model of that seed. Every statistic here is resampled the same way:
the seeds with replacement, and within each drawn seed the member_test and nonmember_test images with replacement,
the same images for every model of the seed (a paired design: the models are compared on the same queries).

Leakage is two-sided: an attack whose scores rank members *lower* identifies them as well as one that ranks them
higher, so an AUC of 0.3 is as much leakage as 0.7. A model's leakage is its best held-out attack's folded AUC,
0.5 + |AUC − 0.5|, and its best TPR at 1 % FPR over both directions. Utility is the held-out loss (the loss attack's
mean nonmember_test loss). The frontier of a seed runs through the base model and the plain-LoRA budgets of that
seed (``benchtable.frontier_auc``; a model more useful than every point is compared with the most useful one). The
distance from the frontier is the model's leakage minus the frontier's at the model's held-out loss: negative is
more private than training less. The verdict is "above" (more private) or "below" only when the 95 % interval of
the mean distance excludes zero, and "indistinguishable" otherwise. A defence whose model is no more useful than
the base model on a seed (held-out loss not lower) is named with those seeds: its low leakage there is that of a
model that did not learn, not a defence's (MP-LoRA's min-max game diverges so, docs/benchmarks.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

from privlora.attacks.metrics import is_held_out, sanitize
from privlora.benchtable import frontier_auc

ROLES = ("member_test", "nonmember_test")
NAMES = {"leakage": "best_auc_two_sided", "tpr": "best_tpr_at_1pct_fpr_two_sided", "heldout": "heldout_loss",
         "distance": "frontier_distance"}
LOW_FPR = 0.01


@dataclass
class Replicate:
    """One seed's audit: per model, per held-out attack, the member_test and nonmember_test scores (the same images,
    in the same order, for every model), and which models form that seed's frontier."""

    seed: int
    scores: dict[str, dict[str, dict[str, np.ndarray]]]  # model -> attack -> role -> scores
    frontier: list[str]  # base, then the budgets and the full-length plain LoRA
    runs: dict[str, str]  # run name -> this seed's model name
    leakage_attacks: list[str] | None = None  # the attacks that count as leakage (None: all); ``restrict``


def replicate_from_report(seed: int, report: dict, frontier: list[str], runs: dict[str, str]) -> Replicate:
    """A replicate from an audit's report.json: only attacks whose numbers are held-out measurements."""
    scores: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for model in report["models"]:
        scores[model["name"]] = {attack: _clean(s) for attack, s in model["scores"].items()
                                 if is_held_out(model["results"].get(attack, {}))}
    return Replicate(seed, scores, frontier, runs)


def restrict(rep: Replicate, attacks: list[str]) -> Replicate:
    """The replicate as seen by these attacks only (e.g. the single-model ones, to set their verdict beside the
    shadow attacks'). The loss attack's scores stay, as the utility; a model none of these attacks scored (the base
    model under shadow attacks that had no shadows for it) drops out of the comparison."""
    scores = {m: {a: s for a, s in by_attack.items() if a in attacks or a == "loss"}
              for m, by_attack in rep.scores.items() if any(a in attacks for a in by_attack)}
    return Replicate(rep.seed, scores, rep.frontier, rep.runs, list(attacks))


def _clean(scores: dict) -> dict[str, np.ndarray]:
    """Non-finite scores become the least member-like value, over both roles together, as the audit's metrics do."""
    member, nonmember = (np.asarray(scores[r], dtype=np.float64) for r in ROLES)
    both, _ = sanitize(np.concatenate([member, nonmember]))
    return {"member_test": both[: len(member)], "nonmember_test": both[len(member):]}


def folded_auc(member: np.ndarray, nonmember: np.ndarray) -> np.ndarray:
    """0.5 + |AUC − 0.5| of each row pair (rows: resamples; ties count one half), via ranks."""
    n_m, n_n = member.shape[-1], nonmember.shape[-1]
    ranks = rankdata(np.concatenate([member, nonmember], axis=-1), axis=-1)
    auc = (ranks[..., :n_m].sum(-1) - n_m * (n_m + 1) / 2) / (n_m * n_n)
    return 0.5 + np.abs(auc - 0.5)


def two_sided_tpr(member: np.ndarray, nonmember: np.ndarray, fpr: float = LOW_FPR) -> np.ndarray:
    """The larger of TPR at FPR ≤ ``fpr`` calling high scores members and calling low scores members: the
    threshold lets at most ⌊fpr·n⌋ non-members through (a conservative operating point, no interpolation)."""
    k = int(math.floor(fpr * nonmember.shape[-1]))
    high = np.sort(nonmember, axis=-1)[..., nonmember.shape[-1] - 1 - k]
    low = np.sort(nonmember, axis=-1)[..., k]
    up = (member > high[..., None]).mean(-1)
    down = (member < low[..., None]).mean(-1)
    return np.maximum(up, down)


def _any_scores(rep: Replicate) -> dict[str, np.ndarray]:
    """One attack's scores of one model (every model of a seed is scored on the same images); a model without
    any of the kept attacks (the base model under shadow attacks it was not scored by) is passed over."""
    return next(next(iter(by_attack.values())) for by_attack in rep.scores.values() if by_attack)


def nonmembers(rep: Replicate) -> int:
    return len(_any_scores(rep)["nonmember_test"])


def _draws(rep: Replicate, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Resampled image indices, (n, members) and (n, non-members); row 0 is the data as measured."""
    first = _any_scores(rep)
    n_m, n_n = len(first["member_test"]), len(first["nonmember_test"])
    im, inm = rng.integers(0, n_m, (n, n_m)), rng.integers(0, n_n, (n, n_n))
    im[0], inm[0] = np.arange(n_m), np.arange(n_n)
    return im, inm


def _model_stats(attacks: dict[str, dict[str, np.ndarray]], im: np.ndarray, inm: np.ndarray,
                 leakage_attacks: list[str] | None = None) -> dict[str, np.ndarray]:
    """Per resample: best folded AUC, best two-sided TPR@1%FPR (over ``leakage_attacks``, default all), held-out
    loss (one value per row of im/inm)."""
    counted = [s for a, s in attacks.items() if leakage_attacks is None or a in leakage_attacks]
    aucs = [folded_auc(s["member_test"][im], s["nonmember_test"][inm]) for s in counted]
    tprs = [two_sided_tpr(s["member_test"][im], s["nonmember_test"][inm]) for s in counted]
    loss = attacks.get("loss")
    heldout = -loss["nonmember_test"][inm].mean(-1) if loss is not None else np.full(len(im), np.nan)
    return {"leakage": np.max(aucs, axis=0), "tpr": np.max(tprs, axis=0), "heldout": heldout}


def _frontier_distance(stats: dict[str, dict[str, np.ndarray]], frontier: list[str], model: str) -> np.ndarray:
    points = [(stats[f]["heldout"], stats[f]["leakage"]) for f in frontier if f in stats]
    out = np.empty(len(stats[model]["leakage"]))
    for b in range(len(out)):
        pts = [(float(h[b]), float(a[b])) for h, a in points]
        loss = float(stats[model]["heldout"][b])
        edge = frontier_auc(pts, loss)
        if math.isinf(edge):  # more useful than every baseline point: compare with the most useful one
            edge = min(pts)[1]
        out[b] = stats[model]["leakage"][b] - edge
    return out


def power_table(replicates: list[Replicate], defences: list[str], n_boot: int = 1000, seed: int = 0,
                level: float = 0.95) -> dict[str, dict]:
    """Per run (every run of the replicates, defences and the plain-LoRA baseline alike): mean and interval over
    seeds × images of its leakage, |AUC − 0.5|, TPR@1%FPR and held-out loss; for each defence, the paired distance
    from the frontier with its interval and verdict. ``n_boot`` = 0: point estimates only."""
    rng = np.random.default_rng(seed)
    n = max(1, n_boot) + 1
    per_seed = []
    unlearned: dict[str, list[int]] = {run: [] for run in defences}
    for rep in replicates:
        im, inm = _draws(rep, n, rng)
        stats = {m: _model_stats(a, im, inm, rep.leakage_attacks) for m, a in rep.scores.items() if a}
        for run, model in rep.runs.items():
            if run in defences and model in stats:
                stats[model]["distance"] = _frontier_distance(stats, rep.frontier, model)
                if _learned_nothing(stats, rep.frontier, model):
                    unlearned[run].append(rep.seed)
        per_seed.append({run: stats[model] for run, model in rep.runs.items() if model in stats})
    picks = rng.integers(0, len(per_seed), (n, len(per_seed)))
    picks[0] = np.arange(len(per_seed))  # row 0: every seed once, the data as measured
    tail = (1 - level) / 2 * 100
    out: dict[str, dict] = {}
    for run in replicates[0].runs:
        keys = [k for k in ("leakage", "tpr", "heldout", "distance") if all(k in s.get(run, {}) for s in per_seed)]
        if not keys:
            continue
        row: dict[str, Any] = {"n_seeds": len(per_seed), "seeds": [r.seed for r in replicates],
                               "tpr_estimable": all(nonmembers(r) >= 1 / LOW_FPR for r in replicates)}
        for key in keys:
            values = np.stack([s[run][key] for s in per_seed])  # (seeds, n)
            means = values[picks, np.arange(n)[:, None]].mean(1)  # (n,): per resample, the mean over drawn seeds
            interval = [float(np.percentile(means[1:], tail)), float(np.percentile(means[1:], 100 - tail))] \
                if n_boot > 0 else None
            row[NAMES[key]] = {"mean": float(means[0]), "ci95": interval, "per_seed": [float(v[0]) for v in values]}
        leak = row["best_auc_two_sided"]
        row["auc_gap"] = {"mean": leak["mean"] - 0.5, "ci95": None if leak["ci95"] is None else
                          [x - 0.5 for x in leak["ci95"]]}  # |AUC − 0.5|
        if "frontier_distance" in row:
            row["verdict"] = paired_verdict(row["frontier_distance"]["ci95"])
            row["learned_nothing_on_seeds"] = unlearned.get(run, [])
        out[run] = row
    return out


def _learned_nothing(stats: dict[str, dict[str, np.ndarray]], frontier: list[str], model: str) -> bool:
    """Whether the model is no more useful than the base model (the frontier's first point) on the data as
    measured: its leakage is then that of a model that did not learn, not a defence's (e.g. a diverged min-max
    game). False where the base model was not scored."""
    base = stats.get(frontier[0]) if frontier else None
    return base is not None and bool(stats[model]["heldout"][0] >= base["heldout"][0])


def paired_verdict(ci: list[float] | None) -> str:
    """"above" (more private than training less) or "below" only when the interval excludes zero."""
    if ci is None:
        return "no interval (n_bootstrap 0)"
    if ci[1] < 0:
        return "above"
    if ci[0] > 0:
        return "below"
    return "indistinguishable"
