"""Test helpers: random-init tiny diffusers folders and their original-LDM single-file checkpoints.

``make_single_file`` writes the inverse of diffusers' ``loaders/single_file_utils.py`` key mapping
(``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``), so a
round trip through diffusers' own single-file loader must reproduce every weight exactly.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from privlora.models import tiny
from privlora.models.clip_layout import save_text_encoder

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


# ---------------------------------------------------------------- tiny diffusers folder


def _bytes_to_unicode() -> list[str]:
    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to U+0100 onwards.
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tiny_vocab() -> dict[str, int]:
    """Byte-level characters, their end-of-word variants, then BOS and EOS (the last two ids, as tiny.py expects)."""
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def write_tiny_tokenizer(folder: str | Path, model_max_length: int = tiny.MAX_TOKENS, pad_token: str = EOS) -> int:
    """Write a CLIP tokenizer folder (vocab.json, merges.txt, tokenizer_config.json); returns the vocab size.

    ``pad_token``: EOS as CLIP-L's tokenizer pads; SDXL's second tokenizer (OpenCLIP-bigG) pads with ``"!"``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    cfg = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": pad_token,
        "unk_token": EOS,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return len(vocab)


def _model_index() -> dict:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _scheduler_json(prediction_type: str) -> dict:
    # Written as SD1.5 ships it (a PNDM config); privlora builds a DDPMScheduler from it for training.
    cfg = {**tiny.scheduler_config(), "prediction_type": prediction_type, "skip_prk_steps": True}
    return {"_class_name": "PNDMScheduler", "_diffusers_version": "0.42.1", **cfg}


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")


# SD1.5's block topology (4 levels, 2 layers per block, attention in the first three) at toy width, so the
# LDM numbering (input_blocks.1-11, output_blocks.0-11, VAE up.0-3 with 3 resnets) is exercised cheaply.
SD15_TOPOLOGY_UNET = dict(
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(16, 32, 32, 32),
    layers_per_block=2,
    attention_head_dim=8,
    norm_num_groups=8,
)
SD15_TOPOLOGY_VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=2,
    norm_num_groups=8,
)


# The real SD1.5 / SD2.x structure — block types, layers per block, one transformer per attention, 12 (CLIP
# ViT-L) / 23 (OpenCLIP-H as diffusers ships it) text-encoder layers, 4-level VAE — at toy widths. Module NAMES,
# which is what LoRA files and their clients see, do not depend on widths, so they are exactly SD1.5's / SD2's.
SD15_SHAPE: dict[str, dict[str, Any]] = dict(
    unet={**SD15_TOPOLOGY_UNET, "cross_attention_dim": 32, "sample_size": 64},
    vae=SD15_TOPOLOGY_VAE,
    text_encoder=dict(num_hidden_layers=12, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                      projection_dim=32),
)
SD2_SHAPE: dict[str, dict[str, Any]] = dict(
    # per-block head counts as SD2's [5, 10, 20, 20], scaled to the toy widths
    unet={**SD15_SHAPE["unet"], "use_linear_projection": True, "attention_head_dim": [2, 4, 4, 4], "sample_size": 96},
    vae=SD15_TOPOLOGY_VAE,
    text_encoder={**SD15_SHAPE["text_encoder"], "num_hidden_layers": 23},
)


def make_sd_folder(path: str | Path, family: str, *, prediction_type: str | None = None, seed: int = 0) -> Path:
    """A random-init diffusers folder with SD1.5's (``family="sd15"``) or SD2.x's (``"sd2"``) structure."""
    shape = {"sd15": SD15_SHAPE, "sd2": SD2_SHAPE}[family]
    return make_tiny_folder(path, sd2_style=family == "sd2", prediction_type=prediction_type, seed=seed,
                            unet_overrides=shape["unet"], vae_overrides=shape["vae"],
                            text_encoder_overrides=shape["text_encoder"])


def _sd2_unet_overrides() -> dict:
    # SD2.x shape: linear proj_in/proj_out and a per-block head count (diffusers' attention_head_dim naming quirk).
    return dict(use_linear_projection=True, attention_head_dim=[4, 8, 8])


def make_tiny_folder(
    path: str | Path,
    *,
    prediction_type: str | None = None,
    sd2_style: bool = False,
    seed: int = 0,
    unet_overrides: dict | None = None,
    vae_overrides: dict | None = None,
    text_encoder_overrides: dict | None = None,
) -> Path:
    """A random-init diffusers Stable Diffusion folder with the tiny configs.

    ``sd2_style`` mimics SD2.x (linear projections, per-block head counts, gelu text encoder) and
    defaults ``prediction_type`` to ``v_prediction``; otherwise it defaults to ``epsilon``.
    ``unet_overrides`` / ``vae_overrides`` / ``text_encoder_overrides`` change the tiny configs (e.g.
    ``SD15_TOPOLOGY_UNET``). The text encoder is saved in the standard layout (``text_model.*`` keys).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    prediction_type = prediction_type or ("v_prediction" if sd2_style else "epsilon")
    vocab_size = write_tiny_tokenizer(path / "tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet_cfg = {**tiny.unet_config(), **(_sd2_unet_overrides() if sd2_style else {}), **(unet_overrides or {})}
        UNet2DConditionModel(**unet_cfg).save_pretrained(path / "unet")
        AutoencoderKL(**{**tiny.vae_config(), **(vae_overrides or {})}).save_pretrained(path / "vae")
        te_cfg = {**tiny.text_encoder_config(vocab_size), **(text_encoder_overrides or {})}
        if sd2_style:
            te_cfg["hidden_act"] = "gelu"
        save_text_encoder(CLIPTextModel(CLIPTextConfig(**te_cfg)), path / "text_encoder")
    _write_json(path / "scheduler" / "scheduler_config.json", _scheduler_json(prediction_type))
    _write_json(path / "model_index.json", _model_index())
    return path


# ---------------------------------------------------------------- diffusers -> original LDM single file

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # SDXL's "text_time" added conditioning (pooled text ⊕ size ids): SGM's label_emb
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_FIXED = {"conv_norm_out": "norm_out"}
_VAE_ATTN = {
    "group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
    # diffusers folders saved before the attention refactor
    "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out",
}


def _resnet_rest(rest: str) -> str:
    name, _, tail = rest.partition(".")
    return f"{_UNET_RESNET[name]}.{tail}"


def _unet_key(key: str, lpb: int, up_has_attn: set[int]) -> str:
    head, _, tail = key.rpartition(".")
    if head in _UNET_FIXED:
        return f"{_UNET_FIXED[head]}.{tail}"
    step = lpb + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = 1 + b * step + layer
        return f"input_blocks.{idx}.0.{_resnet_rest(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * step + lpb}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet_rest(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = b * step + layer
        return f"output_blocks.{idx}.0.{_resnet_rest(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        b = int(m[1])
        # LDM puts the upsampler after the attention module when the block has one.
        return f"output_blocks.{b * step + lpb}.{2 if b in up_has_attn else 1}.conv.{m[2]}"
    raise ValueError(f"no original-LDM name for UNet key {key!r}")


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ValueError("per-block layers_per_block has no original-LDM layout")
    up_has_attn = {int(k.split(".")[1]) for k in state if re.match(r"up_blocks\.\d+\.attentions\.", k)}
    return {"model.diffusion_model." + _unet_key(k, lpb, up_has_attn): v for k, v in state.items()}


def _vae_attn(prefix: str, rest: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    name, _, tail = rest.rpartition(".")
    ldm = _VAE_ATTN[name]
    if ldm != "norm" and tail == "weight" and value.ndim == 2:
        value = value[:, :, None, None]  # LDM stores these projections as 1×1 convolutions
    return f"{prefix}.mid.attn_1.{ldm}.{tail}", value


def _vae_item(key: str, value: torch.Tensor, n_up: int) -> tuple[str, torch.Tensor]:
    head, _, tail = key.rpartition(".")
    part, _, sub = head.partition(".")
    if sub in _VAE_FIXED:
        return f"{part}.{_VAE_FIXED[sub]}.{tail}", value
    if key.startswith(("quant_conv.", "post_quant_conv.")) or sub in ("conv_in", "conv_out"):
        return key, value
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}", value
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", value
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        block = n_up - 1 - int(m[1])  # LDM numbers decoder levels from the lowest resolution up
        return f"decoder.up.{block}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}", value
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}", value
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}", value
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return _vae_attn(m[1], m[2], value)
    raise ValueError(f"no original-LDM name for VAE key {key!r}")


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    n_up = len(config["up_block_types"])
    out = {}
    for k, v in state.items():
        key, value = _vae_item(k, v, n_up)
        out["first_stage_model." + key] = value
    return out


def clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "cond_stage_model.transformer.text_model."
    return {prefix + k.removeprefix("text_model."): v for k, v in state.items() if "position_ids" not in k}


def open_clip_to_ldm(state: dict[str, torch.Tensor], p: str = "cond_stage_model.model.") -> dict[str, torch.Tensor]:
    """A CLIPTextModel's weights in SD2's original OpenCLIP layout (``cond_stage_model.model.*``), or under prefix
    ``p`` (SDXL's second encoder: ``conditioner.embedders.1.model.``).

    q/k/v fuse into ``attn.in_proj_*``; ``fc1``/``fc2`` are ``mlp.c_fc``/``mlp.c_proj``. A 23-layer encoder gets
    the 24th resblock and the ``text_projection`` that SD2 files carry and diffusers skips (random here). A
    CLIPTextModelWithProjection's ``text_projection.weight`` (out × in) becomes OpenCLIP's ``text_projection``
    (in × out: open_clip computes x @ text_projection).
    """
    s = {k.removeprefix("text_model."): v for k, v in state.items() if "position_ids" not in k}
    out = {p + "token_embedding.weight": s["embeddings.token_embedding.weight"],
           p + "positional_embedding": s["embeddings.position_embedding.weight"],
           p + "ln_final.weight": s["final_layer_norm.weight"], p + "ln_final.bias": s["final_layer_norm.bias"]}
    layers = sorted({int(m[1]) for k in s if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for i in layers:
        out.update(_open_clip_block(s, f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."))
    if len(layers) == 23:
        g = torch.Generator().manual_seed(23)
        unused = _open_clip_block(s, "encoder.layers.22.", f"{p}transformer.resblocks.23.")
        out.update({k: torch.randn(v.shape, generator=g) for k, v in unused.items()})
        width = s["final_layer_norm.weight"].shape[0]
        out[p + "text_projection"] = torch.randn(width, width, generator=g)
    if "text_projection.weight" in state:
        out[p + "text_projection"] = state["text_projection.weight"].T.contiguous()
    return out


def _open_clip_block(s: dict[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    out = {}
    for kind in ("weight", "bias"):
        out[f"{dst}attn.in_proj_{kind}"] = torch.cat([s[f"{src}self_attn.{q}_proj.{kind}"] for q in "qkv"])
        for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            out[f"{dst}{theirs}.{kind}"] = s[f"{src}{ours}.{kind}"]
    return out


def _weights(folder: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    for name in names:
        if (folder / name).is_file():
            return load_file(folder / name)
    raise FileNotFoundError(f"{folder}: none of {', '.join(names)}")


def make_single_file(diffusers_folder: str | Path, out_path: str | Path, *, open_clip: bool = False) -> Path:
    """Convert a diffusers SD folder (UNet, VAE, CLIP text encoder) into one original-LDM ``.safetensors``.

    ``open_clip``: the text encoder in SD2's OpenCLIP layout, as SD2.x single files have it.
    """
    src, out_path = Path(diffusers_folder), Path(out_path)
    unet_cfg = json.loads((src / "unet" / "config.json").read_text())
    vae_cfg = json.loads((src / "vae" / "config.json").read_text())
    unet = _weights(src / "unet", ("diffusion_pytorch_model.safetensors",))
    vae = _weights(src / "vae", ("diffusion_pytorch_model.safetensors",))
    text = _weights(src / "text_encoder", ("model.safetensors",))
    text_state = open_clip_to_ldm(text) if open_clip else clip_to_ldm(text)
    state = {**unet_to_ldm(unet, unet_cfg), **vae_to_ldm(vae, vae_cfg), **text_state}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_path))
    return out_path


# ---------------------------------------------------------------- tiny SDXL (base) folder

# SDXL base's structure — 3 UNet levels (no attention at the first), 2 layers per block, linear projections,
# "text_time" added conditioning fed by text encoder 2's pooled projection and 6 size/crop ids, cross-attention
# over both encoders' hidden states concatenated, a 4-level VAE (latents 1/8 of the pixels) — at toy widths
# and depths. The UNet's LDM/SGM block numbering, which kohya's SDXL LoRA names use, depends only on the level
# layout and layers per block, so the tiny model's names follow the same rule as SDXL's.
TINY_SDXL_TE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                    max_position_embeddings=77)
TINY_SDXL_TIME_DIM = 8
TINY_SDXL_UNET: dict[str, Any] = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(16, 32, 32),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 4),
    cross_attention_dim=2 * TINY_SDXL_TE["hidden_size"],  # te1 ⊕ te2 hidden states
    addition_embed_type="text_time", addition_time_embed_dim=TINY_SDXL_TIME_DIM,
    projection_class_embeddings_input_dim=TINY_SDXL_TE["hidden_size"] + 6 * TINY_SDXL_TIME_DIM,  # pooled ⊕ 6 ids
    use_linear_projection=True, norm_num_groups=8,
)
TINY_SDXL_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=64,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 16, 16), scaling_factor=0.13025,
)
TINY_SDXL_RESOLUTION = 64


def _sdxl_model_index(refiner: bool = False) -> dict:
    return {
        "_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "image_encoder": [None, None],
        "force_zeros_for_empty_prompt": not refiner,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": [None, None] if refiner else ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": [None, None] if refiner else ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def make_tiny_sdxl_folder(path: str | Path, *, seed: int = 0, refiner: bool = False) -> Path:
    """A random-init diffusers ``StableDiffusionXLPipeline`` folder with SDXL base's structure at toy size.

    ``refiner``: the refiner's layout instead (no ``text_encoder``/``tokenizer``, only the second encoder), which
    privlora must refuse; its UNet is the base-shaped one, only the folder layout matters there.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tiny_tokenizer(path / "tokenizer_2", pad_token="!")
    if not refiner:
        write_tiny_tokenizer(path / "tokenizer")
    te_cfg: dict[str, Any] = {**TINY_SDXL_TE, "vocab_size": vocab_size, "bos_token_id": vocab_size - 2,
              "eos_token_id": vocab_size - 1, "pad_token_id": 1}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        UNet2DConditionModel(**TINY_SDXL_UNET).save_pretrained(path / "unet")
        AutoencoderKL(**TINY_SDXL_VAE).save_pretrained(path / "vae")
        if not refiner:
            save_text_encoder(CLIPTextModel(CLIPTextConfig(**te_cfg, projection_dim=32)), path / "text_encoder")
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**te_cfg, hidden_act="gelu",
                                                         projection_dim=TINY_SDXL_TE["hidden_size"]))
        te2.save_pretrained(path / "text_encoder_2", safe_serialization=True)
    sched = {**tiny.scheduler_config(), "timestep_spacing": "leading", "interpolation_type": "linear",
             "use_karras_sigmas": False}
    sched.pop("clip_sample"), sched.pop("set_alpha_to_one")
    _write_json(path / "scheduler" / "scheduler_config.json",
                {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.42.1", **sched})
    _write_json(path / "model_index.json", _sdxl_model_index(refiner))
    return path


def make_sdxl_single_file(diffusers_folder: str | Path, out_path: str | Path) -> Path:
    """Convert a diffusers SDXL base folder into one ``.safetensors`` in the SGM layout of Stability's
    ``sd_xl_base_1.0.safetensors`` (what A1111/Forge and ComfyUI load): ``model.diffusion_model.*`` (the UNet in
    LDM/SGM block numbering, ``label_emb.0.*`` for the added conditioning), ``first_stage_model.*`` (VAE),
    ``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L, transformers' names) and
    ``conditioner.embedders.1.model.*`` (OpenCLIP-bigG in open_clip's names, fused q/k/v, ``text_projection``)."""
    src, out_path = Path(diffusers_folder), Path(out_path)
    unet_cfg = json.loads((src / "unet" / "config.json").read_text())
    vae_cfg = json.loads((src / "vae" / "config.json").read_text())
    unet = _weights(src / "unet", ("diffusion_pytorch_model.safetensors",))
    vae = _weights(src / "vae", ("diffusion_pytorch_model.safetensors",))
    te1 = _weights(src / "text_encoder", ("model.safetensors",))
    te2 = _weights(src / "text_encoder_2", ("model.safetensors",))
    prefix1 = "conditioner.embedders.0.transformer.text_model."
    state = {**unet_to_ldm(unet, unet_cfg), **vae_to_ldm(vae, vae_cfg),
             **{prefix1 + k.removeprefix("text_model."): v for k, v in te1.items() if "position_ids" not in k},
             **open_clip_to_ldm(te2, "conditioner.embedders.1.model.")}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_path))
    return out_path


SDXL_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "sdxl"


def load_sdxl_derive():
    """tests/fixtures/sdxl/derive.py as a module (it is a script, not a package module)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("sdxl_fixture_derive", SDXL_FIXTURES / "derive.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def small_smp_objective():
    """An SMP-LoRA objective with a 4×4-pooled, 4-wide attacker and endless empty aux batches (no model needed)."""
    from privlora.config import make_config
    from privlora.objectives import build_objective

    def endless():
        while True:
            yield {}

    return build_objective(make_config(method="smp_lora", attacker_pool=4, attacker_hidden=[4]), latent_channels=4,
                           member_aux=endless(), nonmember_aux=endless())
