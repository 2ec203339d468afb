"""Text encoders and text-encoder LoRAs load with the file's weights on every transformers the pins allow.

transformers >= 5.6 dropped CLIPTextModel's ``text_model`` level; earlier 5.x read only ``text_model.*`` keys
and leave a file without them at random init — silently. privlora writes the standard ``text_model.*`` layout
(every 5.x reads it) and reads both. CI runs this file under the lowest allowed transformers too
(scripts/check_transformers_pins.sh).
"""
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from privlora.errors import PrivloraError
from privlora.models.clip_layout import WRAPPER, save_text_encoder, standard_lora_key, standard_name
from privlora.models.loading import encode_prompt, load_base
from privlora.models.lora import (LoraSpec, add_lora, lora_layers, save_diffusers, save_kohya,
                                  text_encoder_lora_config, unet_lora_config)
from privlora.models.tiny import TINY_SD_PATH
from tests.fixtures import make_tiny_folder

TINY_TE = TINY_SD_PATH / "text_encoder" / "model.safetensors"


def assert_holds_file_weights(model: torch.nn.Module, file: Path) -> None:
    """Every tensor of the model is the file's (same name in the standard spelling), none left at random init."""
    in_file = {standard_name(k): v for k, v in load_file(str(file)).items() if not k.endswith("position_ids")}
    in_model = {standard_name(k): v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    assert set(in_model) == set(in_file)
    different = [k for k, v in in_model.items() if not torch.equal(v, in_file[k].to(v.dtype))]
    assert not different, f"{len(different)} tensors differ from the file, e.g. {different[0]}"


def rewrite_keys(file: Path, rename) -> None:
    save_file({rename(k): v for k, v in load_file(str(file)).items()}, str(file), metadata={"format": "pt"})


# ---------------------------------------------------------------- the bundled tiny-sd


def test_bundled_text_encoder_is_stored_in_the_standard_layout():
    keys = load_file(str(TINY_TE)).keys()
    assert keys and all(k.startswith(WRAPPER) for k in keys)


@pytest.mark.parametrize("loader", ["load_base", "CLIPTextModel", "StableDiffusionPipeline"])
def test_bundled_text_encoder_loads_the_files_weights(loader):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    if loader == "load_base":
        model = load_base("tiny-sd").text_encoder
    elif loader == "CLIPTextModel":
        model = CLIPTextModel.from_pretrained(TINY_SD_PATH / "text_encoder")
    else:
        model = StableDiffusionPipeline.from_pretrained(TINY_SD_PATH, local_files_only=True).text_encoder
    assert_holds_file_weights(model, TINY_TE)


# ---------------------------------------------------------------- saving and loading text encoders


def test_save_text_encoder_writes_the_standard_layout(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, bos_token_id=48, eos_token_id=49, pad_token_id=49))
    save_text_encoder(model, tmp_path / "te")
    file = tmp_path / "te" / "model.safetensors"
    assert all(k.startswith(WRAPPER) for k in load_file(str(file)))
    assert_holds_file_weights(model, file)
    assert_holds_file_weights(CLIPTextModel.from_pretrained(tmp_path / "te"), file)


@pytest.mark.parametrize("layout", ["standard", "flattened"])
def test_load_base_reads_either_layout(tmp_path, layout):
    folder = make_tiny_folder(tmp_path / "m")
    file = folder / "text_encoder" / "model.safetensors"
    if layout == "flattened":  # as transformers >= 5.6 saves it
        rewrite_keys(file, lambda k: k.removeprefix(WRAPPER))
    assert_holds_file_weights(load_base(str(folder)).text_encoder, file)


def test_incomplete_text_encoder_is_a_one_line_error(tmp_path):
    folder = make_tiny_folder(tmp_path / "m")
    file = folder / "text_encoder" / "model.safetensors"
    state = load_file(str(file))
    del state[f"{WRAPPER}final_layer_norm.weight"]
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(PrivloraError) as err:
        load_base(str(folder))
    message = str(err.value)
    assert "\n" not in message and str(file) in message and "final_layer_norm.weight" in message


# ---------------------------------------------------------------- text-encoder LoRAs in either spelling


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    folder = make_tiny_folder(tmp_path_factory.mktemp("m") / "tiny")
    base = load_base(str(folder))
    spec = LoraSpec(rank=4, alpha=2.0)
    add_lora(base.unet, unet_lora_config(spec, base.unet))
    add_lora(base.text_encoder, text_encoder_lora_config(spec))
    g = torch.Generator().manual_seed(3)
    for model in (base.unet, base.text_encoder):
        for layer in lora_layers(model).values():
            w = layer.lora_B["default"].weight
            w.data = torch.randn(w.shape, generator=g) * 0.1
    with torch.no_grad():
        emb = encode_prompt(base, ["a red circle"])
    return folder, base, emb


def flattened_lora_key(key: str) -> str:
    """The spelling privlora wrote under transformers >= 5.6 before the fix."""
    return key.replace("lora_te_text_model_", "lora_te_").replace("text_encoder.text_model.", "text_encoder.")


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
@pytest.mark.parametrize("spelling", ["standard", "flattened"])
@pytest.mark.parametrize("reader", ["sample", "audit"])
def test_text_encoder_lora_in_either_spelling_loads_through_privlora(adapted, tmp_path, fmt, spelling, reader):
    from diffusers import StableDiffusionPipeline

    from privlora.audit import loaded_loras
    from privlora.sample import load_lora

    folder, ours, emb_ours = adapted
    path = (save_kohya if fmt == "kohya" else save_diffusers)(tmp_path / "l.safetensors", ours.unet, ours.text_encoder)
    keys = load_file(str(path)).keys()
    assert all(standard_lora_key(k) == k for k in keys)
    if spelling == "flattened":
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
        save_file({flattened_lora_key(k): v for k, v in load_file(str(path)).items()}, str(path), metadata=metadata)
    if reader == "sample":
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, local_files_only=True)
        load_lora(pipe, path)
        emb = encode(pipe.text_encoder, pipe.tokenizer)
    else:
        base = load_base(str(folder))
        with loaded_loras(base, [path]) as (switch, adapters):
            switch.use(adapters[0])
            emb = encode(base.text_encoder, base.tokenizer)
    torch.testing.assert_close(emb, emb_ours, atol=1e-5, rtol=1e-4)


def encode(text_encoder, tokenizer) -> torch.Tensor:
    ids = tokenizer(["a red circle"], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


# ---------------------------------------------------------------- resuming a training state


def test_a_state_saved_with_the_other_spelling_resumes_to_the_same_lora(tmp_path):
    """A run saved under transformers >= 5.6 (``text_encoder.encoder…``) resumes under any 5.x, and vice versa."""
    from privlora.config import build_config
    from privlora.train import train

    model = str(make_tiny_folder(tmp_path / "tiny"))
    small = dict(pretrained_model_name_or_path=model, synthetic_images=20, n_member_aux=4, n_nonmember_aux=4,
                 n_nonmember_test=4, resolution=32, train_batch_size=4, eval_samples=4, network_dim=4,
                 unet_lr=1e-3, text_encoder_lr=1e-3, train_text_encoder=True)

    def run(out, **kw):
        return train(build_config(None, {**small, "output_dir": str(tmp_path / out), **kw}))

    straight = run("straight", max_train_steps=3, save_state=True, save_every_n_steps=2)
    state_dir = tmp_path / "straight" / "state-step000002"
    state = torch.load(state_dir / "state.pt", weights_only=True)
    te_keys = [k for k in state["lora"] if k.startswith("text_encoder.")]
    assert te_keys and all(k.startswith("text_encoder.text_model.") for k in te_keys)  # saved in the standard spelling
    state["lora"] = {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in state["lora"].items()}
    torch.save(state, state_dir / "state.pt")
    resumed = run("resumed", max_train_steps=3, save_state=True, save_every_n_steps=2, resume=str(state_dir))
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
