"""``privlora audit``: how much membership does a (LoRA-adapted) model leak? Six attacks, one report.

Read ``run_audit`` top to bottom: check every input (nothing is written before all of them pass), load the
base model and every LoRA the way a user would (``StableDiffusionPipeline.load_lora_weights``), encode each
image and caption once, then per model × attack: fit on the auxiliary roles if the attack learns anything,
score ``member_test`` vs ``nonmember_test``, and compute metrics. The report files are written last, each
atomically.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, UTC
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from privlora.attacks import (ATTACKS, AUX_ROLES, DEFAULT_ATTACKS, TEST_ROLES, Attack, Batch, Target,
                              build_attacks, parse_attack_names)
from privlora.attacks import canary, metrics, report as render
from privlora.attacks.dp_audit import claimed_dp, dp_check
from privlora.attacks.target import stable_seed
from privlora.audit_cache import ModelCache, merge_cached
from privlora.captions import (TextEncoding, check_encoding_flags, lora_hyperparameters, read_lora_metadata,
                               text_encoding)
from privlora.data.readers import Example
from privlora.data.splits import Splits, read_manifest
from privlora.errors import PrivloraError
from privlora.models.lora_files import check_lora_file
from privlora.models.vae import native_side
from privlora.files import file_error, sha256_file
from privlora.io import write_bytes

REPORT_FILES = ("report.json", "report.md", "roc.png", "scores.png")


@dataclass
class AuditConfig:
    splits: str
    out: str
    pretrained_model_name_or_path: str = "tiny-sd"
    loras: list[str] = field(default_factory=list)
    attacks: list[str] = field(default_factory=lambda: list(DEFAULT_ATTACKS))
    include_base: bool = False  # with LoRAs: also audit the base model, as a row of the comparison
    seed: int = 0
    resolution: int | None = None  # default: the base model's native resolution
    center_crop: bool = True
    batch_size: int = 64  # UNet rows per forward pass
    max_samples: int | None = None  # per role, a seeded subset
    n_bootstrap: int = 1000
    config_dir: str | None = None
    clip_skip: int | None = None  # default: each LoRA's training setting (its metadata), else none
    max_token_length: int | None = None  # 75 | 150 | 225; default as clip_skip
    device: str | None = None
    attack_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    # a run's canaries.json: the one-run ε audit of each LoRA (privlora.attacks.canary); "auto": each LoRA's own
    # run folder's canaries.json (the bench: every run drew its own coins), LoRAs without one skipped
    canaries: str | None = None
    canary_attack: str = "ref_loss"  # a single-model attack that fits nothing (loss, ref_loss, secmi, pia)
    shadows: int = 0  # lira / lira_offline: shadow LoRAs per audited LoRA's settings (privlora.shadows)
    shadow_dir: str | None = None  # where shadows are cached and reused; default <out>/shadows
    shadow_method: str | None = None  # train the shadows with this method (e.g. lora) instead of the run's own
    shadow_seed: int | None = None  # draws the shadows' IN/OUT masks and seeds; default: seed (the bench: its first)
    jobs: int = 1  # on a CPU: the models split between this many worker processes (same numbers, less wall time)
    threads_per_job: int | None = None  # torch threads of each worker; default: cores // jobs
    # a folder of each model's report entry keyed by everything it depends on (privlora.audit_cache): a model whose
    # key is found there is not audited again
    model_cache: str | None = None


@dataclass
class _Model:
    name: str
    kind: str  # "base" | "lora"
    path: Path | None
    sha256: str
    adapter: str | None
    metadata: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    encoding: TextEncoding = field(default_factory=TextEncoding)  # captions encoded as in the model's training


def run_audit(cfg: AuditConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the audit and write report.json, report.md, roc.png and scores.png into ``cfg.out``; returns the report."""
    from privlora.models.loading import load_base

    started = time.time()
    names = parse_attack_names(cfg.attacks)
    out = _check_settings(cfg)
    lora_files = [check_lora_file(p) for p in cfg.loras]
    splits = read_manifest(cfg.splits)  # verifies every image's hash; every role must be non-empty
    shadow_sets = shadows_for(cfg, names, lora_files, out, log)  # trained (or found) before any part starts
    parts = _parts(cfg, lora_files)
    if parts:
        from privlora.audit_parts import run_in_parts
        from privlora.processes import threads_for

        report, plot = run_in_parts(cfg, lora_files, parts, threads_for(cfg.jobs, cfg.threads_per_job), log,
                                    _audit_part)
        _log_reuse(report, log)
        _log_decisions(plot["results"], log)
        _add_shadow_report(report, shadow_sets)
        return _write_report(out, report, log)
    base = load_base(cfg.pretrained_model_name_or_path, config_dir=cfg.config_dir)
    attacks = build_attacks(names, cfg.attack_params)  # prototypes: parameters, checks and query counts
    for attack in attacks:
        attack.check(base.noise_scheduler.config.num_train_timesteps)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for module in base.modules:
        module.to(device)
    resolution = cfg.resolution or native_side(base)
    roles = TEST_ROLES + (AUX_ROLES if any(a.fits for a in attacks) else ())
    chosen = select_samples(splits, roles, cfg.max_samples, cfg.seed)
    cache = ModelCache(cfg.model_cache) if cfg.model_cache else None

    shadow_files = list(dict.fromkeys(f for s in shadow_sets.values() for f in s.files))
    with loaded_loras(base, lora_files + shadow_files) as (switch, adapters):
        models = _models(base, lora_files, adapters[:len(lora_files)], cfg, resolution)
        targets = _targets(base, models, switch, cfg, device)
        attach_shadows(base, models, targets, shadow_sets, dict(zip(shadow_files, adapters[len(lora_files):])),
                       switch, cfg, device)
        canaries = canary_files(models, cfg) if cfg.canaries else {}
        keys = cache_keys(cfg, base, splits, chosen, attacks, resolution, device, models, shadow_sets,
                          canaries) if cache else {}
        reused = cache.entries(keys) if cache else {}
        # only these are scored; names, the base row's encoding and its controls came from every model, as afresh
        todo = [m for m in models if m.name not in reused]
        batches = encode_batches(base, splits, chosen, resolution, cfg.center_crop, device,
                                 cfg.batch_size) if todo else {}
        log("UNet queries per sample: " + ", ".join(f"{a.name} {a.queries_per_sample()}" for a in attacks)
            + " (loss, ref_loss and mlp share theirs; ref_loss's base half is run once per audit)")
        runs = run_attacks(todo, targets, names, cfg, batches) if todo else AttackRuns()
        canary = canary_audits(base, todo, canaries, targets, cfg, resolution, device, log) if cfg.canaries else {}
        distinct = {id(t): t for x in targets.values() for t in _paid_for(x)}
        queries_run = sum(t.unet_queries for t in distinct.values())

    results = {m.name: {a: _metrics(runs, cfg, m.name, a) for a in runs.scores[m.name]} for m in todo}
    report = build_report(cfg, base, splits, chosen, todo, attacks, results, runs, queries_run,
                          resolution, device, time.time() - started)
    for model in report["models"]:
        if model["name"] in canary:
            model["canary_audit"] = canary[model["name"]]
    if cache:
        merge_cached(report, [m.name for m in models], reused, keys, cache)
        _log_reuse(report, log)
    _log_decisions({m["name"]: m["results"] for m in report["models"]}, log)
    _add_shadow_report(report, shadow_sets)
    return _write_report(out, report, log)


def _parts(cfg: AuditConfig, lora_files: list[Path]) -> list[list[Path]] | None:
    """The LoRA files of each worker process, or None for one process (one job, a GPU, or a split that could
    change a name)."""
    from privlora.processes import on_cpu

    if cfg.jobs == 1 or not on_cpu(cfg.device):
        return None

    return parts_for(cfg, lora_files)


def parts_for(cfg: AuditConfig, files: list[Path]) -> list[list[Path]] | None:
    """LoRA files per part (round-robin, so parts get similar work), or None where the audit must run whole.

    The split is used only where it cannot change a name or a setting: distinct LoRA file names (the serial audit
    renames duplicates by position), the base model in the part of the first LoRA, which derives the base
    row's text encoding exactly as the whole audit would, and with ``--canaries auto`` the same canaries.json for
    every model that borrows one (``canary_files``: the first found among the models audited together)."""
    n = min(cfg.jobs, len(files))
    stems = [p.stem for p in files]
    if n < 2 or len(set(stems)) < len(stems) or "base" in stems:
        return None
    parts = [files[k::n] for k in range(n)]
    if cfg.canaries == AUTO and not _same_borrowed_canaries(files, parts, cfg.include_base):
        return None
    encodings = [lora_encoding(cfg, p, lora_metadata(p)) for p in files]
    if cfg.include_base and base_encoding(encodings, cfg) != base_encoding(encodings[::n], cfg):
        return None
    return parts


def _same_borrowed_canaries(files: list[Path], parts: list[list[Path]], include_base: bool) -> bool:
    """Whether each part lends its canary-less models (and part 0 its base row) the canaries.json the whole audit
    would: the first one found beside any audited LoRA."""
    def first(group: list[Path]) -> Path | None:
        return next((f for f in map(canaries_beside, group) if f.is_file()), None)

    whole = first(files)
    for k, part in enumerate(parts):
        borrows = (include_base and k == 0) or any(not canaries_beside(p).is_file() for p in part)
        if borrows and first(part) != whole:
            return False
    return True


def _audit_part(cfg: AuditConfig) -> dict:
    """One part of a split audit, in a worker process (``audit_parts.run_in_parts``): the audit of its models."""
    return run_audit(cfg, log=lambda line: None)


def _write_report(out: Path, report: dict, log: Callable[[str], None]) -> dict[str, Any]:
    from privlora.audit_parts import plot_inputs

    plot = plot_inputs(report)
    files = {
        "report.json": (json.dumps(report, indent=2) + "\n").encode("utf-8"),
        "report.md": render.markdown(report).encode("utf-8"),
        "roc.png": render.roc_png(plot["scores"], plot["results"]),
        "scores.png": render.scores_png(plot["scores"], plot["skipped"]),
    }
    for name, data in files.items():  # only now, with every input checked and every number computed
        write_bytes(out / name, data)
    log(f"wrote {', '.join(str(out / n) for n in files)} ({report['wall_seconds']:.1f} s)")
    return report


# ------------------------------------------------------------------------------------------------ checks


def _check_settings(cfg: AuditConfig) -> Path:
    if cfg.batch_size < 1:
        raise PrivloraError(f"--batch_size must be at least 1, got {cfg.batch_size}")
    if cfg.max_samples is not None and cfg.max_samples < 2:
        raise PrivloraError(f"--max_samples must be at least 2, got {cfg.max_samples}")
    if cfg.resolution is not None and (cfg.resolution <= 0 or cfg.resolution % 8):
        raise PrivloraError(f"--resolution {cfg.resolution} is not a positive multiple of 8")
    if cfg.jobs < 1:
        raise PrivloraError(f"--jobs must be ≥ 1, got {cfg.jobs}")
    if cfg.threads_per_job is not None and cfg.threads_per_job < 1:
        raise PrivloraError(f"--threads_per_job must be ≥ 1, got {cfg.threads_per_job}")
    if cfg.n_bootstrap < 0:
        raise PrivloraError(f"--n_bootstrap must be ≥ 0, got {cfg.n_bootstrap}")
    check_encoding_flags(cfg.clip_skip, cfg.max_token_length)
    if not cfg.splits:
        raise PrivloraError("--splits: give the split manifest (splits.json in the training run's output folder)")
    if cfg.canaries:
        parse_attack_names([cfg.canary_attack])  # an unknown name is a one-line error before any work
    if cfg.canaries and cfg.canaries != AUTO:
        from privlora.data.canaries import read_canaries

        read_canaries(cfg.canaries)  # a bad canary file fails before any work
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise PrivloraError(f"{out}: --out exists and is not a folder")
    return out


# ------------------------------------------------------------------------------------------------ models


class AdapterSwitch:
    """Makes one loaded LoRA (or none: the base model) active in the shared UNet and text encoder."""

    def __init__(self, pipe, adapters: list[str]):
        self.pipe, self.adapters = pipe, adapters
        self.current: str | None = "<unset>"

    def use(self, adapter: str | None) -> None:
        if not self.adapters or adapter == self.current:
            return
        if adapter is None:
            self.pipe.disable_lora()
        else:
            self.pipe.enable_lora()
            self.pipe.set_adapters([adapter])
        self.current = adapter


@contextlib.contextmanager
def loaded_loras(base, files: list[Path]) -> Iterator[tuple[AdapterSwitch, list[str]]]:
    """Load every LoRA as its own adapter through diffusers' own loader; the base model is restored on exit."""
    from privlora.models.lora import load_lora_adapter, quiet_loading
    from privlora.models.pipeline import sd_pipeline

    pipe = sd_pipeline(unet=base.unet, vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                       scheduler=base.noise_scheduler, text_encoder_2=base.text_encoder_2,
                       tokenizer_2=base.tokenizer_2)
    adapters: list[str] = []
    try:
        for i, path in enumerate(files):
            adapters.append(load_lora_adapter(pipe, path, f"audit_lora_{i}", base.name))
        yield AdapterSwitch(pipe, adapters), adapters
    finally:
        if adapters:
            with quiet_loading():
                pipe.unload_lora_weights()


def lora_metadata(path: Path) -> dict[str, str]:
    meta = read_lora_metadata(path)
    keep = ("privlora_method", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_sd_model_name",
            "sshs_model_hash", "ss_steps", "ss_epoch", "privlora_prediction_type", "privlora_hyperparameters")
    return {k: v for k, v in meta.items() if k in keep or k.startswith("privlora_dp_")}


def _models(base, files: list[Path], adapters: list[str], cfg: AuditConfig, resolution: int) -> list[_Model]:
    from privlora.models.loading import sha256_file

    loras = []
    seen = {"base"}
    for i, (path, adapter) in enumerate(zip(files, adapters), 1):
        name = path.stem if path.stem not in seen else f"{path.stem}-{i}"
        seen.add(name)
        model = _Model(name, "lora", path, sha256_file(path), adapter, lora_metadata(path))
        model.warnings = _lora_warnings(model, base, resolution)
        model.encoding = lora_encoding(cfg, path, model.metadata)
        loras.append(model)
    if not (cfg.include_base or not files):
        return loras
    encoding = base_encoding([m.encoding for m in loras], cfg)
    return [_Model("base", "base", None, base.sha256, None, encoding=encoding), *loras]


def lora_encoding(cfg: AuditConfig, path: Path, metadata: dict[str, str]) -> TextEncoding:
    """How the audit encodes captions for one LoRA: the flags, else its training setting (metadata)."""
    return text_encoding(lora_hyperparameters(metadata), cfg.clip_skip, cfg.max_token_length, str(path))


def base_encoding(loras: list[TextEncoding], cfg: AuditConfig) -> TextEncoding:
    """The flags; else the encoding every audited LoRA was trained with, when they agree; else the plain one."""
    shared = set(loras)
    if len(shared) == 1:
        only = loras[0]
        return TextEncoding(only.clip_skip, only.max_token_length, "as every audited LoRA: " + only.origin)
    return text_encoding({}, cfg.clip_skip, cfg.max_token_length, "base model")


def _lora_warnings(model: _Model, base, resolution: int) -> list[str]:
    meta, out = model.metadata, []
    trained_on = meta.get("sshs_model_hash")
    if trained_on and trained_on != base.sha256:
        out.append(f"trained on a base model with UNet hash {trained_on[:12]}…, auditing on {base.sha256[:12]}…")
    trained_res = lora_hyperparameters(meta).get("resolution")
    if trained_res and trained_res != resolution:
        out.append(f"trained at resolution {trained_res}, audited at {resolution}")
    return out


def _targets(base, models: list[_Model], switch: AdapterSwitch, cfg: AuditConfig, device) -> dict[str, Target]:
    """One target per model; the base model once per text encoding (each LoRA's reference uses its encoding)."""

    def target(name: str, model: _Model | None, encoding: TextEncoding, reference: Target | None) -> Target:
        adapter = model.adapter if model else None
        return Target(name, base.unet, base.noise_scheduler, _encoder(base, encoding),
                      seed=cfg.seed, batch_size=cfg.batch_size, device=device,
                      activate=lambda: switch.use(adapter), reference=reference,
                      source=model.path if model else None)

    base_targets: dict[TextEncoding, Target] = {}
    for m in models:
        if m.encoding not in base_targets:
            base_targets[m.encoding] = target("base", None, m.encoding, None)
    return {m.name: base_targets[m.encoding] if m.kind == "base" else
            target(m.name, m, m.encoding, base_targets[m.encoding]) for m in models}


# ------------------------------------------------------------------------------------------------ data


def select_samples(splits: Splits, roles: tuple[str, ...], max_samples: int | None,
                   seed: int) -> dict[str, list[Example]]:
    """Each role's examples, or a seeded subset of ``max_samples`` of them (kept in manifest order)."""
    chosen = {}
    for role in roles:
        examples = splits.role(role)
        if max_samples and len(examples) > max_samples:
            keep = np.random.default_rng(stable_seed(seed, role)).permutation(len(examples))[:max_samples]
            examples = [examples[i] for i in sorted(keep.tolist())]
        chosen[role] = examples
    return chosen


def encode_batches(base, splits: Splits, chosen: dict[str, list[Example]], resolution: int, center_crop: bool,
                   device, batch_size: int) -> dict[str, list[Batch]]:
    """VAE latents (posterior mean, deterministic) of every chosen image, encoded once, cut into batches."""
    from privlora.models.cache import encode_latents

    out = {}
    for role, examples in chosen.items():
        latents = encode_latents(base, examples, resolution, center_crop, device, batch_size=min(batch_size, 32))
        out[role] = [
            Batch(keys=[splits.hash_of(e) for e in examples[s:s + batch_size]],
                  paths=[e.path for e in examples[s:s + batch_size]],
                  roles=[role] * len(examples[s:s + batch_size]),
                  captions=[e.caption for e in examples[s:s + batch_size]],
                  latents=latents[s:s + batch_size])
            for s in range(0, len(examples), batch_size)
        ]
    return out


# ------------------------------------------------------------------------------------------------ running


@dataclass
class AttackRuns:
    """Per model × attack: test scores (per role), fit summary, details and timing; attacks that do not apply
    to a model are absent from all four and named in ``skipped`` with the reason."""

    scores: dict = field(default_factory=dict)
    fits: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)


def run_attacks(models: list[_Model], targets: dict[str, Target], names: list[str], cfg: AuditConfig,
                batches: dict[str, list[Batch]]) -> AttackRuns:
    """Every attack on every model it applies to. All are prepared for every model first, so bad input (an
    unreadable attacker file) stops the audit before any UNet work."""
    plans = {m.name: _prepare(names, cfg, targets[m.name]) for m in models}
    count = {role: sum(len(b) for b in bs) for role, bs in batches.items()}
    n_aux = sum(count.get(r, 0) for r in AUX_ROLES)
    n_test = sum(count[r] for r in TEST_ROLES)
    total = sum(n_test + (n_aux if a.fits else 0) for attacks, _ in plans.values() for a in attacks)
    runs = AttackRuns(skipped={name: skipped for name, (_, skipped) in plans.items()})
    with tqdm(total=total, desc="audit", unit="sample", dynamic_ncols=True) as bar:
        for model in models:
            target = targets[model.name]
            for table in (runs.scores, runs.fits, runs.details, runs.timing):
                table[model.name] = {}
            for attack in plans[model.name][0]:
                bar.set_description(f"{model.name}: {attack.name}")
                paid = {id(t): t for t in _paid_for(target)}
                before, t0 = {key: t.unet_queries for key, t in paid.items()}, time.time()
                runs.fits[model.name][attack.name] = _fit(attack, target, batches, bar, n_aux)
                runs.scores[model.name][attack.name] = {role: _score(attack, target, batches[role], bar)
                                                        for role in TEST_ROLES}
                runs.details[model.name][attack.name] = attack.details()
                ran = sum(t.unet_queries - before[key] for key, t in paid.items())
                runs.timing[model.name][attack.name] = {"seconds": round(time.time() - t0, 2), "unet_queries_run": ran}
            if target.reference is not target:
                target.clear_cache()  # the base target's cache is kept: every LoRA's ref_loss reuses it
    return runs


def _prepare(names: list[str], cfg: AuditConfig, target: Target) -> tuple[list[Attack], dict[str, str]]:
    """Fresh attacks for one model (no fitted state carries over), and why any of them does not apply to it."""
    attacks, skipped = [], {}
    for attack in build_attacks(names, cfg.attack_params):
        reason = attack.prepare(target)
        if reason is None:
            attacks.append(attack)
        else:
            skipped[attack.name] = reason
    return attacks, skipped


def _fit(attack: Attack, target: Target, batches: dict[str, list[Batch]], bar, n_aux: int) -> dict | None:
    if not attack.fits:
        return None
    summary = attack.fit(target, batches["member_aux"], batches["nonmember_aux"])
    bar.update(n_aux)
    return summary


def _score(attack: Attack, target: Target, batches: list[Batch], bar) -> np.ndarray:
    out = []
    for batch in batches:
        out.append(attack.score(target, batch).detach().double().cpu().numpy())
        bar.update(len(batch))
    return np.concatenate(out)


def _metrics(runs: AttackRuns, cfg: AuditConfig, model: str, attack: str) -> dict:
    scores, details = runs.scores[model][attack], runs.details[model][attack]
    result = metrics.evaluate(scores["member_test"], scores["nonmember_test"],
                              seed=stable_seed(cfg.seed, "bootstrap", model, attack), n_bootstrap=cfg.n_bootstrap,
                              threshold=ATTACKS[attack].decision_threshold)
    result["fit"] = runs.fits[model][attack]
    if details:
        result["details"] = details
    if not metrics.is_held_out(result):
        result["notes"].append(NOT_HELD_OUT)
    return result


NOT_HELD_OUT = ("not a held-out measurement: the attack was trained or chosen on the test samples with their labels; "
                "left out of the ε lower bound")


def _log_decisions(results: dict, log: Callable[[str], None]) -> None:
    for model, by_attack in results.items():
        for attack, r in by_attack.items():
            if "decision_accuracy" in r:
                log(f"{model}: {attack} AUC {r['auc']:.3f}, {ATTACKS[attack].decision_label} "
                    f"{r['decision_accuracy']:.3f}" + ("" if metrics.is_held_out(r) else " (not held out)"))


# ------------------------------------------------------------------------------------------------ report


def build_report(cfg: AuditConfig, base, splits: Splits, chosen: dict, models: list[_Model], attacks: list[Attack],
                 results: dict, runs: AttackRuns, queries_run: int, resolution: int, device,
                 wall: float) -> dict[str, Any]:
    per_sample = {a.name: a.queries_per_sample() for a in attacks}
    specs = {a.name: {"summary": a.summary, "params": _jsonable(a.params()), "queries_per_sample": per_sample[a.name],
                      "fits_on": list(AUX_ROLES) if a.fits else None,
                      **({"decision": {"threshold": a.decision_threshold, "label": a.decision_label}}
                         if a.decision_threshold is not None else {})} for a in attacks}
    return {
        "privlora_audit": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "seed": cfg.seed,
        "base_model": {"name": base.name, "sha256": base.sha256, "source_kind": base.source_kind,
                       "prediction_type": base.prediction_type,
                       "loss_quantity": "epsilon" if base.prediction_type == "epsilon" else
                       "v (loss/ref_loss/mlp/clid use the v-target training loss; secmi/pia convert v to epsilon)"},
        "data": {"manifest": str(cfg.splits), "roles_in_manifest": {r: len(e) for r, e in splits.items()},
                 "used": {r: len(e) for r, e in chosen.items()}, "max_samples": cfg.max_samples,
                 # in score order; with a shadow attack the report names the most exposed members: keep it private
                 **({"member_test_paths": [str(e.path) for e in chosen["member_test"]]} if cfg.shadows else {})},
        "settings": {"resolution": resolution, "center_crop": cfg.center_crop, "batch_size": cfg.batch_size,
                     "n_bootstrap": cfg.n_bootstrap, "clip_skip": cfg.clip_skip,
                     "max_token_length": cfg.max_token_length, "device": str(device),
                     "vae_latents": "posterior mean (deterministic)",
                     "noise": "per sample: seeded by (seed, image sha256, draw) — identical across models"},
        "attacks": specs,
        "unet_queries": {"per_sample": per_sample, "total_run": queries_run},
        "models": [
            {"name": m.name, "kind": m.kind, "path": str(m.path) if m.path else None, "sha256": m.sha256,
             "lora_metadata": m.metadata, "warnings": m.warnings, "text_encoding": m.encoding.as_dict(),
             "results": {a: {**r, **runs.timing[m.name][a]} for a, r in results[m.name].items()},
             "skipped": runs.skipped[m.name],
             "dp_bound": _dp_bound(runs.scores[m.name], results[m.name], m.metadata),
             "dp_guarantee": m.metadata.get("privlora_dp_guarantee"),
             "scores": {a: {r: s[r].tolist() for r in TEST_ROLES} for a, s in runs.scores[m.name].items()}}
            for m in models
        ],
        "wall_seconds": round(wall, 2),
    }


# ------------------------------------------------------------------------------------------------ model cache


def cache_keys(cfg: AuditConfig, base, splits: Splits, chosen: dict[str, list[Example]], attacks: list[Attack],
               resolution: int, device, models: list[_Model], shadow_sets: dict[Path, Any],
               canaries: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Per model, everything its report entry depends on (``privlora.audit_cache``): what every model of this audit
    shares, then the model's own inputs. Neither the other LoRAs nor the output folder nor ``jobs`` (a part gives
    the serial numbers) is in it; the torch thread count is, since on a CPU it may change the last bits.

    The base row borrows from the LoRAs beside it: its text encoding (``base_encoding``), with shadow attacks the
    first LoRA's shadows as its control, with canaries the first canary file found. Its key holds each of them, so
    it is reused exactly when the LoRAs give it the same inputs again (a LoRA added after the first, trained with
    the same text encoding, keeps it)."""
    from privlora.audit_cache import FileHashes

    shared = _shared_key(cfg, base, splits, chosen, attacks, resolution, device)
    hashes = FileHashes()
    return {m.name: {**shared, "model": _model_key(m, shadow_set_of(m, shadow_sets), canaries.get(m.name), attacks,
                                                   hashes)} for m in models}


def _shared_key(cfg: AuditConfig, base, splits: Splits, chosen: dict[str, list[Example]], attacks: list[Attack],
                resolution: int, device) -> dict[str, Any]:
    from privlora.audit_cache import FORMAT, code_fingerprint, content_digest, folder_stamps

    base_folder = Path(base.name)
    samples = {role: [[splits.hash_of(e), e.caption] for e in examples] for role, examples in chosen.items()}
    canary_attack = build_attacks([cfg.canary_attack], cfg.attack_params)[0] if cfg.canaries else None
    return {
        "format": FORMAT, "code": code_fingerprint(),
        "compute": {"device": str(device), "torch": torch.__version__,
                    "threads": torch.get_num_threads() if device.type == "cpu" else None},
        "base_model": {"path": cfg.pretrained_model_name_or_path, "config_dir": cfg.config_dir, "name": base.name,
                       "unet_sha256": base.sha256,
                       "files": folder_stamps(base_folder) if base_folder.is_dir() else None},
        "samples": content_digest(samples),  # the manifest's images (by content) and captions this audit scores
        "attacks": [[a.name, _jsonable(a.params())] for a in attacks],  # in order: the report's order
        "canary_attack": [canary_attack.name, _jsonable(canary_attack.params())] if canary_attack else None,
        "seed": cfg.seed, "resolution": resolution, "center_crop": cfg.center_crop, "batch_size": cfg.batch_size,
        "max_samples": cfg.max_samples, "n_bootstrap": cfg.n_bootstrap, "clip_skip": cfg.clip_skip,
        "max_token_length": cfg.max_token_length,
    }


def _model_key(m: _Model, shadow_set, canary_file: Path | None, attacks: list[Attack],
               hashes: Callable[[Path], str]) -> dict[str, Any]:
    from privlora.audit_cache import content_digest

    beside = [f for a in attacks for f in (a.side_files(m.path) if m.path else [])]
    return {
        "name": m.name,  # seeds the bootstrap
        "kind": m.kind, "path": str(m.path) if m.path else None, "sha256": m.sha256,
        "text_encoding": m.encoding.as_dict(),
        "shadows": None if shadow_set is None else {
            "files": [hashes(f) for f in shadow_set.files], "steps": shadow_set.steps,
            "pool": content_digest(shadow_set.keys), "masks": content_digest(shadow_set.masks.tolist())},
        "canaries": [str(canary_file), hashes(canary_file)] if canary_file else None,
        "files_beside": {f.name: hashes(f) if f.is_file() else None for f in beside},
    }


def _log_reuse(report: dict, log: Callable[[str], None]) -> None:
    summary = report.get("model_cache")
    if summary:
        reused = summary["reused"]
        log(f"model cache {summary['folder']}: {len(reused)} of {len(report['models'])} models reused"
            + (f" ({', '.join(reused)})" if reused else "") + f", {len(summary['audited'])} audited now")


def shadows_for(cfg: AuditConfig, names: list[str], lora_files: list[Path], out: Path,
                log: Callable[[str], None]) -> dict[Path, Any]:
    """Each LoRA's shadow set (privlora.shadows) when a shadow attack is asked for; {} otherwise."""
    from privlora.attacks import SHADOW_ATTACKS
    from privlora.shadows import ensure_shadows

    if not any(n in SHADOW_ATTACKS for n in names):
        return {}
    if cfg.shadows < 2:
        raise PrivloraError(f"--attacks {', '.join(n for n in names if n in SHADOW_ATTACKS)} needs --shadows K "
                            "(at least 2 shadow LoRAs)")
    folder = Path(cfg.shadow_dir) if cfg.shadow_dir else out / "shadows"
    seed = cfg.seed if cfg.shadow_seed is None else cfg.shadow_seed
    return ensure_shadows(lora_files, Path(cfg.splits), cfg.shadows, seed, folder, cfg.shadow_method, cfg.jobs,
                          cfg.threads_per_job, log)


def attach_shadows(base, models: list[_Model], targets: dict[str, Target], shadow_sets: dict[Path, Any],
                   adapters: dict[Path, str], switch: AdapterSwitch, cfg: AuditConfig, device) -> None:
    """Give each LoRA's target its shadow set, with one Target per shadow (the model's text encoding and base
    reference; shared between LoRAs whose shadows and encoding agree, so each shadow answers each query once).
    The base model, trained on nothing, gets the first LoRA's shadows as a control: its shadow-attack scores
    measure the attacks' noise floor on this split."""
    import dataclasses

    made: dict[tuple[Path, TextEncoding], Target] = {}
    for m in models:
        shadow_set = shadow_set_of(m, shadow_sets)
        if shadow_set is None:
            continue
        own = targets[m.name]
        shadow_targets = []
        for file in shadow_set.files:
            key = (file, m.encoding)
            if key not in made:
                made[key] = Target(f"shadow:{file.parent.name}", base.unet, base.noise_scheduler,
                                   _encoder(base, m.encoding), seed=cfg.seed, batch_size=cfg.batch_size,
                                   device=device, activate=_activator(switch, adapters[file]),
                                   reference=own.reference)
            shadow_targets.append(made[key])
        own.shadows = dataclasses.replace(shadow_set, targets=shadow_targets)  # type: ignore[attr-defined]


def _paid_for(target: Target) -> list[Target]:
    """Every UNet a model's queries run on: its own, its base reference and its shadows (a shadow attack asks each
    shadow the model's queries; shadows shared between models answer each query once)."""
    shadows = getattr(target, "shadows", None)
    return [target, target.reference, *(getattr(shadows, "targets", None) or [])]


def shadow_set_of(model: _Model, shadow_sets: dict[Path, Any]):
    """A LoRA's own shadow set; the base model's is the first LoRA's (a control); None without shadow attacks."""
    return shadow_sets.get(model.path) if model.path else next(iter(shadow_sets.values()), None)


def _encoder(base, encoding: TextEncoding) -> Callable[[list[str]], torch.Tensor]:
    from privlora.models.loading import encode_text

    return lambda captions: encode_text(base, captions, encoding)


def _activator(switch: AdapterSwitch, adapter: str) -> Callable[[], None]:
    return lambda: switch.use(adapter)


def _add_shadow_report(report: dict, shadow_sets: dict[Path, Any]) -> None:
    """The shadows' cost per audited LoRA, and each shadow attack's most exposed members (top 1 %, at least 1)."""
    from privlora.attacks import SHADOW_ATTACKS

    if not shadow_sets:
        return
    by_path = {str(p): s.cost() for p, s in shadow_sets.items()}
    families = {s.folder: s for s in shadow_sets.values()}  # checkpoints of one run share one family of trainings
    report["shadows"] = {"per_lora": by_path, "families": len(families),
                         "trained_now": sum(s.trained for s in families.values()),
                         "wall_seconds": round(sum(s.wall_seconds for s in families.values()), 1)}
    for model in report["models"]:
        exposed = {}
        for attack, scores in model["scores"].items():
            paths = report["data"].get("member_test_paths")
            if attack in SHADOW_ATTACKS and paths:
                member = np.asarray(scores["member_test"])
                top = np.argsort(-member, kind="stable")[:max(1, len(member) // 100)]
                exposed[attack] = [{"path": paths[i], "score": float(member[i])} for i in top]
        if exposed:
            model["most_exposed"] = exposed


AUTO = "auto"


def canaries_beside(lora: Path) -> Path:
    """Where ``--canaries auto`` looks for a LoRA's canaries.json: beside the LoRA, as training writes it."""
    from privlora.data.canaries import CANARY_NAME

    return lora.parent / CANARY_NAME


def canary_files(models: list[_Model], cfg: AuditConfig) -> dict[str, Path]:
    """Each model's canaries.json: ``cfg.canaries``, or with "auto" the one beside the LoRA; the base model (and a
    LoRA without one) gets the first file found among all the audited models; {} when none is found."""
    own = {m.name: (Path(cfg.canaries) if cfg.canaries != AUTO else  # type: ignore[arg-type]
                    (canaries_beside(m.path) if m.path else None)) for m in models}
    found = [f for f in own.values() if f is not None and f.is_file()]
    if not found:
        return {}
    return {name: f if f is not None and f.is_file() else found[0] for name, f in own.items()}


def canary_audits(base, models: list[_Model], files: dict[str, Path], targets: dict[str, Target],
                  cfg: AuditConfig, resolution: int, device, log: Callable[[str], None]) -> dict[str, dict]:
    """The one-run ε lower bound of each of ``models`` from its canaries (``files``: ``canary_files`` of every
    audited model): each canary scored by ``canary_attack``, guesses on the extremes, Steinke et al.'s bound at the
    LoRA's claimed δ (0 without a DP claim). The base model, trained on no canary, is a control."""
    if not files:
        log("canary audit: no canaries.json beside any audited LoRA; skipped")
        return {}
    if ATTACKS[cfg.canary_attack].fits:
        raise PrivloraError(f"canary_attack {cfg.canary_attack} learns from the aux roles; the canary audit "
                            "needs one that fits nothing (loss, ref_loss, secmi, pia)")
    prepared: dict[Path, tuple[np.ndarray, list[Batch]]] = {}
    out = {}
    for model in models:
        file = files[model.name]
        if file not in prepared:
            prepared[file] = _canary_batches(base, file, cfg, resolution, device)
        included, batches = prepared[file]
        (attack,) = build_attacks([cfg.canary_attack], cfg.attack_params)  # fresh per model
        if attack.prepare(targets[model.name]):
            continue
        scores = np.concatenate([attack.score(targets[model.name], b).detach().double().cpu().numpy()
                                 for b in batches])
        claim = claimed_dp(model.metadata)
        result = canary.audit(scores, included, delta=claim[1] if claim else 0.0)
        result.update(attack=cfg.canary_attack, claimed_epsilon=claim[0] if claim else None, file=str(file),
                      control=model.kind == "base",  # trained on no canary: its bound should be 0
                      kind="one-run canary audit (Steinke, Nasr & Jagielski 2023): a sound 95 % lower bound")
        out[model.name] = result
        best = result["best"] or {"correct": 0, "guesses": 0}
        log(f"{model.name}: canary audit ({len(included)} canaries, {cfg.canary_attack}): ε ≥ "
            f"{result['epsilon_lower_bound']:.3f} at 95 % ({best['correct']} of {best['guesses']} guesses right)")
    return out


def _canary_batches(base, file: Path, cfg: AuditConfig, resolution: int, device) -> tuple[np.ndarray, list[Batch]]:
    from privlora.data.canaries import read_canaries
    from privlora.models.cache import encode_latents

    record = read_canaries(file)
    examples = [Example(Path(c["path"]), c["caption"]) for c in record["canaries"]]
    for example, c in zip(examples, record["canaries"]):
        if not example.path.is_file() or sha256_file(example.path) != c["sha256"]:
            raise file_error(example.path, f"canary listed in {file} is missing or changed")
    included = np.array([bool(c["included"]) for c in record["canaries"]])
    latents = encode_latents(base, examples, resolution, cfg.center_crop, device, batch_size=min(cfg.batch_size, 32))
    step = cfg.batch_size
    batches = [Batch(keys=[c["sha256"] for c in record["canaries"][s:s + step]],
                     paths=[e.path for e in examples[s:s + step]], roles=["canary"] * len(examples[s:s + step]),
                     captions=[e.caption for e in examples[s:s + step]], latents=latents[s:s + step])
               for s in range(0, len(examples), step)]
    return included, batches


def _dp_bound(scores: dict, results: dict, metadata: dict[str, str]) -> dict[str, Any] | None:
    """The ε lower bound over the held-out attacks run on this model; None when there is none."""
    usable = [a for a, r in results.items() if metrics.is_held_out(r)]
    if not usable:
        return None
    return dp_check({a: scores[a] for a in usable}, metadata, {a: results[a]["tpr_at_1pct_fpr"] for a in usable})


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
