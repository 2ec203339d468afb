"""Base-model loading: diffusers folders, original-LDM single files, refusals, and the prompt/image encoders."""
from __future__ import annotations

import hashlib
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from privlora.diffusion import training_target
from privlora.errors import PrivloraError
from privlora.models import tiny
from privlora.models.loading import BaseModel, encode_images, encode_prompt, load_base
from tests.fixtures import SD15_TOPOLOGY_UNET, SD15_TOPOLOGY_VAE, make_single_file, make_tiny_folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_folder(tmp_path_factory.mktemp("tiny") / "tiny-sd")


@pytest.fixture(scope="module")
def sd2_dir(tmp_path_factory) -> Path:
    return make_tiny_folder(tmp_path_factory.mktemp("sd2") / "sd2", sd2_style=True, seed=1)


@pytest.fixture(scope="module")
def base(tiny_dir) -> BaseModel:
    return load_base(str(tiny_dir))


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection attempt fails the test instead of silently timing out."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _assert_one_line(err: pytest.ExceptionInfo, *fragments: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg and msg
    for f in fragments:
        assert f in msg, (f, msg)


def _unet_out(unet, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    emb = torch.randn(2, tiny.MAX_TOKENS, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=emb).sample


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------- (1) folders


def test_tiny_folder_loads_with_expected_shapes(base, tiny_dir):
    assert base.prediction_type == "epsilon" and base.source_kind == "diffusers"
    assert type(base.noise_scheduler).__name__ == "DDPMScheduler"
    assert base.unet.config.cross_attention_dim == base.text_encoder.config.hidden_size == 64
    assert base.vae.config.latent_channels == 4
    assert _unet_out(base.unet).shape == (2, 4, 8, 8)
    unet_file = tiny_dir / "unet" / "diffusion_pytorch_model.safetensors"
    assert base.sha256 == hashlib.sha256(unet_file.read_bytes()).hexdigest()
    assert not any(p.requires_grad for p in base.unet.parameters())


def test_embedded_tiny_alias():
    if not (tiny.TINY_SD_PATH / "model_index.json").is_file():
        with pytest.raises(PrivloraError) as err:
            load_base("tiny-sd")
        _assert_one_line(err, str(tiny.TINY_SD_PATH), "build_tiny_sd.py")
        return
    b = load_base("tiny-sd")
    assert b.name == "tiny-sd" and b.unet.config.sample_size == tiny.RESOLUTION // 4


# ---------------------------------------------------------------- (2) SD2-style v-prediction


def test_sd2_style_is_v_prediction_and_targets_velocity(sd2_dir):
    b = load_base(str(sd2_dir))
    assert b.prediction_type == "v_prediction" and b.unet.config.use_linear_projection
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 900])
    target = training_target(b.noise_scheduler, latents, noise, t)
    ac = b.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(target, ac.sqrt() * noise - (1 - ac).sqrt() * latents, atol=1e-6)


def test_prediction_type_override(tiny_dir, sd2_dir):
    scheduler = load_base(str(tiny_dir), prediction_type="v_prediction").noise_scheduler
    assert scheduler.config.prediction_type == "v_prediction"
    assert load_base(str(sd2_dir), prediction_type="epsilon").prediction_type == "epsilon"
    with pytest.raises(PrivloraError) as err:
        load_base(str(tiny_dir), prediction_type="sample")
    _assert_one_line(err, "sample")


# ---------------------------------------------------------------- (3) single-file round trip


@pytest.mark.parametrize("sd2_style", [False, True])
def test_single_file_round_trip_is_exact(tmp_path, tiny_dir, sd2_dir, no_network, sd2_style):
    folder = sd2_dir if sd2_style else tiny_dir
    ref = load_base(str(folder))
    ckpt = make_single_file(folder, tmp_path / "model.safetensors")
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in load_file(ckpt))
    got = load_base(str(ckpt), config_dir=str(folder))
    assert got.source_kind == "single_file" and got.prediction_type == ref.prediction_type
    assert got.sha256 == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(ref, name), getattr(got, name))
    assert torch.equal(_unet_out(ref.unet), _unet_out(got.unet))


def test_single_file_round_trip_sd15_topology(tmp_path, no_network):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    folder = make_tiny_folder(tmp_path / "sd15", unet_overrides=SD15_TOPOLOGY_UNET, vae_overrides=SD15_TOPOLOGY_VAE)
    ckpt = make_single_file(folder, tmp_path / "sd15.safetensors")
    state = load_file(ckpt)
    assert infer_diffusers_model_type(state) == "v1"  # diffusers recognises the layout as SD1.x
    assert "model.diffusion_model.output_blocks.8.2.conv.weight" in state  # upsampler after attention
    assert "first_stage_model.decoder.up.3.block.2.conv2.weight" in state
    ref, got = load_base(str(folder)), load_base(str(ckpt), config_dir=str(folder))
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(ref, name), getattr(got, name))


def test_sd2_single_file_with_the_open_clip_text_encoder(tmp_path, no_network):
    """SD2.x single files keep OpenCLIP's own names (cond_stage_model.model.*, fused q/k/v), not CLIP's."""
    folder = make_tiny_folder(tmp_path / "sd2", sd2_style=True, text_encoder_overrides=dict(num_hidden_layers=23))
    ckpt = make_single_file(folder, tmp_path / "sd2.safetensors", open_clip=True)
    state = load_file(ckpt)
    assert "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight" in state
    assert not any(k.startswith("cond_stage_model.transformer.") for k in state)
    ref, got = load_base(str(folder)), load_base(str(ckpt), config_dir=str(folder))
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(ref, name), getattr(got, name))


def test_pickle_checkpoint_with_allow_pickle_uses_weights_only(tmp_path, tiny_dir):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(make_single_file(tiny_dir, tmp_path / "m.safetensors"))}, ckpt)
    got = load_base(str(ckpt), config_dir=str(tiny_dir), allow_pickle=True)
    _assert_same_weights(load_base(str(tiny_dir)).unet, got.unet)

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": Path("/")}, evil)  # an arbitrary object
    with pytest.raises(PrivloraError) as err:
        load_base(str(evil), config_dir=str(tiny_dir), allow_pickle=True)
    _assert_one_line(err, str(evil), "weights_only")


# ---------------------------------------------------------------- (4) single file without configs


def test_single_file_without_config_dir_names_the_flag(tmp_path, tiny_dir, no_network):
    ckpt = make_single_file(tiny_dir, tmp_path / "model.safetensors")
    with pytest.raises(PrivloraError) as err:
        load_base(str(ckpt))
    _assert_one_line(err, str(ckpt), "--config_dir", "model_index.json", "tokenizer/")


def test_config_dir_missing_tokenizer(tmp_path, tiny_dir):
    ckpt = make_single_file(tiny_dir, tmp_path / "model.safetensors")
    cfg = tmp_path / "cfg"
    shutil.copytree(tiny_dir, cfg)
    shutil.rmtree(cfg / "tokenizer")
    with pytest.raises(PrivloraError) as err:
        load_base(str(ckpt), config_dir=str(cfg))
    _assert_one_line(err, str(cfg / "tokenizer"))


def test_single_file_with_mismatched_config(tmp_path, tiny_dir, sd2_dir):
    ckpt = make_single_file(sd2_dir, tmp_path / "model.safetensors")
    with pytest.raises(PrivloraError) as err:  # SD2-style linear projections vs SD1-style 1×1 convolutions
        load_base(str(ckpt), config_dir=str(tiny_dir))
    _assert_one_line(err, str(ckpt), str(tiny_dir))


# ---------------------------------------------------------------- (5) pickle refusal


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_single_file_refused(tmp_path, tiny_dir, suffix):
    ckpt = tmp_path / f"model{suffix}"
    torch.save({"x": torch.zeros(1)}, ckpt)
    with pytest.raises(PrivloraError) as err:
        load_base(str(ckpt), config_dir=str(tiny_dir))
    _assert_one_line(err, str(ckpt), "pickle-based checkpoint refused", "--allow_pickle")


def test_pickle_weights_in_folder_refused(tmp_path, tiny_dir):
    folder = tmp_path / "binfolder"
    shutil.copytree(tiny_dir, folder)
    st = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(st), folder / "unet" / "diffusion_pytorch_model.bin")
    st.unlink()
    with pytest.raises(PrivloraError) as err:
        load_base(str(folder))
    _assert_one_line(err, "diffusion_pytorch_model.bin", "--allow_pickle")
    assert load_base(str(folder), allow_pickle=True).unet.config.in_channels == 4


# ---------------------------------------------------------------- (6) missing / corrupt inputs


def test_missing_path(tmp_path):
    with pytest.raises(PrivloraError) as err:
        load_base(str(tmp_path / "nope"))
    _assert_one_line(err, str(tmp_path / "nope"))


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder", "tokenizer", "scheduler"])
def test_folder_missing_component(tmp_path, tiny_dir, component):
    folder = tmp_path / "partial"
    shutil.copytree(tiny_dir, folder)
    shutil.rmtree(folder / component)
    with pytest.raises(PrivloraError) as err:
        load_base(str(folder))
    _assert_one_line(err, str(folder / component))


@pytest.mark.parametrize("rel", ["unet/config.json", "vae/diffusion_pytorch_model.safetensors",
                                 "text_encoder/model.safetensors"])
def test_folder_missing_file(tmp_path, tiny_dir, rel):
    folder = tmp_path / "partial"
    shutil.copytree(tiny_dir, folder)
    (folder / rel).unlink()
    with pytest.raises(PrivloraError) as err:
        load_base(str(folder))
    _assert_one_line(err, str((folder / rel).parent))


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrivloraError) as err:
        load_base(str(tmp_path / "empty"))
    _assert_one_line(err, str(tmp_path / "empty"), "model_index.json")


def test_corrupt_safetensors(tmp_path, tiny_dir):
    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_dir, folder)
    bad = folder / "unet" / "diffusion_pytorch_model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(PrivloraError) as err:
        load_base(str(folder))
    _assert_one_line(err, str(bad))

    single = tmp_path / "truncated.safetensors"
    single.write_bytes(make_single_file(tiny_dir, tmp_path / "ok.safetensors").read_bytes()[:5000])
    with pytest.raises(PrivloraError) as err:
        load_base(str(single), config_dir=str(tiny_dir))
    _assert_one_line(err, str(single))


def test_single_file_not_ldm_layout(tmp_path, tiny_dir):
    diffusers_unet = tiny_dir / "unet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(PrivloraError) as err:
        load_base(str(diffusers_unet), config_dir=str(tiny_dir))
    _assert_one_line(err, str(diffusers_unet), "model.diffusion_model")


def test_single_file_missing_weights(tmp_path, tiny_dir):
    from safetensors.torch import save_file

    state = load_file(make_single_file(tiny_dir, tmp_path / "full.safetensors"))
    del state["model.diffusion_model.out.2.weight"]
    ckpt = tmp_path / "partial.safetensors"
    save_file(state, str(ckpt))
    with pytest.raises(PrivloraError) as err:
        load_base(str(ckpt), config_dir=str(tiny_dir))
    _assert_one_line(err, str(ckpt), "UNet weights missing")


# ---------------------------------------------------------------- (7) encoders


def test_encode_prompt_clip_skip(base):
    captions = ["a red square on grey", "two blue circles"]
    e1 = encode_prompt(base, captions)
    e2 = encode_prompt(base, captions, clip_skip=2)
    shape = (2, base.tokenizer.model_max_length, base.text_encoder.config.hidden_size)
    assert e1.shape == e2.shape == shape == (2, tiny.MAX_TOKENS, 64)
    assert torch.equal(e1, encode_prompt(base, captions, clip_skip=1))
    assert not torch.allclose(e1, e2)
    with pytest.raises(PrivloraError):
        encode_prompt(base, captions, clip_skip=3)


def test_encode_prompt_truncates_long_captions(base):
    assert encode_prompt(base, ["word " * 200]).shape == (1, tiny.MAX_TOKENS, 64)


def test_encode_images(base):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mode = encode_images(base, x, sample=False)
    assert mode.shape == (2, 4, 8, 8)
    expected = base.vae.encode(x).latent_dist.mode() * base.vae.config.scaling_factor
    assert torch.allclose(mode, expected)
    a = encode_images(base, x, generator=torch.Generator().manual_seed(3))
    b = encode_images(base, x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, mode)


def test_single_file_missing_text_encoder_weights(tmp_path, tiny_dir):
    from safetensors.torch import save_file

    state = load_file(make_single_file(tiny_dir, tmp_path / "full.safetensors"))
    del state["cond_stage_model.transformer.text_model.final_layer_norm.weight"]
    ckpt = tmp_path / "partial.safetensors"
    save_file(state, str(ckpt))
    with pytest.raises(PrivloraError) as err:
        load_base(str(ckpt), config_dir=str(tiny_dir))
    _assert_one_line(err, str(ckpt), "text encoder weights missing", "final_layer_norm.weight")
