"""Loading a base Stable Diffusion model (SD1.x / SD2.x / SDXL base) offline, from a diffusers folder or one single
file.

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
from privlora.diffusion import pack_sdxl
from privlora.errors import PrivloraError
from privlora.files import PICKLE_SUFFIXES, safetensors_keys, sha256_file
from privlora.files import one_line_error as _one_line
from privlora.models.clip_layout import own_name
from privlora.models.tiny import TINY_ALIASES, TINY_SD_PATH
from privlora.offline import offline_by_default

PREDICTION_TYPES = ("epsilon", "v_prediction")
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_COMPONENTS = COMPONENTS + ("text_encoder_2", "tokenizer_2")
_CONFIG_FILES = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "text_encoder_2": "config.json",
    "scheduler": "scheduler_config.json",
}
_WEIGHT_STEMS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}
SD, SDXL = "sd", "sdxl"  # BaseModel.family: SD1.x/SD2.x (one CLIP encoder) or SDXL base (two, added conditioning)
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
    family: str = SD  # "sd" (SD1.x / SD2.x) or "sdxl" (SDXL base)
    text_encoder_2: Any = None  # SDXL: OpenCLIP-bigG (CLIPTextModelWithProjection); None for SD1.x / SD2.x
    tokenizer_2: Any = None

    @property
    def text_encoders(self) -> list:
        """The text encoders the model conditions on: one for SD1.x / SD2.x, two for SDXL."""
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]

    @property
    def modules(self) -> list:
        """Every network of the model: UNet, VAE and text encoder(s)."""
        return [self.unet, self.vae, *self.text_encoders]


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
    the original LDM layout (SD1.x/SD2.x) or Stability's SGM layout (SDXL base, as A1111/ComfyUI load it); then
    ``config_dir`` must name a local diffusers folder of the same family providing configs and tokenizer(s).
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
    for module in base.modules:
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


def _check_folder(folder: Path) -> str:
    """The folder's family (``sd`` or ``sdxl``) once every component it needs is there."""
    index = folder / "model_index.json"
    if index.is_file():
        family = _check_index(index)
    elif not any((folder / c).is_dir() for c in COMPONENTS):
        raise PrivloraError(f"{folder}: not a diffusers Stable Diffusion folder (no model_index.json, no unet/ vae/ "
                            "... subfolders)")
    else:
        family = SDXL if (folder / "text_encoder_2").is_dir() else SD
    if family == SDXL and not (folder / "text_encoder").is_dir():
        raise PrivloraError(f"{folder}: an SDXL refiner (text_encoder_2 only, no text_encoder/) is not supported; "
                            "use the SDXL base model")
    components = SDXL_COMPONENTS if family == SDXL else COMPONENTS
    for component in components:
        sub = folder / component
        if not sub.is_dir():
            raise PrivloraError(f"{sub}: missing — a {'SDXL' if family == SDXL else 'Stable Diffusion'} folder "
                                f"needs {', '.join(c + '/' for c in components)}")
        if component.startswith("tokenizer"):
            _check_tokenizer(sub)
        elif not (sub / _CONFIG_FILES[component]).is_file():
            raise PrivloraError(f"{sub / _CONFIG_FILES[component]}: missing {component} config")
    _check_unet_family(folder / "unet" / _CONFIG_FILES["unet"], family)
    return family


def _check_index(index: Path) -> str:
    try:
        spec = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PrivloraError(f"{index}: unreadable ({_one_line(e)})") from None
    name = spec.get("_class_name", "this pipeline")
    present = {k for k, v in spec.items() if isinstance(v, list) and v and v[0] is not None}
    if "text_encoder_2" in present and "text_encoder" not in present:
        raise PrivloraError(f"{index}: an SDXL refiner ({name}: text_encoder_2 only, no text_encoder) is not "
                            "supported; use the SDXL base model")
    if "transformer" in spec or "prior" in spec or ("text_encoder_2" in present and "XL" not in name):
        raise PrivloraError(f"{index}: {name} is not supported (SD1.x / SD2.x / SDXL base only)")
    return SDXL if "text_encoder_2" in present else SD


def _check_unet_family(config: Path, family: str) -> None:
    """An SDXL folder's UNet takes SDXL's added conditioning ("text_time"); an SD1.x/SD2.x one takes none."""
    try:
        kind = json.loads(config.read_text(encoding="utf-8")).get("addition_embed_type")
    except (OSError, ValueError) as e:
        raise PrivloraError(f"{config}: unreadable ({_one_line(e)})") from None
    if family == SDXL and kind != "text_time":
        raise PrivloraError(f"{config}: addition_embed_type {kind!r} in an SDXL folder (SDXL base's UNet has "
                            "\"text_time\"): unknown layout")
    if family == SD and kind is not None:
        raise PrivloraError(f"{config}: addition_embed_type {kind!r} needs a second text encoder (text_encoder_2/), "
                            "which this folder lacks: unknown layout")


def _check_tokenizer(sub: Path) -> None:
    has_bpe = (sub / "vocab.json").is_file() and (sub / "merges.txt").is_file()
    if not has_bpe and not (sub / "tokenizer.json").is_file():
        raise PrivloraError(f"{sub}: missing tokenizer files (vocab.json and merges.txt)")


# ---------------------------------------------------------------- components


def _load_tokenizer(folder: Path, subfolder: str = "tokenizer"):
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(str(folder), subfolder=subfolder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise PrivloraError(f"{folder / subfolder}: cannot load the CLIP tokenizer ({_one_line(e)})") from None


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


def _load_text_encoder(folder: Path, dtype: torch.dtype, allow_pickle: bool, component: str = "text_encoder"):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
    (model, info), files = _from_pretrained(cls, folder, component, dtype, allow_pickle, output_loading_info=True)
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

    family = _check_folder(folder)
    unet, unet_files = _from_pretrained(UNet2DConditionModel, folder, "unet", dtype, allow_pickle)
    vae, _ = _from_pretrained(AutoencoderKL, folder, "vae", dtype, allow_pickle)
    text_encoder = _load_text_encoder(folder, dtype, allow_pickle)
    sched = _load_scheduler(folder, prediction_type)
    second: dict[str, Any] = {}
    if family == SDXL:
        second = dict(family=SDXL, text_encoder_2=_load_text_encoder(folder, dtype, allow_pickle, "text_encoder_2"),
                      tokenizer_2=_load_tokenizer(folder, "tokenizer_2"))
        _check_sdxl_shapes(folder, unet, text_encoder, second["text_encoder_2"])
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
        **second,
    )


def _check_sdxl_shapes(folder: Path, unet, te1, te2) -> None:
    """SDXL's UNet attends to te1 ⊕ te2 hidden states and embeds te2's pooled projection ⊕ 6 time ids."""
    cfg = unet.config
    width = te1.config.hidden_size + te2.config.hidden_size
    pooled = te2.config.projection_dim
    added = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    if cfg.cross_attention_dim != width or added != pooled or pooled > width:
        raise PrivloraError(f"{folder / 'unet'}: cross_attention_dim {cfg.cross_attention_dim} / added embedding "
                            f"{added} do not fit the text encoders (hidden {width}, pooled {pooled}): unknown layout")


# ---------------------------------------------------------------- single file (original LDM / SGM layout)


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


SDXL_TE1_PREFIX = "conditioner.embedders.0.transformer."  # CLIP-L in transformers' names
SDXL_TE2_PREFIX = "conditioner.embedders.1.model."  # OpenCLIP-bigG in open_clip's names


def _check_ldm_layout(path: Path, state: dict) -> str:
    """The single file's family: ``sd`` (SD1.x/SD2.x, ``cond_stage_model.*``) or ``sdxl`` (SDXL base in Stability's
    SGM layout, ``conditioner.embedders.*``), once its UNet, VAE and text encoder(s) are all there."""
    def has(prefix: str | tuple[str, ...]) -> bool:
        return any(k.startswith(prefix) for k in state)

    family = SDXL if has("conditioner.embedders.") else SD
    if family == SDXL and not has(SDXL_TE1_PREFIX) and has("conditioner.embedders.0.model."):
        raise PrivloraError(f"{path}: an SDXL refiner single file (conditioner.embedders.0.model.*: OpenCLIP-bigG "
                            "only) is not supported; use the SDXL base model")
    prefixes: dict[str, str | tuple[str, ...]] = {
        "UNet (model.diffusion_model.*)": "model.diffusion_model.",
        "VAE (first_stage_model.*)": "first_stage_model.",
    }
    if family == SDXL:
        prefixes[f"CLIP-L text encoder ({SDXL_TE1_PREFIX}*)"] = SDXL_TE1_PREFIX
        prefixes[f"OpenCLIP-bigG text encoder ({SDXL_TE2_PREFIX}*)"] = SDXL_TE2_PREFIX
    else:
        prefixes["CLIP text encoder (cond_stage_model.transformer.* for SD1.x, cond_stage_model.model.* for SD2.x)"] \
            = ("cond_stage_model.transformer.", "cond_stage_model.model.")
    missing = [what for what, p in prefixes.items() if not has(p)]
    if missing:
        kind = "SDXL base (SGM-layout)" if family == SDXL else "original-layout SD1.x/SD2.x"
        raise PrivloraError(f"{path}: not an {kind} checkpoint; missing {', '.join(missing)} weights")
    return family


SDXL_CONFIG_DIR_HINT = (
    "pass --config_dir PATH_TO_LOCAL_SDXL_FOLDER (an SDXL base diffusers folder: model_index.json, unet/, vae/, "
    "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/; only its configs and tokenizers are read)"
)


def _config_folder(path: Path, config_dir: str | None, family: str = SD) -> tuple[Path, str]:
    """The local diffusers folder that configures a single file of ``family``, and the folder's own family."""
    hint = SDXL_CONFIG_DIR_HINT if family == SDXL else CONFIG_DIR_HINT
    if config_dir is None:
        what = ("unet/config.json, vae/config.json, text_encoder/ and text_encoder_2/ config.json, scheduler/) and "
                "both tokenizers" if family == SDXL else
                "unet/config.json, vae/config.json, text_encoder/config.json, scheduler/) and the tokenizer")
        raise PrivloraError(f"{path}: a single-file checkpoint needs the diffusers configs ({what}, which cannot be "
                            f"downloaded offline; {hint}")
    folder = _resolve(config_dir)
    if not folder.is_dir():
        raise PrivloraError(f"{folder}: --config_dir is not a folder; {hint}")
    return folder, _check_folder(folder)


def _single_file_models(path: Path, state: dict, folder: Path, dtype: torch.dtype, family: str) -> tuple:
    """UNet, VAE and text encoder(s), each through diffusers' own single-file converter with its config from
    ``folder``. SDXL's encoders are each handed only their own embedder's tensors: diffusers tells CLIP-L from
    OpenCLIP-bigG by width (768 vs 1280), which a model whose two encoders are equally wide would confuse."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    # Passing the config folder explicitly keeps diffusers from inferring a Hub repo id (it would try the network).
    # fp32 is what diffusers loads into anyway; passing it would only trigger a spurious keep-in-fp32 warning.
    kw = dict(config=str(folder), local_files_only=True, torch_dtype=None if dtype == torch.float32 else dtype)

    def text(cls, sub: str, part: dict):
        return lambda: create_diffusers_clip_model_from_ldm(cls, part, subfolder=sub, **kw)

    loaders = [
        ("UNet", "unet", lambda: UNet2DConditionModel.from_single_file(state, subfolder="unet", **kw)),
        ("VAE", "vae", lambda: AutoencoderKL.from_single_file(state, subfolder="vae", **kw)),
    ]
    if family == SDXL:
        def only(prefix: str) -> dict:
            return {k: v for k, v in state.items() if k.startswith(prefix)}

        loaders += [("CLIP-L text encoder", "text_encoder", text(CLIPTextModel, "text_encoder", only(SDXL_TE1_PREFIX))),
                    ("OpenCLIP-bigG text encoder", "text_encoder_2",
                     text(CLIPTextModelWithProjection, "text_encoder_2", only(SDXL_TE2_PREFIX)))]
    else:
        loaders.append(("text encoder", "text_encoder", text(CLIPTextModel, "text_encoder", state)))
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
    family = _check_ldm_layout(path, state)
    folder, folder_family = _config_folder(path, config_dir, family)
    if folder_family != family:
        names = {SD: "an SD1.x/SD2.x", SDXL: "an SDXL base"}
        raise PrivloraError(f"{path}: {names[family]} checkpoint, but --config_dir {folder} is {names[folder_family]} "
                            f"folder; pass {names[family]} diffusers folder as --config_dir")
    unet, vae, text_encoder, *rest = _single_file_models(path, state, folder, dtype, family)
    sched = _load_scheduler(folder, prediction_type)
    second: dict[str, Any] = {}
    if family == SDXL:
        second = dict(family=SDXL, text_encoder_2=rest[0], tokenizer_2=_load_tokenizer(folder, "tokenizer_2"))
        _check_sdxl_shapes(folder, unet, text_encoder, rest[0])
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
        **second,
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
    SDXL: both encoders, packed with the pooled projection (``encode_sdxl``).
    """
    if is_sdxl(base):
        return encode_sdxl(base, captions, clip_skip, max_token_length)
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


def is_sdxl(model) -> bool:
    """A BaseModel or pipeline with SDXL's second text encoder."""
    return getattr(model, "text_encoder_2", None) is not None


def encode_sdxl(base, captions: list[str], clip_skip: int | None = None,
                max_token_length: int | None = None) -> torch.Tensor:
    """SDXL's text conditioning, packed as ``diffusion.pack_sdxl`` describes: (B, L + 1, D1 + D2).

    As SDXL (and kohya's SDXL scripts) encode: the penultimate hidden states of te1 (CLIP-L) and te2
    (OpenCLIP-bigG), without the final layer norm, side by side; te2's pooled projection is its final (layer-
    normed) hidden state at the first EOS token through ``text_projection``. Long prompts (``max_token_length``)
    are cut into windows for each encoder with its own tokenizer (te2's pads with "!", not EOS, so SD2's window
    rule applies to it); the pooled projection is the first window's, as kohya takes it. ``clip_skip``: SDXL
    has already skipped one layer and kohya's SDXL scripts ignore the flag, so only 1 (or none) is accepted.
    """
    if clip_skip not in (None, 1):
        raise PrivloraError(f"clip_skip {clip_skip} is not supported for SDXL (it already conditions on the "
                            "penultimate layer of both text encoders; kohya's SDXL scripts ignore clip_skip)")
    n = max_token_length // WINDOW_TOKENS if max_token_length else 1
    hidden = []
    for tok, te in ((base.tokenizer, base.text_encoder), (base.tokenizer_2, base.text_encoder_2)):
        length = min(tok.model_max_length, te.config.max_position_embeddings)
        if n == 1:
            ids = tok(list(captions), padding="max_length", max_length=length, truncation=True,
                      return_tensors="pt").input_ids
        else:
            ids = tok(list(captions), padding="max_length", max_length=n * (length - 2) + 2, truncation=True,
                      return_tensors="pt").input_ids
            ids = split_windows(ids, n, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
        ids = ids.to(te.device)
        out = te(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2] if n == 1 else merge_windows(out.hidden_states[-2], n))
    first_eos = (ids == tok.eos_token_id).int().argmax(dim=1)  # te2's ids: the loop's last encoder
    last = out.last_hidden_state[torch.arange(ids.shape[0], device=ids.device), first_eos]
    pooled = te.text_projection(last.to(te.text_projection.weight.dtype))[::n]
    return pack_sdxl(torch.cat(hidden, dim=-1), pooled)


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
