"""What a bench is made of: its spec (runs, data, budgets, seeds), the bench file and ``--methods`` readers, and the
training jobs with their complete settings (``jobs_for``), checked before anything is trained."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privlora.errors import PrivloraError
from privlora.rundir import RunDir
from privlora.tomlio import parse_toml_value

DATA_KEYS = ("train_data_dir", "splits_dir", "splits")
BENCH_KEYS = ("budgets", "attacks", "n_bootstrap", "quality_samples", "quality_steps", "guidance", "seeds",
              "max_auc", "max_tpr_at_1fpr", "select_attacks", "shadows", "resplit")
RUN_CONTROLLED = ("train_data_dir", "splits_dir", "splits", "synthetic_images", "output_dir", "output_name",
                  "overwrite", "resume", "state_every_n_epochs")
# a tune table's points keep these: scored by one audit of one nonmember_aux, they share the run's method, seed and
# split, and the base model, resolution and clip skip their loss is measured with
TUNE_FIXED = ("method", "seed", "split_seed", "n_member_aux", "n_member_test", "n_nonmember_aux", "n_nonmember_test",
              "pretrained_model_name_or_path", "config_dir", "resolution", "clip_skip")


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
    for name, settings in data.get("runs", {}).items():
        check_tune(str(path), name, settings)
    return path, data


def check_tune(source: str, name: str, settings: dict) -> None:
    """A run's ``[runs.NAME.tune]`` table: training keys the run does not set itself, each mapped to a non-empty
    list of distinct values; each value is read as its setting's type."""
    from privlora.config import all_keys, coerce_setting, owners
    from privlora.objectives import METHODS

    if "tune" not in settings:
        return
    tune, method = settings["tune"], settings.get("method", name)
    where = f"{source}: run {name!r}: tune"
    if not isinstance(tune, dict) or not tune:
        raise PrivloraError(f"{where} must be a table of key = [values, ...] with at least one key")
    for key, values in tune.items():
        if key not in all_keys() or key in RUN_CONTROLLED:
            raise PrivloraError(f"{where}: {key!r} is not a training setting a run may set")
        if key in TUNE_FIXED:
            raise PrivloraError(f"{where}: {key} cannot be tuned (every point keeps the run's method, seed and split, "
                                "and is measured with its base model, resolution and clip skip)")
        methods = owners(key)
        if method in METHODS and methods and method not in methods:
            raise PrivloraError(f"{where}: {key} is a setting of {', '.join(methods)}, not of {method}")
        if key in settings:
            raise PrivloraError(f"{where}: {key} is set both in the run and in its tune table")
        if not isinstance(values, list):
            raise PrivloraError(f"{where}: {key} = {values!r} is not a list of values")
        if not values:
            raise PrivloraError(f"{where}: {key} = [] is empty (give at least one value)")
        read = [repr(coerce_setting(key, v, where)) for v in values]
        if len(set(read)) < len(read):
            raise PrivloraError(f"{where}: {key} = {values!r} lists a value twice")


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
        check_tune(source, name, settings)
        for key in (k for k in settings if k != "tune"):
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


def jobs_for(spec: BenchSpec, tuned: dict[str, dict] | None = None) -> list[Job]:
    """Every training of the bench with its complete settings, validated before anything is trained. ``tuned``:
    run name → the values its tune table's search chose (``benchtune``); a tuned run not in it trains at the
    preset's values."""
    baseline_name(spec)  # without a plain LoRA run the bench stops here, before any training
    seeds = bench_seeds(spec)
    redraw = len(seeds) > 1 and resplits(spec)
    jobs = []
    for name, settings in spec.runs.items():
        trained = {**training_settings(settings), **(tuned or {}).get(name, {})}
        for i, seed in enumerate(seeds):
            out_name = name if i == 0 else f"{name}-seed{seed}"
            jobs.append(make_job(spec, name, trained, spec.out / out_name, out_name, i, seed, redraw=redraw))
    return jobs


def bench_seeds(spec: BenchSpec) -> list[int | None]:
    """The training seeds, one replicate each; [None]: the preset's seed."""
    return list(spec.seeds) if spec.seeds else [None]


def training_settings(settings: dict) -> dict:
    """A run's settings without its tune table (which is not a training key)."""
    return {k: v for k, v in settings.items() if k != "tune"}


def make_job(spec: BenchSpec, run: str, settings: dict, out: Path, out_name: str, seed_index: int,
             seed: int | None, *, redraw: bool = False, checkpoints: bool = True) -> Job:
    """One training of ``run`` with ``settings`` into ``out``, its settings checked; ``checkpoints``: with the
    bench's checkpoint schedule (select's candidates), else the final LoRA alone."""
    from privlora.config import build_config

    controlled: dict[str, Any] = {"output_dir": str(out), "output_name": out_name, "overwrite": True}
    if spec.data:
        controlled.update(dict.fromkeys(DATA_KEYS), synthetic_images=0, **spec.data)
    if seed is not None:
        controlled["seed"] = seed
        if seed_index > 0 and redraw:
            controlled["split_seed"] = seed
    overrides = {**settings, **spec.train_overrides, **controlled}
    try:  # a bad setting stops the bench here, before any training
        epochs = build_config(spec.preset, overrides).max_train_epochs
    except PrivloraError as e:
        raise PrivloraError(f"run {run}: {e}") from None
    if epochs:  # a crashed bench resumes each training from its last state, losing ≤ 10 % of it
        overrides["state_every_n_epochs"] = max(1, epochs // 10)
    if checkpoints:
        overrides.update(checkpoint_schedule(spec.budgets, epochs))  # the same rule for every run
    return Job(out_name, run, seed_index, overrides)


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


def checkpoint_schedule(budgets: list[float], epochs: int | None) -> dict[str, Any]:
    """The intermediate saves of every run, one rule for all: the plain LoRA's are the budgets of its frontier, and
    every run's are the candidates ``privlora select`` chooses among on the aux roles. At every multiple of the
    epoch interval that hits each budget, or, when the run has too few epochs for that, at the budgets' fractions
    of its steps. No budgets: no intermediate saves."""
    if not budgets:
        return {}
    interval = budget_interval(budgets, epochs)
    return {"save_every_n_epochs": interval} if interval else {"save_at_fractions": list(budgets)}


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




def job_seed(spec: BenchSpec, job: Job) -> int:
    return job_config(spec, job).seed


def seed_groups(jobs: list[Job], base: str) -> list[list[Job]]:
    """The jobs of each seed, in seed order, the baseline run first in each."""
    count = max(j.seed_index for j in jobs) + 1
    return [sorted((j for j in jobs if j.seed_index == i), key=lambda j: j.run != base) for i in range(count)]
