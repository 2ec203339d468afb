"""LoRA on the UNet and text encoder through peft, saved in kohya's format (A1111/ComfyUI) or diffusers'.

Kohya key layout, per adapted module ``a.b.c``:
  ``lora_unet_a_b_c.lora_down.weight`` (peft ``lora_A``), ``.lora_up.weight`` (``lora_B``), ``.alpha``
  (scalar; effective scale = alpha / rank, the same as peft's ``lora_alpha / r``). Text encoder: ``lora_te_``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from privlora.io import save_safetensors

ADAPTER = "default"
UNET_ATTN_FF = r".*(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|.*\.(proj_in|proj_out)|.*\.ff\.net\.(0\.proj|2)"
UNET_CONV3x3 = r".*resnets\.\d+\.(conv1|conv2)|.*(downsamplers|upsamplers)\.0\.conv"
TEXT_ENCODER = r".*self_attn\.(q_proj|k_proj|v_proj|out_proj)|.*mlp\.(fc1|fc2)"


@dataclass
class LoraSpec:
    rank: int = 4
    alpha: float = 1.0
    conv_rank: int = 0  # 0: no LoRA on 3×3 convs (kohya's conv_dim)
    conv_alpha: float = 1.0
    dropout: float = 0.0


def unet_lora_config(spec: LoraSpec, unet) -> LoraConfig:
    pattern = UNET_ATTN_FF
    rank_pattern, alpha_pattern = {}, {}
    if spec.conv_rank:
        pattern = f"{UNET_ATTN_FF}|{UNET_CONV3x3}"
        for name, _ in unet.named_modules():
            if re.fullmatch(UNET_CONV3x3, name):
                rank_pattern[f"^{re.escape(name)}$"] = spec.conv_rank
                alpha_pattern[f"^{re.escape(name)}$"] = spec.conv_alpha
    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        init_lora_weights="gaussian",
        target_modules=pattern,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )


def text_encoder_lora_config(spec: LoraSpec) -> LoraConfig:
    return LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
        init_lora_weights="gaussian", target_modules=TEXT_ENCODER,
    )


def add_lora(model, config: LoraConfig) -> list[torch.nn.Parameter]:
    """Inject LoRA layers in place (the base weights stay frozen) and return the trainable parameters."""
    model.requires_grad_(False)
    model.add_adapter(config, adapter_name=ADAPTER)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def lora_layers(model) -> dict[str, LoraLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def kohya_state_dict(model, prefix: str) -> dict[str, torch.Tensor]:
    """Kohya keys for every peft LoRA layer of ``model`` (``prefix`` is ``lora_unet`` or ``lora_te``)."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        key = f"{prefix}_{name.replace('.', '_')}"
        down = layer.lora_A[ADAPTER].weight
        up = layer.lora_B[ADAPTER].weight
        rank = down.shape[0]
        alpha = layer.scaling[ADAPTER] * rank
        out[f"{key}.lora_down.weight"] = down.detach().float().cpu().clone()
        out[f"{key}.lora_up.weight"] = up.detach().float().cpu().clone()
        out[f"{key}.alpha"] = torch.tensor(float(alpha))
    return out


def save_kohya(path, unet, text_encoder=None, metadata: dict[str, str] | None = None):
    tensors = kohya_state_dict(unet, "lora_unet")
    if text_encoder is not None and lora_layers(text_encoder):
        tensors.update(kohya_state_dict(text_encoder, "lora_te"))
    return save_safetensors(path, tensors, metadata=metadata)


def diffusers_state_dict(unet, text_encoder=None) -> dict[str, torch.Tensor]:
    """peft/diffusers keys (``unet.<module>.lora_A.weight``), as ``pipe.load_lora_weights`` reads them."""
    from peft.utils import get_peft_model_state_dict

    out = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER).items()}
    if text_encoder is not None and lora_layers(text_encoder):
        te = get_peft_model_state_dict(text_encoder, adapter_name=ADAPTER)
        out.update({f"text_encoder.{k}": v for k, v in te.items()})
    return {k: v.detach().float().cpu().clone() for k, v in out.items()}


def save_diffusers(path, unet, text_encoder=None, metadata: dict[str, str] | None = None):
    """One safetensors file with diffusers keys; the adapter config goes into the metadata as diffusers expects."""
    import json

    meta = dict(metadata or {})
    meta["lora_adapter_metadata"] = json.dumps(_adapter_metadata(unet, text_encoder))
    return save_safetensors(path, diffusers_state_dict(unet, text_encoder), metadata=meta)


def _adapter_metadata(unet, text_encoder) -> dict:
    def cfg(model):
        c = model.peft_config[ADAPTER].to_dict()
        return {k: (sorted(v) if isinstance(v, set) else v) for k, v in c.items()}

    meta = {f"unet.{k}": v for k, v in cfg(unet).items()}
    if text_encoder is not None and lora_layers(text_encoder):
        meta.update({f"text_encoder.{k}": v for k, v in cfg(text_encoder).items()})
    return meta
