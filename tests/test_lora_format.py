"""LoRA files: kohya key names, and diffusers' own loader reproduces our in-memory adapted model."""
import json

import pytest
import torch
from safetensors import safe_open

from privlora.models.loading import encode_prompt, load_base
from privlora.models.lora import (LoraSpec, add_lora, kohya_state_dict, lora_layers, save_diffusers, save_kohya,
                                  text_encoder_lora_config, unet_lora_config)
from tests.fixtures import make_tiny_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("tiny") / "model")


def adapted(folder, spec, with_te):
    torch.manual_seed(0)
    base = load_base(str(folder))
    add_lora(base.unet, unet_lora_config(spec, base.unet))
    if with_te:
        add_lora(base.text_encoder, text_encoder_lora_config(spec))
    g = torch.Generator().manual_seed(1)
    for model in (base.unet, base.text_encoder):
        for layer in lora_layers(model).values():  # B starts at zero: make the LoRA do something
            w = layer.lora_B["default"].weight
            w.data = torch.randn(w.shape, generator=g) * 0.1
    return base


def unet_output(unet, text_emb):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=text_emb).sample


def test_kohya_key_names_for_a_known_module(folder):
    base = load_base(str(folder))
    add_lora(base.unet, unet_lora_config(LoraSpec(rank=4, alpha=2.0), base.unet))
    keys = kohya_state_dict(base.unet, "lora_unet")
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert keys[f"{stem}.lora_down.weight"].shape == (4, 32)
    assert keys[f"{stem}.lora_up.weight"].shape == (32, 4)
    assert keys[f"{stem}.alpha"].item() == 2.0
    assert "lora_unet_up_blocks_2_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_down.weight" in keys
    assert "lora_unet_mid_block_attentions_0_proj_out.lora_up.weight" in keys
    assert not any("resnets" in k for k in keys)  # no conv LoRA unless conv_dim is set


@pytest.mark.parametrize("spec,with_te", [
    (LoraSpec(rank=4, alpha=2.0), False),
    (LoraSpec(rank=4, alpha=4.0, conv_rank=2, conv_alpha=1.0), True),
])
def test_diffusers_loads_our_kohya_file_and_matches_the_in_memory_model(folder, tmp_path, spec, with_te):
    from diffusers import StableDiffusionPipeline

    ours = adapted(folder, spec, with_te)
    path = save_kohya(tmp_path / "l.safetensors", ours.unet, ours.text_encoder if with_te else None,
                      metadata={"privlora_method": "lora"})
    emb_ours = encode_prompt(ours, ["a red circle"]).detach()
    expected = unet_output(ours.unet, emb_ours.expand(2, -1, -1))

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, local_files_only=True)
    plain = unet_output(pipe.unet, emb_ours.expand(2, -1, -1))
    pipe.load_lora_weights(str(path))  # diffusers' own kohya converter, the path users take
    got = unet_output(pipe.unet, emb_ours.expand(2, -1, -1))
    assert (got - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    if with_te:
        ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            torch.testing.assert_close(pipe.text_encoder(ids)[0], emb_ours, atol=1e-5, rtol=1e-4)


def test_diffusers_format_round_trip(folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    spec = LoraSpec(rank=4, alpha=8.0)
    ours = adapted(folder, spec, False)
    path = save_diffusers(tmp_path / "d.safetensors", ours.unet)
    emb = encode_prompt(ours, ["a blue star"]).detach().expand(2, -1, -1)
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, local_files_only=True)
    pipe.load_lora_weights(str(path))
    torch.testing.assert_close(unet_output(pipe.unet, emb), unet_output(ours.unet, emb), atol=1e-5, rtol=1e-4)
    with safe_open(str(path), "pt") as f:
        assert all(k.startswith("unet.") for k in f.keys())
        assert json.loads(f.metadata()["lora_adapter_metadata"])["unet.lora_alpha"] == 8.0
