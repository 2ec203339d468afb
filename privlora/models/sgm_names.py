"""diffusers UNet module paths → the original (LDM/SGM) paths that kohya's SDXL LoRA names are spelled in.

kohya sd-scripts trains SDXL on its own copy of the original UNet, so an SDXL LoRA names its UNet modules by
the original layout (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), where SD1.x/SD2.x LoRAs
use diffusers' (``lora_unet_down_blocks_…``). The layout, as kohya's conversion map and diffusers' single-file
converter both state it: the UNet's levels are flattened into numbered slots, ``layers_per_block + 1`` per level —

- ``down_blocks.i`` layer j → ``input_blocks.{1 + i·(lpb+1) + j}``, its ResBlock in ``.0`` and its transformer in
  ``.1``; the level's downsampler → ``input_blocks.{(i+1)·(lpb+1)}.0.op``;
- ``mid_block`` → ``middle_block.0`` (ResBlock), ``.1`` (transformer), ``.2`` (ResBlock);
- ``up_blocks.i`` layer j → ``output_blocks.{i·(lpb+1) + j}`` (ResBlock ``.0``, transformer ``.1``); the level's
  upsampler sits in the last slot after them: ``.2.conv`` when the level has attention, else ``.1.conv``;
- ResBlock parts ``norm1 conv1 time_emb_proj norm2 conv2 conv_shortcut`` → ``in_layers.0 in_layers.2
  emb_layers.1 out_layers.0 out_layers.3 skip_connection``; ``conv_in`` → ``input_blocks.0.0``, ``conv_out`` →
  ``out.2``, ``time_embedding.linear_1/2`` → ``time_embed.0/2``, ``add_embedding.linear_1/2`` → ``label_emb.0.0/2``.

Inside a transformer the paths are the same in both layouts (``proj_in``, ``transformer_blocks.0.attn1.to_q``…).
"""
from __future__ import annotations

import re

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
TOP = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
       "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
       "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_LEVEL = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.+))?")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.+))?")


def _resnet(rest: str | None) -> str:
    if not rest:
        return ""
    head, _, tail = rest.partition(".")
    return "." + RESNET.get(head, head) + ("." + tail if tail else "")


def _rest(rest: str | None) -> str:
    return "." + rest if rest else ""


def sgm_path(path: str, config) -> str:
    """The original-layout path of a diffusers ``UNet2DConditionModel`` module path (``config``: its config)."""
    if path in TOP:
        return TOP[path]
    lpb = config.layers_per_block
    if not isinstance(lpb, int):
        raise ValueError("a per-level layers_per_block has no original (LDM/SGM) layout")
    per = lpb + 1
    if m := _LEVEL.fullmatch(path):
        kind, level, sub, idx, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        if sub == "downsamplers":
            return f"input_blocks.{per * (level + 1)}.0.op" + (rest or "").removeprefix("conv")
        if sub == "upsamplers":
            slot = 2 if config.up_block_types[level].startswith("CrossAttn") else 1
            return f"output_blocks.{per * level + lpb}.{slot}" + _rest(rest)
        block = (1 + per * level + idx) if kind == "down_blocks" else (per * level + idx)
        prefix = "input_blocks" if kind == "down_blocks" else "output_blocks"
        if sub == "resnets":
            return f"{prefix}.{block}.0" + _resnet(rest)
        return f"{prefix}.{block}.1" + _rest(rest)
    if m := _MID.fullmatch(path):
        if m[1] == "attentions":
            return "middle_block.1" + _rest(m[3])
        return f"middle_block.{2 * int(m[2])}" + _resnet(m[3])
    raise ValueError(f"no original (LDM/SGM) UNet path for {path!r}")
