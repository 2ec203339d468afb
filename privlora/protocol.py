"""The miniature privacy benchmark behind ``privlora demo`` and ``benchmarks/privacy_bench.py``.

One generated private dataset and split; plain LoRA and each defence (MP-LoRA, SMP-LoRA, DP-LoRA at two privacy
levels: the runs of ``method_overrides``) trained with the same seed, split and epochs; plain LoRA's intermediate
checkpoints (and the base model itself) as the "train less" baseline;
every model audited with every attack on the same queries; utility as the held-out denoising loss on
nonmember_test (from the audit's ``loss`` attack, identical queries for every model) and a proxy FID of
generated samples against the nonmember_test images.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from privlora.io import write_bytes, write_json, write_text


@dataclass
class ProtocolSettings:
    n_member_test: int = 200
    n_nonmember_test: int = 200
    n_member_aux: int = 64
    n_nonmember_aux: int = 64
    epochs: int = 100  # enough for plain LoRA to overfit its members (60 epochs barely leaked: loss AUC ≈ 0.62)
    budgets: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5])  # of plain LoRA's epochs
    seed: int = 1337
    data_seed: int = 1
    data_style: str = "framed"  # a style tiny-sd was not pretrained on, so fine-tuning has utility to gain
    model: str = "tiny-sd"
    attacks: list[str] = field(default_factory=lambda: ["loss", "ref_loss", "mlp", "secmi", "pia", "clid"])
    n_bootstrap: int = 500
    quality_samples: int = 200  # generated images per model for the proxy FID
    sample_steps: int = 20
    guidance: float = 3.0
    eval_every_n_epochs: int = 5  # the per-epoch held-out probe would cost a quarter of the training time
    train: dict = field(default_factory=lambda: {  # shared by every method; conv LoRA is what makes it memorise
        "network_dim": 16, "network_alpha": 16, "conv_dim": 16, "conv_alpha": 16, "unet_lr": 1e-3,
        "train_batch_size": 16, "resolution": 32})
    # each defence run: its settings on top of ``train``; "method" defaults to the run's name. DP-SGD takes a
    # larger expected batch (64 of 264): its noise is added once per batch, so per-image noise falls with batch size
    method_overrides: dict = field(default_factory=lambda: {
        "mp_lora": {"privacy_alpha": 1.0, "attacker_lr": 1e-3, "k_steps": 1, "attacker_pool": 8},
        "smp_lora": {"privacy_alpha": 1.0, "privacy_beta": 1.0, "attacker_lr": 1e-3, "k_steps": 1, "attacker_pool": 8},
        "dp_lora_eps8": {"method": "dp_lora", "dp_target_epsilon": 8.0, "train_batch_size": 64},
        "dp_lora_eps1": {"method": "dp_lora", "dp_target_epsilon": 1.0, "train_batch_size": 64},
    })
    label: str = "full"

    @property
    def defences(self) -> list[str]:
        return list(self.method_overrides)

    @property
    def run_names(self) -> list[str]:
        return ["lora", *self.defences]

    @property
    def n_images(self) -> int:
        return self.n_member_test + self.n_nonmember_test + self.n_member_aux + self.n_nonmember_aux


def quick_settings() -> ProtocolSettings:
    return ProtocolSettings(n_member_test=100, n_nonmember_test=100, n_member_aux=32, n_nonmember_aux=32, epochs=30,
                            eval_every_n_epochs=3, n_bootstrap=200, quality_samples=100, sample_steps=10, label="quick")


def run_protocol(s: ProtocolSettings, out: Path, log=print) -> dict:
    from privlora.data import synthetic

    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not (data / ".complete").exists():
        synthetic.write_folder(data, s.n_images, seed=s.data_seed, namespace="private",
                               resolution=s.train["resolution"], style=s.data_style)
        (data / ".complete").touch()
    runs = {m: train_method(s, m, data, out / m, log) for m in s.run_names}
    loras = [runs[m]["lora"] for m in s.run_names] + [p for _, p in runs["lora"]["budget_files"]]
    log(f"auditing {len(loras)} LoRAs and the base model with {', '.join(s.attacks)}")
    report = audit(s, out, runs["lora"]["splits"], loras)
    quality = utility_quality(s, out, runs["lora"]["splits"], loras)
    table = build_table(s, report, quality, runs)
    write_outputs(s, out, table, runs)
    return table


def train_method(s: ProtocolSettings, name: str, data: Path, out: Path, log) -> dict:
    from privlora.config import build_config
    from privlora.train import train

    final = out / f"{name}.safetensors"
    save_every = budget_interval(s) if name == "lora" else None
    own = {"method": name, **s.method_overrides.get(name, {})}
    if not final.exists():
        overrides = {**s.train, **own, "train_data_dir": str(data),
                     "output_dir": str(out), "output_name": name, "max_train_epochs": s.epochs, "seed": s.seed,
                     "n_member_aux": s.n_member_aux, "n_member_test": s.n_member_test,
                     "n_nonmember_aux": s.n_nonmember_aux, "n_nonmember_test": s.n_nonmember_test,
                     "split_seed": s.seed, "pretrained_model_name_or_path": s.model, "eval_samples": 64,
                     "eval_every_n_epochs": s.eval_every_n_epochs,
                     "save_every_n_epochs": save_every, "overwrite": True}
        log(f"training {name} ({own['method']}, {s.epochs} epochs)")
        started = time.time()
        train(build_config(None, overrides))
        write_json(out / "train_time.json", {"seconds": time.time() - started})
    budget_files = ([(f, out / f"{name}-e{round(f * s.epochs):04d}.safetensors") for f in s.budgets]
                    if save_every else [])
    return {"lora": final, "splits": out / "splits.json", "history": json.loads((out / "history.json").read_text()),
            "seconds": json.loads((out / "train_time.json").read_text())["seconds"], "budget_files": budget_files}


def budget_interval(s: ProtocolSettings) -> int:
    epochs = [round(f * s.epochs) for f in s.budgets]
    if any(e < 1 or e >= s.epochs for e in epochs):
        raise ValueError(f"budgets {s.budgets} of {s.epochs} epochs must fall strictly inside the run")
    return math.gcd(*epochs)


def audit(s: ProtocolSettings, out: Path, splits: Path, loras: list[Path]) -> dict:
    from privlora.audit import AuditConfig, run_audit

    report_file = out / "audit" / "report.json"
    if not report_file.exists():
        run_audit(AuditConfig(splits=str(splits), out=str(out / "audit"), pretrained_model_name_or_path=s.model,
                              loras=[str(p) for p in loras], attacks=s.attacks, include_base=True, seed=s.seed,
                              n_bootstrap=s.n_bootstrap))
    return json.loads(report_file.read_text())


def utility_quality(s: ProtocolSettings, out: Path, splits_file: Path, loras: list[Path]) -> dict[str, dict]:
    """Proxy FID (tiny-sd VAE features) of samples from nonmember_test captions against those images."""
    import torch

    from privlora.data.images import open_rgb
    from privlora.data.splits import read_manifest
    from privlora.models.loading import load_base
    from privlora.quality import score
    from privlora.sample import build_pipeline, load_lora

    cache = out / "quality.json"
    if cache.exists():
        return json.loads(cache.read_text())
    test = read_manifest(splits_file).nonmember_test[: s.quality_samples]
    real = [open_rgb(e.path) for e in test]
    prompts = [e.caption for e in test]
    results, grids = {}, {}
    for lora in [None, *loras]:
        name = "base" if lora is None else lora.stem
        base = load_base(s.model)
        pipe = build_pipeline(base.unet, base.vae, base.text_encoder, base.tokenizer, base.noise_scheduler.config)
        if lora is not None:
            load_lora(pipe, lora)
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(s.seed)
        images = pipe(prompts, num_inference_steps=s.sample_steps, guidance_scale=s.guidance,
                      generator=generator).images
        results[name] = score(real, images, metrics=["fid"], feature_extractor="tiny", seed=s.seed)
        grids[name] = images[:16]
    write_json(cache, results)
    save_grids(out, grids, real[:16])
    return results


def save_grids(out: Path, grids: dict, real: list) -> None:
    from privlora.sample import contact_sheet

    for name, images in grids.items():
        sheet = contact_sheet(images, columns=8)
        write_bytes(out / f"samples_{name}.png", _png(sheet))
    write_bytes(out / "samples_real_nonmembers.png", _png(contact_sheet(real, columns=8)))


def _png(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# --- the table -------------------------------------------------------------------------------------------------

def model_row(model: dict, quality: dict) -> dict:
    results = model["results"]
    aucs = {a: r["auc"] for a, r in results.items()}
    best = max(aucs, key=lambda a: aucs[a])
    held_out = -float(np.mean(model["scores"]["loss"]["nonmember_test"])) if "loss" in model["scores"] else None
    return {"model": model["name"], "auc": aucs, "best_attack": best, "best_auc": aucs[best],
            "best_tpr_at_1pct_fpr": max(r["tpr_at_1pct_fpr"] for r in results.values()),
            "heldout_loss": held_out, "proxy_fid": quality.get(model["name"], {}).get("fid_proxy_tiny")}


FRONTIER_MARGIN = 0.01  # AUC differences this small are noise at 200 vs 200 (one standard error ≈ 0.03)


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
    best = min((auc for lo, auc in pts if lo <= loss), default=float("inf"))
    for (l0, a0), (l1, a1) in zip(pts, pts[1:]):
        if l0 < loss < l1:
            best = min(best, a0 + (a1 - a0) * (loss - l0) / (l1 - l0))
    return float(best)


def build_table(s: ProtocolSettings, report: dict, quality: dict, runs: dict) -> dict:
    rows = {m["name"]: model_row(m, quality) for m in report["models"]}
    frontier_names = ["base"] + [p.stem for _, p in runs["lora"]["budget_files"]] + ["lora"]
    frontier = [(rows[n]["heldout_loss"], rows[n]["best_auc"]) for n in frontier_names]
    for name in s.defences:
        r = rows[name]
        r["frontier_auc_at_same_loss"] = frontier_auc(frontier, r["heldout_loss"])
        r["frontier_verdict"] = frontier_verdict(r["best_auc"], r["frontier_auc_at_same_loss"])
        r["above_frontier"] = r["frontier_verdict"] == "above"
    for m in s.run_names:
        rows[m]["train_seconds"] = runs[m]["seconds"]
    return {"settings": asdict(s), "rows": rows, "frontier": frontier_names, "audit": str(Path("audit") / "report.md"),
            "date": time.strftime("%Y-%m-%d"), "machine": machine()}


def machine() -> str:
    import os
    import platform

    import torch

    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def format_table(table: dict) -> str:
    rows = table["rows"]
    order = ["base", *table["frontier"][1:], *(n for n, r in rows.items() if "frontier_verdict" in r)]
    head = ("| model | loss AUC | ref_loss AUC | best-attack AUC (attack) | best TPR@1%FPR | held-out loss "
            "| proxy FID (tiny) | train s | vs. train-less frontier |")
    lines = [head, "|" + "---|" * 9]
    for name in order:
        r = rows[name]
        auc = r["auc"]
        frontier = ""
        if "above_frontier" in r:
            frontier = f"{r['frontier_verdict']} (frontier AUC {r['frontier_auc_at_same_loss']:.3f})"
        if "above_frontier" in r and math.isinf(r["frontier_auc_at_same_loss"]):
            frontier = "above (more useful than every baseline point)"
        lines.append(
            f"| {name} | {auc.get('loss', float('nan')):.3f} | {auc.get('ref_loss', float('nan')):.3f} "
            f"| {r['best_auc']:.3f} ({r['best_attack']}) | {r['best_tpr_at_1pct_fpr']:.3f} | {r['heldout_loss']:.4f} "
            f"| {_num(r['proxy_fid'])} | {_num(r.get('train_seconds'), '.0f')} | {frontier} |")
    return "\n".join(lines)


def _num(x, fmt=".3f") -> str:
    return "" if x is None else format(x, fmt)


def write_outputs(s: ProtocolSettings, out: Path, table: dict, runs: dict) -> None:
    write_json(out / "table.json", table)
    title = f"privlora miniature privacy benchmark ({s.label} variant, {table['date']}, {table['machine']})"
    write_text(out / "table.md", f"# {title}\n\n{format_table(table)}\n")
    write_bytes(out / "curves.png", curves_png(runs))
    write_bytes(out / "frontier.png", frontier_png(table))


def curves_png(runs: dict) -> bytes:
    from privlora.plotting import new_figure, png_bytes

    keys = [("L_ada", "L_ada (last step)"), ("L_adv", "L_adv (last step)"), ("attacker_test_acc", "attacker test acc"),
            ("member_gap", "held-out gap (nonmember − member loss)"), ("grad_norm", "LoRA grad norm (last step)")]
    with_hessian = any(run["history"].get("hessian") for run in runs.values())
    panels = len(keys) + with_hessian
    fig = new_figure(figsize=(4.2 * panels, 3.4))
    axes = fig.subplots(1, panels)
    for ax, (key, title) in zip(axes, keys):
        for method, run in runs.items():
            epochs = run["history"]["epochs"]
            xs = [e["epoch"] for e in epochs if key in e]
            if xs:
                ax.plot(xs, [e[key] for e in epochs if key in e], label=method)
        ax.set_title(title)
        ax.set_xlabel("epoch")
    if with_hessian:  # sharpness: the top Hessian eigenvalue of each run's LoRA loss (hessian_every_n_steps)
        for method, run in runs.items():
            points = run["history"].get("hessian", [])
            axes[-1].plot([h["step"] for h in points], [h["hessian_top_eig"] for h in points], label=method)
        axes[-1].set_title("top Hessian eigenvalue")
        axes[-1].set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    return png_bytes(fig, dpi=110)


def frontier_png(table: dict) -> bytes:
    from privlora.plotting import new_figure, png_bytes

    rows = table["rows"]
    fig = new_figure(figsize=(5.5, 4.2))
    ax = fig.subplots()
    pts = [(rows[n]["heldout_loss"], rows[n]["best_auc"], n) for n in table["frontier"]]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="gray", label="plain LoRA, training less")
    for x, y, n in pts:
        ax.annotate(n, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for name, marker in zip([n for n in rows if "frontier_verdict" in rows[n]], "s*DPXvh^<>"):
        ax.plot(rows[name]["heldout_loss"], rows[name]["best_auc"], marker, markersize=10, label=name)
    ax.axhline(0.5, ls=":", color="k", lw=0.8)
    ax.set_xlabel("held-out denoising loss on nonmember_test (lower = more useful)")
    ax.set_ylabel("best-attack AUC (lower = more private)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png_bytes(fig, dpi=110)
