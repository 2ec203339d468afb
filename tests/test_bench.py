"""``privlora bench``: runs and bench files, the demo's settings pinned to its presets, the recommendation, and
seconds-scale end-to-end benches on a five-folder tree and on a kohya folder."""
import json
import shutil
from typing import Any
from pathlib import Path

import pytest

from privlora.bench import run_bench
from privlora.benchspec import BenchSpec, check_runs, jobs_for, job_config, parse_methods, read_bench_file
from privlora.cli import bench_spec_from_args
from privlora.benchtable import recommend, seed_spread
from privlora.cli import main
from privlora.config import build_config
from privlora.data import synthetic
from privlora.errors import PrivloraError
from privlora.protocol import ProtocolSettings, bench_spec, quick_settings
from tests.fixtures import make_tiny_folder

# --- the demo's settings: what the demo trained with before its settings moved to configs/demo -------------

LEGACY_TRAIN = {"network_dim": 16, "network_alpha": 16, "conv_dim": 16, "conv_alpha": 16, "unet_lr": 1e-3,
                "train_batch_size": 16, "resolution": 32}
LEGACY_RUNS: dict[str, dict[str, Any]] = {
    "lora": {},
    "mp_lora": {"privacy_alpha": 1.0, "attacker_lr": 1e-3, "k_steps": 1, "attacker_pool": 8},
    "smp_lora": {"privacy_alpha": 1.0, "privacy_beta": 1.0, "attacker_lr": 1e-3, "k_steps": 1, "attacker_pool": 8},
    "dp_lora_eps8": {"method": "dp_lora", "dp_target_epsilon": 8.0, "train_batch_size": 64,
                     "dp_reproducible_noise": True},
    "dp_lora_eps1": {"method": "dp_lora", "dp_target_epsilon": 1.0, "train_batch_size": 64,
                     "dp_reproducible_noise": True},
}
LEGACY_VARIANTS = {  # label: (roles m_test, nm_test, m_aux, nm_aux), epochs, eval_every, save_every of every run
    "full": ((200, 200, 64, 64), 100, 5, 5),
    "quick": ((100, 100, 32, 32), 30, 3, 1),
}


def legacy_config(name: str, out: Path, variant: str):
    (m_te, nm_te, m_aux, nm_aux), epochs, every, save = LEGACY_VARIANTS[variant]
    own = {"method": name, **LEGACY_RUNS[name]}
    return build_config(None, {
        **LEGACY_TRAIN, **own, "train_data_dir": str(out / "data"), "output_dir": str(out / name), "output_name": name,
        "max_train_epochs": epochs, "seed": 1337, "n_member_aux": m_aux, "n_member_test": m_te,
        "n_nonmember_aux": nm_aux, "n_nonmember_test": nm_te, "split_seed": 1337,
        "pretrained_model_name_or_path": "tiny-sd", "eval_samples": 64, "eval_every_n_epochs": every,
        # the one change since: every run saves plain LoRA's checkpoints (select's candidates), not only lora
        "save_every_n_epochs": save, "state_every_n_epochs": epochs // 10,
        "overwrite": True})


@pytest.mark.parametrize("settings,variant", [(ProtocolSettings(), "full"), (quick_settings(), "quick")])
def test_the_demo_trains_with_exactly_its_former_settings_which_now_come_from_the_presets(tmp_path, settings, variant):
    spec = bench_spec(settings, tmp_path)
    spec.runs = check_runs(spec.runs, "demo")
    jobs = jobs_for(spec)
    assert [j.name for j in jobs] == list(LEGACY_RUNS)
    for job in jobs:
        assert job_config(spec, job) == legacy_config(job.name, tmp_path, variant), job.name
    bench = read_bench_file(settings.bench_file)["bench"]
    assert (spec.budgets, spec.attacks) == (bench["budgets"], bench["attacks"]) == (
        [0.1, 0.25, 0.5], ["loss", "ref_loss", "mlp", "secmi", "pia", "clid"])
    assert (spec.n_bootstrap, spec.quality_samples, spec.quality_steps) == {
        "full": (500, 200, 20), "quick": (200, 100, 10)}[variant]


def test_configs_demo_is_the_packaged_demo_folder():
    repo = Path(__file__).parents[1]
    assert (repo / "configs" / "demo" / "full.toml").read_text() == ProtocolSettings().bench_file.read_text()


# --- runs -------------------------------------------------------------------------------------------------

def test_methods_flag_names_each_setting_of_a_method():
    runs = parse_methods("lora, smp_lora, smp_lora:privacy_alpha=5:privacy_beta=0.5,dp_lora:dp_target_epsilon=8")
    assert runs == {"lora": {"method": "lora"}, "smp_lora": {"method": "smp_lora"},
                    "smp_lora_privacy_alpha5_privacy_beta0.5": {"method": "smp_lora", "privacy_alpha": 5,
                                                                "privacy_beta": 0.5},
                    "dp_lora_dp_target_epsilon8": {"method": "dp_lora", "dp_target_epsilon": 8}}
    with pytest.raises(PrivloraError, match="is not key=value"):
        parse_methods("smp_lora:privacy_alpha")
    with pytest.raises(PrivloraError, match="given twice"):
        parse_methods("lora,lora")


def test_runs_must_name_a_method_and_only_training_settings():
    with pytest.raises(PrivloraError, match="'nope'.*set method"):
        check_runs({"nope": {}}, "f.toml")
    with pytest.raises(PrivloraError, match="output_dir"):
        check_runs({"lora": {"output_dir": "x"}}, "f.toml")
    with pytest.raises(PrivloraError, match="privacy_alhpa"):
        check_runs({"smp_lora": {"privacy_alhpa": 1}}, "f.toml")


def test_bench_file_inherit_and_errors(tmp_path):
    (tmp_path / "a.toml").write_text('preset = "p.toml"\n[bench]\nbudgets = [0.5]\nn_bootstrap = 9\n[runs.lora]\n')
    (tmp_path / "b.toml").write_text('inherit = "a.toml"\n[bench]\nn_bootstrap = 3\n')
    b = read_bench_file(tmp_path / "b.toml")
    assert b == {"preset": str(tmp_path / "p.toml"), "bench": {"budgets": [0.5], "n_bootstrap": 3},
                 "runs": {"lora": {}}}
    (tmp_path / "a2.toml").write_text('inherit = "a.toml"\n[runs.mp_lora]\n[runs.x]\nmethod = "smp_lora"\n')
    assert list(read_bench_file(tmp_path / "a2.toml")["runs"]) == ["mp_lora", "x"]  # replaced
    (tmp_path / "a3.toml").write_text('inherit = "a2.toml"\nkeep_runs = ["x"]\n[runs.lora]\nseed = 2\n')
    assert read_bench_file(tmp_path / "a3.toml")["runs"] == {"x": {"method": "smp_lora"}, "lora": {"seed": 2}}
    (tmp_path / "a4.toml").write_text('inherit = "a2.toml"\nkeep_runs = ["lora"]\n')
    with pytest.raises(PrivloraError, match="a4.toml: keep_runs names 'lora', which the inherited file lacks"):
        read_bench_file(tmp_path / "a4.toml")
    (tmp_path / "c.toml").write_text("[bench]\nbudget = [0.5]\n")
    with pytest.raises(PrivloraError, match="c.toml: unknown \\[bench\\] key 'budget'"):
        read_bench_file(tmp_path / "c.toml")


def test_a_bad_run_setting_stops_the_bench_before_any_training(tmp_path, capsys):
    code = main(["bench", "--out", str(tmp_path / "o"), "--methods", "lora,smp_lora:privacy_alpha=abc",
                 "--synthetic_images", "40", "--max_train_epochs", "2", "--resolution", "32", "--budgets", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "run smp_lora_privacy_alphaabc" in err and "privacy_alpha" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "lora").exists()


def test_budgets_are_fractions_and_fall_back_to_steps_when_the_epochs_are_too_few(tmp_path):
    def baseline(budgets, epochs):
        spec = BenchSpec(out=tmp_path, runs=check_runs({"lora": {}}, "t"), budgets=budgets,
                         train_overrides={"synthetic_images": 40, "max_train_epochs": epochs})
        return jobs_for(spec)[0].overrides

    with pytest.raises(PrivloraError, match="strictly between 0 and 1"):
        baseline([0.5, 1.5], 10)
    ten = baseline([0.1, 0.25, 0.5], 10)
    assert ten["save_every_n_epochs"] == 1 and "save_at_fractions" not in ten
    for epochs in (4, 1):  # 0.1 of 4 epochs rounds to 0; 1 epoch has no epoch inside it
        few = baseline([0.1, 0.25, 0.5], epochs)
        assert few["save_at_fractions"] == [0.1, 0.25, 0.5] and "save_every_n_epochs" not in few
    assert "save_at_fractions" in baseline([0.01], 10)


# --- the recommendation -----------------------------------------------------------------------------------

def row(name, auc, tpr, loss):
    return {"model": name, "best_auc": auc, "best_tpr_at_1pct_fpr": tpr, "heldout_loss": loss, "auc": {"loss": auc}}


ROWS = {r["model"]: r for r in [
    row("base", 0.50, 0.01, 0.130),
    row("lora-e0010", 0.55, 0.03, 0.083),
    row("lora-e0025", 0.59, 0.06, 0.071),  # useful and under the AUC bound, but over the TPR bound
    row("lora", 0.83, 0.14, 0.070),
    row("smp_lora", 0.58, 0.04, 0.075),  # the most useful model under both bounds
    row("mp_lora", 0.57, 0.02, 0.124),
]}


def test_recommendation_is_the_most_useful_model_under_both_bounds():
    assert recommend(ROWS, 0.6, 0.05)["model"] == "smp_lora"
    assert recommend(ROWS, 0.6, 1.0)["model"] == "lora-e0025"  # without the TPR bound
    assert recommend(ROWS, 0.56, 0.05)["model"] == "lora-e0010"
    none = recommend(ROWS, 0.4, 0.05)
    assert none["model"] is None and "no model" in none["reason"]


def test_seed_spread_is_mean_and_sample_sd():
    spread = seed_spread({"lora": [row("lora", 0.8, 0.1, 0.07), row("lora-seed2", 0.7, 0.1, 0.08)]})["lora"]
    assert spread["n_seeds"] == 2 and spread["best_auc"]["mean"] == pytest.approx(0.75)
    assert spread["best_auc"]["sd"] == pytest.approx(0.0707107, rel=1e-5)
    assert "proxy_fid" not in spread  # no seed sampled
    sampled = [{**row("lora", 0.8, 0.1, 0.07), "proxy_fid": 10.0}, {**row("lora-seed2", 0.7, 0.1, 0.08),
                                                                     "proxy_fid": 14.0}]
    assert seed_spread({"lora": sampled})["lora"]["proxy_fid"] == {"mean": 12.0, "sd": pytest.approx(2.8284271),
                                                                    "values": [10.0, 14.0]}


def test_curves_use_epoch_means_where_logged_and_one_colour_per_run():
    from privlora.benchplots import curve, run_colours

    epochs = [{"epoch": 1, "L_ada": 9.0, "L_ada_mean": 1.0}, {"epoch": 2, "L_ada": 8.0, "L_ada_mean": 2.0}]
    assert curve(epochs, "L_ada") == ([1, 2], [1.0, 2.0], True)
    assert curve([{"epoch": 1, "L_ada": 9.0}], "L_ada") == ([1], [9.0], False)
    assert run_colours(["lora", "smp_lora"]) == {"lora": "C0", "smp_lora": "C1"}


# --- end to end at toy size -------------------------------------------------------------------------------

PRESET = """\
resolution = 32
network_dim = 4
network_alpha = 4
unet_lr = 1e-3
train_batch_size = 8
eval_samples = 6
attacker_pool = 8
attacker_hidden = [32]
attacker_lr = 1e-3
n_member_aux = 6
n_member_test = 6
n_nonmember_aux = 6
n_nonmember_test = 6
max_train_epochs = 60
seed = 3
"""
TOY = ["--attacks", "loss", "--budgets", "0.5", "--n_bootstrap", "50", "--quality_samples", "4",
       "--quality_steps", "2", "--max_train_epochs", "4", "--max_auc", "1.0", "--max_tpr_at_1fpr", "1"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    model = make_tiny_folder(root / "model")
    (root / "preset.toml").write_text(PRESET + f'pretrained_model_name_or_path = "{model}"\n')
    kohya = synthetic.write_folder(root / "kohya", 30, seed=4, resolution=32, layout="kohya", repeats=1)
    return {"root": root, "model": str(model), "preset": str(root / "preset.toml"), "kohya": kohya}


def five_folders(root: Path, images: Path) -> Path:
    """D_tr (18), D^m_aux and D^m_te (copies of 6 training images each), D^nm_aux and D^nm_te (6 each)."""
    files = sorted(images.rglob("*.png"))
    folders = {n: root / n for n in ("D_tr", "D^m_aux", "D^m_te", "D^nm_aux", "D^nm_te")}
    for f in folders.values():
        f.mkdir(parents=True)
    for i, png in enumerate(files):
        target = folders["D_tr"] if i < 18 else folders["D^nm_aux" if i < 24 else "D^nm_te"]
        shutil.copy(png, target / png.name)
        shutil.copy(png.with_suffix(".txt"), target / png.with_suffix(".txt").name)
        if i < 12:
            shutil.copy(png, folders["D^m_aux" if i < 6 else "D^m_te"] / png.name)
    return root


def defence_rows(table: dict, job: str) -> list[str]:
    """A defence's rows: the model compared (its aux-chosen checkpoint, or its final LoRA), then the final LoRA for
    reference when that is another file."""
    model = table["picks"][job]["model"]
    return [model, job] if model != job else [job]


@pytest.mark.slow
def test_bench_on_five_folders_end_to_end(toy, tmp_path, capsys):
    tree = five_folders(tmp_path / "tree", toy["kohya"])
    out = tmp_path / "bench"
    code = main(["bench", "--out", str(out), "--splits_dir", str(tree), "--preset", toy["preset"],
                 "--methods", "lora,smp_lora", *TOY, "--seeds", "3,4"])
    assert code == 0, capsys.readouterr().err
    table = json.loads((out / "table.json").read_text())
    assert list(table["rows"]) == ["base", "lora-e0002", "lora", *defence_rows(table, "smp_lora")]
    assert table["rows"]["smp_lora"]["frontier_verdict"] in ("above", "below", "indistinguishable")
    power = table["power"]["smp_lora"]
    assert power["n_seeds"] == 2 and power["verdict"] == table["rows"]["smp_lora"]["frontier_verdict"]
    assert len(power["frontier_distance"]["ci95"]) == 2 and not table["resplit"]  # five folders: one split
    rec = table["recommendation"]
    # the one recommendation is the aux-only choice (3 vs 3 scored aux images support only AUC ≤ 1.0) and the
    # table lists it; the test-role optimum is only an oracle
    assert rec["model"] == table["selection"]["choice"]["model"] and rec["model"] in table["rows"]
    assert rec["chosen_on"].startswith("aux roles only")
    oracle = table["oracle"]
    assert all(r["heldout_loss"] >= table["rows"][oracle["model"]]["heldout_loss"] for r in table["rows"].values())
    assert "for reference only" in oracle["note"] and "Oracle, for reference only" in (out / "table.md").read_text()
    assert table["settings"]["resolved"]["smp_lora"]["max_train_epochs"] == 4  # the flag beat the preset's 60
    assert table["settings"]["resolved"]["lora"]["splits_dir"] == str(tree)
    assert set(table["selection"]["rows"]) == {"base", "lora-e0002", "lora"}
    for name in ("table.md", "frontier.png", "curves.png", "samples_smp_lora.png", "audit/report.md",
                 "lora/select.json"):
        assert (out / name).stat().st_size > 0, name
    assert "Recommendation" in (out / "table.md").read_text()
    wall = table["wall_seconds"]
    assert list(wall) == ["train", "selection", "audit", "quality", "total"]  # selection before any test role
    assert wall["total"] >= sum(v for k, v in wall.items() if k != "total") - 0.5 and wall["train"] > 0
    assert "Wall time of this invocation" in (out / "table.md").read_text()
    assert set(table["seed_rows"]) == {"lora-seed4", "smp_lora-seed4"}
    assert table["seed_spread"]["smp_lora"]["n_seeds"] == 2
    assert "Spread over training seeds" in (out / "table.md").read_text()
    # each seed's compared models are sampled against that seed's own nonmember_test images
    assert table["seed_rows"]["smp_lora-seed4"]["proxy_fid"] is not None
    assert len(table["seed_spread"]["smp_lora"]["proxy_fid"]["values"]) == 2
    assert "proxy FID mean ± sd" in (out / "table.md").read_text()
    assert (out / "samples_seed4_base.png").stat().st_size > 0
    assert "Paired comparison over 2 seeds, one split" in (out / "table.md").read_text()
    assert (out / "audit-seed4" / "report.json").is_file()  # seed 4's own audit, with its own budgets
    assert (out / "lora-seed4" / "lora-seed4-e0002.safetensors").is_file()
    history = json.loads((out / "smp_lora" / "history.json").read_text())
    assert "L_ada_mean" in history["epochs"][-1]


@pytest.mark.slow
def test_resplit_seeds_are_replicates_with_their_own_split_and_frontier(toy, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--out", str(out), "--train_data_dir", str(toy["kohya"]), "--preset", toy["preset"],
                 "--methods", "lora,smp_lora", *TOY, "--seeds", "3,4", "--resplit", "--quality_samples", "0"])
    assert code == 0, capsys.readouterr().err
    roles = [json.loads((out / run / "splits.json").read_text())["roles"] for run in ("lora", "lora-seed4")]
    assert roles[0]["nonmember_test"] != roles[1]["nonmember_test"]  # seed 4 re-drew who is a member
    same_seed = json.loads((out / "smp_lora-seed4" / "splits.json").read_text())["roles"]
    assert same_seed == roles[1]  # the runs of one seed share its split
    table = json.loads((out / "table.json").read_text())
    assert table["resplit"] and table["power"]["smp_lora"]["n_seeds"] == 2
    assert table["power"]["smp_lora"]["verdict"] in ("above", "below", "indistinguishable")
    assert "each with its own re-drawn split" in (out / "table.md").read_text()


def test_resplit_refuses_roles_fixed_by_five_folders(toy, tmp_path):
    tree = five_folders(tmp_path / "tree", toy["kohya"])
    with pytest.raises(PrivloraError, match="--resplit: the roles are fixed"):
        run_bench(bench_spec_from_args({"out": str(tmp_path / "b"), "splits_dir": str(tree), "preset": toy["preset"],
                                        "methods": "lora", "seeds": "1,2", "resplit": True}))


@pytest.mark.slow
def test_bench_on_a_kohya_folder_reuses_finished_pieces(toy, tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "--out", str(out), "--train_data_dir", str(toy["kohya"]), "--preset", toy["preset"],
            "--methods", "lora,mp_lora:privacy_alpha=0.5", *TOY]
    assert main(args) == 0, capsys.readouterr().err
    first = json.loads((out / "table.json").read_text())
    assert "mp_lora_privacy_alpha0.5" in first["rows"]
    lora = out / "lora" / "lora.safetensors"
    stamp = lora.stat().st_mtime_ns
    (out / "mp_lora_privacy_alpha0.5" / "mp_lora_privacy_alpha0.5.safetensors").unlink()  # an interrupted run
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "lora: finished earlier, reused" in printed and "training mp_lora_privacy_alpha0.5" in printed
    # it continued from the state saved at epoch 3 of 4, not from scratch, and ended where the first run did
    assert "mp_lora_privacy_alpha0.5: resuming the interrupted training from its last state" in printed
    assert lora.stat().st_mtime_ns == stamp
    again = json.loads((out / "table.json").read_text())
    assert again["rows"]["lora"]["auc"] == first["rows"]["lora"]["auc"]
    mp = "mp_lora_privacy_alpha0.5"
    assert again["rows"][mp]["auc"] == first["rows"][mp]["auc"]
    assert again["rows"][mp]["heldout_loss"] == first["rows"][mp]["heldout_loss"]
    # nothing changed: every phase is reused from phases.json (the audit, the selection, each model's samples)
    report = out / "audit" / "report.json"
    stamp = report.stat().st_mtime_ns
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert report.stat().st_mtime_ns == stamp and "privacy-aware selection" not in printed
    phases = json.loads((out / "phases.json").read_text())
    assert {"audit", "select/lora", "quality/base", f"quality/{mp}"} <= set(phases)
    # a copy of the bench folder elsewhere, by a copy that does not keep modification times, reuses every piece too
    copy = tmp_path / "elsewhere" / "bench"
    shutil.copytree(out, copy, copy_function=shutil.copy)
    report, samples = copy / "audit" / "report.json", copy / "samples_base.png"
    stamps = report.stat().st_mtime_ns, samples.stat().st_mtime_ns
    assert main([str(copy) if a == str(out) else a for a in args]) == 0
    printed = capsys.readouterr().out
    assert "lora: finished earlier, reused" in printed and f"{mp}: finished earlier, reused" in printed
    assert "training lora" not in printed and f"training {mp}" not in printed
    assert "privacy-aware selection" not in printed
    assert (report.stat().st_mtime_ns, samples.stat().st_mtime_ns) == stamps
    assert json.loads((copy / "table.json").read_text())["rows"] == again["rows"]


@pytest.mark.slow
def test_a_run_added_to_the_bench_audits_only_its_own_models(toy, tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "--out", str(out), "--train_data_dir", str(toy["kohya"]), "--preset", toy["preset"], *TOY,
            "--quality_samples", "0"]
    assert main([*args, "--methods", "lora"]) == 0, capsys.readouterr().err
    first = json.loads((out / "table.json").read_text())
    capsys.readouterr()
    assert main([*args, "--methods", "lora,smp_lora"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "audit" / "report.json").read_text())
    baseline = [m["name"] for m in report["models"] if not m["name"].startswith("smp_lora")]
    assert report["model_cache"]["reused"] == baseline == ["base", "lora", "lora-e0002"]
    assert report["model_cache"]["audited"] and all(n.startswith("smp_lora") for n in report["model_cache"]["audited"])
    assert "model cache" in printed and "3 of " in printed
    again = json.loads((out / "table.json").read_text())
    for name in baseline:
        assert again["rows"][name]["auc"] == first["rows"][name]["auc"], name
    # the new run's aux-only selection (same split, seed and text encoding) takes the base row from lora's
    selection = json.loads((out / "smp_lora" / "select" / "report.json").read_text())
    assert selection["model_cache"]["reused"] == ["base"]


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")  # the claim is "equals a serial one-thread run": thread count changes sums
def test_parallel_trainings_give_the_serial_table(toy, tmp_path, capsys):
    tables = {}
    for jobs in ("1", "2"):
        out = tmp_path / f"jobs{jobs}"
        args = ["bench", "--out", str(out), "--train_data_dir", str(toy["kohya"]), "--preset", toy["preset"],
                "--methods", "lora,smp_lora", *TOY, "--max_train_epochs", "2", "--jobs", jobs, "--threads_per_job", "1"]
        assert main(args) == 0, capsys.readouterr().err
        tables[jobs] = json.loads((out / "table.json").read_text())
    serial, parallel = tables["1"], tables["2"]
    # trainings, audit, sampling and the aux-only selection all ran in worker processes; not one number moved
    numbers = ("auc", "best_auc", "best_tpr_at_1pct_fpr", "heldout_loss", "proxy_fid")
    for name in serial["rows"]:
        assert {k: serial["rows"][name][k] for k in numbers} == {k: parallel["rows"][name][k] for k in numbers}, name
    assert list(serial["rows"]) == ["base", "lora-e0001", "lora", *defence_rows(serial, "smp_lora")]
    assert serial["picks"] == parallel["picks"]
    assert all(r["proxy_fid"] is not None for r in serial["rows"].values())
    def without_paths(selection):  # the chosen file's path names each bench's own folder
        return {**selection, "choice": {k: v for k, v in selection["choice"].items() if k != "path"}}

    assert without_paths(serial["selection"]) == without_paths(parallel["selection"])
    assert (tmp_path / "jobs2" / "smp_lora" / "train.log").is_file()  # trained in a child process
    assert json.loads((tmp_path / "jobs2" / "audit" / "report.json").read_text())["settings"]["processes"] == 2
    assert "processes" not in json.loads((tmp_path / "jobs1" / "audit" / "report.json").read_text())["settings"]


@pytest.mark.slow
def test_default_budgets_run_on_a_one_epoch_run_with_step_checkpoints(toy, tmp_path, capsys):
    """The issue's failing command: default budgets (0.1, 0.25, 0.5) with too few epochs for epoch checkpoints."""
    out = tmp_path / "bench"
    args = [a for a in TOY if a not in ("--budgets", "0.5")]
    args[args.index("--max_train_epochs") + 1] = "1"
    assert main(["bench", "--out", str(out), "--train_data_dir", str(toy["kohya"]), "--preset", toy["preset"],
                 "--methods", "lora", *args, "--train_batch_size", "1"]) == 0, capsys.readouterr().err
    table = json.loads((out / "table.json").read_text())
    steps = table["rows"]["lora"]["steps"]  # 18 training images at batch 1: 18 steps
    budget_rows = table["frontier"][1:-1]
    assert budget_rows == [f"lora-step{max(1, round(f * steps)):06d}" for f in (0.1, 0.25, 0.5)]
    assert [table["rows"][n]["steps"] for n in budget_rows] == [max(1, round(f * steps)) for f in (0.1, 0.25, 0.5)]
    assert f"lora-step{round(0.5 * steps):06d} ({round(0.5 * steps)} steps)" in (out / "table.md").read_text()


# --- every defence at the checkpoint select chose on its aux roles (issue 26) ------------------------------

def test_every_run_saves_the_baselines_checkpoint_schedule(tmp_path):
    runs = {"lora": {}, "smp_lora": {}, "x": {"method": "dp_lora", "dp_target_epsilon": 8.0}}
    spec = BenchSpec(out=tmp_path, runs=check_runs(runs, "t"), budgets=[0.25, 0.5],
                     train_overrides={"synthetic_images": 40, "max_train_epochs": 8})
    schedules = {j.name: {k: j.overrides.get(k) for k in ("save_every_n_epochs", "save_at_fractions")}
                 for j in jobs_for(spec)}
    assert schedules == dict.fromkeys(["lora", "smp_lora", "x"], {"save_every_n_epochs": 2, "save_at_fractions": None})
    spec.budgets = []  # --budgets none: no intermediate checkpoints for any run
    assert all("save_every_n_epochs" not in j.overrides for j in jobs_for(spec))


def test_a_run_finished_without_this_checkpoint_schedule_is_trained_again(tmp_path):
    from privlora.benchjobs import is_finished
    from privlora.config import resolved_toml

    spec = BenchSpec(out=tmp_path, runs=check_runs({"lora": {}, "smp_lora": {}}, "t"), budgets=[0.5],
                     train_overrides={"synthetic_images": 40, "max_train_epochs": 4})
    job = jobs_for(spec)[1]
    job.out.mkdir(parents=True)
    job.dir.lora().write_bytes(b"")
    job.dir.train_time.write_text('{"seconds": 1}')
    before = {**job.overrides, "save_every_n_epochs": None}  # a defence trained before every run saved checkpoints
    job.dir.resolved.write_text(resolved_toml(build_config(None, before)))
    assert not is_finished(spec, job)
    job.dir.resolved.write_text(resolved_toml(job_config(spec, job)))
    assert is_finished(spec, job)


def test_a_run_finished_with_other_settings_is_trained_again_and_the_log_says_which(tmp_path):
    from privlora.benchjobs import changed_settings, is_finished
    from privlora.config import resolved_toml

    spec = BenchSpec(out=tmp_path, runs=check_runs({"lora": {}, "smp_lora": {"privacy_alpha": 2.0}}, "t"),
                     budgets=[], train_overrides={"synthetic_images": 40, "max_train_epochs": 4})
    job = jobs_for(spec)[1]
    job.out.mkdir(parents=True)
    job.dir.lora().write_bytes(b"")
    job.dir.train_time.write_text('{"seconds": 1}')
    then = {**job.overrides, "privacy_alpha": 1.0, "unet_lr": 3e-4, "output_dir": "/elsewhere"}
    job.dir.resolved.write_text(resolved_toml(build_config(None, then)))
    logged: list[str] = []
    assert not is_finished(spec, job, logged.append)
    assert logged == ["smp_lora: trained earlier with other settings (privacy_alpha: 1.0 → 2.0, unet_lr: 0.0003 → "
                      f"{job_config(spec, job).unet_lr!r}): trained again"]  # where it wrote is not compared
    # a key the record lacks (trained before the key existed) counts as its default; a changed default does not
    record = resolved_toml(job_config(spec, job))
    job.dir.resolved.write_text("\n".join(line for line in record.splitlines()
                                          if not line.startswith("caption_swap_rate")))
    assert changed_settings(spec, job) == "" and is_finished(spec, job)
    job.dir.resolved.write_text(record.replace("caption_swap_rate = 0.0", "caption_swap_rate = 0.5"))
    assert changed_settings(spec, job) == "caption_swap_rate: 0.5 → 0.0"


def test_a_pick_is_the_chosen_checkpoint_or_the_final_lora_with_the_reason(tmp_path):
    from privlora.benchselect import pick_for
    from privlora.benchspec import Job

    job = Job("smp_lora-seed4", "smp_lora", 1, {"output_dir": str(tmp_path)})
    final = tmp_path / "smp_lora-seed4.safetensors"

    def pick(model, refused=None):
        choice = {"model": model, "reason": "select refused: too few" if refused else "the lowest held-out loss"}
        return pick_for(job, {"choice": choice, **({"refused": refused} if refused else {})})

    chosen = pick("smp_lora-seed4-e0002")
    assert (chosen.model, chosen.path, chosen.outcome) == ("smp_lora-seed4-e0002",
                                                           tmp_path / "smp_lora-seed4-e0002.safetensors", "chosen")
    assert chosen.rows() == ["smp_lora-seed4-e0002", "smp_lora-seed4"]  # the final LoRA beside it, for reference
    for fallback, outcome, says in [(pick(None, refused="too few"), "refused", "select refused: too few"),
                                    (pick(None), "none", "select: the lowest"),
                                    (pick("base"), "base", "select chose the base model")]:
        assert (fallback.model, fallback.path, fallback.outcome) == ("smp_lora-seed4", final, outcome)
        assert fallback.reason.startswith(says) and fallback.rows() == ["smp_lora-seed4"]


def test_the_recommended_checkpoint_is_named_from_this_bench_folder_not_the_recorded_path(tmp_path):
    """phases.json records select's result with absolute paths; a copied or moved bench folder must audit its own
    checkpoint, not the old folder's, and a choice that is already a row (the final LoRA, a budget) adds nothing."""
    from privlora.bench import recommended_checkpoint
    from privlora.benchspec import Job

    baseline = Job("lora", "lora", 0, {"output_dir": str(tmp_path / "copy")})
    old = "/elsewhere/original/lora/lora-e0004.safetensors"
    chosen = {"choice": {"model": "lora-e0004", "path": old, "reason": "the lowest held-out loss"}}
    assert recommended_checkpoint(baseline, chosen, []) == [tmp_path / "copy" / "lora-e0004.safetensors"]
    budget = tmp_path / "copy" / "lora-e0004.safetensors"
    assert recommended_checkpoint(baseline, chosen, [budget]) == []
    final = {"choice": {"model": "lora", "path": old, "reason": "the lowest held-out loss"}}
    assert recommended_checkpoint(baseline, final, []) == []
    for nothing in ({"choice": {"model": None, "reason": "none under the bound"}},
                    {"choice": {"model": "base", "reason": "the base model"}},
                    {"choice": {"reason": "too few aux images"}, "refused": "too few aux images"}):
        assert recommended_checkpoint(baseline, nothing, []) == []


def intermediates_only(monkeypatch):
    """select's own rule (the bound, then the lowest held-out loss), among the intermediate checkpoints only: at toy
    size the final LoRA is usually the most useful, and the bench's use of an earlier choice would go untested."""
    import re

    from privlora import select as select_module

    real = select_module.choose
    monkeypatch.setattr(select_module, "choose", lambda rows, *bound: real(
        {n: r for n, r in rows.items() if re.search(r"-e\d{4}$|-step\d{6}$", n)}, *bound))


@pytest.fixture(scope="module")
def picked(toy, tmp_path_factory):
    """A two-seed bench (re-drawn splits) whose selections choose intermediate checkpoints, then the same bench
    again under a bound its 3-vs-3 scored aux images cannot support, so every selection is refused. Each table, and
    what the first left on disk, before the second overwrote it."""
    out = tmp_path_factory.mktemp("picked") / "bench"
    args = ["bench", "--out", str(out), "--train_data_dir", str(toy["kohya"]), "--preset", toy["preset"],
            "--methods", "lora,smp_lora", *TOY, "--budgets", "0.25,0.5", "--seeds", "3,4", "--resplit",
            "--quality_samples", "0"]
    with pytest.MonkeyPatch.context() as mp:
        intermediates_only(mp)
        assert main(args) == 0
    first = {"table": json.loads((out / "table.json").read_text()), "md": (out / "table.md").read_text(),
             "phases": json.loads((out / "phases.json").read_text()),
             "select": {j: json.loads((out / j / "select.json").read_text()) for j in ("smp_lora", "smp_lora-seed4")},
             "seed4_audit": json.loads((out / "audit-seed4" / "report.json").read_text())}
    assert main([*args, "--max_auc", "0.6"]) == 0  # flags: the last one wins
    refused = {"table": json.loads((out / "table.json").read_text()), "md": (out / "table.md").read_text()}
    return {"out": out, "first": first, "refused": refused}


def md_line(md: str, model: str) -> str:
    return next(line for line in md.splitlines() if line.startswith(f"| {model} "))


@pytest.mark.slow
def test_every_defence_run_saves_intermediate_checkpoints(picked):
    out = picked["out"]
    for job in ("smp_lora", "smp_lora-seed4"):
        assert [p.name for p in sorted((out / job).glob(f"{job}-e????.safetensors"))] == [
            f"{job}-e000{e}.safetensors" for e in (1, 2, 3)]
    resolved = picked["first"]["table"]["settings"]["resolved"]
    assert resolved["smp_lora"]["save_every_n_epochs"] == resolved["lora"]["save_every_n_epochs"] == 1


@pytest.mark.slow
def test_a_defence_row_is_the_checkpoint_select_chose_with_its_final_lora_for_reference(picked):
    table, md = picked["first"]["table"], picked["first"]["md"]
    choice = picked["first"]["select"]["smp_lora"]["choice"]
    chosen = choice["model"]
    assert chosen.startswith("smp_lora-e000")  # an intermediate checkpoint (intermediates_only)
    assert picked["first"]["phases"]["select/smp_lora"]["result"]["choice"]["model"] == chosen  # the cached one
    assert list(table["rows"])[-2:] == [chosen, "smp_lora"]
    row = table["rows"][chosen]
    assert row["pick"]["outcome"] == "chosen" and row["pick"]["reason"] == choice["reason"]
    assert row["frontier_verdict"] == table["power"]["smp_lora"]["verdict"]
    assert "frontier_verdict" not in table["rows"]["smp_lora"] and table["rows"]["smp_lora"]["reference_for"] == chosen
    assert f"| {chosen} ({row['steps']} steps) |" in md and "chosen by select" in md_line(md, chosen)
    assert f"for reference only: compared at {chosen}" in md_line(md, "smp_lora")
    assert table["picks"]["smp_lora"]["model"] == chosen


@pytest.mark.slow
def test_each_seeds_replicate_uses_that_seeds_own_chosen_checkpoint(picked):
    first = picked["first"]
    chosen = [first["select"][j]["choice"]["model"] for j in ("smp_lora", "smp_lora-seed4")]
    assert chosen[1].startswith("smp_lora-seed4-e000")
    power = first["table"]["power"]["smp_lora"]
    assert power["models"] == chosen
    seed4 = next(m for m in first["seed4_audit"]["models"] if m["name"] == chosen[1])  # in seed 4's own audit
    heldout = -sum(seed4["scores"]["loss"]["nonmember_test"]) / len(seed4["scores"]["loss"]["nonmember_test"])
    assert power["heldout_loss"]["per_seed"][1] == pytest.approx(heldout)
    assert first["table"]["seed_rows"]["smp_lora-seed4"]["model"] == chosen[1]


@pytest.mark.slow
def test_a_refused_selection_compares_the_final_lora_and_says_why(picked):
    table, md = picked["refused"]["table"], picked["refused"]["md"]
    assert list(table["rows"])[-1] == "smp_lora" and not any(n.startswith("smp_lora-e") for n in table["rows"])
    pick = table["rows"]["smp_lora"]["pick"]
    assert pick["outcome"] == "refused" and pick["reason"].startswith("select refused:") and "--max_auc 0.6" in pick[
        "reason"]
    assert f"final LoRA compared: {pick['reason']}" in md_line(md, "smp_lora")
    assert table["power"]["smp_lora"]["models"] == ["smp_lora", "smp_lora-seed4"]
    assert table["picks"]["smp_lora-seed4"]["outcome"] == "refused"
