"""The one policy for LoRA files given by a user (``privlora sample --lora``, ``privlora audit --lora``).

Checked before any model is loaded: the file exists, is not a pickle (loading one can run arbitrary code), has a
readable safetensors header and names at least one LoRA weight (kohya, peft or diffusers spelling).
"""
from __future__ import annotations

import re
from pathlib import Path

from privlora.errors import PrivloraError
from privlora.files import PICKLE_SUFFIXES, safetensors_keys

_LORA_DOWN = re.compile(r"^(.+?)\.(lora_down|lora_A|lora\.down|lora_linear_layer\.down)(\.[^.]+)?\.weight$")


def lora_module_names(keys: list[str]) -> set[str]:
    """The adapted modules a LoRA file names (kohya ``lora_unet_x.lora_down.weight`` or peft
    ``unet.x.lora_A.weight``)."""
    return {m.group(1) for k in keys if (m := _LORA_DOWN.match(k))}


def check_lora_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise PrivloraError(f"{path}: LoRA file not found")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise PrivloraError(f"{path}: pickle-based LoRA refused (arbitrary code execution risk); convert it to "
                            ".safetensors")
    if not lora_module_names(safetensors_keys(path)):
        raise PrivloraError(f"{path}: no LoRA weights in this file (no *.lora_down.weight / *.lora_A.weight keys)")
    return path
