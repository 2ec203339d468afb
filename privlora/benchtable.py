"""The privacy–utility table of ``privlora bench`` / ``demo``: rows, the train-less frontier, the verdicts,
the recommendation under a leakage bound, the spread over seeds, and the table's Markdown."""
from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np

FRONTIER_MARGIN = 0.01  # AUC differences this small are noise at 200 vs 200 (one standard error ≈ 0.03)


def model_row(model: dict, quality: dict) -> dict:
    """One audited model (an entry of the audit's report.json) as a table row: its best attack among those run on
    it whose numbers are held-out measurements (an attack can be absent for a model: ``skipped`` in the report)."""
    from privlora.attacks.metrics import is_held_out

    results = {a: r for a, r in model["results"].items() if is_held_out(r)}
    aucs = {a: r["auc"] for a, r in results.items()}
    best = max(aucs, key=lambda a: aucs[a]) if aucs else None
    held_out = -float(np.mean(model["scores"]["loss"]["nonmember_test"])) if "loss" in model["scores"] else None
    return {"model": model["name"], "auc": aucs, "best_attack": best, "best_auc": aucs[best] if best else None,
            "best_tpr_at_1pct_fpr": max((r["tpr_at_1pct_fpr"] for r in results.values()), default=None),
            "heldout_loss": held_out, "proxy_fid": quality.get(model["name"], {}).get("fid_proxy_tiny"),
            "dp_guarantee": model.get("dp_guarantee")}


def frontier_verdict(best_auc: float, frontier: float) -> str:
    """"above" only when clearly more private than training less; within the margin is a tie ("on")."""
    if best_auc < frontier - FRONTIER_MARGIN:
        return "above"
    return "on" if best_auc <= frontier + FRONTIER_MARGIN else "below"


def frontier_auc(points: list[tuple[float, float]], loss: float) -> float:
    """Best-attack AUC the "train less" baseline reaches at this held-out loss or better.

    Any baseline point with a held-out loss ≤ ``loss`` is at least as useful, so the frontier is the lowest
    AUC among them, with straight lines between neighbouring points; ``inf`` where no point is that useful.
    """
    pts = sorted(points)
    best = min((auc for held_out, auc in pts if held_out <= loss), default=float("inf"))
    for (l0, a0), (l1, a1) in zip(pts, pts[1:]):
        if l0 < loss < l1:
            best = min(best, a0 + (a1 - a0) * (loss - l0) / (l1 - l0))
    return float(best)


def add_verdicts(rows: dict[str, dict], frontier_names: list[str], defences: list[str]) -> None:
    frontier = [(rows[n]["heldout_loss"], rows[n]["best_auc"]) for n in frontier_names]
    for name in defences:
        r = rows[name]
        r["frontier_auc_at_same_loss"] = frontier_auc(frontier, r["heldout_loss"])
        r["frontier_verdict"] = frontier_verdict(r["best_auc"], r["frontier_auc_at_same_loss"])
        r["above_frontier"] = r["frontier_verdict"] == "above"


def recommend(rows: dict[str, dict], max_auc: float, max_tpr_at_1fpr: float) -> dict:
    """The most useful model (lowest held-out loss) whose best-attack AUC ≤ ``max_auc`` and best TPR@1%FPR
    ≤ ``max_tpr_at_1fpr``; ties go to the lower AUC. ``model`` is None when no model meets the bound."""
    ok = [r for r in rows.values() if r["heldout_loss"] is not None
          and r["best_auc"] <= max_auc and r["best_tpr_at_1pct_fpr"] <= max_tpr_at_1fpr]
    bound = f"best-attack AUC ≤ {max_auc:g} and TPR@1%FPR ≤ {max_tpr_at_1fpr:g}"
    if not ok:
        return {"model": None, "max_auc": max_auc, "max_tpr_at_1fpr": max_tpr_at_1fpr,
                "reason": f"no model meets {bound}"}
    best = min(ok, key=lambda r: (r["heldout_loss"], r["best_auc"], r["model"]))
    return {"model": best["model"], "max_auc": max_auc, "max_tpr_at_1fpr": max_tpr_at_1fpr,
            "best_auc": best["best_auc"], "best_tpr_at_1pct_fpr": best["best_tpr_at_1pct_fpr"],
            "heldout_loss": best["heldout_loss"],
            "reason": f"the lowest held-out loss among the {len(ok)} model(s) with {bound}"}


def recommendation(rows: dict[str, dict], selection: dict | None) -> dict:
    """The one recommendation: the aux-only choice (``privlora select``), with its test-role numbers from the table
    — never a choice made on the test roles."""
    choice = (selection or {}).get("choice") or {}
    name = choice.get("model")
    if not name:
        return {"model": None, "chosen_on": "aux roles only (privlora select)",
                "reason": choice.get("reason") or "no aux-only selection was run"}
    r = rows.get(name, {})
    return {"model": name, "chosen_on": "aux roles only (privlora select)", "best_auc": r.get("best_auc"),
            "best_tpr_at_1pct_fpr": r.get("best_tpr_at_1pct_fpr"), "heldout_loss": r.get("heldout_loss"),
            "reason": f"{choice.get('reason')}; its test-role numbers are its row in the table"}


def seed_spread(rows_by_seed: dict[str, list[dict]]) -> dict[str, dict]:
    """Per run: mean and sample standard deviation of best AUC, loss AUC, held-out loss and proxy FID (where
    sampled) over its seeds."""
    out = {}
    for name, rows in rows_by_seed.items():
        stats: dict[str, Any] = {"n_seeds": len(rows)}
        for key, get in (("best_auc", lambda r: r["best_auc"]), ("loss_auc", lambda r: r["auc"].get("loss")),
                         ("heldout_loss", lambda r: r["heldout_loss"]), ("proxy_fid", lambda r: r.get("proxy_fid"))):
            xs = [get(r) for r in rows if get(r) is not None]
            if xs:
                stats[key] = {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                              "values": xs}
        out[name] = stats
    return out


def format_table(table: dict) -> str:
    """The rows in the table's order: the frontier, then each defence at its compared model, its final LoRA beside
    it when that is another file; the last column says how select chose (aux roles only)."""
    rows = table["rows"]
    head = ("| model | loss AUC | ref_loss AUC | best-attack AUC (attack) | best TPR@1%FPR | held-out loss "
            "| proxy FID (tiny) | train s | vs. train-less frontier | checkpoint choice (aux roles only) |")
    lines = [head, "|" + "---|" * 10]
    for name in rows:
        r = rows[name]
        auc = r["auc"]
        frontier = ""
        if "above_frontier" in r:
            frontier = f"{r['frontier_verdict']} (frontier AUC {r['frontier_auc_at_same_loss']:.3f})"
        if "above_frontier" in r and math.isinf(r["frontier_auc_at_same_loss"]):
            frontier = "above (more useful than every baseline point)"
        if r.get("frontier_distance"):  # the paired verdict over seeds × images
            frontier = f"{r['frontier_verdict']} ({_interval(r['frontier_distance'], '+.3f')})"
        label = f"{name} ({r['steps']} steps)" if r.get("steps") else name
        if (r.get("dp_guarantee") or "").startswith("void"):
            label += " (DP guarantee VOID: reproducible noise)"
        elif (r.get("dp_guarantee") or "").startswith("none"):
            label += " (no DP guarantee: σ = 0, clipping only)"
        lines.append(
            f"| {label} | {auc.get('loss', float('nan')):.3f} | {auc.get('ref_loss', float('nan')):.3f} "
            f"| {r['best_auc']:.3f} ({r['best_attack']}) | {r['best_tpr_at_1pct_fpr']:.3f} | {r['heldout_loss']:.4f} "
            f"| {_num(r['proxy_fid'])} | {_num(r.get('train_seconds'), '.0f')} | {frontier} | {choice_note(r)} |")
    return "\n".join(lines)


def choice_note(row: dict) -> str:
    """A defence's compared row: select's outcome and reason; its final LoRA's reference row: what it stands beside."""
    pick = row.get("pick")
    if pick:
        how = "chosen by select" if pick["outcome"] == "chosen" else "final LoRA compared"
        return f"{how}: {pick['reason']}"
    if row.get("reference_for"):
        return f"final LoRA, for reference only: compared at {row['reference_for']}"
    return ""


def format_extras(table: dict) -> str:
    """The recommendation, the spread over seeds and the aux-only selection estimate, as Markdown."""
    parts = []
    rec = table.get("recommendation")
    if rec:
        what = f"**{rec['model']}**" if rec["model"] else "**none**"
        parts.append(f"Recommendation (chosen on the aux roles only): {what} — {rec['reason']}.")
    oracle = table.get("oracle")
    if oracle and oracle.get("model"):
        parts.append(f"Oracle, for reference only (chosen on the test roles, which a real user does not have): "
                     f"{oracle['model']} — {oracle['reason']}.")
    wall = table.get("wall_seconds")
    if wall:
        jobs = (table.get("settings") or {}).get("jobs", 1)
        phases = ", ".join(f"{k} {v:.0f} s" for k, v in wall.items() if k != "total")
        parts.append(f"Wall time of this invocation: {wall['total']:.0f} s ({phases}; {jobs} job(s)).")
    if table.get("tuning"):
        parts.append(tuning_markdown(table["tuning"]))
    power = table.get("power")
    if power:
        parts.append(power_markdown(power, table.get("resplit")))
    single = table.get("power_single_model")
    if single:
        parts.append("The same comparison with the single-model attacks alone (no shadow attack): the verdicts "
                     "a weaker auditor would reach.\n\n" + power_rows(single))
    spread = table.get("seed_spread")
    if spread:
        columns = [("best_auc", ".3f", "best-attack AUC"), ("loss_auc", ".3f", "loss AUC"),
                   ("heldout_loss", ".4f", "held-out loss")]
        if any("proxy_fid" in s for s in spread.values()):
            columns.append(("proxy_fid", ".2f", "proxy FID"))
        lines = ["| run | seeds | " + " | ".join(f"{title} mean ± sd" for _, _, title in columns) + " |",
                 "|---|---|" + "---|" * len(columns)]
        for name, s in spread.items():
            cells = [_mean_sd(s.get(k), f) for k, f, _ in columns]
            lines.append(f"| {name} | {s['n_seeds']} | " + " | ".join(cells) + " |")
        parts.append("Spread over training seeds:\n\n" + "\n".join(lines))
    selection = table.get("selection")
    if selection:
        lines = ["| checkpoint | aux-only best AUC | test AUC, same attacks | test best-attack AUC "
                 "| aux-only held-out loss | test held-out loss |", "|---|---|---|---|---|---|"]
        for name, r in selection["rows"].items():
            lines.append(f"| {name} | {r['aux_best_auc']:.3f} | {_num(r['test_auc_same_attacks'])} "
                         f"| {_num(r['test_best_auc'])} | {_num(r['aux_heldout_loss'], '.4f')} "
                         f"| {_num(r['test_heldout_loss'], '.4f')} |")
        choice = selection["choice"]["model"] or "none"
        if selection.get("refused"):
            parts.append(f"Privacy-aware selection of plain LoRA's checkpoints on the aux roles refused: "
                         f"{selection['refused']}")
        else:
            parts.append(f"Privacy-aware selection of plain LoRA's checkpoints on the aux roles only "
                         f"({', '.join(selection['attacks'])}; `privlora select`, deciding on 95 % upper bounds), "
                         f"against the test-role audit of the same checkpoints; choice under the bound: "
                         f"**{choice}**:\n\n" + "\n".join(lines))
    return "\n\n".join(parts)


def tuning_markdown(tuning: dict[str, dict]) -> str:
    """Each tuned run's grid: every point's held-out loss on nonmember_aux, the chosen values, and for DP-LoRA what
    its (ε, δ) does not cover."""
    parts = ["Hyperparameters tuned on nonmember_aux only (`[runs.NAME.tune]`): every grid point trained at the "
             "first seed; its final LoRA's held-out denoising loss on nonmember_aux (seeded timesteps and noise, the "
             "same for every point); the lowest chosen (ties: the first in grid order), and the run then trained at "
             "every seed with it."]
    for run, record in tuning.items():
        keys = list(record["grid"])
        chosen = ", ".join(f"{k} = {v}" for k, v in record["chosen"].items())
        lines = ["| point | " + " | ".join(keys) + " | held-out loss on nonmember_aux |",
                 "|---|" + "---|" * (len(keys) + 1)]
        for point in record["points"]:
            mark = " (chosen)" if point["model"] == record["chosen_model"] else ""
            lines.append(f"| {point['model']}{mark} | " + " | ".join(str(point["values"][k]) for k in keys)
                         + f" | {point['heldout_loss']:.4f} |")
        caveat = f"\n\nDP caveat: {record['dp_caveat']}." if record.get("dp_caveat") else ""
        parts.append(f"**{run}** (seed {record['seed']}): chosen {chosen}.\n\n" + "\n".join(lines) + caveat)
    return "\n\n".join(parts)


def power_markdown(power: dict, resplit: bool | None) -> str:
    """The powered comparison: per run, means and 95 % intervals over seeds × images, and the paired verdict."""
    any_row = next(iter(power.values()))
    seeds = any_row["n_seeds"]
    how = (f"{seeds} seeds" + (", each with its own re-drawn split" if resplit else ", one split") if seeds > 1
           else "one seed (intervals over images only)")
    over = ("seeds × images (seeds and images resampled, the same images for every model of a seed)" if seeds > 1
            else "the test images (resampled, the same images for every model)")
    return (f"Paired comparison over {how}: mean [95 % interval] over {over}; leakage is two-sided (an inverted "
            "attack counts); each seed's frontier runs through its base model, budgets and full-length plain LoRA "
            "(not plain LoRA's aux-selected checkpoint, which only the first seed has); each defence is measured at "
            "the checkpoint select chose on that seed's own aux roles (its final LoRA where select refused, found "
            "none under the bound or chose the base model; table.json → power → models); a negative distance is "
            "more private than training less at the same held-out loss, and the verdict is above/below only when "
            "the interval excludes zero:\n\n"
            + power_rows(power))


def power_rows(power: dict) -> str:
    lines = ["| run | best-attack AUC, two-sided | |AUC − 0.5| | TPR@1%FPR, two-sided | held-out loss "
             "| distance from the train-less frontier | verdict |", "|---|---|---|---|---|---|---|"]
    for run, r in power.items():
        tpr = _interval(r["best_tpr_at_1pct_fpr_two_sided"]) if r["tpr_estimable"] else "n/e (< 100 non-members)"
        distance = _interval(r["frontier_distance"], "+.3f") if "frontier_distance" in r else "(the baseline)"
        verdict = r.get("verdict", "")
        if r.get("learned_nothing_on_seeds"):
            seeds = ", ".join(str(s) for s in r["learned_nothing_on_seeds"])
            verdict += f"; learned nothing on seed {seeds} (held-out loss no better than the base model's)"
        lines.append(f"| {run} | {_interval(r['best_auc_two_sided'])} | {_interval(r['auc_gap'])} | {tpr} "
                     f"| {_interval(r['heldout_loss'], '.4f')} | {distance} | {verdict} |")
    return "\n".join(lines)


def _interval(stat: dict, fmt: str = ".3f") -> str:
    ci = stat.get("ci95")
    text = format(stat["mean"], fmt)
    return text if not ci else f"{text} [{format(ci[0], fmt)}, {format(ci[1], fmt)}]"


def _mean_sd(stat: dict | None, fmt: str) -> str:
    return "" if not stat else f"{format(stat['mean'], fmt)} ± {format(stat['sd'], fmt)}"


def _num(x, fmt=".3f") -> str:
    return "" if x is None else format(x, fmt)
