"""Crash safety: a run killed with SIGKILL and resumed ends bit-identical to an uninterrupted run."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures import make_tiny_folder

ARGS = ["--synthetic_images", "40", "--n_member_aux", "5", "--n_nonmember_aux", "5", "--n_nonmember_test", "10",
        "--resolution", "32", "--train_batch_size", "8", "--eval_samples", "8", "--network_dim", "4",
        "--network_alpha", "4", "--unet_lr", "1e-3", "--attacker_pool", "8", "--attacker_hidden", "16",
        "--method", "smp_lora", "--max_train_epochs", "6", "--attacker_lr", "1e-3", "--network_dropout", "0.1"]


def command(model, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "privlora", "train", "--pretrained_model_name_or_path", model,
           "--output_dir", str(out), *ARGS, *extra]
    return cmd, env


# The paper's settings draw from more generators (fresh aux batches per attacker step, L_adv's dropout masks,
# per-step caption shuffles): every one of them must resume exactly.
REFERENCE = ("--adv_step", "reference", "--attacker_dropout_in_adv", "--shuffle_caption", "--keep_tokens", "1",
             "--max_token_length", "150", "--k_steps", "2")


# The stronger proxy attacker adds K-draw batches and running feature statistics (buffers) to the state.
STRONGER = (*REFERENCE, "--attacker_input", "calibrated", "--attacker_features", "scalar", "--attacker_timestep",
            "--attacker_draws", "2")


@pytest.mark.slow
@pytest.mark.parametrize("settings", [(), REFERENCE, STRONGER], ids=["fused", "reference", "stronger"])
def test_kill_9_then_resume_is_bit_identical(tmp_path, settings):
    model = str(make_tiny_folder(tmp_path / "tiny"))
    cmd, env = command(model, tmp_path / "straight", *settings)
    subprocess.run(cmd, env=env, check=True, capture_output=True)

    cmd, env = command(model, tmp_path / "killed", *settings, "--save_state", "--save_every_n_steps", "3")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "killed" / "state-latest"
    deadline = time.time() + 300
    while not (latest.exists() and "000006" in latest.read_text()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-epoch, somewhere after the step-6 state was written
    proc.wait()
    assert latest.exists() and not (tmp_path / "killed" / "lora.safetensors").exists()

    cmd, env = command(model, tmp_path / "killed", *settings, "--save_state", "--save_every_n_steps", "3",
                       "--resume", "latest")
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    a = load_file(tmp_path / "straight" / "lora.safetensors")
    b = load_file(tmp_path / "killed" / "lora.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("lora.attacker.safetensors", "lora.attacker_best.safetensors"):
        assert (tmp_path / "straight" / name).exists() == (tmp_path / "killed" / name).exists()
        if not (tmp_path / "straight" / name).exists():  # no evaluation beat chance: no best attacker
            continue
        att_a, att_b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "killed" / name)
        assert all(torch.equal(att_a[k], att_b[k]) for k in att_a)
