"""``privlora select``: pick the most useful checkpoint of a run whose estimated leakage is under a bound.

The estimate uses the auxiliary roles only — the test roles stay untouched for an honest final audit. Each
aux role is split in two seeded halves: the first halves fit the attacks that learn (``mlp``, ``clid``), the
second halves are scored (member_aux half vs nonmember_aux half). Utility is the held-out denoising loss on
the scored nonmember_aux half. The audit runs on a derived manifest that lists the aux images only, so no
test-role image is ever opened, hashed or queried.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from privlora.errors import PrivloraError
from privlora.io import write_json

DEFAULT_SELECT_ATTACKS = ("loss", "ref_loss")
_CHECKPOINT = r"^{name}(?:-e(?P<epoch>\d{{4,}})|-step(?P<step>\d{{6,}}))?\.safetensors$"


@dataclass
class SelectConfig:
    run_dir: str
    max_auc: float = 0.6
    max_tpr_at_1fpr: float = 1.0
    attacks: list[str] = field(default_factory=lambda: list(DEFAULT_SELECT_ATTACKS))
    seed: int = 0
    n_bootstrap: int = 200
    include_base: bool = True  # the base model is a candidate too (no fine-tuning at all)
    out: str | None = None  # default: <run_dir>/select.json
    jobs: int = 1  # on a CPU: worker processes of the audit (same numbers)
    threads_per_job: int | None = None


def list_checkpoints(run_dir: Path, output_name: str) -> list[Path]:
    """The run's intermediate ``-eNNNN`` / ``-stepNNNNNN`` LoRA files and its final one, in training order."""
    pattern = re.compile(_CHECKPOINT.format(name=re.escape(output_name)))
    found = []
    for path in run_dir.glob(f"{output_name}*.safetensors"):
        m = pattern.match(path.name)
        if m:
            order = (1, 0) if not (m["epoch"] or m["step"]) else (0, int(m["epoch"] or 0) or int(m["step"] or 0))
            found.append((order, path))
    return [p for _, p in sorted(found)]


def run_settings(run_dir: Path) -> dict:
    from privlora.config import RESOLVED_NAME, read_toml

    resolved = run_dir / RESOLVED_NAME
    if not resolved.is_file():
        raise PrivloraError(f"{run_dir}: not a finished privlora run ({RESOLVED_NAME} is missing)")
    return read_toml(resolved)


def aux_manifest(splits_file: Path, out_file: Path, seed: int) -> Path:
    """A manifest of the aux images only: first halves as the aux roles, second halves as the test roles.

    Reads the run's manifest as JSON (no image of it is opened or hashed); the new one keeps the hashes, so
    the audit still verifies every aux image it reads.
    """
    from privlora.data.splits import MANIFEST_VERSION, MANIFEST_WARNING, _load_manifest, _manifest_root

    manifest = _load_manifest(splits_file)
    root = _manifest_root(splits_file, manifest).resolve()
    rng = np.random.default_rng(seed)
    halves = {}
    for role in ("member_aux", "nonmember_aux"):
        entries = manifest["roles"].get(role) or []
        if len(entries) < 4:
            raise PrivloraError(f"{splits_file}: {role} has {len(entries)} images; selection needs at least 4 "
                                "(two halves of two)")
        order = rng.permutation(len(entries))
        half = len(entries) // 2
        halves[role] = ([entries[i] for i in order[:half]], [entries[i] for i in order[half:]])
    roles = {"train": halves["member_aux"][0] + halves["member_aux"][1],
             "member_aux": halves["member_aux"][0], "member_test": halves["member_aux"][1],
             "nonmember_aux": halves["nonmember_aux"][0], "nonmember_test": halves["nonmember_aux"][1]}
    write_json(out_file, {"warning": MANIFEST_WARNING, "version": MANIFEST_VERSION, "seed": seed, "root": str(root),
                          "root_from_manifest": Path(os.path.relpath(root, out_file.parent.resolve())).as_posix(),
                          "roles": roles})
    return out_file


def select(cfg: SelectConfig, log=print) -> dict:
    """Estimate every checkpoint's leakage and utility on the aux roles; write and return select.json's content."""
    from privlora.attacks import parse_attack_names
    from privlora.audit import AuditConfig, run_audit
    from privlora.benchtable import model_row, recommend

    run_dir = Path(cfg.run_dir)
    settings = run_settings(run_dir)
    attacks = parse_attack_names(cfg.attacks)
    if "loss" not in attacks:
        attacks = ["loss", *attacks]  # its scores on the nonmember half are the utility estimate
    checkpoints = list_checkpoints(run_dir, settings.get("output_name", "lora"))
    if not checkpoints:
        raise PrivloraError(f"{run_dir}: no LoRA checkpoints named "
                            f"{settings.get('output_name')}[-eNNNN|-stepNNNNNN].safetensors")
    work = run_dir / "select"
    manifest = aux_manifest(run_dir / "splits.json", work / "aux_splits.json", cfg.seed)
    report = run_audit(AuditConfig(
        splits=str(manifest), out=str(work),
        pretrained_model_name_or_path=settings.get("pretrained_model_name_or_path", "tiny-sd"),
        loras=[str(p) for p in checkpoints], attacks=attacks, include_base=cfg.include_base, seed=cfg.seed,
        n_bootstrap=cfg.n_bootstrap, resolution=settings.get("resolution"), config_dir=settings.get("config_dir"),
        clip_skip=settings.get("clip_skip"), jobs=cfg.jobs, threads_per_job=cfg.threads_per_job), log=log)
    rows = {m["name"]: model_row(m, {}) for m in report["models"]}
    choice = recommend(rows, cfg.max_auc, cfg.max_tpr_at_1fpr)
    paths = {p.stem: str(p) for p in checkpoints}
    result = {
        "run_dir": str(run_dir), "estimated_on": "aux roles only: first halves fit, second halves scored",
        "settings": {"max_auc": cfg.max_auc, "max_tpr_at_1fpr": cfg.max_tpr_at_1fpr, "attacks": attacks,
                     "seed": cfg.seed, "n_bootstrap": cfg.n_bootstrap, "include_base": cfg.include_base},
        "checkpoints": {name: {"path": paths.get(name), "auc": r["auc"], "best_attack": r["best_attack"],
                               "best_auc": r["best_auc"], "best_tpr_at_1pct_fpr": r["best_tpr_at_1pct_fpr"],
                               "heldout_loss": r["heldout_loss"]} for name, r in rows.items()},
        "choice": {**choice, "path": paths.get(choice["model"]) if choice["model"] else None},
    }
    write_json(Path(cfg.out) if cfg.out else run_dir / "select.json", result)
    return result


def format_selection(result: dict) -> str:
    lines = ["| checkpoint | est. best AUC (attack) | est. TPR@1%FPR | est. held-out loss |", "|---|---|---|---|"]
    for name, r in result["checkpoints"].items():
        lines.append(f"| {name} | {r['best_auc']:.3f} ({r['best_attack']}) | {r['best_tpr_at_1pct_fpr']:.3f} "
                     f"| {r['heldout_loss']:.4f} |")
    choice = result["choice"]
    lines.append(f"\nchoice: {choice['model'] or 'none'} — {choice['reason']}")
    return "\n".join(lines)
