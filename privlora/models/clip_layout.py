"""One spelling for CLIP text-encoder names, whatever transformers is installed.

transformers < 5.6 wraps ``CLIPTextModel`` in a ``text_model`` module (``text_model.encoder.layers.0…``);
5.6 and later dropped that level (``encoder.layers.0…``). The standard spelling — the one in every SD1.x/SD2.x
checkpoint and the only one ComfyUI, A1111 and kohya sd-scripts read in LoRA files — keeps ``text_model.``.
privlora writes the standard spelling (weights files, LoRA module names) and reads both.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

WRAPPER = "text_model."
KOHYA_TE = "lora_te_"
DIFFUSERS_TE = "text_encoder."


def standard_name(name: str) -> str:
    """``encoder.layers.0.mlp.fc1`` or ``text_model.encoder.layers.0.mlp.fc1`` → the latter."""
    return WRAPPER + name.removeprefix(WRAPPER)


def own_name(model: torch.nn.Module, name: str) -> str:
    """A name in either spelling → the spelling of ``model``'s own modules and parameters."""
    bare = name.removeprefix(WRAPPER)
    return WRAPPER + bare if hasattr(model, "text_model") else bare


def standard_lora_key(key: str) -> str:
    """A LoRA file key with its text-encoder part in the standard spelling; UNet keys are returned unchanged."""
    if key.startswith(KOHYA_TE):
        rest = key[len(KOHYA_TE):]
        return key if rest.startswith("text_model_") else f"{KOHYA_TE}text_model_{rest}"
    if key.startswith(DIFFUSERS_TE):
        return DIFFUSERS_TE + standard_name(key[len(DIFFUSERS_TE):])
    return key


def standardise_weights_file(path: str | Path) -> bool:
    """Rewrite a text encoder's ``.safetensors`` with standard keys (tensors and metadata unchanged).

    Returns whether anything changed. A sharded checkpoint's ``*.index.json`` next to it is updated too.
    """
    from safetensors import safe_open

    from privlora.io import save_safetensors

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        if all(k.startswith(WRAPPER) for k in f.keys()):
            return False
        tensors = {standard_name(k): f.get_tensor(k) for k in f.keys()}
    save_safetensors(path, tensors, metadata=metadata)
    index = path.parent / f"{path.stem.split('-')[0]}.safetensors.index.json"
    if index.is_file():
        spec = json.loads(index.read_text(encoding="utf-8"))
        spec["weight_map"] = {standard_name(k): v for k, v in spec["weight_map"].items()}
        index.write_text(json.dumps(spec, indent=2), encoding="utf-8")
    return True


def save_text_encoder(model, folder: str | Path) -> Path:
    """``save_pretrained`` in the standard layout, which every transformers 5.x reads (5.6+ maps it on load)."""
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    for file in sorted(folder.glob("*.safetensors")):
        standardise_weights_file(file)
    return folder
