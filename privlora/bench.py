"""``privlora bench``: the privacy–utility comparison of ``privlora demo`` on the user's own data and model.

Every run (a registered method with its settings) trains with the same preset, data, split and seed; plain
LoRA's intermediate checkpoints (and the base model) form the "train less" baseline; every model is audited
with every attack on identical queries; utility is the held-out denoising loss on nonmember_test (and a proxy
FID of generated samples); each defence gets a verdict against the baseline, and the most useful model under
a leakage bound is recommended. Finished pieces (trainings, the audit, samples) are reused when the bench is
run again, so an interrupted bench resumes.

Settings of one run, lowest to highest priority: the preset, the run's own settings, the train flags given to
bench, and what the bench controls (data source, output folder and name, training seed with ``--seeds``, the
baseline's checkpoint interval).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

from privlora.benchtable import (add_verdicts, format_extras, format_table, model_row, recommend, recommendation,
                                 seed_spread)
from privlora.errors import PrivloraError
from privlora.io import write_bytes, write_json, write_text
from privlora.progress import ENV as PROGRESS_ENV, Board
from privlora.rundir import RunDir
from privlora.tomlio import parse_toml_value

DATA_KEYS = ("train_data_dir", "splits_dir", "splits")
BENCH_KEYS = ("budgets", "attacks", "n_bootstrap", "quality_samples", "quality_steps", "guidance", "seeds",
              "max_auc", "max_tpr_at_1fpr", "select_attacks", "shadows", "resplit")
RUN_CONTROLLED = ("train_data_dir", "splits_dir", "splits", "synthetic_images", "output_dir", "output_name",
                  "overwrite", "resume", "state_every_n_epochs")


@dataclass
class BenchSpec:
    out: Path
    runs: dict[str, dict]  # run name → its settings on top of the preset ("method" defaults to the name)
    data: dict[str, str] = field(default_factory=dict)  # one of DATA_KEYS; empty: the preset's data source
    dataset: str | None = None  # a built-in dataset (openmoji) made into <out>/<name>_<resolution> instead of data
    preset: str | None = None  # a train preset: the settings every run shares
    train_overrides: dict[str, Any] = field(default_factory=dict)  # train flags given to bench: over every run
    budgets: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5])  # of plain LoRA's epochs
    attacks: list[str] = field(default_factory=lambda: ["loss", "ref_loss", "mlp", "secmi", "pia", "clid"])
    n_bootstrap: int = 500
    quality_samples: int = 200  # generated images per model for the proxy FID; 0: no samples
    quality_steps: int = 20  # sampler steps of those images
    guidance: float = 3.0
    seeds: list[int] | None = None  # one replicate per seed; the first is the table's, all give the intervals
    # each seed after the first re-draws the split (split_seed = its seed): None = on for the bench's own data
    # (generated images, --dataset), off for a user's folders unless asked
    resplit: bool | None = None
    max_auc: float = 0.6  # the recommendation's leakage bound
    max_tpr_at_1fpr: float = 0.05
    select_attacks: list[str] = field(default_factory=lambda: ["loss", "ref_loss"])
    shadows: int = 0  # lira / lira_offline in attacks: shadow LoRAs per audited run's settings (<out>/shadows)
    jobs: int = 1
    threads_per_job: int | None = None  # torch threads of each worker process; default: cores // jobs
    label: str = "bench"


@dataclass
class Job:
    name: str  # the run's name in the table (the output name: <out>/<name>/<name>.safetensors)
    run: str  # the run it belongs to
    seed_index: int
    overrides: dict[str, Any]

    @property
    def out(self) -> Path:
        return Path(self.overrides["output_dir"])

    @property
    def dir(self) -> RunDir:
        return RunDir(self.out, self.name)


# --- the runs ---------------------------------------------------------------------------------------------

def parse_methods(text: str) -> dict[str, dict]:
    """``lora,smp_lora:privacy_alpha=5:privacy_beta=2`` → runs; a run with settings is named after them
    (``smp_lora_privacy_alpha5_privacy_beta2``). Values are read as TOML values (numbers, true/false, strings)."""
    runs: dict[str, dict] = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        method, *pairs = item.split(":")
        settings: dict[str, Any] = {"method": method}
        for pair in pairs:
            key, eq, value = pair.partition("=")
            if not eq or not key:
                raise PrivloraError(f"--methods: {pair!r} in {item!r} is not key=value")
            settings[key] = parse_toml_value(value)
        name = method + "".join(f"_{k}{v}" for k, v in list(settings.items())[1:])
        if name in runs:
            raise PrivloraError(f"--methods: run {name!r} is given twice")
        runs[name] = settings
    if not runs:
        raise PrivloraError("--methods: no method given")
    return runs


def read_bench_file(path: str | Path) -> dict:
    """A bench file: ``preset = "train.toml"``, a ``[bench]`` table and ``[runs.NAME]`` tables; ``inherit``
    reads another bench file first (its [bench] keys are updated, its runs replaced if this file has any, or
    with ``keep_runs = [...]`` those inherited runs kept and this file's added)."""
    from privlora.tomlio import inherit_chain

    result: dict[str, Any] = {"preset": None, "bench": {}, "runs": {}}
    for file, data in inherit_chain(path, "bench file", _checked_bench_file):
        if "preset" in data:
            result["preset"] = str(file.parent / data["preset"])
        result["bench"] = {**result["bench"], **data.get("bench", {})}
        if "keep_runs" in data:  # these inherited runs, then this file's
            missing = set(data["keep_runs"]) - set(result["runs"])
            if missing:
                raise PrivloraError(f"{file}: keep_runs names {sorted(missing)[0]!r}, which the inherited file lacks")
            kept = {name: result["runs"][name] for name in data["keep_runs"]}
            result["runs"] = {**kept, **{name: dict(settings) for name, settings in data.get("runs", {}).items()}}
        elif data.get("runs"):
            result["runs"] = {name: dict(settings) for name, settings in data["runs"].items()}
    return result


def _checked_bench_file(path: Path, data: dict) -> tuple[Path, dict]:
    unknown = set(data) - {"preset", "bench", "runs", "keep_runs"}
    if unknown:
        raise PrivloraError(f"{path}: unknown key {sorted(unknown)[0]!r} "
                            "(a bench file has inherit, keep_runs, preset, [bench], [runs.NAME])")
    bad = set(data.get("bench", {})) - set(BENCH_KEYS)
    if bad:
        raise PrivloraError(f"{path}: unknown [bench] key {sorted(bad)[0]!r} (choose from {', '.join(BENCH_KEYS)})")
    return path, data


def check_runs(runs: dict[str, dict], source: str) -> dict[str, dict]:
    """Every run names a registered method and only training keys the bench does not control."""
    from privlora.config import all_keys, owners
    from privlora.objectives import METHODS

    known = all_keys()
    checked = {}
    for name, settings in runs.items():
        if not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise PrivloraError(f"{source}: run name {name!r} may only hold letters, digits, _ - .")
        settings = {"method": name, **settings}
        if settings["method"] not in METHODS:
            raise PrivloraError(f"{source}: run {name!r}: method {settings['method']!r} is not one of "
                                f"{', '.join(METHODS)}"
                                + ("" if "method" in runs[name] else " (set method = ... for this run)"))
        for key in settings:
            if key not in known or key in RUN_CONTROLLED:
                raise PrivloraError(f"{source}: run {name!r}: {key!r} is not a training setting a run may set")
            methods = owners(key)
            if methods and settings["method"] not in methods:
                raise PrivloraError(f"{source}: run {name!r}: {key} is a setting of {', '.join(methods)}, not of "
                                    f"{settings['method']}")
        checked[name] = settings
    return checked


def baseline_name(spec: BenchSpec) -> str:
    """The plain-LoRA run whose checkpoints are the train-less baseline: "lora", else the first lora run."""
    plain = [n for n, s in spec.runs.items() if s.get("method", n) == "lora"]
    if not plain:
        raise PrivloraError("the train-less frontier needs a plain LoRA run: add lora to --methods or a "
                            "[runs.lora] table")
    return "lora" if "lora" in plain else plain[0]


def jobs_for(spec: BenchSpec) -> list[Job]:
    """Every training of the bench with its complete settings, validated before anything is trained."""
    from privlora.config import build_config

    base = baseline_name(spec)
    seeds: list[int | None] = list(spec.seeds) if spec.seeds else [None]
    jobs = []
    for name, settings in spec.runs.items():
        for i, seed in enumerate(seeds):
            out_name = name if i == 0 else f"{name}-seed{seed}"
            controlled: dict[str, Any] = {"output_dir": str(spec.out / out_name), "output_name": out_name,
                                          "overwrite": True}
            if spec.data:
                controlled.update(dict.fromkeys(DATA_KEYS), synthetic_images=0, **spec.data)
            if seed is not None:
                controlled["seed"] = seed
                if i > 0 and resplits(spec):
                    controlled["split_seed"] = seed
            overrides = {**settings, **spec.train_overrides, **controlled}
            try:  # a bad setting stops the bench here, before any training
                epochs = build_config(spec.preset, overrides).max_train_epochs
            except PrivloraError as e:
                raise PrivloraError(f"run {name}: {e}") from None
            if epochs:  # a crashed bench resumes each training from its last state, losing ≤ 10 % of it
                overrides["state_every_n_epochs"] = max(1, epochs // 10)
            if name == base and spec.budgets:  # every seed's frontier has its own budgets
                interval = budget_interval(spec.budgets, epochs)
                if interval:
                    overrides["save_every_n_epochs"] = interval
                else:  # too few epochs to resolve the budgets: checkpoints at those fractions of the steps
                    overrides["save_at_fractions"] = list(spec.budgets)
            jobs.append(Job(out_name, name, i, overrides))
    return jobs


def resplits(spec: BenchSpec) -> bool:
    """Whether seeds after the first re-draw the split: the bench's own data by default, a user's auto-split
    folder with --resplit; five folders or a manifest fix the roles, so they cannot be re-drawn."""
    from privlora.config import build_config

    cfg = build_config(spec.preset, {**spec.train_overrides, **spec.data})
    fixed = bool(cfg.splits_dir or cfg.splits)
    if spec.resplit and fixed:
        raise PrivloraError("--resplit: the roles are fixed by --splits_dir / --splits; give a folder to split "
                            "(--train_data_dir) or drop --resplit")
    if spec.resplit is not None:
        return spec.resplit
    return not fixed and (bool(spec.dataset) or (not spec.data and bool(cfg.synthetic_images)))


def budget_interval(budgets: list[float], epochs: int | None) -> int | None:
    """The epoch interval that saves a checkpoint at every budget (fractions of the epochs), or None when the
    epochs are too few (or unset) to give each budget its own epoch inside the run: then step checkpoints."""
    if any(not 0 < f < 1 for f in budgets):
        raise PrivloraError(f"--budgets {budgets}: each must lie strictly between 0 and 1 (a fraction of the run)")
    if not epochs:
        return None
    points = [round(f * epochs) for f in budgets]
    if any(e < 1 or e >= epochs for e in points) or len(set(points)) < len(points):
        return None
    return math.gcd(*points)


def budget_files(spec: BenchSpec, job: Job) -> list[Path]:
    cfg = job_config(spec, job)
    if not cfg.save_at_fractions:
        return [job.dir.lora(epoch=round(f * cfg.max_train_epochs)) for f in spec.budgets]
    steps = budget_steps(job.dir.lora()) or 0
    wanted = sorted({max(1, round(f * steps)) for f in spec.budgets})
    files = [job.dir.lora(step=s) for s in wanted]
    if len(wanted) != len(spec.budgets) or any(s >= steps for s in wanted):
        raise PrivloraError(f"--budgets {spec.budgets}: the {steps}-step plain LoRA run has too few steps for "
                            "distinct budget checkpoints; train longer or give fewer budgets")
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise PrivloraError(f"{job.out}: budget checkpoints {', '.join(missing)} are missing")
    return files


def budget_steps(lora: Path) -> int | None:
    """The optimizer steps a checkpoint was trained for (its ss_steps), for the table's budget rows."""
    from privlora.captions import read_lora_metadata

    steps = read_lora_metadata(lora).get("ss_steps")
    return int(steps) if steps and steps.isdigit() else None


def job_config(spec: BenchSpec, job: Job):
    from privlora.config import build_config

    return build_config(spec.preset, job.overrides)


# --- training ---------------------------------------------------------------------------------------------

def is_finished(job: Job) -> bool:
    return job.dir.is_finished() and job.dir.train_time.is_file()


def resumable(spec: BenchSpec, job: Job) -> bool:
    """An unfinished training of exactly this job's settings left a state (a crash, Ctrl-C, a killed bench)."""
    from privlora.config import ran_with

    return job.dir.latest.is_file() and ran_with(job_config(spec, job), job.out)


def train_all(spec: BenchSpec, jobs: list[Job], log: Callable[[str], None], board: Board | None = None) -> None:
    """Every unfinished training: here one after another, or with ``jobs`` > 1 in child processes while ``board``
    shows each running one's progress."""
    board = board or Board(log)
    todo = [j for j in jobs if not is_finished(j)]
    board.expect(len(todo), "trainings")
    board.enter("train", f"{len(todo)} to train, {len(jobs) - len(todo)} reused"
                + (f", {spec.jobs} at a time" if spec.jobs > 1 and len(todo) > 1 else ""))
    for j in jobs:
        if j not in todo:
            log(f"{j.name}: finished earlier, reused")
        elif resumable(spec, j):
            log(f"{j.name}: resuming the interrupted training from its last state")
            j.overrides.update(resume="latest", overwrite=False)
    if spec.jobs <= 1:
        for job in todo:
            board.start(job.name)
            train_here(spec, job, log)  # which draws its own progress bar
            board.finish(job.name)
        return
    from privlora.processes import threads_for

    threads = threads_for(spec.jobs, spec.threads_per_job)
    with ThreadPoolExecutor(spec.jobs) as pool:
        board.wait({pool.submit(train_in_child, spec, job, threads, board.say, board): job.name for job in todo})


def train_here(spec: BenchSpec, job: Job, log: Callable[[str], None]) -> None:
    from privlora.train import train

    cfg = job_config(spec, job)
    log(f"training {job.name} ({cfg.method}, {cfg.max_train_epochs or cfg.max_train_steps} "
        f"{'epochs' if cfg.max_train_epochs else 'steps'}, seed {cfg.seed})")
    started = time.time()
    train(cfg)
    write_json(job.dir.train_time, {"seconds": time.time() - started, **_resumed(job)})


def train_in_child(spec: BenchSpec, job: Job, threads: int, log: Callable[[str], None],
                   board: Board | None = None) -> None:
    """``privlora train`` in a fresh process with its own torch thread count (set before torch is imported);
    ``board`` follows its progress file (``PRIVLORA_PROGRESS_FILE``) or else its log's tqdm bar."""
    import privlora
    from privlora.config import resolved_toml

    cfg = job_config(spec, job)
    job.out.mkdir(parents=True, exist_ok=True)
    config_file = write_text(job.out / "bench_job.toml", resolved_toml(cfg))
    progress_file = job.out / "progress.json"
    progress_file.unlink(missing_ok=True)  # an earlier bench's
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(Path(privlora.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
           PROGRESS_ENV: str(progress_file)}
    log(f"training {job.name} ({cfg.method}) in a child process, {threads} thread(s); log: {job.out / 'train.log'}")
    started = time.time()
    with open(job.out / "train.log", "w") as out:
        if board is not None:
            board.start(job.name, progress_file, job.out / "train.log", desc=cfg.method)
        code = subprocess.call([sys.executable, "-m", "privlora", "train", "--config", str(config_file)],
                               env=env, stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        raise PrivloraError(f"{job.out / 'train.log'}: training run {job.name} failed (exit status {code})")
    progress_file.unlink(missing_ok=True)
    write_json(job.dir.train_time, {"seconds": time.time() - started, "threads": threads, **_resumed(job)})


def _resumed(job: Job) -> dict:
    """A resumed training's seconds cover only what ran after the resume."""
    return {"resumed_from": "latest"} if job.overrides.get("resume") else {}


def check_same_split(jobs: list[Job]) -> None:
    """Every run must have trained on the baseline's split, or the comparison compares different data."""
    def roles(job: Job) -> dict:
        manifest = json.loads(job.dir.splits.read_text())
        return {r: sorted(e["sha256"] for e in entries) for r, entries in manifest["roles"].items()}

    first = roles(jobs[0])
    for job in jobs[1:]:
        if roles(job) != first:
            raise PrivloraError(f"{job.out / 'splits.json'}: run {job.name} was split differently from "
                                f"{jobs[0].name} (a run setting changes n_* or split_seed?)")


# --- the bench --------------------------------------------------------------------------------------------

def run_bench(spec: BenchSpec, log: Callable[[str], None] = print) -> dict:
    if spec.jobs < 1:
        raise PrivloraError(f"--jobs must be ≥ 1, got {spec.jobs}")
    from privlora.attacks import parse_attack_names

    spec.runs = check_runs(spec.runs, "runs")
    spec.attacks = parse_attack_names(spec.attacks)
    spec.select_attacks = parse_attack_names(spec.select_attacks)
    base = baseline_name(spec)
    if spec.dataset:
        spec.data = {"train_data_dir": str(prepare_dataset(spec, log))}
    jobs = jobs_for(spec)
    spec.out.mkdir(parents=True, exist_ok=True)
    wall = PhaseClock()
    board = Board(log)
    train_all(spec, jobs, log, board)
    wall.done("train")
    groups = seed_groups(jobs, base)
    for group in groups:
        check_same_split(group)
    if not resplits(spec):
        check_same_split([j for group in groups for j in group])
    main_jobs = groups[0]
    baseline = main_jobs[0]
    budgets = budget_files(spec, baseline) if spec.budgets else []
    canonical = [j.dir.lora() for j in main_jobs]
    cfg = job_config(spec, baseline)
    board.enter("select")
    chosen = aux_selection(spec, baseline, log)  # on the aux roles only, before any test role is audited
    wall.done("selection")
    pick = chosen["choice"].get("path")
    extra_pick = [Path(pick)] if pick and Path(pick) not in canonical + budgets else []
    loras = canonical + budgets + extra_pick
    board.enter("audit")
    log(f"auditing {len(loras)} LoRAs and the base model with {', '.join(spec.attacks)}")
    report = audit(spec, cfg, baseline.dir.splits, loras)
    replicates = [replicate(spec, groups[0], report, budgets)]
    for group in groups[1:]:  # each further seed: its own split's audit of its own runs and budgets
        seed_budgets = budget_files(spec, group[0]) if spec.budgets else []
        seed_loras = [j.dir.lora() for j in group] + seed_budgets
        log(f"auditing seed {job_seed(spec, group[0])}: {len(seed_loras)} LoRAs and the base model")
        seed_report = audit(spec, job_config(spec, group[0]), group[0].dir.splits, seed_loras,
                            name=f"audit-seed{job_seed(spec, group[0])}")
        replicates.append(replicate(spec, group, seed_report, seed_budgets))
    wall.done("audit")
    board.enter("quality")
    quality = utility_quality(spec, cfg, baseline.dir.splits, canonical + budgets + extra_pick)
    wall.done("quality")
    board.enter("table")
    selection = compare_selection(chosen, report)
    points = sorted(budgets + extra_pick, key=lambda p: budget_steps(p) or 0)  # the train-less points in order
    table = build_table(spec, jobs, report, quality, points, selection, replicates)
    table["wall_seconds"] = wall.seconds
    write_outputs(spec, table, {j.run: history(j) for j in sorted(main_jobs, key=lambda j: j.run != base)})
    return table


class PhaseClock:
    """Wall seconds of each phase of this invocation (a reused piece counts what reusing it took)."""

    def __init__(self) -> None:
        self.started = self.last = time.time()
        self.seconds: dict[str, float] = {}

    def done(self, phase: str) -> None:
        now = time.time()
        self.seconds.pop("total", None)
        self.seconds[phase] = round(now - self.last, 1)
        self.seconds["total"] = round(now - self.started, 1)
        self.last = now


def prepare_dataset(spec: BenchSpec, log: Callable[[str], None]) -> Path:
    """``--dataset openmoji``: build (or reuse) ``<out>/openmoji_<resolution>`` at the preset's resolution with
    exactly the images the split's four roles take (all of them when n_member_test is unset), so the members
    trained on are as many as with the demo's data, not every surplus image."""
    from privlora.config import build_config
    from privlora.data.openmoji import build_openmoji

    if spec.dataset != "openmoji":
        raise PrivloraError(f"--dataset: unknown dataset {spec.dataset!r} (choose from openmoji)")
    cfg = build_config(spec.preset, {**spec.train_overrides, **dict.fromkeys(DATA_KEYS), "synthetic_images": 1})
    roles = (cfg.n_nonmember_aux, cfg.n_nonmember_test, cfg.n_member_aux, cfg.n_member_test)
    n_images = None if cfg.n_member_test is None else sum(int(n or 0) for n in roles)
    folder = spec.out / f"{spec.dataset}_{cfg.resolution}"
    build_openmoji(folder, cfg.resolution, n_images=n_images, log=log)
    return folder


def seed_groups(jobs: list[Job], base: str) -> list[list[Job]]:
    """The jobs of each seed, in seed order, the baseline run first in each."""
    count = max(j.seed_index for j in jobs) + 1
    return [sorted((j for j in jobs if j.seed_index == i), key=lambda j: j.run != base) for i in range(count)]


def replicate(spec: BenchSpec, group: list[Job], report: dict, budgets: list[Path]):
    """One seed's audit as a replicate of the powered comparison (privlora.benchpower)."""
    from privlora.benchpower import replicate_from_report

    baseline = group[0]
    frontier = ["base", *(p.stem for p in sorted(budgets, key=lambda p: budget_steps(p) or 0)), baseline.name]
    return replicate_from_report(job_seed(spec, baseline), report, frontier, {j.run: j.name for j in group})


def history(job: Job) -> dict:
    return json.loads(job.dir.history.read_text())


def audit(spec: BenchSpec, cfg, splits: Path, loras: list[Path], name: str = "audit") -> dict:
    """The audit of every model (and the base model), in ``<out>/<folder>``, reused when it was run with exactly
    these inputs."""
    from privlora.audit import AuditConfig, run_audit

    folder = spec.out / name
    inputs = {"loras": [[str(p), _stamp(p)] for p in loras], "attacks": list(spec.attacks), "seed": cfg.seed,
              "n_bootstrap": spec.n_bootstrap, "model": cfg.pretrained_model_name_or_path,
              "splits": str(splits), "canaries": "auto" if cfg.canaries else None, "shadows": spec.shadows}
    done = folder / "inputs.json"
    if (folder / "report.json").is_file() and done.is_file() and json.loads(done.read_text()) == inputs:
        return json.loads((folder / "report.json").read_text())
    report = run_audit(AuditConfig(splits=str(splits), out=str(folder),
                                   pretrained_model_name_or_path=cfg.pretrained_model_name_or_path,
                                   loras=[str(p) for p in loras], attacks=list(spec.attacks), include_base=True,
                                   seed=cfg.seed, n_bootstrap=spec.n_bootstrap, config_dir=cfg.config_dir,
                                   clip_skip=cfg.clip_skip, jobs=spec.jobs, threads_per_job=spec.threads_per_job,
                                   canaries="auto" if cfg.canaries else None, shadows=spec.shadows,
                                   shadow_dir=str(spec.out / "shadows")))
    write_json(done, inputs)
    return report


def _stamp(path: Path) -> str:
    """Identifies one version of a file: a re-trained run's new LoRA invalidates what was computed from the old."""
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def utility_quality(spec: BenchSpec, cfg, splits_file: Path, loras: list[Path]) -> dict[str, dict]:
    """Proxy FID (tiny-sd VAE features) of samples from nonmember_test captions against those images; each
    model's result is cached in quality.json and reused while the sampling settings stay the same. With
    ``jobs`` > 1 on a CPU, models are sampled in worker processes (each model's generator is seeded alone, so
    the numbers do not change)."""
    if spec.quality_samples <= 0:
        return {}
    from privlora.data.splits import read_manifest

    cache = spec.out / "quality.json"
    settings = {"quality_samples": spec.quality_samples, "quality_steps": spec.quality_steps,
                "guidance": spec.guidance, "seed": cfg.seed, "model": cfg.pretrained_model_name_or_path}
    stored = json.loads(cache.read_text()) if cache.is_file() else {}
    results = stored.get("models", {}) if stored.get("settings") == settings else {}
    stamps = {"base": "", **{p.stem: _stamp(p) for p in loras}}
    results = {n: r for n, r in results.items() if stored.get("stamps", {}).get(n) == stamps.get(n)}
    todo = [lora for lora in [None, *loras] if _quality_name(lora) not in results]
    if not todo:
        return results
    from privlora.data.images import open_rgb

    test = read_manifest(splits_file).nonmember_test[: spec.quality_samples]
    job = QualityJob(cfg.pretrained_model_name_or_path, cfg.config_dir, [open_rgb(e.path) for e in test],
                     [e.caption for e in test], spec.quality_steps, spec.guidance, cfg.seed)

    def keep(name: str, result: dict, sheet: bytes) -> None:
        results[name] = result
        write_bytes(spec.out / f"samples_{name}.png", sheet)
        # each model's result survives an interrupt
        write_json(cache, {"settings": settings, "models": results, "stamps": {n: stamps[n] for n in results}})

    from privlora.processes import on_cpu, threads_for, worker_pool

    if spec.jobs > 1 and len(todo) > 1 and on_cpu():
        with worker_pool(min(spec.jobs, len(todo)), threads_for(spec.jobs, spec.threads_per_job)) as pool:
            for lora, (result, sheet) in zip(todo, pool.map(job.run, todo)):
                keep(_quality_name(lora), result, sheet)
    else:
        for lora in todo:
            keep(_quality_name(lora), *job.run(lora))
    write_bytes(spec.out / "samples_real_nonmembers.png", _png(_sheet(job.real[:16])))
    return results


def _quality_name(lora: Path | None) -> str:
    return "base" if lora is None else lora.stem


@dataclass
class QualityJob:
    """Samples of one model (the base model for ``lora=None``) from the held-out captions, scored against the
    held-out images; picklable, so a worker process can run it."""

    model: str
    config_dir: str | None
    real: list  # PIL images
    prompts: list[str]
    steps: int
    guidance: float
    seed: int

    def run(self, lora: Path | None) -> tuple[dict, bytes]:
        import torch

        from privlora.models.loading import load_base
        from privlora.quality import score
        from privlora.sample import build_pipeline, load_lora

        base = load_base(self.model, config_dir=self.config_dir)
        pipe = build_pipeline(base.unet, base.vae, base.text_encoder, base.tokenizer, base.noise_scheduler.config)
        if lora is not None:
            load_lora(pipe, lora)
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(self.seed)
        images = pipe(self.prompts, num_inference_steps=self.steps, guidance_scale=self.guidance,
                      generator=generator).images
        result = score(self.real, images, metrics=["fid"], feature_extractor="tiny", seed=self.seed)
        return result, _png(_sheet(images[:16]))


def _sheet(images: list):
    from privlora.sample import contact_sheet

    return contact_sheet(images, columns=8)


def _png(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def aux_selection(spec: BenchSpec, baseline: Job, log) -> dict:
    """``privlora select`` on the baseline's checkpoints (aux roles only); a bound the aux roles cannot support is
    recorded as a refusal, not an error: the table then says why there is no recommendation."""
    from privlora.select import SelectConfig, select

    done = baseline.dir.select
    settings: dict[str, Any] = {"max_auc": spec.max_auc, "max_tpr_at_1fpr": spec.max_tpr_at_1fpr,
                "attacks": ["loss", *[a for a in spec.select_attacks if a != "loss"]], "seed": job_seed(spec, baseline),
                "n_bootstrap": spec.n_bootstrap, "include_base": True}
    result = json.loads(done.read_text()) if done.is_file() else None
    final = baseline.dir.lora()
    if result is None or result["settings"] != settings or done.stat().st_mtime_ns < final.stat().st_mtime_ns:
        log(f"privacy-aware selection of {baseline.name}'s checkpoints on the aux roles")
        try:
            result = select(SelectConfig(str(baseline.out), spec.max_auc, spec.max_tpr_at_1fpr,
                                         list(spec.select_attacks), settings["seed"], spec.n_bootstrap, True,
                                         jobs=spec.jobs, threads_per_job=spec.threads_per_job), log=log)
        except PrivloraError as e:
            log(f"selection refused: {e}")
            return {"settings": settings, "refused": str(e), "checkpoints": {},
                    "choice": {"model": None, "path": None, "reason": f"select refused: {e}"}}
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


def job_seed(spec: BenchSpec, job: Job) -> int:
    return job_config(spec, job).seed


def build_table(spec: BenchSpec, jobs: list[Job], report: dict, quality: dict, budgets: list[Path],
                selection: dict | None, replicates: list | None = None) -> dict:
    from privlora.benchpower import power_table

    rows = {m["name"]: model_row(m, quality) for m in report["models"]}
    base = baseline_name(spec)
    main = [j for j in jobs if j.seed_index == 0]
    frontier_names = ["base", *(p.stem for p in budgets), base]
    defences = [j.name for j in main if j.run != base]
    add_verdicts(rows, frontier_names, defences)
    power = power_table(replicates, [j.run for j in main if j.run != base], spec.n_bootstrap,
                        job_seed(spec, main[0])) if replicates else {}
    for j in main:
        if j.run in power and "verdict" in power[j.run]:  # the paired verdict replaces the one-seed margin rule
            rows[j.name]["frontier_verdict"] = power[j.run]["verdict"]
            rows[j.name]["frontier_distance"] = power[j.run]["frontier_distance"]
            rows[j.name]["above_frontier"] = power[j.run]["verdict"] == "above"
    for j in main:
        rows[j.name]["train_seconds"] = json.loads(j.dir.train_time.read_text())["seconds"]
    for path in [*budgets, next(j for j in main if j.run == base).dir.lora()]:
        rows[path.stem]["steps"] = budget_steps(path)
    shown = {n: rows[n] for n in ["base", *frontier_names[1:], *defences]}
    table = {"settings": {**{k: v for k, v in asdict(spec).items() if k not in ("out", "runs")},
                          "out": str(spec.out), "runs": spec.runs,
                          "resolved": {j.name: _resolved(spec, j) for j in jobs}},
             "rows": shown, "frontier": frontier_names, "audit": str(Path("audit") / "report.md"),
             "date": time.strftime("%Y-%m-%d"), "machine": machine(spec),
             "recommendation": recommendation(shown, selection),
             "oracle": {**recommend(shown, spec.max_auc, spec.max_tpr_at_1fpr),
                        "note": "chosen on the test roles: for reference only, never a recommendation"},
             "selection": selection, "power": power,
             "resplit": resplits(spec) if spec.seeds and len(spec.seeds) > 1 else None}
    if replicates and len(replicates) > 1:
        seed_rows = {}
        for rep, group in zip(replicates[1:], seed_groups(jobs, base)[1:]):
            report_i = json.loads((spec.out / f"audit-seed{rep.seed}" / "report.json").read_text())
            by_name = {m["name"]: model_row(m, {}) for m in report_i["models"]}
            for j in group:
                seed_rows[j.name] = {**by_name[j.name], "train_seconds": json.loads(
                    j.dir.train_time.read_text())["seconds"]}
        table["seed_rows"] = seed_rows
        by_run = {run: [rows[j.name] if j.seed_index == 0 else seed_rows[j.name] for j in jobs if j.run == run]
                  for run in spec.runs}
        table["seed_spread"] = seed_spread(by_run)
    return table


def _resolved(spec: BenchSpec, job: Job) -> dict:
    return job_config(spec, job).flat()


def machine(spec: BenchSpec) -> str:
    import platform

    import torch

    from privlora.processes import threads_for

    threads = (f"{torch.get_num_threads()} threads" if spec.jobs <= 1 else
               f"{spec.jobs} processes × {threads_for(spec.jobs, spec.threads_per_job)} thread(s)")
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, {threads}"


def write_outputs(spec: BenchSpec, table: dict, histories: dict[str, dict]) -> None:
    write_json(spec.out / "table.json", table)
    title = f"privlora privacy benchmark ({spec.label}, {table['date']}, {table['machine']})"
    extras = format_extras(table)
    write_text(spec.out / "table.md", f"# {title}\n\n{format_table(table)}\n" + (f"\n{extras}\n" if extras else ""))
    from privlora.benchplots import curves_png, frontier_png

    write_bytes(spec.out / "curves.png", curves_png(histories))
    write_bytes(spec.out / "frontier.png", frontier_png(table))


# --- the command line -------------------------------------------------------------------------------------

def bench_spec_from_args(args: dict[str, Any]) -> BenchSpec:
    """``privlora bench`` flags → a spec: bench file values first, then the bench's own flags; every other
    flag is a training setting over every run."""
    from privlora.config import all_keys

    args = {k: v for k, v in args.items() if k not in ("command", "handler", "allow_network")}
    file = read_bench_file(args.pop("runs")) if "runs" in args else {"preset": None, "bench": {}, "runs": {}}
    runs = parse_methods(args.pop("methods")) if "methods" in args else file["runs"]
    if not runs:
        raise PrivloraError("--runs: the bench file has no [runs.NAME] table")
    bench = dict(file["bench"])
    for key in ("budgets", "attacks", "seeds", "select_attacks"):
        if key in args:
            bench[key] = _list_flag(key, args.pop(key))
    for key in ("n_bootstrap", "quality_samples", "quality_steps", "guidance", "max_auc", "max_tpr_at_1fpr", "jobs",
                "threads_per_job", "shadows", "resplit"):
        if key in args:
            bench[key] = args.pop(key)
    preset = args.pop("preset", None) or file["preset"]
    out = Path(args.pop("out"))
    data = {k: args.pop(k) for k in DATA_KEYS if k in args}
    dataset = args.pop("dataset", None)
    given = [*data, *(["dataset"] if dataset else [])]
    if len(given) > 1:
        raise PrivloraError(f"give one data source, not {' and '.join('--' + k for k in given)}")
    unknown = set(args) - all_keys()
    if unknown:
        raise PrivloraError(f"command line: unknown option --{sorted(unknown)[0]}")
    return BenchSpec(out=out, runs=runs, data=data, dataset=dataset, preset=preset, train_overrides=args, **bench)


def _list_flag(key: str, text: str) -> list:
    if key == "budgets" and text.strip().lower() == "none":
        return []
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        if key == "budgets":
            return [float(t) for t in items]
        if key == "seeds":
            return [int(t) for t in items]
    except ValueError:
        raise PrivloraError(f"--{key}: {text!r} is not a comma-separated list of numbers") from None
    return items
