"""``privlora audit --jobs N`` on a CPU: the models split between N worker processes, one report.

Each model's scores depend only on the audit seed, the samples and the model (every sample's noise is seeded by
its content hash, each fitted attack seeds itself, the bootstrap is seeded by the model's name), so a model gives
the same numbers whichever process audits it and beside whichever other models. What the split changes:
every part runs the base model's half of ``ref_loss`` once (``unet_queries.total_run`` counts it per part).

The split is used only where it cannot change a name or a setting: distinct LoRA file names (the serial audit
renames duplicates by position), and the base model in the part of the first LoRA, which derives the base row's
text encoding exactly as the whole audit would.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np

from privlora.attacks import TEST_ROLES


def parts_for(cfg, files: list[Path]) -> list[list[Path]] | None:
    """LoRA files per part (round-robin, so parts get similar work), or None where the audit must run whole."""
    from privlora.audit import base_encoding, lora_encoding, lora_metadata

    n = min(cfg.jobs, len(files))
    stems = [p.stem for p in files]
    if n < 2 or len(set(stems)) < len(stems) or "base" in stems:
        return None
    parts = [files[k::n] for k in range(n)]
    encodings = [lora_encoding(cfg, p, lora_metadata(p)) for p in files]
    if cfg.include_base and base_encoding(encodings, cfg) != base_encoding(encodings[::n], cfg):
        return None
    return parts


def run_in_parts(cfg, files: list[Path], parts: list[list[Path]], threads: int,
                 log: Callable[[str], None]) -> tuple[dict, dict]:
    """Audit each part in its own process; the merged report and the scores/results/skipped to plot."""
    from privlora.processes import worker_pool

    started = time.time()
    order = (["base"] if cfg.include_base else []) + [p.stem for p in files]
    log(f"auditing {len(order)} models in {len(parts)} processes, {threads} torch thread(s) each")
    with tempfile.TemporaryDirectory(prefix="privlora-audit-") as tmp:
        configs = [dataclasses.replace(cfg, loras=[str(p) for p in part], include_base=cfg.include_base and k == 0,
                                       out=str(Path(tmp) / f"part{k}"), jobs=1) for k, part in enumerate(parts)]
        with worker_pool(len(parts), threads) as pool:
            reports = list(pool.map(_audit_part, configs))
    report = merge_reports(reports, order, time.time() - started, len(parts))
    return report, plot_inputs(report)


def _audit_part(cfg) -> dict:
    from privlora.audit import run_audit

    return run_audit(cfg, log=lambda line: None)


def merge_reports(reports: list[dict], order: list[str], wall: float, processes: int) -> dict[str, Any]:
    """One report from the parts' reports: models in the whole audit's order, queries summed."""
    by_name = {m["name"]: m for r in reports for m in r["models"]}
    merged = dict(reports[0])
    merged["models"] = [by_name[name] for name in order]
    merged["unet_queries"] = {**reports[0]["unet_queries"],
                              "total_run": sum(r["unet_queries"]["total_run"] for r in reports)}
    merged["settings"] = {**reports[0]["settings"], "processes": processes}
    merged["wall_seconds"] = round(wall, 2)
    return merged


def plot_inputs(report: dict) -> dict:
    """The per-model scores (as arrays), results and skipped attacks that the plots take."""
    return {
        "scores": {m["name"]: {a: {r: np.asarray(s[r], dtype=np.float64) for r in TEST_ROLES}
                               for a, s in m["scores"].items()} for m in report["models"]},
        "results": {m["name"]: m["results"] for m in report["models"]},
        "skipped": {m["name"]: m["skipped"] for m in report["models"]},
    }
