"""``privlora bench``: the privacy–utility comparison of ``privlora demo`` on the user's own data and model.

A run with a ``[runs.NAME.tune]`` table first has its hyperparameters chosen on nonmember_aux alone
(``benchtune``). Every run (a registered method with its settings) trains with the same preset, data, split and
seed, and saves intermediate checkpoints on the same schedule; plain LoRA's (and the base model) form the "train
less" baseline; ``privlora select`` chooses each defence's checkpoint on the aux roles only (``benchselect``); every
model is audited with every attack on identical queries; utility is the held-out denoising loss on nonmember_test
(and a proxy FID of generated samples); each defence, at its chosen checkpoint, gets a verdict against the
baseline; the recommendation is plain LoRA's checkpoint chosen the same way under the leakage bound. Finished
pieces (trainings, tunings, selections, the audit, samples) are reused when the bench is run again, so an
interrupted bench resumes.

Settings of one run, lowest to highest priority: the preset, the run's own settings, the train flags given to
bench, and what the bench controls (data source, output folder and name, training seed with ``--seeds``, the
checkpoint schedule).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from collections.abc import Callable

from privlora.benchcache import AUDIT_CACHE, PhaseCache, bench_path, file_stamp
from privlora.benchjobs import check_same_split, train_all
from privlora.benchselect import Pick, compare_selection, pick_for, select_runs
from privlora.benchspec import (DATA_KEYS, BenchSpec, Job, baseline_name, budget_files, budget_steps, check_runs,
                                job_config, job_seed, jobs_for, resplits, seed_groups)
from privlora.benchtable import (add_verdicts, format_extras, format_table, model_row, recommend, recommendation,
                                 seed_spread)
from privlora.benchtune import chosen_values, tune_runs
from privlora.errors import PrivloraError
from privlora.io import write_bytes, write_json, write_text
from privlora.progress import Board
from privlora.quality import QualityJob, quality_name, sheet_png


def run_bench(spec: BenchSpec, log: Callable[[str], None] = print) -> dict:
    if spec.jobs < 1:
        raise PrivloraError(f"--jobs must be ≥ 1, got {spec.jobs}")
    from privlora.attacks import parse_attack_names

    spec.runs = check_runs(spec.runs, "runs")
    spec.attacks = parse_attack_names(["loss", *[a for a in spec.attacks if a != "loss"]])  # loss: the utility
    spec.select_attacks = parse_attack_names(spec.select_attacks)
    base = baseline_name(spec)
    if spec.dataset:
        spec.data = {"train_data_dir": str(prepare_dataset(spec, log))}
    jobs_for(spec)  # every run's settings checked before anything is trained
    spec.out.mkdir(parents=True, exist_ok=True)
    wall = PhaseClock()
    board = Board(log)
    tuning = tune_runs(spec, log, board)  # on nonmember_aux only, before any run trains at its seeds
    if tuning:
        wall.done("tune")
    jobs = jobs_for(spec, chosen_values(tuning))
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
    cfg = job_config(spec, baseline)
    board.enter("select")
    selections = select_runs(spec, jobs, base, log)  # on the aux roles only, before any test role is audited
    wall.done("selection")
    chosen = selections[baseline.name]
    picks = {j.name: pick_for(j, selections[j.name]) for j in jobs if j.run != base}
    extra_pick = recommended_checkpoint(baseline, chosen, budgets)
    loras = audited_models(main_jobs, budgets + extra_pick, picks)
    board.enter("audit")
    log(f"auditing {len(loras)} LoRAs and the base model with {', '.join(spec.attacks)}")
    report = audit(spec, cfg, baseline.dir.splits, loras, shadow_seed=cfg.seed)
    replicates = [replicate(spec, groups[0], report, budgets, picks)]
    seed_reports = [report]
    for group in groups[1:]:  # each further seed: its own split's audit of its own runs, picks and budgets
        seed_budgets = budget_files(spec, group[0]) if spec.budgets else []
        seed_loras = audited_models(group, seed_budgets, picks)
        log(f"auditing seed {job_seed(spec, group[0])}: {len(seed_loras)} LoRAs and the base model")
        seed_report = audit(spec, job_config(spec, group[0]), group[0].dir.splits, seed_loras,
                            name=f"audit-seed{job_seed(spec, group[0])}", shadow_seed=cfg.seed)
        replicates.append(replicate(spec, group, seed_report, seed_budgets, picks))
        seed_reports.append(seed_report)
    wall.done("audit")
    board.enter("quality")
    quality = utility_quality(spec, cfg, baseline.dir.splits, loras)
    seed_quality = [quality, *(further_seed_quality(spec, group, picks) for group in groups[1:])]
    wall.done("quality")
    board.enter("table")
    selection = compare_selection(chosen, report)
    points = sorted(budgets + extra_pick, key=lambda p: budget_steps(p) or 0)  # the train-less points in order
    table = build_table(spec, jobs, report, quality, points, selection, picks, replicates, seed_reports,
                        seed_quality)
    if tuning:
        table["tuning"] = tuning
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


def recommended_checkpoint(baseline: Job, chosen: dict, budgets: list[Path]) -> list[Path]:
    """Plain LoRA's aux-chosen checkpoint as an extra audited model, unless it is already a row (the final LoRA, a
    budget). Its file is named from this bench folder, never from the path phases.json recorded, so a copied or
    moved bench folder audits its own checkpoint."""
    pick = pick_for(baseline, chosen)
    return [pick.path] if pick.outcome == "chosen" and pick.path not in [baseline.dir.lora(), *budgets] else []


def audited_models(group: list[Job], points: list[Path], picks: dict[str, Pick]) -> list[Path]:
    """One seed's LoRAs for its audit, each once: every run's final LoRA, the train-less points (the baseline's
    budgets; on the first seed also its aux-chosen checkpoint) and every defence's aux-chosen checkpoint."""
    chosen = [picks[j.name].path for j in group if j.name in picks]
    return list(dict.fromkeys([*(j.dir.lora() for j in group), *points, *chosen]))


def compared_model(job: Job, picks: dict[str, Pick]) -> str:
    """The model a job is compared with: a defence's pick, the baseline's final LoRA."""
    return picks[job.name].model if job.name in picks else job.name


def replicate(spec: BenchSpec, group: list[Job], report: dict, budgets: list[Path], picks: dict[str, Pick]):
    """One seed's audit as a replicate of the powered comparison (privlora.benchpower): each defence at its own
    aux-chosen checkpoint of this seed, the frontier as always (base, budgets, full-length plain LoRA)."""
    from privlora.benchpower import replicate_from_report

    baseline = group[0]
    frontier = ["base", *(p.stem for p in sorted(budgets, key=lambda p: budget_steps(p) or 0)), baseline.name]
    return replicate_from_report(job_seed(spec, baseline), report, frontier,
                                 {j.run: compared_model(j, picks) for j in group})


def history(job: Job) -> dict:
    return json.loads(job.dir.history.read_text())


def audit(spec: BenchSpec, cfg, splits: Path, loras: list[Path], name: str = "audit",
          shadow_seed: int | None = None) -> dict:
    """The audit of every model (and the base model), in ``<out>/<folder>``, reused when it was run with exactly
    these inputs; otherwise each model's entry is still reused from ``<out>/audit-cache`` when its own inputs are
    unchanged (``privlora.audit_cache``), so a run added to the bench audits only its models. ``shadow_seed``: one
    for every seed's audit, so the seeds' re-drawn splits of the same images share one set of shadows
    (``privlora.shadows``)."""
    from privlora.audit import AuditConfig, run_audit

    folder = spec.out / name
    inputs = {"loras": [[bench_path(p, spec.out), file_stamp(p)] for p in loras], "attacks": list(spec.attacks),
              "seed": cfg.seed, "n_bootstrap": spec.n_bootstrap, "model": cfg.pretrained_model_name_or_path,
              "splits": bench_path(splits, spec.out), "canaries": "auto" if cfg.canaries else None,
              "shadows": spec.shadows, **({"shadow_seed": shadow_seed} if spec.shadows else {})}
    cache = PhaseCache(spec.out)
    if cache.get(name, inputs) is not None and (folder / "report.json").is_file():
        return json.loads((folder / "report.json").read_text())
    report = run_audit(AuditConfig(splits=str(splits), out=str(folder),
                                   pretrained_model_name_or_path=cfg.pretrained_model_name_or_path,
                                   loras=[str(p) for p in loras], attacks=list(spec.attacks), include_base=True,
                                   seed=cfg.seed, n_bootstrap=spec.n_bootstrap, config_dir=cfg.config_dir,
                                   clip_skip=cfg.clip_skip, jobs=spec.jobs, threads_per_job=spec.threads_per_job,
                                   canaries="auto" if cfg.canaries else None, shadows=spec.shadows,
                                   shadow_dir=str(spec.out / "shadows"), shadow_seed=shadow_seed,
                                   model_cache=str(spec.out / AUDIT_CACHE)))
    cache.put(name, inputs, {"report": str(Path(name) / "report.json")})
    return report


def further_seed_quality(spec: BenchSpec, group: list[Job], picks: dict[str, Pick]) -> dict[str, dict]:
    """A further seed's proxy FID of the model compared for each of its runs (and of the base model), against its
    own split's nonmember_test images: the spread over seeds then covers utility too."""
    compared = [picks[j.name].path if j.name in picks else j.dir.lora() for j in group]
    seed = job_seed(spec, group[0])
    return utility_quality(spec, job_config(spec, group[0]), group[0].dir.splits, compared, tag=f"seed{seed}")


def utility_quality(spec: BenchSpec, cfg, splits_file: Path, loras: list[Path], tag: str = "") -> dict[str, dict]:
    """Proxy FID (tiny-sd VAE features) of samples from nonmember_test captions against those images; each
    model's result is cached (``PhaseCache``) and reused while the sampling settings and its LoRA file stay the
    same. With ``jobs`` > 1 on a CPU, models are sampled in worker processes (each model's generator is seeded
    alone, so the numbers do not change). ``tag`` names a further seed's split: its base model and sample sheets
    are kept apart from the first seed's."""
    if spec.quality_samples <= 0:
        return {}
    from privlora.data.splits import read_manifest

    cache = PhaseCache(spec.out)
    prefix = f"{tag}/" if tag else ""
    settings = {"quality_samples": spec.quality_samples, "quality_steps": spec.quality_steps,
                "guidance": spec.guidance, "seed": cfg.seed, "model": cfg.pretrained_model_name_or_path,
                **({"splits": file_stamp(splits_file)} if tag else {})}
    inputs = {quality_name(p): {**settings, "lora": "" if p is None else file_stamp(p)} for p in [None, *loras]}
    results = {n: r for n, key in inputs.items() if (r := cache.get(f"quality/{prefix}{n}", key)) is not None}
    todo = [lora for lora in [None, *loras] if quality_name(lora) not in results]
    if not todo:
        return results
    from privlora.data.images import open_rgb

    test = read_manifest(splits_file).nonmember_test[: spec.quality_samples]
    job = QualityJob(cfg.pretrained_model_name_or_path, cfg.config_dir, [open_rgb(e.path) for e in test],
                     [e.caption for e in test], spec.quality_steps, spec.guidance, cfg.seed)

    def keep(name: str, result: dict, sheet: bytes) -> None:
        results[name] = result
        write_bytes(spec.out / f"samples_{tag + '_' if tag and name == 'base' else ''}{name}.png", sheet)
        cache.put(f"quality/{prefix}{name}", inputs[name], result)  # each model's result survives an interrupt

    from privlora.processes import on_cpu, threads_for, worker_pool

    if spec.jobs > 1 and len(todo) > 1 and on_cpu():
        with worker_pool(min(spec.jobs, len(todo)), threads_for(spec.jobs, spec.threads_per_job)) as pool:
            for lora, (result, sheet) in zip(todo, pool.map(job.run, todo)):
                keep(quality_name(lora), result, sheet)
    else:
        for lora in todo:
            keep(quality_name(lora), *job.run(lora))
    if not tag:
        write_bytes(spec.out / "samples_real_nonmembers.png", sheet_png(job.real[:16]))
    return results


def build_table(spec: BenchSpec, jobs: list[Job], report: dict, quality: dict, budgets: list[Path],
                selection: dict | None, picks: dict[str, Pick], replicates: list | None = None,
                seed_reports: list[dict] | None = None, seed_quality: list[dict] | None = None) -> dict:
    """The table from the first seed's audit (``report``): each defence at its aux-chosen checkpoint (``picks``),
    its final LoRA beside it for reference; with several seeds, ``replicates`` give the powered comparison and
    ``seed_reports`` (each seed's audit, the first one included) the per-seed rows, with ``seed_quality``'s proxy
    FID (each seed's, in the same order)."""
    from privlora.benchpower import power_table

    rows = {m["name"]: model_row(m, quality) for m in report["models"]}
    base = baseline_name(spec)
    main = [j for j in jobs if j.seed_index == 0]
    frontier_names = ["base", *(p.stem for p in budgets), base]
    mine = [picks[j.name] for j in main if j.run != base]
    add_verdicts(rows, frontier_names, [p.model for p in mine])
    power = power_table(replicates, [j.run for j in main if j.run != base], spec.n_bootstrap,
                        job_seed(spec, main[0])) if replicates else {}
    for run, row in power.items():  # which model each seed compared for the run
        row["models"] = [rep.runs[run] for rep in replicates or []]
    single = single_model_power(spec, replicates, [j.run for j in main if j.run != base], job_seed(spec, main[0]))
    for j in main:
        model = compared_model(j, picks)
        if j.run in power and "verdict" in power[j.run]:  # the paired verdict replaces the one-seed margin rule
            rows[model]["frontier_verdict"] = power[j.run]["verdict"]
            rows[model]["frontier_distance"] = power[j.run]["frontier_distance"]
            rows[model]["above_frontier"] = power[j.run]["verdict"] == "above"
        rows[j.name]["train_seconds"] = train_seconds(j)
    mark_picks(rows, mine)
    for path in [*budgets, *(j.dir.lora() for j in main), *(p.path for p in mine)]:
        rows[path.stem]["steps"] = budget_steps(path)
    shown = {n: rows[n] for n in ["base", *frontier_names[1:], *(n for p in mine for n in p.rows())]}
    table = {"settings": {**{k: v for k, v in asdict(spec).items() if k not in ("out", "runs")},
                          "out": str(spec.out), "runs": spec.runs,
                          "resolved": {j.name: _resolved(spec, j) for j in jobs}},
             "rows": shown, "frontier": frontier_names, "audit": str(Path("audit") / "report.md"),
             "date": time.strftime("%Y-%m-%d"), "machine": machine(spec),
             "recommendation": recommendation(shown, selection),
             "oracle": {**recommend(shown, spec.max_auc, spec.max_tpr_at_1fpr),
                        "note": "chosen on the test roles: for reference only, never a recommendation"},
             "selection": selection, "picks": {name: p.as_dict() for name, p in picks.items()}, "power": power,
             **({"power_single_model": single} if single else {}),
             "resplit": resplits(spec) if spec.seeds and len(spec.seeds) > 1 else None}
    if replicates and len(replicates) > 1:
        seed_rows = further_seed_rows(jobs, base, seed_reports or [], picks, seed_quality)
        table["seed_rows"] = seed_rows
        by_run = {run: [rows[compared_model(j, picks)] if j.seed_index == 0 else seed_rows[j.name]
                        for j in jobs if j.run == run] for run in spec.runs}
        table["seed_spread"] = seed_spread(by_run)
    return table


def mark_picks(rows: dict[str, dict], picks: list[Pick]) -> None:
    """Each defence's compared row says how select decided; a final LoRA beside its chosen checkpoint says that it
    is there for reference only."""
    for p in picks:
        rows[p.model]["pick"] = p.as_dict()
        if p.is_checkpoint:
            rows[p.job]["reference_for"] = p.model


def further_seed_rows(jobs: list[Job], base: str, seed_reports: list[dict], picks: dict[str, Pick],
                      seed_quality: list[dict] | None = None) -> dict:
    """Per job of every seed after the first: the row of the model compared for it, from its seed's audit (and
    its seed's proxy FID where the bench sampled)."""
    rows = {}
    qualities = (seed_quality or [])[1:] or [{}] * len(seed_reports[1:])
    for report, group, quality in zip(seed_reports[1:], seed_groups(jobs, base)[1:], qualities):
        by_name = {m["name"]: model_row(m, quality) for m in report["models"]}
        for j in group:
            pick = {"pick": picks[j.name].as_dict()} if j.name in picks else {}
            rows[j.name] = {**by_name[compared_model(j, picks)], "train_seconds": train_seconds(j), **pick}
    return rows


def train_seconds(job: Job) -> float:
    return json.loads(job.dir.train_time.read_text())["seconds"]


def single_model_power(spec: BenchSpec, replicates: list | None, defences: list[str], seed: int) -> dict:
    """With shadow attacks in the bench: the powered comparison once more with the single-model attacks alone, so
    the table shows which verdicts hold only against attacks without shadows."""
    from privlora.attacks import SHADOW_ATTACKS
    from privlora.benchpower import power_table, restrict

    single = [a for a in spec.attacks if a not in SHADOW_ATTACKS]
    if not replicates or len(single) == len(spec.attacks):
        return {}
    return power_table([restrict(r, single) for r in replicates], defences, spec.n_bootstrap, seed)


def _resolved(spec: BenchSpec, job: Job) -> dict:
    return job_config(spec, job).flat()


def machine(spec: BenchSpec) -> str:
    import platform

    import torch

    from privlora.processes import threads_for

    threads = (f"{torch.get_num_threads()} thread(s)" if spec.jobs <= 1 else
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


