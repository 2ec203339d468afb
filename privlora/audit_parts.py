"""``privlora audit --jobs N`` on a CPU: the models split between N worker processes, one report.

Each model's scores depend only on the audit seed, the samples and the model (every sample's noise is seeded by
its content hash, each fitted attack seeds itself, the bootstrap is seeded by the model's name), so a model gives
the same numbers whichever process audits it and beside whichever other models. What the split changes:
every part runs the base model's half of ``ref_loss`` once (``unet_queries.total_run`` counts it per part).

Which splits are safe is the audit's call (``privlora.audit.parts_for``); this module runs the parts and merges
their reports. It does not import ``privlora.audit``: the audit hands ``run_in_parts`` the function that audits one
part, so the two modules import one way (docs/architecture.md, tests/test_layers.py).
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
from privlora.audit_cache import merge_summaries


def run_in_parts(cfg, files: list[Path], parts: list[list[Path]], threads: int, log: Callable[[str], None],
                 work: Callable[[Any], dict]) -> tuple[dict, dict]:
    """Audit each part in its own process; the merged report and the scores/results/skipped to plot.

    ``work`` audits one part's config in a worker (``privlora.audit._audit_part``: a module-level function, which
    the spawned workers import by name)."""
    from privlora.processes import worker_pool

    started = time.time()
    order = (["base"] if cfg.include_base else []) + [p.stem for p in files]
    log(f"auditing {len(order)} models in {len(parts)} processes, {threads} torch thread(s) each")
    with tempfile.TemporaryDirectory(prefix="privlora-audit-") as tmp:
        configs = [dataclasses.replace(cfg, loras=[str(p) for p in part], include_base=cfg.include_base and k == 0,
                                       out=str(Path(tmp) / f"part{k}"), jobs=1) for k, part in enumerate(parts)]
        with worker_pool(len(parts), threads) as pool:
            reports = list(pool.map(work, configs))
    report = merge_reports(reports, order, time.time() - started, len(parts))
    return report, plot_inputs(report)


def merge_reports(reports: list[dict], order: list[str], wall: float, processes: int) -> dict[str, Any]:
    """One report from the parts' reports: models in the whole audit's order, queries summed."""
    by_name = {m["name"]: m for r in reports for m in r["models"]}
    merged = dict(reports[0])
    merged["models"] = [by_name[name] for name in order]
    merged["unet_queries"] = {**reports[0]["unet_queries"],
                              "total_run": sum(r["unet_queries"]["total_run"] for r in reports)}
    merged["settings"] = {**reports[0]["settings"], "processes": processes}
    if "model_cache" in reports[0]:
        merged["model_cache"] = merge_summaries([r["model_cache"] for r in reports], order)
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
