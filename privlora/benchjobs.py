"""The bench's trainings: each unfinished job trained here or in a child process (``--jobs``), resumed from its
last state when its settings are unchanged, with live progress; and the check that the runs of a seed share a split."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from collections.abc import Callable

from privlora.benchspec import BenchSpec, Job, job_config
from privlora.errors import PrivloraError
from privlora.io import write_json, write_text
from privlora.progress import ENV as PROGRESS_ENV, Board


CHECKPOINT_KEYS = ("save_every_n_epochs", "save_at_fractions")  # benchspec.checkpoint_schedule's settings
# settings that do not shape what a finished training learned: where it wrote, how often it logged or probed (the
# contract test shows probing changes no LoRA), and how it was started
NOT_COMPARED = ("output_dir", "output_name", "overwrite", "resume", "logging_dir", "eval_every_n_epochs",
                "sample_every_n_epochs", "sample_prompts", "save_state", "state_every_n_epochs")


def is_finished(spec: BenchSpec, job: Job, log: Callable[[str], None] | None = None) -> bool:
    """Trained to the end with every setting the bench asks for now: the intermediate checkpoints (a run finished
    before every run saved them, or with other budgets, is trained once more so that ``privlora select`` has its
    candidates), a tuned run's chosen values, and any setting changed in the bench file or on the command line."""
    if not (job.dir.is_finished() and job.dir.train_time.is_file()):
        return False
    changed = changed_settings(spec, job)
    if changed and log:
        log(f"{job.name}: trained earlier with other settings ({changed}): trained again")
    return not changed


def changed_settings(spec: BenchSpec, job: Job) -> str:
    """The settings the run's resolved_config.toml records differently from this job's, as "key: then → now"
    (empty: none). A key the record lacks (a run trained before the key existed, or an unset key, which is a
    comment there) counts as its default."""
    import tomllib

    from privlora.config import method_defaults

    try:
        recorded = _flat(tomllib.loads(job.dir.resolved.read_text(encoding="utf-8")))
    except (OSError, tomllib.TOMLDecodeError):
        return "no readable resolved_config.toml"
    now = job_config(spec, job).flat()
    defaults = method_defaults(now.get("method", "lora"))
    diffs = []
    for key in sorted(now):
        then = recorded.get(key, defaults.get(key))
        if key not in NOT_COMPARED and not _same(then, now[key]):
            diffs.append(f"{key}: {then!r} → {now[key]!r}")
    return ", ".join(diffs)


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def _flat(table: dict) -> dict:
    """A resolved config's keys, the method's own (in a table named after the method) among the shared ones."""
    flat = {k: v for k, v in table.items() if not isinstance(v, dict)}
    for section in (v for v in table.values() if isinstance(v, dict)):
        flat.update(section)
    return flat


def resumable(spec: BenchSpec, job: Job) -> bool:
    """An unfinished training of exactly this job's settings left a state (a crash, Ctrl-C, a killed bench)."""
    from privlora.config import ran_with

    return job.dir.latest.is_file() and ran_with(job_config(spec, job), job.out)


def train_all(spec: BenchSpec, jobs: list[Job], log: Callable[[str], None], board: Board | None = None,
              phase: str = "train") -> None:
    """Every unfinished training: here one after another, or with ``jobs`` > 1 in child processes while ``board``
    shows each running one's progress under ``phase``."""
    board = board or Board(log)
    todo = [j for j in jobs if not is_finished(spec, j, log)]
    board.expect(len(todo), "trainings")
    board.enter(phase, f"{len(todo)} to train, {len(jobs) - len(todo)} reused"
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


