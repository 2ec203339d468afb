"""``privlora select``: pick the most useful checkpoint of a run whose estimated leakage is under a bound.

The estimate uses the auxiliary roles only — the test roles stay untouched for an honest final audit. Each
aux role is split in two seeded halves: the first halves fit the attacks that learn (``mlp``, ``clid``), the
second halves are scored (member_aux half vs nonmember_aux half). Utility is the held-out denoising loss on
the scored nonmember_aux half. The audit runs on a derived manifest that lists the aux images only, so no
test-role image is ever opened, hashed or queried.

It decides on upper confidence bounds, not point estimates: a checkpoint qualifies when the upper end of the 95 %
bootstrap interval of every attack's AUC — two-sided: max(upper, 1 − lower), since an inverted attack leaks too — is
≤ ``max_auc`` and, with a TPR bound, the Clopper–Pearson upper limit of every TPR@1%FPR is ≤ ``max_tpr_at_1fpr``.
Before any audit it refuses, in one line, a bound the aux set cannot support: one that even a model at chance would
fail at this many scored images (the AUC's null standard error, Hanley & McNeil), or a TPR bound at a 1 % FPR that
the scored non-members cannot resolve or that zero caught members could not meet.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from privlora.errors import PrivloraError
from privlora.io import write_json
from privlora.rundir import RunDir

DEFAULT_SELECT_ATTACKS = ("loss", "ref_loss")
Z95 = 1.959964  # the two-sided 95 % normal quantile
Z75 = 0.674490  # the median of |N(0, 1)|: how far a chance model's AUC estimate typically lies from 0.5
MIN_BOOTSTRAP = 50  # the AUC's upper bound is a bootstrap percentile: too few resamples make it noise


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
    model_cache: str | None = None  # the audit's --model_cache: checkpoints scored before are not scored again


def list_checkpoints(run_dir: Path, output_name: str) -> list[Path]:
    """The run's intermediate ``-eNNNN`` / ``-stepNNNNNN`` LoRA files and its final one, in training order."""
    return RunDir(run_dir, output_name).checkpoints()


def run_settings(run_dir: Path) -> dict:
    from privlora.config import read_toml

    resolved = RunDir(run_dir).resolved
    if not resolved.is_file():
        raise PrivloraError(f"{run_dir}: not a finished privlora run ({RunDir.RESOLVED} is missing)")
    return read_toml(resolved)


def aux_manifest(splits_file: Path, out_file: Path, seed: int) -> Path:
    """A manifest of the aux images only: first halves as the aux roles, second halves as the test roles.

    Reads the run's manifest as JSON (no image of it is opened or hashed); the new one keeps the hashes, so
    the audit still verifies every aux image it reads.
    """
    from privlora.data.splits import _load_manifest, _manifest_root, write_role_entries

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
    return write_role_entries(out_file, root, roles, seed)


def select(cfg: SelectConfig, log=print) -> dict:
    """Estimate every checkpoint's leakage and utility on the aux roles; write and return select.json's content."""
    from privlora.attacks import parse_attack_names
    from privlora.audit import AuditConfig, run_audit

    run_dir = Path(cfg.run_dir)
    settings = run_settings(run_dir)
    guarantee = dp_guarantee(run_dir, settings)
    if guarantee:
        return select_on_nonmembers(cfg, run_dir, settings, guarantee, log)
    attacks = parse_attack_names(cfg.attacks)
    if "loss" not in attacks:
        attacks = ["loss", *attacks]  # its scores on the nonmember half are the utility estimate
    checkpoints = list_checkpoints(run_dir, settings.get("output_name", "lora"))
    if not checkpoints:
        raise PrivloraError(f"{run_dir}: no LoRA checkpoints named "
                            f"{settings.get('output_name')}[-eNNNN|-stepNNNNNN].safetensors")
    scored = scored_sizes(RunDir(run_dir).splits)
    check_support(cfg, *scored, RunDir(run_dir).splits)
    work = run_dir / "select"
    manifest = aux_manifest(RunDir(run_dir).splits, work / "aux_splits.json", cfg.seed)
    report = run_audit(AuditConfig(
        splits=str(manifest), out=str(work),
        pretrained_model_name_or_path=settings.get("pretrained_model_name_or_path", "tiny-sd"),
        loras=[str(p) for p in checkpoints], attacks=attacks, include_base=cfg.include_base, seed=cfg.seed,
        n_bootstrap=cfg.n_bootstrap, resolution=settings.get("resolution"), config_dir=settings.get("config_dir"),
        clip_skip=settings.get("clip_skip"), jobs=cfg.jobs, threads_per_job=cfg.threads_per_job,
        model_cache=cfg.model_cache), log=log)
    rows = {m["name"]: estimate(m) for m in report["models"]}
    choice = choose(rows, cfg.max_auc, cfg.max_tpr_at_1fpr)
    paths = {p.stem: str(p) for p in checkpoints}
    result = {
        "run_dir": str(run_dir), "estimated_on": "aux roles only: first halves fit, second halves scored",
        "scored": {"member_aux": scored[0], "nonmember_aux": scored[1]},
        "settings": {"max_auc": cfg.max_auc, "max_tpr_at_1fpr": cfg.max_tpr_at_1fpr, "attacks": attacks,
                     "seed": cfg.seed, "n_bootstrap": cfg.n_bootstrap, "include_base": cfg.include_base},
        "decides_on": "upper 95 % bounds: the two-sided bootstrap AUC bound of every attack and the "
                      "Clopper–Pearson upper limit of every TPR@1%FPR",
        "checkpoints": {name: {"path": paths.get(name), **r} for name, r in rows.items()},
        "choice": {**choice, "path": paths.get(choice["model"]) if choice["model"] else None},
    }
    write_json(Path(cfg.out) if cfg.out else RunDir(run_dir).select, result)
    return result


def scored_sizes(splits_file: Path) -> tuple[int, int]:
    """(members, non-members) the aux-only estimate scores: the second halves of member_aux and nonmember_aux."""
    from privlora.data.splits import _load_manifest

    roles = _load_manifest(splits_file)["roles"]
    sizes = [len(roles.get(r) or []) for r in ("member_aux", "nonmember_aux")]
    return sizes[0] - sizes[0] // 2, sizes[1] - sizes[1] // 2


def null_auc_upper(n_member: int, n_nonmember: int) -> float:
    """The two-sided 95 % upper bound a model at chance shows in the median: 0.5 + (z₀.₇₅ + z)·SE₀ with Hanley &
    McNeil's null SE. Its AUC estimate lies at least z₀.₇₅·SE₀ = 0.674·SE₀ from 0.5 half of the time, on either side,
    and select bounds max(upper, 1 − lower), so a chance model's bound sits above 0.5 + z·SE₀ (the bound of an
    estimate of exactly 0.5) most of the time: with 16 vs 16 scored images 0.773, not 0.703 (measured: the demo's
    base model showed 0.78–0.79 with loss and ref_loss)."""
    se0 = math.sqrt((n_member + n_nonmember + 1) / (12 * n_member * n_nonmember))
    return min(1.0, 0.5 + (Z75 + Z95) * se0)  # an AUC bound above 1 is 1


def aux_needed_for_auc(max_auc: float) -> int | None:
    """Images per aux role (twice the scored half) at which a chance-level model can meet ``max_auc``."""
    if max_auc <= 0.5:
        return None
    n = 2
    while null_auc_upper(n, n) > max_auc:
        n += 1
    return 2 * n


def members_needed_for_tpr(max_tpr: float) -> int:
    """Scored members at which zero caught members give a Clopper–Pearson upper limit ≤ ``max_tpr``."""
    return math.ceil(math.log(0.025) / math.log(1 - max_tpr)) if max_tpr < 1 else 1


class Unsupported(PrivloraError):
    """The aux roles (or the resampling asked for) cannot support the bound asked for: a property of the data and
    settings, not a failure; the bench records it as the reason for no recommendation."""


def check_support(cfg: SelectConfig, n_member: int, n_nonmember: int, splits_file: Path) -> None:
    """Refuse, in one line and before any audit, a bound these aux roles cannot support."""
    from privlora.attacks.metrics import FPR_TARGETS, nonmembers_needed

    if cfg.n_bootstrap < MIN_BOOTSTRAP:
        raise Unsupported(f"select decides on bootstrap upper bounds: --n_bootstrap {cfg.n_bootstrap} is below "
                            f"{MIN_BOOTSTRAP}")
    where = f"{splits_file}: select scores {n_member} member_aux vs {n_nonmember} nonmember_aux images (half of each)"
    chance = null_auc_upper(n_member, n_nonmember)
    if chance > cfg.max_auc:
        need = aux_needed_for_auc(cfg.max_auc)
        raise Unsupported(f"{where}; even a model at chance shows, in the median, a two-sided 95 % AUC upper bound "
                            f"of {chance:.3f} > --max_auc "
                            f"{cfg.max_auc:g} there: " + (f"needs ≥ {need} images in each aux role (member_aux, "
                                                          f"nonmember_aux), or --max_auc ≥ {chance:.3f}"
                                                          if need else "no aux size supports a bound ≤ 0.5"))
    if cfg.max_tpr_at_1fpr < 1:
        needs_nm = nonmembers_needed(FPR_TARGETS["tpr_at_1pct_fpr"])
        needs_m = members_needed_for_tpr(cfg.max_tpr_at_1fpr)
        if n_nonmember < needs_nm or n_member < needs_m:
            levels = [f"{t:g}" for t in FPR_TARGETS.values() if n_nonmember >= nonmembers_needed(t)]
            lowest = f"{100 * float(levels[-1]):g} %" if levels else "none of 5 %, 1 %, 0.1 %"
            raise Unsupported(
                f"{where}; --max_tpr_at_1fpr {cfg.max_tpr_at_1fpr:g} needs ≥ {needs_nm} scored non-members to resolve "
                f"a 1 % FPR and ≥ {needs_m} scored members for a Clopper–Pearson upper limit that low, i.e. ≥ "
                f"{2 * max(needs_nm, needs_m)} images in each aux role; the lowest standard FPR level these aux roles "
                f"resolve is {lowest} (1/{n_nonmember} ≈ {100 / n_nonmember:.1f} % is the lowest FPR they measure)")


def estimate(model: dict) -> dict:
    """One checkpoint's aux-only estimate: per attack the AUC and its interval; the worst two-sided upper bound and
    the worst TPR@1%FPR upper limit over the held-out attacks; utility from the loss scores."""
    from privlora.attacks.metrics import is_held_out

    results = {a: r for a, r in model["results"].items() if is_held_out(r)}
    upper = {a: max(r["ci95"]["auc"][1], 1 - r["ci95"]["auc"][0]) for a, r in results.items()}
    tpr_upper = [(r.get("tpr_cp95") or {}).get("tpr_at_1pct_fpr") for r in results.values()]
    best = max(upper, key=lambda a: upper[a])
    return {"auc": {a: r["auc"] for a, r in results.items()},
            "auc_ci95": {a: r["ci95"]["auc"] for a, r in results.items()},
            "best_attack": best, "best_auc": results[best]["auc"], "auc_upper": upper[best],
            "best_tpr_at_1pct_fpr": max(r["tpr_at_1pct_fpr"] for r in results.values()),
            "tpr_upper": None if any(t is None for t in tpr_upper) else max(t[1] for t in tpr_upper if t),
            "heldout_loss": -float(np.mean(model["scores"]["loss"]["nonmember_test"]))}


def choose(rows: dict[str, dict], max_auc: float, max_tpr_at_1fpr: float) -> dict:
    """The most useful checkpoint (lowest held-out loss) whose upper bounds meet the bound; ties to the lower AUC
    bound. ``model`` is None when none does."""
    def meets(r: dict) -> bool:
        tpr_ok = max_tpr_at_1fpr >= 1 or (r["tpr_upper"] is not None and r["tpr_upper"] <= max_tpr_at_1fpr)
        return r["auc_upper"] <= max_auc and tpr_ok

    bound = f"95 % upper bounds: AUC ≤ {max_auc:g}" + (
        f" and TPR@1%FPR ≤ {max_tpr_at_1fpr:g}" if max_tpr_at_1fpr < 1 else "")
    ok = {name: r for name, r in rows.items() if meets(r)}
    if not ok:
        return {"model": None, "reason": f"no checkpoint meets {bound}"}
    name = min(ok, key=lambda n: (ok[n]["heldout_loss"], ok[n]["auc_upper"], n))
    r = ok[name]
    return {"model": name, "best_auc": r["best_auc"], "auc_upper": r["auc_upper"], "tpr_upper": r["tpr_upper"],
            "heldout_loss": r["heldout_loss"],
            "reason": f"the lowest held-out loss among the {len(ok)} checkpoint(s) whose {bound}"}


def dp_guarantee(run_dir: Path, settings: dict) -> str | None:
    """The run's DP claim (its final LoRA's ``privlora_dp_*`` metadata), or None for a run without one."""
    from privlora.captions import read_lora_metadata

    final = RunDir(run_dir, settings.get("output_name", "lora")).lora()
    checkpoints = list_checkpoints(run_dir, settings.get("output_name", "lora"))
    path = final if final.is_file() else (checkpoints[-1] if checkpoints else None)
    meta = read_lora_metadata(path) if path else {}
    if "privlora_dp_epsilon" not in meta:
        return None
    return f"(ε, δ) = ({meta['privlora_dp_epsilon']}, {meta.get('privlora_dp_delta', '?')})"


def nonmember_manifest(splits_file: Path, out_file: Path, seed: int) -> Path:
    """A manifest of nonmember_aux images only, in four seeded quarters playing the five roles (the audit needs
    them all): no training image — member_aux included — is listed, opened or queried."""
    from privlora.data.splits import _load_manifest, _manifest_root, write_role_entries

    manifest = _load_manifest(splits_file)
    root = _manifest_root(splits_file, manifest).resolve()
    entries = manifest["roles"].get("nonmember_aux") or []
    if len(entries) < 4:
        raise PrivloraError(f"{splits_file}: nonmember_aux has {len(entries)} images; choosing on non-members "
                            "alone (a DP run's checkpoint, a bench's tuned values) needs at least 4")
    order = np.random.default_rng(seed).permutation(len(entries))
    q = [[entries[i] for i in part] for part in np.array_split(order, 4)]
    roles = {"train": q[0] + q[1], "member_aux": q[0], "member_test": q[1], "nonmember_aux": q[2],
             "nonmember_test": q[3]}
    return write_role_entries(out_file, root, roles, seed)


def nonmember_losses(splits_file: Path, work: Path, loras: list[Path], settings: dict, seed: int, *,
                     include_base: bool = False, jobs: int = 1, threads_per_job: int | None = None,
                     model_cache: str | None = None, log=print) -> dict[str, float]:
    """Each model's held-out denoising loss on nonmember_aux alone (``nonmember_manifest``; its scored quarters),
    by model name. The audit's queries are seeded per image, so every model is asked at the same timesteps and
    noise. ``settings``: the resolved training settings of the runs (model, resolution, clip skip)."""
    from privlora.audit import AuditConfig, run_audit

    manifest = nonmember_manifest(splits_file, work / "nonmember_splits.json", seed)
    report = run_audit(AuditConfig(
        splits=str(manifest), out=str(work),
        pretrained_model_name_or_path=settings.get("pretrained_model_name_or_path", "tiny-sd"),
        loras=[str(p) for p in loras], attacks=["loss"], include_base=include_base, seed=seed,
        n_bootstrap=0, resolution=settings.get("resolution"), config_dir=settings.get("config_dir"),
        clip_skip=settings.get("clip_skip"), jobs=jobs, threads_per_job=threads_per_job,
        model_cache=model_cache), log=log)
    return {m["name"]: -float(np.mean(m["scores"]["loss"]["member_test"] + m["scores"]["loss"]["nonmember_test"]))
            for m in report["models"]}


def select_on_nonmembers(cfg: SelectConfig, run_dir: Path, settings: dict, guarantee: str, log=print) -> dict:
    """A DP run: its checkpoint is chosen on utility alone, measured on non-member data (nonmember_aux), which is
    post-processing of the DP outputs and costs no privacy. Leakage is not estimated — that would query
    member_aux, training data the accountant does not count — the DP guarantee bounds it instead."""
    checkpoints = list_checkpoints(run_dir, settings.get("output_name", "lora"))
    log(f"{run_dir}: a DP-LoRA run {guarantee}: choosing the most useful checkpoint on nonmember_aux only "
        "(post-processing; member_aux is training data and is not used); the leakage bounds are not applied")
    losses = nonmember_losses(RunDir(run_dir).splits, run_dir / "select", checkpoints, settings, cfg.seed,
                              include_base=cfg.include_base, jobs=cfg.jobs, threads_per_job=cfg.threads_per_job,
                              model_cache=cfg.model_cache, log=log)
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
    write_json(Path(cfg.out) if cfg.out else RunDir(run_dir).select, result)
    return result


def format_selection(result: dict) -> str:
    if result.get("dp_guarantee"):
        lines = ["| checkpoint | held-out loss on nonmember_aux |", "|---|---|"]
        lines += [f"| {name} | {r['heldout_loss']:.4f} |" for name, r in result["checkpoints"].items()]
        return "\n".join(lines) + f"\n\nchoice: {result['choice']['model']} — {result['choice']['reason']}"
    lines = ["| checkpoint | est. best AUC (attack) | its 95 % upper bound (two-sided) | est. TPR@1%FPR "
             "| its upper limit | est. held-out loss |", "|---|---|---|---|---|---|"]
    for name, r in result["checkpoints"].items():
        tpr_up = "n/e" if r["tpr_upper"] is None else f"{r['tpr_upper']:.3f}"
        lines.append(f"| {name} | {r['best_auc']:.3f} ({r['best_attack']}) | {r['auc_upper']:.3f} "
                     f"| {r['best_tpr_at_1pct_fpr']:.3f} | {tpr_up} | {r['heldout_loss']:.4f} |")
    choice = result["choice"]
    lines.append(f"\nchoice: {choice['model'] or 'none'} — {choice['reason']}")
    return "\n".join(lines)
