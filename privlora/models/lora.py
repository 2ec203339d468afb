"""LoRA on the UNet and text encoder through peft, saved in kohya's format (A1111/ComfyUI) or diffusers'.

Kohya key layout, per adapted module ``a.b.c``:
  ``lora_unet_a_b_c.lora_down.weight`` (peft ``lora_A``), ``.lora_up.weight`` (``lora_B``), ``.alpha``
  (scalar; effective scale = alpha / rank, the same as peft's ``lora_alpha / r``). Text encoder: ``lora_te_``
  plus the standard CLIP path (``lora_te_text_model_encoder_layers_0_mlp_fc1``) whatever transformers is
  installed — ComfyUI, A1111 and kohya sd-scripts drop text-encoder modules spelt without ``text_model``.
Files are read through diffusers' loader after ``readable_lora_file`` has put them in that spelling:
``load_lora_adapter`` is the one loader (``privlora sample``, the audit, the bench's quality runs).

SDXL, as kohya sd-scripts writes it: UNet modules by their original (LDM/SGM) path (``models/sgm_names.py``:
``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), the two text encoders as ``lora_te1_…`` (CLIP-L)
and ``lora_te2_…`` (OpenCLIP-bigG), each with the standard CLIP path.
"""
from __future__ import annotations

import contextlib
import logging
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from privlora.errors import PrivloraError
from privlora.files import one_line_error, safetensors_keys
from privlora.io import save_safetensors
from privlora.models.clip_layout import standard_lora_key, standard_name
from privlora.models.lora_files import check_lora_file, lora_module_names
from privlora.diffusion import takes_added_cond
from privlora.models.sgm_names import sgm_path

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
        lora_alpha=spec.alpha,  # type: ignore[arg-type]  # peft types it int; floats work
        lora_dropout=spec.dropout,
        init_lora_weights="gaussian",
        target_modules=pattern,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )


def text_encoder_lora_config(spec: LoraSpec) -> LoraConfig:
    return LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,  # type: ignore[arg-type]
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


TE_PREFIXES = ("lora_te", "lora_te1", "lora_te2")


def kohya_key(prefix: str, name: str, unet_config=None) -> str:
    """The kohya key stem of a peft LoRA layer's module name (``prefix`` is ``lora_unet``, ``lora_te``, or SDXL's
    ``lora_te1`` / ``lora_te2``). ``unet_config``: an SDXL UNet's config, whose names kohya spells in the original
    layout."""
    if prefix in TE_PREFIXES:
        name = standard_name(name)
    elif unet_config is not None:
        name = sgm_path(name, unet_config)
    return f"{prefix}_{name.replace('.', '_')}"


def kohya_key_of(model, prefix: str, name: str) -> str:
    """``kohya_key`` for a module of ``model``: SDXL UNets get the original-layout spelling."""
    sdxl_unet = prefix == "lora_unet" and takes_added_cond(model)
    return kohya_key(prefix, name, getattr(model, "config", None) if sdxl_unet else None)


def kohya_state_dict(model, prefix: str) -> dict[str, torch.Tensor]:
    """Kohya keys for every peft LoRA layer of ``model`` (``prefix`` as in ``kohya_key``)."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        key = kohya_key_of(model, prefix, name)
        down = layer.lora_A[ADAPTER].weight
        up = layer.lora_B[ADAPTER].weight
        rank = down.shape[0]  # type: ignore[index]  # peft's ModuleDict entries are typed loosely
        alpha = layer.scaling[ADAPTER] * rank
        out[f"{key}.lora_down.weight"] = down.detach().float().cpu().clone()  # type: ignore[operator]
        out[f"{key}.lora_up.weight"] = up.detach().float().cpu().clone()  # type: ignore[operator]
        out[f"{key}.alpha"] = torch.tensor(float(alpha))
    return out


def save_kohya(path, unet, text_encoder=None, metadata: dict[str, str] | None = None, text_encoder_2=None):
    """``text_encoder_2``: SDXL's second encoder; then the encoders are ``lora_te1`` / ``lora_te2``."""
    tensors = kohya_state_dict(unet, "lora_unet")
    te_prefixes = ("lora_te1", "lora_te2") if text_encoder_2 is not None else ("lora_te",)
    for te, prefix in zip((text_encoder, text_encoder_2), te_prefixes):
        if te is not None and lora_layers(te):
            tensors.update(kohya_state_dict(te, prefix))
    return save_safetensors(path, tensors, metadata=metadata)


def _text_encoders(text_encoder, text_encoder_2) -> list[tuple[str, torch.nn.Module]]:
    pairs = (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2))
    return [(name, te) for name, te in pairs if te is not None and lora_layers(te)]


def diffusers_state_dict(unet, text_encoder=None, text_encoder_2=None) -> dict[str, torch.Tensor]:
    """peft/diffusers keys (``unet.<module>.lora_A.weight``), as ``pipe.load_lora_weights`` reads them."""
    from peft.utils import get_peft_model_state_dict

    out = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER).items()}
    for name, te in _text_encoders(text_encoder, text_encoder_2):
        state = get_peft_model_state_dict(te, adapter_name=ADAPTER)
        out.update({f"{name}.{standard_name(k)}": v for k, v in state.items()})
    return {k: v.detach().float().cpu().clone() for k, v in out.items()}


def save_diffusers(path, unet, text_encoder=None, metadata: dict[str, str] | None = None, text_encoder_2=None):
    """One safetensors file with diffusers keys; the adapter config goes into the metadata as diffusers expects."""
    import json

    meta = dict(metadata or {})
    meta["lora_adapter_metadata"] = json.dumps(_adapter_metadata(unet, text_encoder, text_encoder_2))
    return save_safetensors(path, diffusers_state_dict(unet, text_encoder, text_encoder_2), metadata=meta)


def _adapter_metadata(unet, text_encoder, text_encoder_2=None) -> dict:
    def cfg(model):
        c = model.peft_config[ADAPTER].to_dict()
        return {k: (sorted(v) if isinstance(v, set) else v) for k, v in c.items()}

    meta = {f"unet.{k}": v for k, v in cfg(unet).items()}
    for name, te in _text_encoders(text_encoder, text_encoder_2):
        meta.update({f"{name}.{k}": v for k, v in cfg(te).items()})
    return meta


@contextlib.contextmanager
def readable_lora_file(path: str | Path) -> Iterator[Path]:
    """``path``, or a temporary copy with text-encoder keys in the standard spelling when it has the other one.

    diffusers under transformers < 5.6 cannot place ``lora_te_encoder_…`` / ``text_encoder.encoder…`` keys
    (files written by privlora before the fix under transformers >= 5.6); a copy keeps the file's metadata,
    which diffusers needs for diffusers-format files (their alphas live there).
    """
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        renamed = {k: standard_lora_key(k) for k in f.keys()}
        changed = any(k != v for k, v in renamed.items())
        tensors = {new: f.get_tensor(old) for old, new in renamed.items()} if changed else {}
        metadata = f.metadata()
    if not changed:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="privlora-lora-") as tmp:
        yield save_safetensors(Path(tmp) / path.name, tensors, metadata=metadata)


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """diffusers/peft/transformers log every key mismatch at length; ``load_lora_adapter`` reports them itself."""
    import warnings

    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def load_lora_adapter(pipe: Any, path: str | Path, adapter: str, base_name: str | None = None) -> str:
    """Load a kohya- or diffusers-format LoRA file into ``pipe`` (a diffusers pipeline) as adapter ``adapter``,
    through diffusers' own ``load_lora_weights`` — what anyone loading the file gets. Returns ``adapter``.

    The file is checked first (``check_lora_file``). Strict: every module the file adapts must land in the
    pipeline's UNet or text encoder, else the adapter is removed again. Either failure is one line naming the file,
    the base model (``base_name``, when known) and the reason (the loader's error, or the module counts).
    """
    path = check_lora_file(path)
    expected = lora_module_names(safetensors_keys(path))
    base = f"the base model {base_name}" if base_name else "the base model"
    try:
        with quiet_loading(), readable_lora_file(path) as readable:
            pipe.load_lora_weights(str(readable), adapter_name=adapter)
    except Exception as e:  # diffusers/peft raise ValueError, KeyError, RuntimeError (shapes) or their own types
        raise PrivloraError(f"{path}: this LoRA does not fit {base} ({one_line_error(e)})") from None
    models = (pipe.unet, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None))  # SDXL: two
    loaded = sum(_adapted_modules(m, adapter) for m in models if m is not None)
    if loaded < len(expected):
        with quiet_loading():
            pipe.delete_adapters([adapter])
        raise PrivloraError(f"{path}: only {loaded} of its {len(expected)} LoRA modules exist in {base} "
                            "(key mismatch: a LoRA for another base model?)")
    return adapter


def _adapted_modules(model, adapter: str) -> int:
    return sum(1 for m in model.modules() if isinstance(m, LoraLayer) and adapter in m.lora_A)


def read_kohya_weights(path: str | Path, model,
                       prefix: str = "lora_unet") -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """Pair each of ``model``'s LoRA parameters with its value in a kohya file privlora wrote for the same
    LoRA layout (same modules, ranks and alphas): what to copy into the parameters to run that LoRA."""
    from safetensors.torch import load_file

    from privlora.files import file_error

    tensors = load_file(str(path))
    pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    for name, layer in lora_layers(model).items():
        key = kohya_key_of(model, prefix, name)
        # peft's ModuleDict entries are typed loosely
        down = cast(torch.nn.Parameter, layer.lora_A[ADAPTER].weight)
        up = cast(torch.nn.Parameter, layer.lora_B[ADAPTER].weight)
        alpha = tensors.get(f"{key}.alpha")
        if alpha is None or f"{key}.lora_down.weight" not in tensors or f"{key}.lora_up.weight" not in tensors:
            raise file_error(path, f"has no LoRA weights for {name}: not trained with this run's LoRA settings")
        if abs(float(alpha) - layer.scaling[ADAPTER] * down.shape[0]) > 1e-4 * max(1.0, float(alpha)):
            raise file_error(path, f"alpha of {name} differs from this run's network_alpha/conv_alpha")
        for param, value in ((down, tensors[f"{key}.lora_down.weight"]), (up, tensors[f"{key}.lora_up.weight"])):
            if value.shape != param.shape:
                raise file_error(path, f"{name}: shape {tuple(value.shape)} is not this run's {tuple(param.shape)}")
            pairs.append((param, value.to(param.device, param.dtype)))
    return pairs
