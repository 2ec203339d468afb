"""``[runs.NAME.tune]``: a run's hyperparameters chosen on nonmember_aux alone before it trains at its seeds."""
import json
from pathlib import Path

import numpy as np
import pytest

from privlora.benchspec import BenchSpec, check_runs, jobs_for, read_bench_file
from privlora.benchtune import grid_points, measure_points, point_slug, tune_grid
from privlora.cli import main
from privlora.data import synthetic
from privlora.errors import PrivloraError
from tests.test_bench import PRESET

pytestmark = pytest.mark.usefixtures("one_thread")

DEMO = Path(__file__).parents[1] / "configs" / "demo"


# --- the tune table in a bench file ------------------------------------------------------------------------

@pytest.mark.parametrize("run,says", [
    ("[runs.lora.tune]\nunet_lrr = [1e-3]", "'unet_lrr' is not a training setting a run may set"),
    ("[runs.lora.tune]\nunet_lr = []", "unet_lr = [] is empty"),
    ("[runs.lora]\nunet_lr = 1e-3\n[runs.lora.tune]\nunet_lr = [1e-2]", "unet_lr is set both in the run and in"),
    ("[runs.lora.tune]\nunet_lr = 1e-3", "unet_lr = 0.001 is not a list of values"),
    ("[runs.lora.tune]\nunet_lr = [1e-3, 0.001]", "lists a value twice"),
    ("[runs.lora.tune]\nunet_lr = [1e-3, \"fast\"]", "unet_lr = 'fast' is not a valid"),
    ("[runs.lora.tune]\nseed = [1, 2]", "seed cannot be tuned"),
    ("[runs.lora.tune]\nresolution = [32, 64]", "resolution cannot be tuned"),
    ("[runs.lora.tune]\ndp_max_grad_norm = [0.1]", "dp_max_grad_norm is a setting of dp_lora, not of lora"),
    ("[runs.lora]\ntune = [1]", "tune must be a table of key = [values, ...]"),
])
def test_a_bad_tune_table_is_a_one_line_error_naming_the_bench_file(tmp_path, run, says):
    file = tmp_path / "bench.toml"
    file.write_text(run + "\n")
    with pytest.raises(PrivloraError) as error:
        read_bench_file(file)
    message = str(error.value)
    assert message.startswith(f"{file}: run 'lora': tune") and says in message and "\n" not in message


def test_the_grid_is_the_cartesian_product_first_key_outermost():
    points = grid_points({"unet_lr": [1e-3, 3e-3], "dp_max_grad_norm": [0.1, 1]})
    assert points == [{"unet_lr": 1e-3, "dp_max_grad_norm": 0.1}, {"unet_lr": 1e-3, "dp_max_grad_norm": 1},
                      {"unet_lr": 3e-3, "dp_max_grad_norm": 0.1}, {"unet_lr": 3e-3, "dp_max_grad_norm": 1}]
    assert point_slug(points[1]) == "unet_lr0.001-dp_max_grad_norm1"


def test_dp_frontier_tunes_each_dp_run_at_the_first_seed_in_its_own_folders(tmp_path):
    file = read_bench_file(DEMO / "dp_frontier.toml")
    spec = BenchSpec(out=tmp_path, runs=check_runs(file["runs"], "dp_frontier.toml"), preset=file["preset"],
                     train_overrides={"synthetic_images": 264}, **file["bench"])
    dp_runs = [n for n, s in spec.runs.items() if s["method"] == "dp_lora"]
    assert dp_runs and all("tune" in spec.runs[n] for n in dp_runs) and "tune" not in spec.runs["lora"]
    points = tune_grid(spec, "dp_eps8")
    assert [p.values for p in points] == grid_points({"unet_lr": [1e-3, 3e-3, 1e-2],
                                                     "dp_max_grad_norm": [0.01, 0.1, 1.0]})
    assert len({p.job.out for p in points}) == 9 and all(p.job.out.parent == tmp_path / "tune" / "dp_eps8"
                                                          for p in points)
    first_seed = spec.seeds[0]
    assert all(p.job.overrides["seed"] == first_seed and p.job.overrides["dp_target_epsilon"] == 8.0
               for p in points)
    # every seed of the run itself trains with the chosen values, not with the tune table
    main_jobs = [j for j in jobs_for(spec, {"dp_eps8": points[4].values}) if j.run == "dp_eps8"]
    assert len(main_jobs) == len(spec.seeds) and "tune" not in main_jobs[0].overrides
    assert all(j.overrides["unet_lr"] == 3e-3 and j.overrides["dp_max_grad_norm"] == 0.1 for j in main_jobs)


def test_the_lowest_loss_is_chosen_ties_to_the_first_point_and_dp_gets_the_caveat(tmp_path, monkeypatch):
    from privlora import select

    runs = {"lora": {"tune": {"unet_lr": [1e-4, 1e-3, 1e-2]}},
            "dp": {"method": "dp_lora", "dp_target_epsilon": 8.0, "tune": {"unet_lr": [1e-4, 1e-3, 1e-2]}}}
    spec = BenchSpec(out=tmp_path, runs=check_runs(runs, "t"),
                     train_overrides={"synthetic_images": 40, "max_train_epochs": 2})
    losses = [0.30, 0.20, 0.20]  # a tie between the second and third points
    monkeypatch.setattr(select, "run_settings", lambda run_dir: {})
    for run in runs:
        points = tune_grid(spec, run)
        monkeypatch.setattr(select, "nonmember_losses", lambda splits, work, loras, *a, **k: {
            p.stem: loss for p, loss in zip(loras, losses)})
        record = measure_points(spec, run, points, 3, print)
        assert record["chosen"] == {"unet_lr": 1e-3} and record["chosen_model"] == f"{run}-unet_lr0.001"
        assert [p["heldout_loss"] for p in record["points"]] == losses
        assert (record["dp_caveat"] is not None) == (run == "dp")
    assert "3 trainings" in record["dp_caveat"] and "Papernot & Steinke" in record["dp_caveat"]


def test_a_nonmember_aux_too_small_to_score_the_points_stops_the_bench_before_any_training(tmp_path):
    from privlora.bench import run_bench

    runs = {"lora": {"n_nonmember_aux": 2, "tune": {"unet_lr": [1e-3, 1e-2]}}}
    spec = BenchSpec(out=tmp_path, runs=runs, train_overrides={"synthetic_images": 40, "max_train_epochs": 2})
    with pytest.raises(PrivloraError, match="run lora: its tune table is scored on nonmember_aux alone, which needs "
                                            "at least 4 images \\(n_nonmember_aux = 2\\)"):
        run_bench(spec)
    assert not (tmp_path / "tune").exists() and not (tmp_path / "lora").exists()


def test_a_finished_training_of_other_tuned_values_is_trained_again(tmp_path):
    from privlora.benchjobs import is_finished
    from privlora.benchspec import job_config
    from privlora.config import resolved_toml

    spec = BenchSpec(out=tmp_path, runs=check_runs({"lora": {"tune": {"unet_lr": [1e-3, 1e-2]}}}, "t"), budgets=[],
                     train_overrides={"synthetic_images": 40, "max_train_epochs": 2})
    before, now = jobs_for(spec, {"lora": {"unet_lr": 1e-3}})[0], jobs_for(spec, {"lora": {"unet_lr": 1e-2}})[0]
    now.out.mkdir(parents=True)
    now.dir.lora().write_bytes(b"")
    now.dir.train_time.write_text('{"seconds": 1}')
    now.dir.resolved.write_text(resolved_toml(job_config(spec, before)))  # an earlier choice of the tune table
    assert not is_finished(spec, now)
    now.dir.resolved.write_text(resolved_toml(job_config(spec, now)))
    assert is_finished(spec, now)


# --- a tuned bench end to end ------------------------------------------------------------------------------

BENCH = """\
preset = "preset.toml"

[bench]
budgets = []
attacks = ["loss"]
n_bootstrap = 50
quality_samples = 0
seeds = [3, 4]
max_auc = 1.0
max_tpr_at_1fpr = 1.0

[runs.lora]

[runs.lora.tune]
unet_lr = [1e-2, 1e-6]  # at this size 1e-6 has the lower loss: the choice is not simply the first point
"""


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A two-seed bench whose plain LoRA run tunes unet_lr, run twice; what the first run printed and left."""
    root = tmp_path_factory.mktemp("tuned")
    (root / "preset.toml").write_text(PRESET + 'pretrained_model_name_or_path = "tiny-sd"\n')
    (root / "bench.toml").write_text(BENCH)
    images = synthetic.write_folder(root / "images", 30, seed=4, resolution=32)
    out = root / "bench"
    args = ["bench", "--runs", str(root / "bench.toml"), "--out", str(out), "--train_data_dir", str(images),
            "--max_train_epochs", "2"]
    return {"out": out, "args": args, "code": main(args)}


def heldout_losses(report: dict) -> dict[str, float]:
    """The loss attack's scores are minus each image's loss; the scored roles are nonmember_aux's two quarters."""
    return {m["name"]: -float(np.mean(m["scores"]["loss"]["member_test"] + m["scores"]["loss"]["nonmember_test"]))
            for m in report["models"]}


@pytest.mark.slow
def test_a_tuned_run_trains_its_grid_at_the_first_seed_and_chooses_on_nonmember_aux(tuned):
    assert tuned["code"] == 0
    out = tuned["out"]
    table = json.loads((out / "table.json").read_text())
    record = table["tuning"]["lora"]
    points = {"lora-unet_lr0.01": 1e-2, "lora-unet_lr1e-06": 1e-6}
    assert [p["model"] for p in record["points"]] == list(points)
    assert sorted(p.name for p in (out / "tune" / "lora").iterdir()) == ["heldout", "unet_lr0.01", "unet_lr1e-06"]
    for model, lr in points.items():  # each point trained once, at the first seed, with its own lr
        resolved = (out / "tune" / "lora" / model.removeprefix("lora-") / "resolved_config.toml").read_text()
        assert "\nseed = 3\n" in resolved and f"\nunet_lr = {lr!r}\n" in resolved
    heldout = out / "tune" / "lora" / "heldout"
    # scored on nonmember_aux alone: the manifest lists none of the split's other images
    run_roles = json.loads((out / "lora" / "splits.json").read_text())["roles"]
    scored = json.loads((heldout / "nonmember_splits.json").read_text())["roles"]
    assert {e["sha256"] for r in scored.values() for e in r} <= {e["sha256"] for e in run_roles["nonmember_aux"]}
    losses = heldout_losses(json.loads((heldout / "report.json").read_text()))
    assert set(losses) == set(points) and abs(losses["lora-unet_lr1e-06"] - losses["lora-unet_lr0.01"]) > 1e-4
    best = min(losses, key=lambda name: losses[name])
    assert record["chosen_model"] == best and record["chosen"] == {"unet_lr": points[best]}
    assert [p["heldout_loss"] for p in record["points"]] == [pytest.approx(losses[m]) for m in points]
    for job in ("lora", "lora-seed4"):  # the run itself, at every seed, with the chosen lr
        assert f"\nunet_lr = {points[best]!r}\n" in (out / job / "resolved_config.toml").read_text()
        assert table["settings"]["resolved"][job]["unet_lr"] == points[best]
    md = (out / "table.md").read_text()
    assert f"**lora** (seed 3): chosen unet_lr = {points[best]}." in md and f"| {best} (chosen) |" in md
    assert "DP caveat" not in md and record["dp_caveat"] is None
    assert list(table["wall_seconds"])[:2] == ["tune", "train"]


@pytest.mark.slow
def test_a_second_invocation_reuses_the_grid_trainings_and_the_choice(tuned, capsys):
    out = tuned["out"]
    loras = sorted((out / "tune").rglob("*.safetensors")) + [out / "lora" / "lora.safetensors"]
    stamps = [p.stat().st_mtime_ns for p in loras]
    first = json.loads((out / "table.json").read_text())["tuning"]
    capsys.readouterr()
    assert main(tuned["args"]) == 0
    printed = capsys.readouterr().out
    assert not [line for line in printed.splitlines() if line.startswith("training ")]
    assert "tuning lora" not in printed
    assert "bench: [tune] → train → select → audit → quality → table · 0 to train, 2 reused" in printed
    assert "lora-unet_lr0.01: finished earlier, reused" in printed
    assert [p.stat().st_mtime_ns for p in loras] == stamps
    assert json.loads((out / "table.json").read_text())["tuning"] == first
    assert "tune/lora" in json.loads((out / "phases.json").read_text())
