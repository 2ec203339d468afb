"""A run's ``[runs.NAME.tune]`` table: training keys mapped to lists of values. Every point of their grid (the
Cartesian product, first key outermost) is trained at the bench's first seed in ``<out>/tune/NAME/<slug>``; each
point's final LoRA is scored by its held-out denoising loss on nonmember_aux alone (``select.nonmember_losses``:
seeded, the same timesteps and noise for every point; no test-role image and no training image is queried); the
lowest loss is chosen (ties: the first point in grid order), and the run then trains at every seed with the chosen
values. The choice is cached in ``<out>/phases.json`` with the run's settings, the grid and the trained files."""
from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from privlora.benchcache import AUDIT_CACHE, PhaseCache, file_stamp
from privlora.benchjobs import check_same_split, train_all
from privlora.benchspec import BenchSpec, Job, bench_seeds, job_config, job_seed, make_job, training_settings
from privlora.errors import PrivloraError
from privlora.progress import Board

PAPERNOT_STEINKE = "Papernot & Steinke, \"Hyperparameter Tuning with Renyi Differential Privacy\", ICLR 2022"


@dataclass(frozen=True)
class GridPoint:
    values: dict[str, Any]  # tune key → this point's value
    job: Job  # its training at the first seed


def tune_runs(spec: BenchSpec, log: Callable[[str], None], board: Board | None = None) -> dict[str, dict]:
    """Each tuned run's record (``tuning_record``), by run name; every grid point of every tuned run is checked
    before any is trained, then all are trained together (``--jobs`` at a time)."""
    grids = {name: tune_grid(spec, name) for name, settings in spec.runs.items() if "tune" in settings}
    if not grids:
        return {}
    if board is not None:
        board.phases = ("tune", *board.phases)
    train_all(spec, [p.job for points in grids.values() for p in points], log, board, phase="tune")
    return {name: tuning_record(spec, name, points, log) for name, points in grids.items()}


def chosen_values(tuning: dict[str, dict]) -> dict[str, dict]:
    """Run name → the tune values it trains with at every seed."""
    return {name: record["chosen"] for name, record in tuning.items()}


def grid_points(tune: dict[str, list]) -> list[dict[str, Any]]:
    keys = list(tune)
    return [dict(zip(keys, values)) for values in itertools.product(*(tune[k] for k in keys))]


def point_slug(values: dict[str, Any]) -> str:
    """A point's folder name: ``unet_lr0.003-dp_max_grad_norm0.1``."""
    def text(value: Any) -> str:
        raw = str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, float) else str(value)
        return re.sub(r"[^A-Za-z0-9._-]+", "_", raw)

    return "-".join(f"{key}{text(value)}" for key, value in values.items())


def tune_grid(spec: BenchSpec, run: str) -> list[GridPoint]:
    """The run's grid points, each a training at the first seed with the run's settings and the point's values
    (the final LoRA alone is scored, so without the bench's checkpoint schedule)."""
    settings = training_settings(spec.runs[run])
    seed = bench_seeds(spec)[0]
    points, slugs = [], set()
    for values in grid_points(spec.runs[run]["tune"]):
        slug = point_slug(values)
        if slug in slugs:
            raise PrivloraError(f"run {run}: two tune points share the folder name {slug!r}; give distinct values")
        slugs.add(slug)
        job = make_job(spec, run, {**settings, **values}, spec.out / "tune" / run / slug, f"{run}-{slug}", 0, seed,
                       checkpoints=False)
        points.append(GridPoint(values, job))
    check_scorable(spec, run, points[0].job)
    return points


def check_scorable(spec: BenchSpec, run: str, job: Job) -> None:
    """Refuse, before any training, a split whose nonmember_aux is too small to score the points on (its scored
    quarters: ``select.nonmember_manifest``); with fixed roles the count is only known from the split itself."""
    cfg = job_config(spec, job)
    if not (cfg.splits_dir or cfg.splits) and cfg.n_nonmember_aux is not None and cfg.n_nonmember_aux < 4:
        raise PrivloraError(f"run {run}: its tune table is scored on nonmember_aux alone, which needs at least 4 "
                            f"images (n_nonmember_aux = {cfg.n_nonmember_aux})")


def tuning_record(spec: BenchSpec, run: str, points: list[GridPoint], log: Callable[[str], None]) -> dict:
    """The run's grid with each point's held-out loss on nonmember_aux and the chosen point, reused from
    ``phases.json`` while the run's settings, its grid and every point's LoRA file are unchanged."""
    jobs = [p.job for p in points]
    check_same_split(jobs)  # one nonmember_aux scores every point: none of it may be another point's member
    inputs = {"run": training_settings(spec.runs[run]), "grid": spec.runs[run]["tune"],
              "seed": job_seed(spec, jobs[0]), "splits": file_stamp(jobs[0].dir.splits),
              "loras": {j.name: file_stamp(j.dir.lora()) for j in jobs}}
    cache = PhaseCache(spec.out)
    record = cache.get(f"tune/{run}", inputs)
    if record is None:
        record = measure_points(spec, run, points, inputs["seed"], log)
        cache.put(f"tune/{run}", inputs, record)
    return record


def measure_points(spec: BenchSpec, run: str, points: list[GridPoint], seed: int, log: Callable[[str], None]) -> dict:
    from privlora.select import nonmember_losses, run_settings

    first = points[0].job
    log(f"tuning {run}: the held-out loss of its {len(points)} grid points on nonmember_aux only")
    losses = nonmember_losses(first.dir.splits, spec.out / "tune" / run / "heldout", [p.job.dir.lora() for p in points],
                              run_settings(first.out), seed, jobs=spec.jobs, threads_per_job=spec.threads_per_job,
                              model_cache=str(spec.out / AUDIT_CACHE), log=log)
    scored = [{"model": p.job.name, "values": p.values, "heldout_loss": losses[p.job.name]} for p in points]
    best = min(range(len(scored)), key=lambda i: (scored[i]["heldout_loss"], i))
    method = spec.runs[run].get("method", run)
    return {"grid": spec.runs[run]["tune"], "seed": seed, "points": scored, "chosen": scored[best]["values"],
            "chosen_model": scored[best]["model"],
            "measured_on": "nonmember_aux only: each point's final LoRA, its held-out denoising loss at seeded "
                           "timesteps and noise (the same for every point); ties to the first in grid order",
            "dp_caveat": dp_caveat(len(points)) if method == "dp_lora" else None}


def dp_caveat(n_points: int) -> str:
    return (f"the run's (ε, δ), where it has one, holds for one training and does not account for this tuning: "
            f"choosing among {n_points} trainings on the same private data costs extra privacy ({PAPERNOT_STEINKE}). "
            "The choice used nonmember_aux alone, so it adds no membership signal from the test roles, but every one "
            f"of the {n_points} trainings used the members")
