"""Rendering an audit report: Markdown tables and the two figures, all in memory (the caller writes them)."""
from __future__ import annotations

from typing import Any

import numpy as np

from privlora.attacks.metrics import is_held_out, roc

COLUMNS = (("auc", "AUC"), ("asr", "ASR"), ("tpr_at_5pct_fpr", "TPR@5%FPR"), ("tpr_at_1pct_fpr", "TPR@1%FPR"),
           ("tpr_at_0.1pct_fpr", "TPR@0.1%FPR"))


def _cell(result: dict[str, Any], metric: str) -> str:
    if metric in result.get("estimable", {}):
        return _tpr_cell(result, metric)
    text = f"{result[metric]:.3f}"
    if "ci95" in result:
        lo, hi = result["ci95"][metric]
        text += f" [{lo:.3f}, {hi:.3f}]"
    if metric in result.get("reliable", {}) and not result["reliable"][metric]:
        text += " †"
    return text


def _tpr_cell(result: dict[str, Any], metric: str) -> str:
    """TPR at a fixed FPR with its Clopper–Pearson 95 % interval, or "n/e" where the non-members cannot resolve
    that FPR."""
    if not result["estimable"][metric]:
        return f"n/e (needs ≥ {result['nonmembers_needed'][metric]} non-members)"
    lo, hi = result["tpr_cp95"][metric]
    return f"{result[metric]:.3f} [{lo:.3f}, {hi:.3f}]"


def _short(sha: str) -> str:
    return sha[:12] + "…"


def markdown(report: dict[str, Any]) -> str:
    lines = ["# privlora membership-inference audit", ""]
    lines += _header(report)
    lines += _comparison(report)
    for model in report["models"]:
        lines += _model_table(report, model)
    lines += _dp_bounds(report)
    lines += _canary_audits(report)
    lines += _shadow_lines(report)
    lines += _attack_notes(report)
    return "\n".join(lines) + "\n"


def guarantee_cell(guarantee: str | None) -> str:
    """A DP-LoRA file's own statement of its guarantee; a void one (reproducible noise) in capitals."""
    if not guarantee:
        return ""
    return guarantee.upper() if guarantee.startswith("void") else guarantee.split(";")[0]


def _dp_bounds(report: dict[str, Any]) -> list[str]:
    """Empirical ε lower bounds (95 % confidence) and, for DP-LoRA files, whether the claim holds."""
    models = [m for m in report["models"] if m.get("dp_bound")]
    if not models:
        return []
    lines = ["## Differential privacy: a heuristic check", "",
             "Heuristic ε lower bound: the largest ε any attack's ROC suggests at 95 % (Clopper–Pearson, Bonferroni "
             "over thresholds and over the attacks). It treats one model's per-example scores as independent "
             "trials, which they are not, so it is a flag, not a proof; the sound bound is the canary audit "
             "(`--canaries`).", "",
             "| model | ε lower bound (attack) | ε point estimate | claimed ε (δ) | verdict | guarantee |",
             "|---|---|---|---|---|---|"]
    for m in models:
        b = m["dp_bound"]
        claim, verdict = "", ""
        if "claimed_epsilon" in b:
            claim = f"{b['claimed_epsilon']:.3g} ({b['claimed_delta']:.2g})"
            ok = b["consistent"] and b["tpr_at_1pct_fpr_within_limit"]
            verdict = "consistent" if ok else "VIOLATED: an attack does better than the claimed ε allows"
        lines.append(f"| {m['name']} | {b['epsilon_lower_bound']:.3f} ({b['attack']}) | {b['epsilon_point']:.3f} "
                     f"| {claim} | {verdict} | {guarantee_cell(m.get('dp_guarantee'))} |")
    return lines + [""]


def _shadow_lines(report: dict[str, Any]) -> list[str]:
    shadows = report.get("shadows")
    if not shadows:
        return []
    families = shadows.get("families")
    lines = ["## Shadow LoRAs (lira, lira_offline, rmia)", "",
             f"Trained by this audit: {shadows['trained_now']} shadow LoRA(s), {shadows['wall_seconds']:.0f} s; "
             "the others were reused from the cache."
             + (f" {families} famil{'y' if families == 1 else 'ies'} of shadow runs (one per audited run's "
                "settings and length; each checkpoint is compared with the shadows' same step)." if families else ""),
             ""]
    for lora, cost in shadows["per_lora"].items():
        step = f" at step {cost['steps']}" if cost.get("steps") is not None else ""
        lines.append(f"- `{lora}`: {cost['shadows']} shadows{step} in `{cost['folder']}` ({cost['reused']} reused)")
    exposed = [(m["name"], a, e) for m in report["models"] for a, e in (m.get("most_exposed") or {}).items()]
    if exposed:
        lines += ["", "Most exposed members (top 1 % by score; private: these name training images):", ""]
        lines += [f"- {name}, {attack}: " + ", ".join(f"`{x['path']}` ({x['score']:.3g})" for x in items)
                  for name, attack, items in exposed]
    return lines + [""]


def _canary_audits(report: dict[str, Any]) -> list[str]:
    models = [m for m in report["models"] if m.get("canary_audit")]
    if not models:
        return []
    lines = ["## Differential privacy: the one-run canary audit", "",
             "A sound 95 % lower bound on ε (Steinke, Nasr & Jagielski 2023): each canary was trained on with "
             "probability ½ by a secret coin; the attack guesses IN on the highest and OUT on the lowest scores; the "
             "confidence is split over the guess sizes tried. A DP-LoRA's claimed ε must not be below it.", "",
             "| model | canaries (trained) | attack | guesses | correct | ε lower bound | claimed ε |",
             "|---|---|---|---|---|---|---|"]
    for m in models:
        c = m["canary_audit"]
        best = c.get("best") or {"guesses": 0, "correct": 0}
        claim = "" if c.get("claimed_epsilon") is None else f"{c['claimed_epsilon']:.3g}"
        name = f"{m['name']} (control: trained on none)" if c.get("control") else m["name"]
        lines.append(f"| {name} | {c['canaries']} ({c['included']}) | {c['attack']} | {best['guesses']} "
                     f"| {best['correct']} | {c['epsilon_lower_bound']:.3f} | {claim} |")
    return lines + [""]


def _header(report: dict[str, Any]) -> list[str]:
    base, data, s = report["base_model"], report["data"], report["settings"]
    used = data["used"]
    return [
        f"- base model: `{base['name']}` (UNet sha256 `{_short(base['sha256'])}`, "
        f"{base['prediction_type']} prediction)",
        f"- splits: `{data['manifest']}` — test: {used['member_test']} members vs {used['nonmember_test']} "
        "non-members; "
        f"aux (fitting only): {used.get('member_aux', 0)} vs {used.get('nonmember_aux', 0)}",
        f"- seed {report['seed']}, resolution {s['resolution']}, UNet batch {s['batch_size']}, device {s['device']}, "
        f"{s['n_bootstrap']} bootstrap resamples (95% intervals in brackets; for TPR at a fixed FPR the exact "
        "Clopper–Pearson interval on the members caught there; n/e: too few non-members to resolve that FPR)",
        f"- wall time {report['wall_seconds']:.1f} s, "
        f"{report['unet_queries']['total_run']} UNet sample-evaluations run",
        *_cache_line(report),
        "",
    ]


def _cache_line(report: dict[str, Any]) -> list[str]:
    cache = report.get("model_cache")
    if not cache:
        return []
    reused = cache["reused"]
    return [f"- model cache `{cache['folder']}`: {len(reused)} of {len(report['models'])} models reused from earlier "
            "audits" + (f" ({', '.join(f'`{n}`' for n in reused)}; their seconds and UNet evaluations are those "
                        "audits', not counted above)" if reused else "")]


def _comparison(report: dict[str, Any]) -> list[str]:
    models = report["models"]
    lines = ["## Comparison across models", ""]
    for metric, label in (("auc", "AUC"), ("tpr_at_1pct_fpr", "TPR@1%FPR")):
        lines += [f"**{label}** (higher = more membership leakage; AUC 0.5 = chance)", ""]
        lines.append("| attack | queries/sample | " + " | ".join(f"`{m['name']}`" for m in models) + " |")
        lines.append("|---|---:|" + "---:|" * len(models))
        for name, spec in report["attacks"].items():
            cells = [_cell(m["results"][name], metric) if name in m["results"] else "—" for m in models]
            lines.append(f"| {name} | {spec['queries_per_sample']} | " + " | ".join(cells) + " |")
        lines.append("")
    if any(m.get("skipped") for m in models):
        lines += ["— : the attack does not apply to that model (its section says why).", ""]
    return lines


def _model_table(report: dict[str, Any], model: dict[str, Any]) -> list[str]:
    where = f" — `{model['path']}`" if model.get("path") else ""
    lines = [f"## Model `{model['name']}`{where}", "", f"sha256 `{model['sha256']}`", ""]
    for warning in model.get("warnings", []):
        lines.append(f"> warning: {warning}")
    lines += ["", "| attack | " + " | ".join(label for _, label in COLUMNS) + " | fit on aux |",
              "|---|" + "---:|" * len(COLUMNS) + "---|"]
    notes: list[str] = []
    for name, result in model["results"].items():
        fit = ", ".join(f"{k}={_fmt(v)}" for k, v in (result.get("fit") or {}).items()) or "—"
        lines.append(f"| {name} | " + " | ".join(_cell(result, m) for m, _ in COLUMNS) + f" | {fit} |")
        notes += [n for n in result.get("notes", []) if n not in notes]
    lines.append("")
    lines += [f"† {n}" for n in notes]
    lines += [_decision_line(report, name, r) for name, r in model["results"].items() if "decision_accuracy" in r]
    lines += [f"- {name}: not run on this model — {reason}" for name, reason in model.get("skipped", {}).items()]
    return lines + [""]


def _decision_line(report: dict[str, Any], name: str, result: dict[str, Any]) -> str:
    details = result.get("details") or {}
    where = f" (`{details['attacker_file']}`)" if "attacker_file" in details else ""
    line = f"- {name}{where}: {report['attacks'][name]['decision']['label']}: {result['decision_accuracy']:.3f}"
    if not is_held_out(result):
        line += " — not held out, see †"
    return line


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _attack_notes(report: dict[str, Any]) -> list[str]:
    lines = ["## Attacks", "", "Scores: higher = more likely a member. Queries: UNet evaluations per sample "
             "(loss, ref_loss and mlp share the same cached queries; "
             "ref_loss's base-model half is run once per audit).", ""]
    for name, spec in report["attacks"].items():
        params = ", ".join(f"{k}={v}" for k, v in spec["params"].items())
        lines.append(f"- **{name}** ({spec['queries_per_sample']} queries/sample): {spec['summary']}. Parameters: "
                     f"{params}.")
    return lines + [""]


# ------------------------------------------------------------------------------------------------ figures


def _grid(n: int, cols: int) -> tuple[int, int]:
    cols = max(1, min(cols, n))
    return (n + cols - 1) // cols, cols


def roc_png(scores: dict[str, dict[str, dict[str, np.ndarray]]], results: dict[str, dict[str, dict]]) -> bytes:
    """Log-log ROC per model (one panel each), one curve per attack, with the chance line."""
    from privlora.plotting import new_figure, png_bytes

    models = list(scores)
    rows, cols = _grid(len(models), 3)
    fig = new_figure(figsize=(4.4 * cols, 4.2 * rows))
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.13, top=0.93, wspace=0.3, hspace=0.4)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, model in zip(axes, models):
        floor = 1.0
        for attack, s in scores[model].items():
            fpr, tpr, _ = roc(s["member_test"], s["nonmember_test"])
            floor = min(floor, 0.5 / len(s["nonmember_test"]), 0.5 / len(s["member_test"]))
            auc = results[model][attack]["auc"]
            ax.plot(np.clip(fpr, floor, 1), np.clip(tpr, floor, 1), label=f"{attack} (AUC {auc:.3f})")
        ax.plot([floor, 1], [floor, 1], "k--", lw=0.8, label="chance")
        ax.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1.05), xlabel="false positive rate",
               ylabel="true positive rate", title=model)
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes[len(models):]:
        ax.set_visible(False)
    return png_bytes(fig)


def scores_png(scores: dict[str, dict[str, dict[str, np.ndarray]]],
               skipped: dict[str, dict[str, str]] | None = None) -> bytes:
    """Member vs non-member score histograms: one row per model, one column per attack (blank where an attack
    does not apply to a model)."""
    from privlora.plotting import new_figure, png_bytes

    models = list(scores)
    attacks = list(dict.fromkeys(a for m in models for a in [*scores[m], *(skipped or {}).get(m, {})]))
    fig = new_figure(figsize=(3.0 * len(attacks), 2.4 * len(models)))
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.08, top=0.9, wspace=0.3, hspace=0.5)
    axes = fig.subplots(len(models), len(attacks), squeeze=False)
    for r, model in enumerate(models):
        for c, attack in enumerate(attacks):
            ax = axes[r][c]
            if attack not in scores[model]:
                ax.set_axis_off()
                ax.set_title(f"{model}: {attack} (not run)", fontsize=8)
                continue
            s = scores[model][attack]
            both = np.concatenate([s["member_test"], s["nonmember_test"]])
            bins = np.histogram_bin_edges(both, bins=30) if np.ptp(both) > 0 else 3
            ax.hist(s["nonmember_test"], bins=bins, alpha=0.55, label="non-member")
            ax.hist(s["member_test"], bins=bins, alpha=0.55, label="member")
            ax.set_title(f"{model}: {attack}", fontsize=8)
            ax.tick_params(labelsize=6)
            ax.locator_params(axis="x", nbins=4)
            if r == 0 and c == 0:
                ax.legend(fontsize=7)
    return png_bytes(fig, dpi=80)
