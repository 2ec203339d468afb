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
    if dp_guarantee(run_dir, settings):
        return select_on_nonmembers(cfg, run_dir, settings, log)
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


def dp_guarantee(run_dir: Path, settings: dict) -> str | None:
    """The run's DP claim (its final LoRA's ``privlora_dp_*`` metadata), or None for a run without one."""
    from privlora.captions import read_lora_metadata

    final = run_dir / f"{settings.get('output_name', 'lora')}.safetensors"
    checkpoints = list_checkpoints(run_dir, settings.get("output_name", "lora"))
    path = final if final.is_file() else (checkpoints[-1] if checkpoints else None)
    meta = read_lora_metadata(path) if path else {}
    if "privlora_dp_epsilon" not in meta:
        return None
    return f"(ε, δ) = ({meta['privlora_dp_epsilon']}, {meta.get('privlora_dp_delta', '?')})"


def nonmember_manifest(splits_file: Path, out_file: Path, seed: int) -> Path:
    """A manifest of nonmember_aux images only, in four seeded quarters playing the five roles (the audit needs
    them all): no training image — member_aux included — is listed, opened or queried."""
    from privlora.data.splits import MANIFEST_VERSION, MANIFEST_WARNING, _load_manifest, _manifest_root

    manifest = _load_manifest(splits_file)
    root = _manifest_root(splits_file, manifest).resolve()
    entries = manifest["roles"].get("nonmember_aux") or []
    if len(entries) < 4:
        raise PrivloraError(f"{splits_file}: nonmember_aux has {len(entries)} images; selecting a DP run's "
                            "checkpoint on non-members needs at least 4")
    order = np.random.default_rng(seed).permutation(len(entries))
    q = [[entries[i] for i in part] for part in np.array_split(order, 4)]
    roles = {"train": q[0] + q[1], "member_aux": q[0], "member_test": q[1], "nonmember_aux": q[2],
             "nonmember_test": q[3]}
    write_json(out_file, {"warning": MANIFEST_WARNING, "version": MANIFEST_VERSION, "seed": seed, "root": str(root),
                          "root_from_manifest": Path(os.path.relpath(root, out_file.parent.resolve())).as_posix(),
                          "roles": roles})
    return out_file


def select_on_nonmembers(cfg: SelectConfig, run_dir: Path, settings: dict, log=print) -> dict:
    """A DP run: its checkpoint is chosen on utility alone, measured on non-member data (nonmember_aux), which is
    post-processing of the DP outputs and costs no privacy. Leakage is not estimated — that would query
    member_aux, training data the accountant does not count — the DP guarantee bounds it instead."""
    from privlora.audit import AuditConfig, run_audit

    checkpoints = list_checkpoints(run_dir, settings.get("output_name", "lora"))
    guarantee = dp_guarantee(run_dir, settings)
    log(f"{run_dir}: a DP-LoRA run {guarantee}: choosing the most useful checkpoint on nonmember_aux only "
        "(post-processing; member_aux is training data and is not used); the leakage bounds are not applied")
    work = run_dir / "select"
    manifest = nonmember_manifest(run_dir / "splits.json", work / "nonmember_splits.json", cfg.seed)
    report = run_audit(AuditConfig(
        splits=str(manifest), out=str(work),
        pretrained_model_name_or_path=settings.get("pretrained_model_name_or_path", "tiny-sd"),
        loras=[str(p) for p in checkpoints], attacks=["loss"], include_base=cfg.include_base, seed=cfg.seed,
        n_bootstrap=0, resolution=settings.get("resolution"), config_dir=settings.get("config_dir"),
        clip_skip=settings.get("clip_skip"), jobs=cfg.jobs, threads_per_job=cfg.threads_per_job), log=log)
    losses = {m["name"]: -float(np.mean(m["scores"]["loss"]["member_test"] + m["scores"]["loss"]["nonmember_test"]))
              for m in report["models"]}
    best = min(losses, key=lambda n: (losses[n], n))
    paths = {p.stem: str(p) for p in checkpoints}
    rule = ("DP run: the lowest held-out loss on nonmember_aux, a choice that uses no training data "
            f"(post-processing: the guarantee {guarantee} holds for it unchanged); leakage bounds not applied")
    result = {
        "run_dir": str(run_dir), "estimated_on": "nonmember_aux only (DP run: member_aux is training data)",
        "dp_guarantee": guarantee,
        "settings": {"attacks": ["loss"], "seed": cfg.seed, "include_base": cfg.include_base, "rule": "dp_nonmember"},
        "checkpoints": {name: {"path": paths.get(name), "heldout_loss": loss} for name, loss in losses.items()},
        "choice": {"model": best, "path": paths.get(best), "heldout_loss": losses[best], "reason": rule},
    }
    write_json(Path(cfg.out) if cfg.out else run_dir / "select.json", result)
    return result


def format_selection(result: dict) -> str:
    if result.get("dp_guarantee"):
        lines = ["| checkpoint | held-out loss on nonmember_aux |", "|---|---|"]
        lines += [f"| {name} | {r['heldout_loss']:.4f} |" for name, r in result["checkpoints"].items()]
        return "\n".join(lines) + f"\n\nchoice: {result['choice']['model']} — {result['choice']['reason']}"
    lines = ["| checkpoint | est. best AUC (attack) | est. TPR@1%FPR | est. held-out loss |", "|---|---|---|---|"]
    for name, r in result["checkpoints"].items():
        lines.append(f"| {name} | {r['best_auc']:.3f} ({r['best_attack']}) | {r['best_tpr_at_1pct_fpr']:.3f} "
                     f"| {r['heldout_loss']:.4f} |")
    choice = result["choice"]
    lines.append(f"\nchoice: {choice['model'] or 'none'} — {choice['reason']}")
    return "\n".join(lines)
