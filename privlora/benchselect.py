"""Each run's checkpoint for the bench's comparison, chosen on the aux roles only.

``privlora select`` runs on the checkpoints of the plain-LoRA baseline (first seed: the recommendation) and of every
defence at every seed, with the same bound, attacks and resampling, before any test role is audited; each result is
cached in ``<out>/phases.json`` per run and seed. A defence is then compared at the checkpoint select chose — its
``Pick`` — and its final LoRA stays in the table for reference. Where select refuses the bound (aux roles too small),
finds no checkpoint under it, or chooses the base model (the frontier's first point already), the final LoRA stands
in and the pick says why.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privlora.benchcache import AUDIT_CACHE, PhaseCache, file_stamp
from privlora.benchspec import BenchSpec, Job, job_seed
from privlora.benchtable import model_row


@dataclass(frozen=True)
class Pick:
    """The model one training job (a run at one seed) is compared with: the checkpoint select chose, or its final
    LoRA with the reason (``outcome``: "chosen", else why the final stands in: "refused", "none", "base")."""

    job: str  # smp_lora, smp_lora-seed4
    model: str  # the audited model compared: smp_lora-e0008, or the final LoRA's name (= job)
    path: Path
    outcome: str
    reason: str

    @property
    def is_checkpoint(self) -> bool:
        """An intermediate checkpoint, so the final LoRA is a separate reference row."""
        return self.model != self.job

    def rows(self) -> list[str]:
        """The job's rows in the table: the compared model, then the final LoRA for reference when they differ."""
        return [self.model, self.job] if self.is_checkpoint else [self.model]

    def as_dict(self) -> dict:
        return {"job": self.job, "model": self.model, "final": self.job, "outcome": self.outcome,
                "reason": self.reason}


def pick_for(job: Job, result: dict) -> Pick:
    """The job's model for the comparison from its selection (``aux_selection``'s result)."""
    choice = result["choice"]
    model = choice.get("model")
    final = job.dir.lora()
    if result.get("refused"):
        return Pick(job.name, job.name, final, "refused", choice["reason"])
    if model is None:
        return Pick(job.name, job.name, final, "none", f"select: {choice['reason']}")
    if model == "base":
        return Pick(job.name, job.name, final, "base", f"select chose the base model ({choice['reason']}), which "
                                                       "is the train-less frontier's first point")
    return Pick(job.name, model, job.dir.path / f"{model}.safetensors", "chosen", choice["reason"])


def select_runs(spec: BenchSpec, jobs: list[Job], base: str, log) -> dict[str, dict]:
    """Select's result for the first seed's baseline and for every defence job, by job name."""
    wanted = [j for j in jobs if j.run != base or j.seed_index == 0]
    return {j.name: aux_selection(spec, j, log) for j in wanted}


def aux_selection(spec: BenchSpec, job: Job, log) -> dict:
    """``privlora select`` on one job's checkpoints (aux roles only); a bound the aux roles cannot support is
    recorded as a refusal, not an error: the table then gives it as the reason."""
    from privlora.select import SelectConfig, Unsupported, select

    settings: dict[str, Any] = {"max_auc": spec.max_auc, "max_tpr_at_1fpr": spec.max_tpr_at_1fpr,
                                "attacks": ["loss", *[a for a in spec.select_attacks if a != "loss"]],
                                "seed": job_seed(spec, job), "n_bootstrap": spec.n_bootstrap, "include_base": True}
    cache = PhaseCache(spec.out)
    inputs = {**settings, "lora": file_stamp(job.dir.lora())}
    result = cache.get(f"select/{job.name}", inputs)
    if result is not None:
        return result
    log(f"privacy-aware selection of {job.name}'s checkpoints on the aux roles")
    try:
        result = select(SelectConfig(str(job.out), spec.max_auc, spec.max_tpr_at_1fpr, list(spec.select_attacks),
                                     settings["seed"], spec.n_bootstrap, True, jobs=spec.jobs,
                                     threads_per_job=spec.threads_per_job,
                                     model_cache=str(spec.out / AUDIT_CACHE)), log=log)
    except Unsupported as e:  # cached too: the same aux roles refuse the same bound again
        log(f"selection refused: {e}")
        result = {"settings": settings, "refused": str(e), "checkpoints": {},
                  "choice": {"model": None, "path": None, "reason": f"select refused: {e}"}}
    cache.put(f"select/{job.name}", inputs, result)
    return result


def compare_selection(result: dict, report: dict) -> dict:
    """The aux-only estimates next to the test-role audit of the same checkpoints."""
    test = {m["name"]: m for m in report["models"]}
    rows = {}
    for name, est in result["checkpoints"].items():
        if name not in test:
            continue
        t = model_row(test[name], {})
        same = [t["auc"][a] for a in result["settings"]["attacks"] if a in t["auc"]]
        rows[name] = {"aux_best_auc": est["best_auc"], "aux_best_attack": est["best_attack"],
                      "aux_auc_upper": est.get("auc_upper"), "aux_heldout_loss": est["heldout_loss"],
                      "test_auc_same_attacks": max(same) if same else None,
                      "test_best_auc": t["best_auc"], "test_heldout_loss": t["heldout_loss"]}
    return {"attacks": result["settings"]["attacks"], "choice": result["choice"], "rows": rows,
            "refused": result.get("refused")}
