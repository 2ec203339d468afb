"""Fault injection: NaN losses, a crash in the middle of a save, and no network use at run time."""
import socket

import pytest
import torch
from safetensors.torch import load_file

import privlora.io
from privlora.config import build_config
from privlora.errors import PrivloraError
from privlora.io import save_safetensors
from privlora.train import train

SMALL = dict(synthetic_images=40, n_member_aux=5, n_nonmember_aux=5, n_nonmember_test=10, resolution=32,
             train_batch_size=8, eval_samples=8, network_dim=4, network_alpha=4, unet_lr=1e-3)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(model, tmp_path, monkeypatch):
    from privlora.objectives.lora import LoraObjective

    real = LoraObjective.lora_loss
    calls = {"n": 0}

    def poisoned(self, batch, denoiser):
        out = real(self, batch, denoiser)
        calls["n"] += 1
        if calls["n"] == 5:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(LoraObjective, "lora_loss", poisoned)
    cfg = build_config(None, {**SMALL, "pretrained_model_name_or_path": model, "output_dir": str(tmp_path / "r"),
                              "max_train_steps": 10, "save_every_n_steps": 2, "save_state": True})
    with pytest.raises(PrivloraError, match="non-finite loss .* at step 5"):
        train(cfg)
    good = load_file(tmp_path / "r" / "lora-step000004.safetensors")
    assert all(torch.isfinite(v).all() for v in good.values())
    assert (tmp_path / "r" / "state-step000004" / "state.pt").exists()
    assert not (tmp_path / "r" / "lora.safetensors").exists()


def test_a_crash_in_the_middle_of_a_save_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "lora.safetensors"
    save_safetensors(path, {"w": torch.ones(3)})

    def dies_halfway(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt  # e.g. the process is interrupted while writing

    with pytest.raises(KeyboardInterrupt):
        privlora.io.atomic_write(path, dies_halfway)
    assert torch.equal(load_file(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]  # no temporary file left behind


def test_train_audit_and_sample_open_no_socket(model, tmp_path, monkeypatch):
    from privlora.audit import AuditConfig, run_audit
    from privlora.sample import sample

    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    out = tmp_path / "r"
    lora = train(build_config(None, {**SMALL, "pretrained_model_name_or_path": model, "output_dir": str(out),
                                     "max_train_steps": 2}))
    run_audit(AuditConfig(splits=str(out / "splits.json"), out=str(tmp_path / "audit"),
                          pretrained_model_name_or_path=model, loras=[str(lora)], attacks=["loss", "pia"],
                          n_bootstrap=10), log=lambda *_: None)
    sample(model, tmp_path / "samples", prompt="a red circle", n=2, steps=2, lora=lora)
    assert attempts == []
