"""Run-to-run spread on CPU: two trainings at the same seed and thread count give bit-identical LoRA files."""
import pytest
import torch
from safetensors.torch import load_file

from privlora.config import build_config
from privlora.train import train
from tests.fixtures import make_tiny_folder

TOY = dict(synthetic_images=24, n_member_aux=4, n_member_test=4, n_nonmember_aux=4, n_nonmember_test=4,
           resolution=32, train_batch_size=8, eval_samples=4, network_dim=4, network_alpha=4, unet_lr=3e-3,
           attacker_pool=8, attacker_hidden=[16], attacker_lr=1e-3, max_train_epochs=2, seed=11)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(make_tiny_folder(tmp_path_factory.mktemp("m") / "tiny"))


def weights(model, out, **kw):
    cfg = build_config(None, {**TOY, "pretrained_model_name_or_path": model, "output_dir": str(out), **kw})
    return load_file(str(train(cfg)))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "smp_lora"])
def test_same_seed_same_threads_gives_identical_lora_weights(model, tmp_path, method):
    first, second = (weights(model, tmp_path / name, method=method) for name in ("a", "b"))
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    other = weights(model, tmp_path / "c", method=method, seed=12)  # the test can fail: another seed differs
    assert any(not torch.equal(first[k], other[k]) for k in first)
