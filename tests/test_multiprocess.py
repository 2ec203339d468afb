"""Two CPU processes (torchrun, gloo) train like one process with the same global batch."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures import make_tiny_folder

ARGS = ["--synthetic_images", "60", "--n_member_aux", "5", "--n_nonmember_aux", "5", "--n_nonmember_test", "10",
        "--resolution", "32", "--eval_samples", "16", "--network_dim", "4", "--network_alpha", "4", "--unet_lr", "2e-3",
        "--attacker_pool", "8", "--attacker_hidden", "16", "--method", "smp_lora", "--max_train_epochs", "6",
        "--attacker_lr", "1e-3", "--lr_scheduler", "linear", "--lr_warmup_steps", "3"]



def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it), so parallel or repeated runs do not collide."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    model = str(make_tiny_folder(tmp_path / "tiny"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["-m", "privlora", "train", "--pretrained_model_name_or_path", model, *ARGS]
    subprocess.run([sys.executable, *common, "--output_dir", str(tmp_path / "one"), "--train_batch_size", "8"],
                   env=env, check=True, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port())]
    subprocess.run([*torchrun, *common, "--output_dir", str(tmp_path / "two"), "--train_batch_size", "4"],
                   env=env, check=True, capture_output=True)

    one = json.loads((tmp_path / "one" / "history.json").read_text())
    two = json.loads((tmp_path / "two" / "history.json").read_text())
    assert [e["step"] for e in one["epochs"]] == [e["step"] for e in two["epochs"]] == [6, 12, 18, 24, 30, 36]
    curve_one = torch.tensor([e["member_test_loss"] for e in one["epochs"]])
    curve_two = torch.tensor([e["member_test_loss"] for e in two["epochs"]])
    drop = curve_one[0] - curve_one[-1]
    assert drop > 0.05  # training did something
    assert (curve_one - curve_two).abs().max() < 0.2 * drop  # same curve up to the per-process noise draws
    a, b = load_file(tmp_path / "one" / "lora.safetensors"), load_file(tmp_path / "two" / "lora.safetensors")
    assert a.keys() == b.keys()
