"""The bench's plots: training curves per run (one colour per run in every panel) and the frontier."""
from __future__ import annotations

from privlora.plotting import new_figure, png_bytes

# (history key, title); "<key>_mean" (the mean over the steps since the previous evaluation) is drawn
# where a run logged it
CURVES = [("L_ada", "L_ada"), ("L_adv", "L_adv"), ("attacker_test_acc", "attacker test acc"),
          ("member_gap", "held-out gap (nonmember − member loss)"), ("grad_norm", "LoRA grad norm")]


def run_colours(names: list[str]) -> dict[str, str]:
    """A fixed colour per run, in run order, so a run looks the same in every panel and plot."""
    cycle = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9"]
    return {n: cycle[i % len(cycle)] for i, n in enumerate(names)}


def curve(epochs: list[dict], key: str) -> tuple[list, list, bool]:
    """(epochs, values, is_mean) of one key: the mean over each evaluation period where logged, else the last
    step's value."""
    mean = f"{key}_mean"
    use = mean if any(mean in e for e in epochs) else key
    xs = [e["epoch"] for e in epochs if use in e]
    return xs, [e[use] for e in epochs if use in e], use == mean


def curves_png(histories: dict[str, dict]) -> bytes:
    colours = run_colours(list(histories))
    with_hessian = any(h.get("hessian") for h in histories.values())
    panels = len(CURVES) + with_hessian
    fig = new_figure(figsize=(4.2 * panels, 3.4))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax, (key, title) in zip(axes, CURVES):
        means = False
        for run, h in histories.items():
            xs, ys, is_mean = curve(h["epochs"], key)
            means |= is_mean
            if xs:
                ax.plot(xs, ys, color=colours[run], label=run)
        ax.set_title(f"{title} ({'period mean' if means else 'last step'})" if key in ("L_ada", "L_adv", "grad_norm")
                     else title)
        ax.set_xlabel("epoch")
    if with_hessian:  # sharpness: the top Hessian eigenvalue of each run's LoRA loss (hessian_every_n_steps)
        for run, h in histories.items():
            points = h.get("hessian", [])
            axes[-1].plot([p["step"] for p in points], [p["hessian_top_eig"] for p in points], color=colours[run],
                          label=run)
        axes[-1].set_title("top Hessian eigenvalue")
        axes[-1].set_xlabel("step")
    axes[0].legend(fontsize=7)
    return _save(fig)


def frontier_png(table: dict) -> bytes:
    rows = table["rows"]
    fig = new_figure(figsize=(5.5, 4.2))
    ax = fig.subplots()
    pts = [(rows[n]["heldout_loss"], rows[n]["best_auc"], n) for n in table["frontier"]]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="gray", label="plain LoRA, training less")
    for x, y, n in pts:
        ax.annotate(n, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    defences = [n for n in rows if "frontier_verdict" in rows[n]]
    colours = run_colours([table["frontier"][-1], *defences])
    for name, marker in zip(defences, "s*DPXvh^<>"):
        ax.plot(rows[name]["heldout_loss"], rows[name]["best_auc"], marker, color=colours[name], markersize=10,
                label=name)
    rec = (table.get("recommendation") or {}).get("model")
    if rec in rows:
        ax.plot(rows[rec]["heldout_loss"], rows[rec]["best_auc"], "o", markersize=16, mfc="none", color="k",
                label=f"recommended: {rec}")
    ax.axhline(0.5, ls=":", color="k", lw=0.8)
    ax.set_xlabel("held-out denoising loss on nonmember_test (lower = more useful)")
    ax.set_ylabel("best-attack AUC (lower = more private)")
    ax.legend(fontsize=7)
    return _save(fig)


def _save(fig) -> bytes:
    fig.tight_layout()
    return png_bytes(fig, dpi=110)
