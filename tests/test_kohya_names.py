"""LoRA files of SD1.5- and SD2-shaped models name exactly the modules ComfyUI, A1111 and kohya sd-scripts load
(tests/data/kohya_lora_modules_*.txt), whatever transformers is installed, and diffusers' loader reproduces the
adapted UNet and text encoder from them.

The models have SD1.5's / SD2's real structure (block types, layers per block, 12 / 23 text-encoder layers) at
toy widths and random weights (tests/fixtures.py ``SD15_SHAPE`` / ``SD2_SHAPE``): names do not depend on widths.
"""
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from privlora.models.loading import encode_prompt, load_base
from privlora.models.lora import (LoraSpec, add_lora, kohya_state_dict, lora_layers, save_kohya,
                                  text_encoder_lora_config, unet_lora_config)
from tests.fixtures import make_sd_folder

DATA = Path(__file__).resolve().parent / "data"
SPECS = {"sd15": LoraSpec(rank=4, alpha=2.0), "sd2": LoraSpec(rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0)}
CLIENT_LISTS = {"sd15": "kohya_lora_modules_sd15.txt", "sd2": "kohya_lora_modules_sd2_conv.txt"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return {family: make_sd_folder(root / family, family) for family in ("sd15", "sd2")}


def client_names(family: str) -> set[str]:
    return set((DATA / CLIENT_LISTS[family]).read_text(encoding="utf-8").split())


def adapted(folder: Path, spec: LoraSpec):
    base = load_base(str(folder))
    add_lora(base.unet, unet_lora_config(spec, base.unet))
    add_lora(base.text_encoder, text_encoder_lora_config(spec))
    g = torch.Generator().manual_seed(1)
    for model in (base.unet, base.text_encoder):
        for layer in lora_layers(model).values():  # B starts at zero: make the LoRA do something
            w = layer.lora_B["default"].weight
            w.data = torch.randn(w.shape, generator=g) * 0.1  # type: ignore[arg-type]  # peft: a Linear's weight
    return base


def file_modules(path: Path) -> dict[str, set[str]]:
    """Module name → the suffixes it has in the file (``lora_down.weight``, ``lora_up.weight``, ``alpha``)."""
    out: dict[str, set[str]] = {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            name, suffix = key.split(".", 1)
            out.setdefault(name, set()).add(suffix)
    return out


@pytest.mark.parametrize("family", ["sd15", "sd2"])
def test_module_names_are_exactly_the_ones_the_clients_load(folders, tmp_path, family):
    base = adapted(folders[family], SPECS[family])
    path = save_kohya(tmp_path / "lora.safetensors", base.unet, base.text_encoder)
    modules = file_modules(path)
    assert set(modules) == client_names(family)
    assert all(suffixes == {"lora_down.weight", "lora_up.weight", "alpha"} for suffixes in modules.values())


class Wrapped(torch.nn.Module):
    """The ``text_model`` level that CLIPTextModel has under transformers < 5.6, whatever is installed."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.text_model = inner


@pytest.mark.parametrize("family", ["sd15", "sd2"])
def test_text_encoder_names_do_not_depend_on_the_wrapper_level(folders, family):
    from peft import inject_adapter_in_model
    from transformers import CLIPTextModel

    def fresh():
        return CLIPTextModel.from_pretrained(folders[family] / "text_encoder")

    first = fresh()
    if hasattr(first, "text_model"):  # transformers < 5.6: the bare encoder is one level down
        with_level, without_level = first, fresh().text_model
    else:
        with_level, without_level = Wrapped(first), fresh()
    config = text_encoder_lora_config(SPECS[family])
    names = []
    for model in (with_level, without_level):
        inject_adapter_in_model(config, model)
        names.append({k.split(".")[0] for k in kohya_state_dict(model, "lora_te")})
    expected = {n for n in client_names(family) if n.startswith("lora_te_")}
    assert names[0] == names[1] == expected


@pytest.mark.parametrize("family", ["sd15", "sd2"])
def test_diffusers_reproduces_the_adapted_unet_and_text_encoder(folders, tmp_path, family):
    from diffusers import StableDiffusionPipeline

    ours = adapted(folders[family], SPECS[family])
    path = save_kohya(tmp_path / "lora.safetensors", ours.unet, ours.text_encoder)
    prompt = ["a red circle"]
    with torch.no_grad():
        emb_ours = encode_prompt(ours, prompt)
        expected = unet_output(ours.unet, emb_ours)

    pipe = StableDiffusionPipeline.from_pretrained(str(folders[family]), safety_checker=None, local_files_only=True)
    with torch.no_grad():
        emb_plain = pipe.text_encoder(tokens(pipe, prompt))[0]
    pipe.load_lora_weights(str(path))  # diffusers' own kohya converter, the path users take
    loaded = len(lora_layers_named(pipe.unet)) + len(lora_layers_named(pipe.text_encoder))
    assert loaded == len(file_modules(path))
    with torch.no_grad():
        emb_theirs = pipe.text_encoder(tokens(pipe, prompt))[0]
        got = unet_output(pipe.unet, emb_ours)
    assert (emb_theirs - emb_plain).abs().max() > 1e-3  # the text-encoder LoRA does something …
    torch.testing.assert_close(emb_theirs, emb_ours, atol=1e-5, rtol=1e-4)  # … and the same thing
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def lora_layers_named(model) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer) and m.lora_A]


def tokens(pipe, prompt: list[str]) -> torch.Tensor:
    return pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                          return_tensors="pt").input_ids


def unet_output(unet, emb: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)  # any size works; the module names do not depend on it
    return unet(x, torch.tensor([10, 500]), encoder_hidden_states=emb.expand(2, -1, -1)).sample
