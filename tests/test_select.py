"""``privlora select``: checkpoints of a run, leakage estimated on the aux roles only, never the test roles."""
import json
from pathlib import Path

import PIL.Image
import pytest

from privlora.errors import PrivloraError

from privlora.cli import main
from privlora.config import build_config
from privlora.select import aux_manifest, list_checkpoints
from privlora.train import train
from tests.fixtures import make_tiny_folder

RUN = dict(synthetic_images=30, n_member_aux=6, n_member_test=6, n_nonmember_aux=6, n_nonmember_test=6,
           resolution=32, train_batch_size=8, eval_samples=6, network_dim=4, network_alpha=4, unet_lr=3e-3,
           max_train_epochs=4, save_every_n_epochs=2, seed=5)


def images_opened(monkeypatch) -> list[Path]:
    """Every image file PIL opens from now on (resolved paths)."""
    opened: list[Path] = []
    original = PIL.Image.open

    def spy(fp, *a, **k):
        opened.append(Path(fp).resolve())
        return original(fp, *a, **k)

    monkeypatch.setattr(PIL.Image, "open", spy)
    return opened


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sel")
    model = make_tiny_folder(root / "model")
    train(build_config(None, {**RUN, "pretrained_model_name_or_path": str(model), "output_dir": str(root / "run"),
                              "output_name": "toy"}))
    return root / "run"


def test_checkpoints_are_listed_in_training_order(tmp_path):
    for name in ("x.safetensors", "x-e0010.safetensors", "x-e0002.safetensors", "x.attacker.safetensors",
                 "xy.safetensors", "x-step000004.safetensors"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_checkpoints(tmp_path, "x")] == [
        "x-e0002.safetensors", "x-step000004.safetensors", "x-e0010.safetensors", "x.safetensors"]


def test_aux_manifest_halves_the_aux_roles_and_lists_no_test_image(run_dir, tmp_path):
    out = aux_manifest(run_dir / "splits.json", tmp_path / "aux.json", seed=0)
    original = json.loads((run_dir / "splits.json").read_text())["roles"]
    derived = json.loads(out.read_text())["roles"]
    key = lambda entries: sorted(e["sha256"] for e in entries)  # noqa: E731
    assert key(derived["member_aux"] + derived["member_test"]) == key(original["member_aux"])
    assert key(derived["nonmember_aux"] + derived["nonmember_test"]) == key(original["nonmember_aux"])
    assert not set(key(derived["member_aux"])) & set(key(derived["member_test"]))
    every = {e["sha256"] for entries in derived.values() for e in entries}
    assert not every & {e["sha256"] for r in ("member_test", "nonmember_test") for e in original[r]}


@pytest.mark.slow
def test_select_never_reads_a_test_image_and_picks_the_most_useful_checkpoint_under_the_bound(run_dir, monkeypatch,
                                                                                             capsys):
    manifest = json.loads((run_dir / "splits.json").read_text())
    root = Path(manifest["root"])
    aux = {(root / e["path"]).resolve() for r in ("member_aux", "nonmember_aux") for e in manifest["roles"][r]}
    test = {(root / e["path"]).resolve() for r in ("member_test", "nonmember_test") for e in manifest["roles"][r]}
    opened = images_opened(monkeypatch)
    for path in test - aux:
        path.rename(path.with_suffix(".hidden"))  # select must not even need them
    try:
        assert main(["select", str(run_dir), "--max_auc", "1.0", "--attacks", "loss,mlp"]) == 0, capsys.readouterr().err
    finally:
        for path in test - aux:
            path.with_suffix(".hidden").rename(path)
    assert opened and not set(opened) & test
    result = json.loads((run_dir / "select.json").read_text())
    est = result["checkpoints"]
    assert list(est) == ["base", "toy-e0002", "toy"]
    assert result["choice"]["model"] == min(est, key=lambda n: est[n]["heldout_loss"])  # every model under AUC 1.0
    assert result["scored"] == {"member_aux": 3, "nonmember_aux": 3}
    assert all(r["auc_upper"] >= max(r["auc_ci95"][a][1] for a in r["auc_ci95"]) for r in est.values())
    assert result["decides_on"].startswith("upper 95 % bounds")


@pytest.mark.slow
def test_select_on_a_dp_run_uses_nonmember_data_only_and_says_so(tmp_path, monkeypatch, capsys):
    model = make_tiny_folder(tmp_path / "model")
    run = tmp_path / "dp"
    train(build_config(None, {**RUN, "method": "dp_lora", "dp_noise_multiplier": 1.0, "max_train_epochs": 2,
                              "save_every_n_epochs": 1, "pretrained_model_name_or_path": str(model),
                              "output_dir": str(run), "output_name": "dp"}))
    manifest = json.loads((run / "splits.json").read_text())
    root = Path(manifest["root"])
    allowed = {(root / e["path"]).resolve() for e in manifest["roles"]["nonmember_aux"]}
    training = {(root / e["path"]).resolve() for r in ("train", "member_aux", "member_test")
                for e in manifest["roles"][r]}
    opened = images_opened(monkeypatch)
    hidden = training - allowed
    for path in hidden:
        path.rename(path.with_suffix(".hidden"))  # not one training image may be needed
    try:
        code = main(["select", str(run), "--max_auc", "0.55", "--max_tpr_at_1fpr", "0.01"])
    finally:
        for path in hidden:
            path.with_suffix(".hidden").rename(path)
    out = capsys.readouterr()
    assert code == 0, out.err
    assert opened and set(opened) <= allowed
    result = json.loads((run / "select.json").read_text())
    assert result["dp_guarantee"].startswith("(ε, δ) = (") and result["settings"]["rule"] == "dp_nonmember"
    est = result["checkpoints"]
    assert list(est) == ["base", "dp-e0001", "dp"]
    assert result["choice"]["model"] == min(est, key=lambda n: est[n]["heldout_loss"])
    assert "post-processing" in result["choice"]["reason"] and "nonmember_aux" in out.out


def test_a_tpr_bound_the_aux_roles_cannot_support_is_refused_in_one_line_before_any_audit(run_dir, capsys):
    select_json = run_dir / "select.json"
    before = select_json.stat().st_mtime_ns if select_json.exists() else None
    assert main(["select", str(run_dir), "--max_auc", "1.0", "--max_tpr_at_1fpr", "0.03"]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "3 member_aux vs 3 nonmember_aux" in err
    assert "≥ 100 scored non-members" in err and "≥ 122 scored members" in err
    assert "≥ 244 images in each aux role" in err
    assert "the lowest standard FPR level these aux roles resolve is none" in err
    assert (select_json.stat().st_mtime_ns if select_json.exists() else None) == before  # nothing was run or written


def test_64_plus_64_aux_images_refuse_a_3_percent_tpr_bound_and_name_what_would_do():
    from privlora.select import SelectConfig, check_support

    cfg = SelectConfig("run", max_auc=0.75, max_tpr_at_1fpr=0.03)
    with pytest.raises(PrivloraError) as e:
        check_support(cfg, 32, 32, Path("splits.json"))
    assert "≥ 244 images in each aux role" in str(e.value) and "resolve is 5 % (1/32 ≈ 3.1 %" in str(e.value)
    check_support(SelectConfig("run", max_auc=0.75), 32, 32, Path("splits.json"))  # AUC alone: supported
    check_support(SelectConfig("run", max_auc=0.6, max_tpr_at_1fpr=0.03), 122, 122, Path("splits.json"))
    with pytest.raises(PrivloraError, match="needs ≥ 234 images in each aux role"):  # 0.6 needs 117 vs 117 scored
        check_support(SelectConfig("run", max_auc=0.6), 32, 32, Path("splits.json"))


def test_the_support_check_uses_what_a_chance_model_shows_two_sided_not_an_estimate_of_exactly_one_half():
    """16 vs 16 scored aux images (the quick demo's 32 + 32): a chance model's estimate strays ≥ 0.674·SE₀ from 0.5
    half of the time, and the bound is two-sided, so its median bound is 0.773 (the demo's base model measured
    0.78-0.79), not the 0.703 of an estimate at exactly 0.5; a bound of 0.71 is refused before any audit."""
    import numpy as np

    from privlora.select import SelectConfig, check_support, null_auc_upper

    assert null_auc_upper(16, 16) == pytest.approx(0.7730, abs=1e-4)
    assert null_auc_upper(3, 3) == 1.0  # capped: --max_auc 1 stays supported at any size
    with pytest.raises(PrivloraError, match="in the median, a two-sided 95 % AUC upper bound of 0.773 > "
                                            "--max_auc 0.71"):
        check_support(SelectConfig("run", max_auc=0.71), 16, 16, Path("splits.json"))
    # the median claim itself: scores with no signal, the two-sided normal-approximation bound max(upper, 1 − lower)
    rng = np.random.default_rng(0)
    bounds = []
    for _ in range(2000):
        m, nm = rng.normal(size=16), rng.normal(size=16)
        auc = float((m[:, None] > nm[None, :]).mean())
        se0 = np.sqrt(33 / (12 * 256))
        bounds.append(max(auc, 1 - auc) + 1.959964 * se0)
    assert np.median(bounds) == pytest.approx(null_auc_upper(16, 16), abs=0.02)


def test_select_decides_on_upper_bounds_not_point_estimates():
    from privlora.select import choose

    def est(auc, upper, tpr_upper, loss):
        return {"best_auc": auc, "auc_upper": upper, "tpr_upper": tpr_upper, "heldout_loss": loss}

    rows = {"base": est(0.50, 0.56, 0.01, 0.130),
            "e0010": est(0.55, 0.59, 0.02, 0.080),
            "e0020": est(0.57, 0.66, 0.02, 0.070),  # point estimate under 0.6, upper bound over: rejected
            "final": est(0.58, 0.59, 0.06, 0.060)}  # AUC fine, TPR upper limit over the bound: rejected
    choice = choose(rows, 0.6, 0.05)
    assert choice["model"] == "e0010" and choice["auc_upper"] == 0.59
    assert choose(rows, 0.6, 1.0)["model"] == "final"  # no TPR bound asked for
    assert choose(rows, 0.5, 1.0)["model"] is None
