"""The training recipe end to end on a tiny model, and bad input stopped before anything is written."""
import json
import re

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from privlora.cli import main
from privlora.config import build_config
from privlora.data.splits import read_manifest
from privlora.train import train
from tests.fixtures import make_tiny_folder

SMALL = dict(synthetic_images=40, n_member_aux=5, n_nonmember_aux=5, n_nonmember_test=10, resolution=32,
             train_batch_size=8, eval_samples=8, network_dim=4, network_alpha=4, unet_lr=1e-3, attacker_pool=8,
             attacker_hidden=[32])


def run(model, out, **kw):
    cfg = build_config(None, {**SMALL, "pretrained_model_name_or_path": model, "output_dir": str(out), **kw})
    return train(cfg)


@pytest.mark.slow
def test_plain_lora_run_writes_lora_manifest_logs_and_learns(model, tmp_path):
    path = run(model, tmp_path / "run", max_train_epochs=4)
    assert path.exists() and (tmp_path / "run" / "splits.json").exists()
    assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents*"))
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history["epochs"]) == 4
    assert history["epochs"][-1]["member_test_loss"] < history["base"]["member_test"]
    splits = read_manifest(tmp_path / "run" / "splits.json")
    assert len(splits.train) == 40 - 15 and len(splits.nonmember_test) == 10
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        assert all(k.startswith("lora_unet_") for k in keys)
        assert f.metadata()["privlora_method"] == "lora" and f.metadata()["ss_network_dim"] == "4"


def test_eval_every_n_epochs_evaluates_on_schedule_and_at_the_end(model, tmp_path):
    run(model, tmp_path / "r", max_train_epochs=5, eval_every_n_epochs=2)
    history = json.loads((tmp_path / "r" / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [2, 4, 5]


def test_eval_every_n_epochs_must_be_positive(model, tmp_path):
    with pytest.raises(Exception, match="eval_every_n_epochs must be"):
        run(model, tmp_path / "r", max_train_epochs=1, eval_every_n_epochs=0)


def test_lora_metadata_has_no_data_derived_strings(model, tmp_path):
    path = run(model, tmp_path / "secret_folder_name", max_train_steps=1, output_name="x")
    splits = read_manifest(tmp_path / "secret_folder_name" / "splits.json")
    with safe_open(str(path), "pt") as f:
        meta = json.dumps(f.metadata()).lower()
    tokens = set(re.findall(r"[a-z0-9]+", meta)) | set(re.findall(r"[a-z0-9_]+", meta))
    words = {w for e in splits.train + splits.nonmember_test for w in e.caption.lower().split() if len(w) > 3}
    names = {e.path.stem.lower() for e in splits.train} | {"secret_folder_name", "data"}
    assert words and not words & tokens
    assert not names & tokens


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mp_lora", "smp_lora"])
@pytest.mark.parametrize("adv_step,attacker_input", [("fused", "loss_map"), ("reference", "loss_map"),
                                                      ("fused", "calibrated")])
def test_privacy_objectives_run_and_save_the_attacker(model, tmp_path, method, adv_step, attacker_input):
    path = run(model, tmp_path / "r", method=method, adv_step=adv_step, max_train_epochs=1, k_steps=2,
               attacker_input=attacker_input)
    attacker = tmp_path / "r" / f"{path.stem}.attacker.safetensors"
    assert attacker.exists()
    record = json.loads((tmp_path / "r" / "history.json").read_text())["epochs"][-1]
    for key in ("L_ada", "L_adv", "attacker_loss", "attacker_train_acc", "attacker_test_acc"):
        assert key in record and record[key] == record[key]  # present and not NaN


def test_v_prediction_model_trains(tmp_path):
    sd2 = str(make_tiny_folder(tmp_path / "sd2", prediction_type="v_prediction", sd2_style=True))
    path = run(sd2, tmp_path / "r", max_train_steps=2)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["privlora_prediction_type"] == "v_prediction"


def test_refuses_to_overwrite_a_finished_run(model, tmp_path):
    run(model, tmp_path / "r", max_train_steps=1)
    with pytest.raises(Exception, match="already there"):
        run(model, tmp_path / "r", max_train_steps=1)


# --- bad input: one line naming the problem, exit status 2, nothing written -------------------------------

def data_folder(tmp_path, n=30):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (16, 16), (i * 8, 10, 200)).save(folder / f"im{i:02d}.png")
        (folder / f"im{i:02d}.txt").write_text(f"a picture number {i}")
    return folder


def cli(model, tmp_path, capsys, *extra):
    out = tmp_path / "out"
    code = main(["train", "--pretrained_model_name_or_path", model, "--output_dir", str(out), "--resolution", "32",
                 "--max_train_steps", "1", "--n_member_aux", "3", "--n_nonmember_aux", "3", "--n_nonmember_test", "3",
                 *extra])
    err = capsys.readouterr().err.strip()
    return code, err, out


@pytest.mark.parametrize("breakage,expect", [
    ("truncate", "im05.png"),
    ("no_caption", "im07.png"),
    ("not_an_image", "im03.png"),
])
def test_bad_data_is_reported_before_training(model, tmp_path, capsys, breakage, expect):
    folder = data_folder(tmp_path)
    if breakage == "truncate":
        data = (folder / "im05.png").read_bytes()
        (folder / "im05.png").write_bytes(data[: len(data) // 2])
    elif breakage == "no_caption":
        (folder / "im07.txt").unlink()
    else:
        (folder / "im03.png").write_text("this is not a png")
    code, err, out = cli(model, tmp_path, capsys, "--train_data_dir", str(folder))
    assert code == 2 and len(err.splitlines()) == 1 and expect in err
    assert not out.exists()


def test_empty_folder(model, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err, out = cli(model, tmp_path, capsys, "--train_data_dir", str(tmp_path / "empty"))
    assert code == 2 and "empty" in err and "no images" in err and not out.exists()


def test_unknown_config_key_and_bad_resolution(model, tmp_path, capsys):
    preset = tmp_path / "p.toml"
    preset.write_text('synthetic_images = 40\nmax_train_steps = 1\nnetwork_dimm = 4\n')
    code = main(["train", "--config", str(preset), "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "p.toml" in err and "network_dimm" in err and len(err.splitlines()) == 1
    code, err, out = cli(model, tmp_path, capsys, "--synthetic_images", "40", "--resolution", "36")
    assert code == 2 and "resolution 36" in err and not out.exists()
    assert not (tmp_path / "o").exists()


def test_samples_during_training_are_written(model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --d 3 --s 4\n# comment\na blue star --s 4\n")
    run(model, tmp_path / "r", max_train_epochs=2, sample_prompts=str(prompts), sample_every_n_epochs=1)
    assert sorted(p.name for p in (tmp_path / "r" / "samples").glob("*.png")) == [
        "e0001_0.png", "e0001_1.png", "e0002_0.png", "e0002_1.png"]


def test_bad_sample_prompts_fail_before_training(model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --zz 3\n")
    with pytest.raises(Exception, match="prompts.txt:1"):
        run(model, tmp_path / "r", max_train_epochs=1, sample_prompts=str(prompts), sample_every_n_epochs=1)
    assert not (tmp_path / "r").exists()


def test_scale_lr_and_channels_last(model, tmp_path):
    from privlora.train_setup import setup

    cfg = build_config(None, {**SMALL, "pretrained_model_name_or_path": model, "output_dir": str(tmp_path / "r"),
                              "max_train_steps": 1, "scale_lr": True, "channels_last": True,
                              "gradient_accumulation_steps": 2})
    run = setup(cfg)
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 8 * 2)
    conv = run.base.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)


def test_reference_run_evaluates_the_cotrained_attacker_on_fresh_noise_and_keeps_the_best(model, tmp_path):
    path = run(model, tmp_path / "r", method="smp_lora", adv_step="reference", attacker_dropout_in_adv=True,
               max_train_epochs=2, k_steps=2)
    history = json.loads((tmp_path / "r" / "history.json").read_text())["epochs"]
    for record in history:
        for key in ("attacker_test_acc_fresh", "attacker_aux_acc_fresh", "grad_norm"):
            assert key in record and 0 <= record[key] < float("inf")
    # the fresh-noise evaluation uses every test sample: (member_test + nonmember_test) accuracies are k/n
    n_test = len(read_manifest(tmp_path / "r" / "splits.json").member_test) + 10
    assert all(abs(r["attacker_test_acc_fresh"] * n_test - round(r["attacker_test_acc_fresh"] * n_test)) < 1e-4
               for r in history)
    best = tmp_path / "r" / f"{path.stem}.attacker_best.safetensors"
    top = max(r["attacker_test_acc_fresh"] for r in history)
    assert best.exists() == (top > 0.5)  # the reference keeps a best attacker only above chance
    if best.exists():
        with safe_open(str(best), "pt") as f:
            assert float(f.metadata()["privlora_attacker_test_acc_fresh"]) == top
    resolved = (tmp_path / "r" / "resolved_config.toml").read_text()
    assert 'adv_step = "reference"' in resolved and "attacker_dropout_in_adv = true" in resolved


def test_hessian_estimate_is_logged_on_schedule_and_leaves_the_run_unchanged(model, tmp_path):
    plain = run(model, tmp_path / "a", method="smp_lora", max_train_steps=4, eval_every_n_epochs=1)
    probed = run(model, tmp_path / "b", method="smp_lora", max_train_steps=4, hessian_every_n_steps=2, hessian_iters=3)
    history = json.loads((tmp_path / "b" / "history.json").read_text())
    assert [h["step"] for h in history["hessian"]] == [2, 4]
    assert all(h["hessian_top_eig"] == h["hessian_top_eig"] and h["hessian_top_eig"] != 0 for h in history["hessian"])
    with safe_open(str(plain), "pt") as fa, safe_open(str(probed), "pt") as fb:
        assert all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())


def test_history_has_per_evaluation_means_of_the_per_step_logs(model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(model, tmp_path / "r", method="smp_lora", max_train_epochs=4, eval_every_n_epochs=2, log_every_n_steps=1)
    history = json.loads((tmp_path / "r" / "history.json").read_text())["epochs"]
    events = EventAccumulator(str(next((tmp_path / "r" / "logs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    start = 0
    for record in history:  # every step of the period (start, record["step"]], as TensorBoard logged it
        for key in ("L_ada", "L_adv", "attacker_loss", "grad_norm"):
            steps = [e for e in events.Scalars(f"train/{key}") if start < e.step <= record["step"]]
            assert len(steps) == record["step"] - start > 1
            assert record[f"{key}_mean"] == pytest.approx(sum(e.value for e in steps) / len(steps), rel=1e-5)
            assert record[key] == pytest.approx(steps[-1].value, rel=1e-5)  # the last step's value is kept
        norms = [e.value for e in events.Scalars("train/grad_norm") if start < e.step <= record["step"]]
        assert record["grad_norm_max"] == pytest.approx(max(norms), rel=1e-5)
        assert "lr_mean" not in record
        start = record["step"]


@pytest.mark.slow
def test_the_saved_attackers_load_into_the_audits_proxy_attack(model, tmp_path):
    from privlora.audit import AuditConfig, run_audit

    path = run(model, tmp_path / "r", method="mp_lora", adv_step="reference", attacker_input="calibrated",
               max_train_epochs=2, max_token_length=150, clip_skip=2)
    for which, file in (("final", "attacker"), ("best", "attacker_best")):
        report = run_audit(AuditConfig(splits=str(tmp_path / "r" / "splits.json"), out=str(tmp_path / which),
                                       pretrained_model_name_or_path=model, loras=[str(path)],
                                       attacks=["loss", "proxy"], n_bootstrap=0,
                                       attack_params={"proxy": {"attacker": which}}), log=lambda _: None)
        [lora] = report["models"]
        if not (tmp_path / "r" / f"{path.stem}.{file}.safetensors").exists():
            # no evaluation beat chance, so no best attacker was kept (the reference's rule): proxy says why
            assert which == "best" and "proxy" in lora["skipped"] and file in lora["skipped"]["proxy"]
            continue
        details = lora["results"]["proxy"]["details"]
        assert details["attacker_file"] == f"{path.stem}.{file}.safetensors"
        assert details["attacker_input"] == "calibrated"
        assert details["held_out"] is (which == "final")
        assert lora["text_encoding"] == {"clip_skip": 2, "max_token_length": 150,
                                         "from": "clip_skip: LoRA metadata; max_token_length: LoRA metadata"}
        assert 0 <= lora["results"]["proxy"]["decision_accuracy"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize("adv_step", ["fused", "reference"])
def test_a_stronger_attacker_trains_is_evaluated_on_its_own_input_and_replayed_by_proxy(model, tmp_path, adv_step):
    from privlora.audit import AuditConfig, run_audit

    path = run(model, tmp_path / "r", method="smp_lora", adv_step=adv_step, attacker_input="calibrated",
               attacker_features="scalar", attacker_timestep=True, attacker_draws=2, max_train_epochs=1)
    record = json.loads((tmp_path / "r" / "history.json").read_text())["epochs"][-1]
    for key in ("L_adv", "attacker_loss", "attacker_test_acc_fresh", "attacker_aux_acc_fresh"):
        assert key in record and 0 <= record[key] < float("inf")
    assert "attacker_test_acc" not in record  # the one-draw fixed-noise probe is not this attacker's input
    with safe_open(str(tmp_path / "r" / f"{path.stem}.attacker.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["draws"], meta["timestep"], meta["features"]) == ("2", "true", "scalar")
    report = run_audit(AuditConfig(splits=str(tmp_path / "r" / "splits.json"), out=str(tmp_path / "a"),
                                   pretrained_model_name_or_path=model, loras=[str(path)], attacks=["loss", "proxy"],
                                   n_bootstrap=0), log=lambda _: None)
    [lora] = report["models"]
    proxy = lora["results"]["proxy"]
    assert proxy["details"]["attacker_features"] == "scalar" and 0 <= proxy["decision_accuracy"] <= 1
