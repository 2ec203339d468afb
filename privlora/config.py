"""Training configuration: TOML presets, every key also a command-line flag, validated before any work.

Presets may group keys in tables (``[model]``, ``[data]``, ``[training]``, …); the tables are only for the
reader — keys are flat and unique. Kohya's names are used where kohya has one.
"""
from __future__ import annotations

import argparse
import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from privlora.data.halves import TRAIN_SUBSETS
from privlora.errors import PrivloraError


@dataclass
class TrainConfig:
    # model
    pretrained_model_name_or_path: str = "tiny-sd"
    config_dir: str | None = None  # local diffusers folder giving configs/tokenizer to a single-file checkpoint
    prediction_type: str | None = None  # override the scheduler's (epsilon | v_prediction)
    allow_pickle: bool = False
    # data: one of train_data_dir (auto split), splits_dir (five folders), splits (a manifest), synthetic_images
    train_data_dir: str | None = None
    splits_dir: str | None = None
    splits: str | None = None
    synthetic_images: int = 0  # >0: generate this many private synthetic sprites into <output_dir>/data
    synthetic_seed: int = 1
    synthetic_style: str = "framed"  # plain | framed (a style tiny-sd was not pretrained on)
    # the one-run ε audit (privlora audit --canaries): extra training images, each included with probability ½ by
    # a secret coin, recorded in <output_dir>/canaries.json (private, like splits.json)
    canaries: int = 0
    canary_source: str = "generated"  # generated (sprites of their own) | a folder of images never in the split
    caption_extension: str = ".txt"
    n_member_aux: int = 200
    n_member_test: int | None = None
    n_nonmember_aux: int = 200
    n_nonmember_test: int = 200
    split_seed: int = 0
    train_subset: str = "all"  # all | half_a | half_b: train on one seeded half of the train role (distill teachers)
    resolution: int = 512
    center_crop: bool = True
    # augmentation of the training batches (any method; privlora.data.augment), seeded per batch position so a
    # resumed run draws the same. Flip alone keeps the latent cache (both orientations are cached); crop or jitter
    # need pixels, so the training images are then VAE-encoded every step (the other roles stay cached).
    random_flip: bool = False  # kohya's flip_aug: mirror each image left-right with probability 1/2
    random_crop_scale: float = 1.0  # random resized crop: area fraction in [s, 1], aspect 3/4..4/3; 1 = off
    color_jitter: float = 0.0  # kohya's color_aug, as brightness/contrast/saturation factors in [1-s, 1+s]; 0 = off
    skip_bad_images: bool = False
    cache_latents: bool = True
    cache_text_encoder_outputs: bool | None = None  # default: on when the text encoder is not trained
    # network
    method: str = "lora"
    network_dim: int = 4
    network_alpha: float = 1.0
    conv_dim: int = 0
    conv_alpha: float = 1.0
    network_dropout: float = 0.0
    train_text_encoder: bool = False
    # optimisation
    unet_lr: float = 1e-4
    text_encoder_lr: float = 1e-5
    optimizer_type: str = "AdamW"  # AdamW | AdamW8bit
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    lr_scheduler: str = "constant"  # any of diffusers.optimization's schedules
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_train_epochs: int | None = None
    max_train_steps: int | None = None
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the UNet (GPU; slow warm-up)
    channels_last: bool = False
    scale_lr: bool = False  # multiply the learning rates by batch × accumulation × processes
    clip_skip: int | None = None
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    seed: int = 1337
    # privacy objective (MP-LoRA / SMP-LoRA)
    privacy_alpha: float = 1.0
    privacy_beta: float = 1.0
    k_steps: int = 1
    adv_step: str = "fused"  # fused | reference
    attacker_lr: float = 1e-5
    attacker_weight_decay: float = 1e-4
    attacker_hidden: list[int] = field(default_factory=lambda: [512, 256])
    attacker_dropout: float = 0.5
    attacker_pool: int = 64  # loss maps are pooled to pool×pool (64 = the reference at 512²)
    attacker_batch_size: int | None = None  # default: train_batch_size
    attacker_input: str = "loss_map"  # loss_map (the paper) | calibrated (minus the base model's map; +1 no-grad fwd)
    # stronger proxy attackers (departures from the paper, off by default; docs/fidelity.md)
    attacker_draws: int = 1  # K noise/timestep draws per image shown to the attacker together (L_adv: K× batch)
    attacker_timestep: bool = False  # the attacker also sees each draw's t/T
    attacker_features: str = "map"  # map (MLP on pooled maps) | scalar (MLP on per-draw mean/std/quantiles)
    # DP-LoRA (DP-SGD): give dp_noise_multiplier, or dp_target_epsilon and the multiplier is solved for the run
    dp_noise_multiplier: float | None = None
    dp_target_epsilon: float | None = None
    dp_delta: float | None = None  # default 1e-5; never above 1/(10·N) for N training images
    # research only: noise and Poisson sampling from the run's seed (repeatable), which VOIDS the guarantee for
    # anyone who has the LoRA file (its metadata holds the seed); default: a secret per-run source
    dp_reproducible_noise: bool = False
    dp_max_grad_norm: float = 1.0  # per-image clipping norm C
    dp_accountant: str = "prv"  # prv | rdp (Opacus' accountants)
    dp_micro_batch_size: int = 16  # per-image gradients are formed this many images at a time (memory bound)
    dp_noise_draws: int = 1  # noise/timestep draws averaged per image before clipping (DPDM's noise multiplicity)
    # distill_lora (Fu et al. 2024): a student learns from two teachers trained on disjoint halves of the train role
    distill_true_noise_weight: float = 0.0  # w in target = w·ε_true + (1 − w)·ε_teacher
    distill_teacher_epochs: int | None = None  # each teacher's max_train_epochs; None: the student's settings
    # fidelity to the reference implementation (docs/fidelity.md)
    attacker_dropout_in_adv: bool = False  # L_adv runs the attacker with dropout active (the reference); seeded masks
    shuffle_caption: bool = False  # kohya: shuffle comma-separated tags every step (seeded); no text caching then
    keep_tokens: int = 0  # kohya: the first N tags stay in place when shuffling
    max_token_length: int | None = None  # kohya: 75 | 150 | 225 tokens in 75-token windows; None: one window
    attacker_eval_samples: int | None = None  # per role, for the co-trained attacker's evaluation; None: all
    hessian_every_n_steps: int = 0  # >0: estimate the top Hessian eigenvalue of the LoRA loss every N steps
    hessian_iters: int = 10  # power-iteration steps per estimate
    collapse_patience: int = 3  # evaluations with member_test loss above the base model's before warning
    # evaluation during training
    eval_samples: int = 64  # per test role, for the per-epoch held-out losses and attacker accuracy
    eval_every_n_epochs: int = 1  # the held-out evaluation (and collapse guard) runs every N epochs and at the end
    sample_prompts: str | None = None  # prompts file (kohya per-line options); images go to <output_dir>/samples
    sample_every_n_epochs: int | None = None
    sample_sampler: str = "ddim"
    sample_steps: int = 20
    # output
    output_dir: str = "runs/lora"
    output_name: str = "lora"
    save_format: str = "kohya"  # kohya | diffusers
    save_every_n_epochs: int | None = None
    save_every_n_steps: int | None = None
    save_at_fractions: list[float] | None = None  # also save -stepNNNNNN files at these fractions of the run's steps
    save_state: bool = False
    state_every_n_epochs: int | None = None  # a resumable state (no LoRA file) every N epochs: a crash loses ≤ N
    resume: str | None = None
    log_every_n_steps: int = 1
    overwrite: bool = False

    def validate(self, source: str = "config") -> TrainConfig:
        def bad(msg: str) -> PrivloraError:
            return PrivloraError(f"{source}: {msg}")

        if self.resolution <= 0 or self.resolution % 8:
            raise bad(f"resolution {self.resolution} is not a positive multiple of 8")
        from privlora.objectives import METHODS

        if self.method not in METHODS:
            raise bad(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        reason = METHODS[self.method].check_config(self)
        if reason:
            raise bad(reason)
        if self.save_format not in ("kohya", "diffusers"):
            raise bad(f"save_format {self.save_format!r} is not kohya or diffusers")
        if self.adv_step not in ("fused", "reference"):
            raise bad(f"adv_step {self.adv_step!r} is not fused or reference")
        if self.attacker_input not in ("loss_map", "calibrated"):
            raise bad(f"attacker_input {self.attacker_input!r} is not loss_map or calibrated")
        if self.attacker_features not in ("map", "scalar"):
            raise bad(f"attacker_features {self.attacker_features!r} is not map or scalar")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise bad(f"mixed_precision {self.mixed_precision!r} is not no, fp16 or bf16")
        if self.optimizer_type not in ("AdamW", "AdamW8bit"):
            raise bad(f"optimizer_type {self.optimizer_type!r} is not AdamW or AdamW8bit")
        if self.train_subset not in TRAIN_SUBSETS:
            raise bad(f"train_subset {self.train_subset!r} is not one of {', '.join(TRAIN_SUBSETS)}")
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            raise bad(f"prediction_type {self.prediction_type!r} is not epsilon or v_prediction")
        self._validate_fidelity(bad)
        self._validate_regularisers(bad)
        if not (self.max_train_epochs or self.max_train_steps):
            raise bad("set max_train_epochs or max_train_steps")
        for key in ("network_dim", "train_batch_size", "gradient_accumulation_steps", "k_steps", "attacker_pool",
                    "eval_every_n_epochs", "dp_micro_batch_size", "dp_noise_draws", "attacker_draws"):
            if getattr(self, key) < 1:
                raise bad(f"{key} must be ≥ 1")
        if sum(bool(x) for x in (self.train_data_dir, self.splits_dir, self.splits, self.synthetic_images)) != 1:
            raise bad("give exactly one data source: train_data_dir, splits_dir, splits or synthetic_images")
        if self.canaries < 0 or self.canaries == 1:
            raise bad(f"canaries {self.canaries}: give 0 (none) or at least 2")
        if self.canaries and self.canary_source != "generated" and not Path(self.canary_source).exists():
            raise bad(f"canary_source {self.canary_source}: no such folder (or use \"generated\")")
        if self.save_at_fractions and not all(0 < f < 1 for f in self.save_at_fractions):
            raise bad(f"save_at_fractions {self.save_at_fractions}: each must lie strictly between 0 and 1")
        if self.state_every_n_epochs is not None and self.state_every_n_epochs < 1:
            raise bad("state_every_n_epochs must be ≥ 1")
        if self.sample_every_n_epochs and not self.sample_prompts:
            raise bad("sample_every_n_epochs needs sample_prompts")
        if self.sample_prompts:
            from privlora.prompts import read_prompts

            read_prompts(self.sample_prompts)  # a bad line fails before training
        return self

    def _validate_fidelity(self, bad) -> None:
        if self.max_token_length not in (None, 75, 150, 225):
            raise bad(f"max_token_length {self.max_token_length} is not 75, 150 or 225")
        if self.keep_tokens < 0 or self.hessian_every_n_steps < 0 or self.hessian_iters < 1:
            raise bad("keep_tokens and hessian_every_n_steps must be ≥ 0, hessian_iters ≥ 1")
        if self.attacker_eval_samples is not None and self.attacker_eval_samples < 1:
            raise bad("attacker_eval_samples must be ≥ 1")
        if self.shuffle_caption and self.cache_text_encoder_outputs:
            raise bad("shuffle_caption changes the caption every step, so text encoder outputs cannot be cached; "
                      "turn off cache_text_encoder_outputs or shuffle_caption")

    def _validate_regularisers(self, bad) -> None:
        if not 0.0 < self.random_crop_scale <= 1.0:
            raise bad(f"random_crop_scale {self.random_crop_scale} is not in (0, 1] (1 = no crop)")
        if not 0.0 <= self.color_jitter <= 1.0:
            raise bad(f"color_jitter {self.color_jitter} is not in [0, 1] (0 = off)")
        if not 0.0 <= self.network_dropout < 1.0:
            raise bad(f"network_dropout {self.network_dropout} is not in [0, 1)")
        if self.weight_decay < 0.0:
            raise bad(f"weight_decay {self.weight_decay} must be ≥ 0")

    @property
    def caches_text(self) -> bool:
        if self.cache_text_encoder_outputs is None:
            return not (self.train_text_encoder or self.shuffle_caption)
        return self.cache_text_encoder_outputs and not self.train_text_encoder


_HINTS = get_type_hints(TrainConfig)
KEYS = {f.name for f in fields(TrainConfig)}


def _coerce(key: str, value: Any, source: str) -> Any:
    hint = str(_HINTS[key])
    if value is None:
        return None
    try:
        if "bool" in hint:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if "list[int]" in hint or "list[float]" in hint:
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split() if v]
            return [int(v) if "list[int]" in hint else float(v) for v in value]
        if "int" in hint and "float" not in hint:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if "float" in hint:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise PrivloraError(f"{source}: {key} = {value!r} is not a valid {hint.replace('typing.', '')}") from None


def _flatten(table: dict, path: Path, out: dict | None = None) -> dict:
    out = {} if out is None else out
    for key, value in table.items():
        if isinstance(value, dict):
            _flatten(value, path, out)
        elif key in out:
            raise PrivloraError(f"{path}: key {key!r} is set twice")
        else:
            out[key] = value
    return out


def load_toml(path: Path, seen: tuple[Path, ...], what: str) -> dict:
    """A TOML file as a dict, with the checks every privlora TOML reader makes: it exists, it is not already
    being read (an ``inherit`` loop), it parses."""
    if not path.is_file():
        raise PrivloraError(f"{path}: {what} not found")
    if path.resolve() in seen:
        raise PrivloraError(f"{path}: inherit loop")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PrivloraError(f"{path}: not valid TOML ({e})") from None


def read_toml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Flat key → value of a preset; ``inherit = "other.toml"`` (relative to this file) is read first."""
    path = Path(path)
    data = load_toml(path, _seen, "config file")
    parent = data.pop("inherit", None)
    flat = _flatten(data, path)
    for key in flat:
        if key not in KEYS:
            raise PrivloraError(f"{path}: unknown config key {key!r}")
    if parent is None:
        return flat
    return {**read_toml(path.parent / parent, (*_seen, path.resolve())), **flat}


def build_config(config_file: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """Preset values, then flag overrides (flags win); the result is validated."""
    values: dict[str, Any] = {}
    if config_file:
        base = Path(config_file).parent
        for key, value in read_toml(config_file).items():
            values[key] = _coerce(key, value, str(config_file))
        # relative paths in a preset are relative to it
        for key in ("train_data_dir", "splits_dir", "splits", "sample_prompts"):
            value = values.get(key)
            if isinstance(value, str) and not Path(value).is_absolute() and (base / value).exists():
                values[key] = str(base / values[key])
    for key, value in overrides.items():
        if key not in KEYS:
            raise PrivloraError(f"command line: unknown option --{key}")
        values[key] = _coerce(key, value, f"--{key}")
    return TrainConfig(**values).validate(str(config_file or "command line"))


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Every config key becomes ``--key VALUE`` (booleans also accept a bare ``--key``)."""
    for f in fields(TrainConfig):
        kw: dict[str, Any] = dict(default=argparse.SUPPRESS, dest=f.name)
        if "bool" in str(_HINTS[f.name]):
            kw.update(nargs="?", const="true", metavar="BOOL")
        if f.name == "method":
            from privlora.objectives import METHODS

            kw.update(choices=list(METHODS), help="; ".join(f"{n}: {c.summary}" for n, c in METHODS.items()))
        parser.add_argument(f"--{f.name}", **kw)


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


RESOLVED_NAME = "resolved_config.toml"


def resolved_toml(cfg: TrainConfig) -> str:
    """Every key of ``cfg`` after inherit and flags, as a flat TOML preset that ``build_config`` reads back.

    TOML has no null: an unset key (None) is written as a comment, which reads back as its default (None).
    """
    lines = ["# privlora: the fully resolved training settings (every key, after inherit and flags)"]
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        lines.append(f"# {f.name} = (unset)" if value is None else f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a valid TOML basic string


def ran_with(cfg: TrainConfig, out: str | Path) -> bool:
    """Whether the run in folder ``out`` was started with every setting of ``cfg`` (its resolved_config.toml;
    ``resume``/``overwrite`` say how a run was started, not what it trains, and are ignored)."""
    path = Path(out) / RESOLVED_NAME

    def settings(text: str) -> dict:
        return {k: v for k, v in tomllib.loads(text).items() if k not in ("resume", "overwrite")}

    try:
        return settings(path.read_text(encoding="utf-8")) == settings(resolved_toml(cfg))
    except (tomllib.TOMLDecodeError, OSError):
        return False


def write_resolved_config(cfg: TrainConfig, out: str | Path, derived: dict[str, str] | None = None) -> Path:
    """``derived``: what the method worked out from the settings (DP-LoRA's noise multiplier, …), as comments."""
    from privlora.io import write_text

    text = resolved_toml(cfg)
    if derived:
        text += "# derived by the method at the start of the run:\n" + "".join(
            f"# {k} = {v}\n" for k, v in derived.items())
    return write_text(Path(out) / RESOLVED_NAME, text)
