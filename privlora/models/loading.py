"""Loading a base Stable Diffusion model (SD1.x / SD2.x) offline, from a diffusers folder or one single file.

Every failure a user can cause (missing path, incomplete folder, corrupt or pickle-based weights, a single
file without configs) becomes a one-line ``PrivloraError`` naming the file and the problem.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from privlora.captions import TextEncoding
from privlora.errors import PrivloraError
from privlora.files import PICKLE_SUFFIXES, safetensors_keys, sha256_file
from privlora.files import one_line_error as _one_line
from privlora.models.clip_layout import own_name
from privlora.models.tiny import TINY_ALIASES, TINY_SD_PATH
from privlora.offline import offline_by_default

PREDICTION_TYPES = ("epsilon", "v_prediction")
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_CONFIG_FILES = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "scheduler": "scheduler_config.json",
}
_WEIGHT_STEMS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}
CONFIG_DIR_HINT = (
    "pass --config_dir PATH_TO_LOCAL_DIFFUSERS_FOLDER (a folder with model_index.json and tokenizer/, "
    "e.g. a local SD1.5 diffusers copy, or tiny-sd for the embedded model)"
)


@dataclass
class BaseModel:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any  # DDPMScheduler built from the model's scheduler config
    prediction_type: str  # "epsilon" | "v_prediction"
    name: str  # what the user passed
    sha256: str  # of the single file, or of the UNet weights of a folder
    source_kind: str  # "diffusers" | "single_file"


def load_base(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    config_dir: str | None = None,
    allow_pickle: bool = False,
    prediction_type: str | None = None,
) -> BaseModel:
    """Load UNet, VAE, CLIP text encoder, tokenizer and a DDPM noise scheduler, all weights frozen.

    ``name_or_path``: ``tiny-sd`` (embedded model), a diffusers folder, or a single ``.safetensors`` checkpoint in
    the original LDM layout (then ``config_dir`` must name a local diffusers folder providing configs and tokenizer).
    ``prediction_type`` overrides the scheduler config (for checkpoints whose config is wrong).
    """
    offline_by_default()  # a local model needs no network; the caller may have opted in already
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise PrivloraError(f"prediction_type {prediction_type!r} is not supported (use epsilon or v_prediction)")
    path = _resolve(name_or_path)
    if path.is_dir():
        base = _load_folder(path, dtype, allow_pickle, prediction_type)
    elif path.is_file():
        base = _load_single_file(path, config_dir, dtype, allow_pickle, prediction_type)
    else:
        raise PrivloraError(f"{path}: no such file or folder (expected tiny-sd, a diffusers folder or a .safetensors "
                            "file)")
    base.name = str(name_or_path)
    for module in (base.unet, base.vae, base.text_encoder):
        module.requires_grad_(False).eval()
    return base


# ---------------------------------------------------------------- paths, hashes, validation


def _resolve(name_or_path: str | Path) -> Path:
    if str(name_or_path) in TINY_ALIASES:
        if not (TINY_SD_PATH / "model_index.json").is_file():
            raise PrivloraError(f"{TINY_SD_PATH}: the embedded tiny model is missing; build it with "
                                "scripts/build_tiny_sd.py")
        return TINY_SD_PATH
    return Path(name_or_path).expanduser()


def _check_safetensors(path: Path) -> None:
    safetensors_keys(path)


def _refuse_pickle(path: Path) -> PrivloraError:
    return PrivloraError(
        f"{path}: pickle-based checkpoint refused (arbitrary code execution risk); "
        "convert to .safetensors or pass --allow_pickle"
    )


def _weight_files(folder: Path, component: str, allow_pickle: bool) -> tuple[list[Path], str | None]:
    """The component's weight files and the variant to request (``fp16`` when only a variant was saved)."""
    stem = _WEIGHT_STEMS[component]
    for suffix, pickled in ((".safetensors", False), (".bin", True)):
        plain = sorted(folder.glob(f"{stem}*{suffix}"))
        if not plain:
            continue
        if pickled and not allow_pickle:
            raise _refuse_pickle(plain[0])
        exact = [p for p in plain if p.name == stem + suffix or p.name.startswith(stem + "-")]
        if exact:
            return exact, None
        variant = plain[0].name[len(stem) + 1 :].split(".")[0].split("-")[0]  # "fp16" of *.fp16[-0000x-of-n].*
        return [p for p in plain if p.name.startswith(f"{stem}.{variant}")], variant
    raise PrivloraError(f"{folder}: no weights file ({stem}.safetensors) — the folder is missing the {component} "
                        "weights")


def _check_folder(folder: Path) -> None:
    index = folder / "model_index.json"
    if index.is_file():
        _check_index(index)
    elif not any((folder / c).is_dir() for c in COMPONENTS):
        raise PrivloraError(f"{folder}: not a diffusers Stable Diffusion folder (no model_index.json, no unet/ vae/ "
                            "... subfolders)")
    for component in COMPONENTS:
        sub = folder / component
        if not sub.is_dir():
            raise PrivloraError(f"{sub}: missing — a Stable Diffusion folder needs "
                                f"{', '.join(c + '/' for c in COMPONENTS)}")
        if component == "tokenizer":
            _check_tokenizer(sub)
        elif not (sub / _CONFIG_FILES[component]).is_file():
            raise PrivloraError(f"{sub / _CONFIG_FILES[component]}: missing {component} config")


def _check_index(index: Path) -> None:
    try:
        spec = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PrivloraError(f"{index}: unreadable ({_one_line(e)})") from None
    if "text_encoder_2" in spec or "transformer" in spec:
        raise PrivloraError(f"{index}: {spec.get('_class_name', 'this pipeline')} is not supported "
                            "(SD1.x / SD2.x only)")


def _check_tokenizer(sub: Path) -> None:
    has_bpe = (sub / "vocab.json").is_file() and (sub / "merges.txt").is_file()
    if not has_bpe and not (sub / "tokenizer.json").is_file():
        raise PrivloraError(f"{sub}: missing tokenizer files (vocab.json and merges.txt)")


# ---------------------------------------------------------------- components


def _load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer", local_files_only=True)
    except (OSError, ValueError) as e:
        raise PrivloraError(f"{folder / 'tokenizer'}: cannot load the CLIP tokenizer ({_one_line(e)})") from None


def _load_scheduler(folder: Path, prediction_type: str | None):
    from diffusers import DDPMScheduler

    overrides = {"prediction_type": prediction_type} if prediction_type else {}
    try:
        sched = DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler", local_files_only=True, **overrides)
    except (OSError, ValueError) as e:
        raise PrivloraError(f"{folder / 'scheduler'}: cannot build the noise scheduler ({_one_line(e)})") from None
    kind = sched.config.prediction_type
    if kind not in PREDICTION_TYPES:
        path = folder / "scheduler" / _CONFIG_FILES["scheduler"]
        raise PrivloraError(f"{path}: prediction_type {kind!r} is not supported; pass --prediction_type "
                            "epsilon|v_prediction")
    return sched


def _from_pretrained(cls, folder: Path, component: str, dtype: torch.dtype, allow_pickle: bool, **extra):
    files, variant = _weight_files(folder / component, component, allow_pickle)
    for f in files:
        if f.suffix == ".safetensors":
            _check_safetensors(f)
    if variant:
        extra["variant"] = variant
    try:
        model = cls.from_pretrained(str(folder), subfolder=component, local_files_only=True, dtype=dtype, **extra)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise PrivloraError(f"{folder / component}: cannot load {cls.__name__} ({_one_line(e)})") from None
    return model, files


def _load_text_encoder(folder: Path, dtype: torch.dtype, allow_pickle: bool):
    from transformers import CLIPTextModel

    (model, info), files = _from_pretrained(CLIPTextModel, folder, "text_encoder", dtype, allow_pickle,
                                            output_loading_info=True)
    if info["missing_keys"]:
        # transformers left those weights at random init: the file has the other CLIP spelling (transformers
        # < 5.6 reads only text_model.*), or it is incomplete.
        _load_in_own_spelling(model, files, allow_pickle)
    return model


def _load_in_own_spelling(model, files: list[Path], allow_pickle: bool) -> None:
    state = {}
    for f in files:
        state.update({own_name(model, k): v for k, v in _read_checkpoint(f, allow_pickle).items()})
    missing, _ = model.load_state_dict(state, strict=False)
    if missing:
        raise PrivloraError(f"{files[0]}: text encoder weights missing ({len(missing)} tensors, e.g. {missing[0]})")


def _load_folder(folder: Path, dtype: torch.dtype, allow_pickle: bool, prediction_type: str | None) -> BaseModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    _check_folder(folder)
    unet, unet_files = _from_pretrained(UNet2DConditionModel, folder, "unet", dtype, allow_pickle)
    vae, _ = _from_pretrained(AutoencoderKL, folder, "vae", dtype, allow_pickle)
    text_encoder = _load_text_encoder(folder, dtype, allow_pickle)
    sched = _load_scheduler(folder, prediction_type)
    return BaseModel(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_load_tokenizer(folder),
        noise_scheduler=sched,
        prediction_type=sched.config.prediction_type,
        name=str(folder),
        sha256=sha256_file(unet_files),
        source_kind="diffusers",
    )


# ---------------------------------------------------------------- single file (original LDM layout)


def _read_checkpoint(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise _refuse_pickle(path)
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses arbitrary objects; anything else is a broken file
            raise PrivloraError(f"{path}: cannot read the checkpoint with weights_only=True ({_one_line(e)})") from None
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        _check_safetensors(path)
        state = load_file(str(path), device="cpu")
    else:
        raise PrivloraError(f"{path}: unsupported weights file (expected .safetensors, or "
                            f"{', '.join(PICKLE_SUFFIXES)} with --allow_pickle)")
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PrivloraError(f"{path}: not a state dict")
    return state


def _check_ldm_layout(path: Path, state: dict) -> None:
    prefixes = {
        "UNet (model.diffusion_model.*)": "model.diffusion_model.",
        "VAE (first_stage_model.*)": "first_stage_model.",
        "CLIP text encoder (cond_stage_model.transformer.* for SD1.x, cond_stage_model.model.* for SD2.x)":
            ("cond_stage_model.transformer.", "cond_stage_model.model."),
    }
    missing = [what for what, p in prefixes.items() if not any(k.startswith(p) for k in state)]
    if missing:
        raise PrivloraError(f"{path}: not an original-layout SD1.x/SD2.x checkpoint; missing {', '.join(missing)} "
                            "weights")


def _config_folder(path: Path, config_dir: str | None) -> Path:
    if config_dir is None:
        raise PrivloraError(
            f"{path}: a single-file checkpoint needs the diffusers configs (unet/config.json, vae/config.json, "
            "text_encoder/config.json, scheduler/) and the tokenizer, which cannot be downloaded offline; "
            f"{CONFIG_DIR_HINT}"
        )
    folder = _resolve(config_dir)
    if not folder.is_dir():
        raise PrivloraError(f"{folder}: --config_dir is not a folder; {CONFIG_DIR_HINT}")
    _check_folder(folder)
    return folder


def _single_file_models(path: Path, state: dict, folder: Path, dtype: torch.dtype) -> tuple:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    # Passing the config folder explicitly keeps diffusers from inferring a Hub repo id (it would try the network).
    # fp32 is what diffusers loads into anyway; passing it would only trigger a spurious keep-in-fp32 warning.
    kw = dict(config=str(folder), local_files_only=True, torch_dtype=None if dtype == torch.float32 else dtype)
    loaders = (
        ("UNet", "unet", lambda: UNet2DConditionModel.from_single_file(state, subfolder="unet", **kw)),
        ("VAE", "vae", lambda: AutoencoderKL.from_single_file(state, subfolder="vae", **kw)),
        ("text encoder", "text_encoder", lambda: create_diffusers_clip_model_from_ldm(CLIPTextModel, state,
                                                                                      subfolder="text_encoder", **kw)),
    )
    return tuple(_single_file_component(path, folder / sub, label, load) for label, sub, load in loaders)


def _single_file_component(path: Path, config: Path, label: str, load) -> torch.nn.Module:
    try:
        model = load()
    except NotImplementedError as e:
        if "meta tensor" not in str(e):
            raise
        # diffusers fills a meta-initialised model; tensors absent from the file stay on "meta" until moved.
        raise PrivloraError(f"{path}: {label} weights missing from the checkpoint "
                            "(incomplete or pruned file)") from None
    except Exception as e:  # diffusers raises ValueError/OSError/its own types for shape or config mismatches
        raise PrivloraError(f"{path}: {label} weights do not fit the config in {config} ({_one_line(e)})") from None
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:  # the CLIP path never moves the model, so missing tensors stay silently on "meta"
        raise PrivloraError(f"{path}: {label} weights missing from the checkpoint ({len(missing)} tensors, e.g. "
                            f"{missing[0]})")
    return model


def _load_single_file(
    path: Path, config_dir: str | None, dtype: torch.dtype, allow_pickle: bool, prediction_type: str | None
) -> BaseModel:
    state = _read_checkpoint(path, allow_pickle)
    _check_ldm_layout(path, state)
    folder = _config_folder(path, config_dir)
    unet, vae, text_encoder = _single_file_models(path, state, folder, dtype)
    sched = _load_scheduler(folder, prediction_type)
    return BaseModel(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_load_tokenizer(folder),
        noise_scheduler=sched,
        prediction_type=sched.config.prediction_type,
        name=str(path),
        sha256=sha256_file(path),
        source_kind="single_file",
    )


def is_sd2(unet_config) -> bool:
    """SD2.x, as A1111 tells LoRAs apart (``ss_v2``): its UNet uses linear transformer projections for OpenCLIP-H's
    1024-wide embeddings; every SD1.x UNet uses 1×1-conv projections for CLIP-L's 768."""
    return bool(unet_config.use_linear_projection) or unet_config.cross_attention_dim == 1024


# ---------------------------------------------------------------- encoders used by training and the audit


def _final_layer_norm(text_encoder):
    # transformers >= 5.6 flattened CLIPTextModel; older versions wrap it in .text_model.
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


def tokenize(base: BaseModel, captions: list[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's max length, shape (B, max_len)."""
    tok = base.tokenizer
    max_len = min(tok.model_max_length, base.text_encoder.config.max_position_embeddings)
    ids = tok(list(captions), padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
    return ids.input_ids


def encode_prompt(base: BaseModel, captions: list[str], clip_skip: int | None = None,
                  max_token_length: int | None = None) -> torch.Tensor:
    """CLIP embeddings (B, max_len, hidden). ``clip_skip=k`` takes hidden_states[-k] + final layer norm (A1111/kohya).

    ``max_token_length`` (75 | 150 | 225): kohya's long prompts in 75-token windows (``encode_long``).
    """
    if max_token_length:
        return encode_long(base, captions, max_token_length, clip_skip)
    return encode_ids(base, tokenize(base, captions), clip_skip)


def encode_ids(base: BaseModel, ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
    """The text encoder's output for token ids (B, L), with kohya's clip_skip."""
    te = base.text_encoder
    ids = ids.to(te.device)
    if not clip_skip or clip_skip == 1:
        return te(ids)[0]
    n_layers = te.config.num_hidden_layers
    if not 1 <= clip_skip <= n_layers:
        raise PrivloraError(f"clip_skip {clip_skip} is out of range for a {n_layers}-layer text encoder "
                            f"(1..{n_layers})")
    hidden = te(ids, output_hidden_states=True).hidden_states[-clip_skip]
    return _final_layer_norm(te)(hidden)


def encode_text(base: BaseModel, captions: list[str], encoding: TextEncoding) -> torch.Tensor:
    """Captions encoded as ``encoding`` says (the audit and sampling: as the LoRA was trained)."""
    return encode_prompt(base, captions, clip_skip=encoding.clip_skip, max_token_length=encoding.max_token_length)


# Long prompts (kohya, SD1/2): the caption is tokenised without truncation up to n·w tokens (w = the tokenizer's
# length − 2, 75 for CLIP), cut into n windows of w tokens, and each window is encoded as BOS + w tokens + EOS
# (77 positions for CLIP); of the n hidden-state blocks kohya keeps the first window's BOS, every window's w
# inner positions and the last window's final position: 1 + n·w + 1 positions (227 for 225). ``clip_skip``
# applies to each window. A short caption still becomes n windows: the padding windows are encoded too and
# are keys of the UNet's cross-attention, so they change its output (tests/test_fidelity.py measures it).
# On a tokenizer whose length is not 77 (the embedded tiny-sd: 32) the window is that length − 2 and
# max_token_length only chooses the number of windows (max_token_length / 75).

WINDOW_TOKENS = 75  # kohya counts max_token_length in CLIP windows of 75


def split_windows(ids: torch.Tensor, n_windows: int, bos: int, eos: int, pad: int) -> torch.Tensor:
    """(B, n·w + 2) ids → (B·n, w + 2): BOS + each window of w tokens + the sequence's last id (kohya).

    With pad ≠ eos (SD2's tokenizer) kohya also ends every window that does not end in EOS/pad with EOS, and
    turns a window that starts with padding into an empty prompt (BOS, EOS, pad…).
    """
    w = (ids.shape[1] - 2) // n_windows
    chunks = []
    for i in range(1, ids.shape[1] - 1, w):
        chunk = torch.cat([ids[:, :1], ids[:, i:i + w], ids[:, -1:]], dim=1)
        if pad != eos:
            chunk = chunk.clone()
            chunk[(chunk[:, -2] != eos) & (chunk[:, -2] != pad), -1] = eos
            chunk[chunk[:, 1] == pad, 1] = eos
        chunks.append(chunk)
    return torch.stack(chunks, dim=1).reshape(-1, w + 2)


def merge_windows(hidden: torch.Tensor, n_windows: int) -> torch.Tensor:
    """(B·n, w + 2, D) → (B, n·w + 2, D): the first BOS, each window's inner w positions, the last position."""
    per = hidden.shape[1]
    flat = hidden.reshape(-1, n_windows * per, hidden.shape[-1])
    inner = [flat[:, i:i + per - 2] for i in range(1, n_windows * per, per)]
    return torch.cat([flat[:, :1], *inner, flat[:, -1:]], dim=1)


def encode_long(base, captions: list[str], max_token_length: int, clip_skip: int | None) -> torch.Tensor:
    """kohya's max_token_length encoding of a batch of captions: (B, n·w + 2, D)."""
    tok = base.tokenizer
    window = min(tok.model_max_length, base.text_encoder.config.max_position_embeddings) - 2
    n = max_token_length // WINDOW_TOKENS
    ids = tok(list(captions), padding="max_length", max_length=n * window + 2, truncation=True,
              return_tensors="pt").input_ids
    windows = split_windows(ids, n, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    return merge_windows(encode_ids(base, windows, clip_skip), n)


def encode_images(
    base: BaseModel,
    pixel_values: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    sample: bool = True,
) -> torch.Tensor:
    """VAE latents of images in [-1, 1]: a posterior sample (or its mode), shifted and scaled as the UNet expects."""
    vae = base.vae
    dist = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
    latents = dist.sample(generator=generator) if sample else dist.mode()
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        latents = latents - shift
    return latents * vae.config.scaling_factor
