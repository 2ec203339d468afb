"""The settings of a training run: the keys every method shares (``TrainConfig``) and the base of each method's own
(``MethodSettings``; a method declares its subclass next to its ``Objective``, privlora/objectives/).

Presets and flags are flat (``privacy_alpha = 2``), and a key belongs either to ``TrainConfig`` or to one method's
settings; ``privlora.config`` reads presets and flags into these classes. Kohya's names are used where kohya has one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from privlora.data.halves import SHARD_PATTERN, TRAIN_SUBSETS, valid_subset
from privlora.errors import PrivloraError


def one_process_refusal(method: str, prerequisites: str) -> str | None:
    """The refusal of a method whose prerequisite runs train one after the other in its process, when launched
    multi-process (torchrun/accelerate set WORLD_SIZE)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return (f"{method} runs in one process (its {prerequisites} are trained first, one after the other); "
                "launch it without torchrun/accelerate multi-process")
    return None


@dataclass
class MethodSettings:
    """A method's own settings: each dataclass field is one key (preset key and ``--flag``), with its default.

    Every key is recorded in the LoRA metadata and must match when a run resumes, except those listed in
    ``resume_free`` (they change how the run computes, not what it trains). ``check`` validates them together with
    the shared settings, before any work. A field's ``metadata={"help": …}`` is its ``--help`` line.
    Plain LoRA's settings are this class itself: no keys.
    """

    resume_free: ClassVar[tuple[str, ...]] = ()

    def check(self, cfg: TrainConfig) -> str | None:
        """A reason this method cannot run with these settings and ``cfg``, or None."""
        return None

    def values(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def resume_keys(self) -> tuple[str, ...]:
        return tuple(k for k in self.values() if k not in self.resume_free)


S = TypeVar("S", bound=MethodSettings)


@dataclass
class TrainConfig:
    """What every method shares; the method's own keys are in ``method_settings``."""

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
    # all | half_a | half_b | shard_<j>_of_<k>_seed_<s>: train on one seeded half (distill_lora's teachers) or shard
    # (shard_merge's shard runs) of the train role
    train_subset: str = "all"
    resolution: int = 512
    center_crop: bool = True
    # augmentation of the training batches (any method; privlora.data.augment), seeded per batch position so a
    # resumed run draws the same. Flip alone keeps the latent cache (both orientations are cached); crop or jitter
    # need pixels, so the training images are then VAE-encoded every step (the other roles stay cached).
    random_flip: bool = False  # kohya's flip_aug: mirror each image left-right with probability 1/2
    random_crop_scale: float = 1.0  # random resized crop: area fraction in [s, 1], aspect 3/4..4/3; 1 = off
    color_jitter: float = 0.0  # kohya's color_aug, as brightness/contrast/saturation factors in [1-s, 1+s]; 0 = off
    # conditioning randomisation of the training batches (Somepalli et al. 2023: copying rises with caption
    # specificity); inference is unchanged
    caption_swap_rate: float = field(default=0.0, metadata={
        "help": "defence: each training image's caption replaced by another image's from its batch at this rate"})
    caption_word_dropout: float = field(default=0.0, metadata={
        "help": "defence: each comma-separated caption tag dropped at this rate (needs uncached captions)"})
    text_noise_scale: float = field(default=0.0, metadata={
        "help": "defence: Gaussian noise of this std on the cached text embeddings of each training batch"})
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
    # kohya's timestep range: training (and the method's own) noise levels drawn from [min_timestep, max_timestep)
    # only, e.g. away from where membership leaks most (benchmarks/timestep_leakage.py measures where); the
    # probe and the audit still query every timestep
    min_timestep: int = field(default=0, metadata={
        "help": "training noise levels from this timestep on (kohya's; defence: timestep shaping)"})
    max_timestep: int | None = field(default=None, metadata={
        "help": "training noise levels below this timestep (default: all)"})
    seed: int = 1337
    # fidelity to the reference implementation (docs/fidelity.md)
    shuffle_caption: bool = False  # kohya: shuffle comma-separated tags every step (seeded); no text caching then
    keep_tokens: int = 0  # kohya: the first N tags stay in place when shuffling
    max_token_length: int | None = None  # kohya: 75 | 150 | 225 tokens in 75-token windows; None: one window
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
    # the method's own settings (its class comes with the method: privlora.objectives, METHODS[method].settings_cls)
    method_settings: MethodSettings = field(default_factory=lambda: MethodSettings())

    def validate(self, source: str = "config") -> TrainConfig:
        def bad(msg: str) -> PrivloraError:
            return PrivloraError(f"{source}: {msg}")

        if self.resolution <= 0 or self.resolution % 8:
            raise bad(f"resolution {self.resolution} is not a positive multiple of 8")
        reason = self.method_settings.check(self)
        if reason:
            raise bad(reason)
        if self.save_format not in ("kohya", "diffusers"):
            raise bad(f"save_format {self.save_format!r} is not kohya or diffusers")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise bad(f"mixed_precision {self.mixed_precision!r} is not no, fp16 or bf16")
        if self.optimizer_type not in ("AdamW", "AdamW8bit"):
            raise bad(f"optimizer_type {self.optimizer_type!r} is not AdamW or AdamW8bit")
        if not valid_subset(self.train_subset):
            raise bad(f"train_subset {self.train_subset!r} is not one of {', '.join(TRAIN_SUBSETS)} or {SHARD_PATTERN} "
                      "(k ≥ 2, 1 ≤ j ≤ k)")
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            raise bad(f"prediction_type {self.prediction_type!r} is not epsilon or v_prediction")
        self._validate_fidelity(bad)
        self._validate_regularisers(bad)
        if not (self.max_train_epochs or self.max_train_steps):
            raise bad("set max_train_epochs or max_train_steps")
        for key in ("network_dim", "train_batch_size", "gradient_accumulation_steps", "eval_every_n_epochs"):
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
        for key in ("caption_swap_rate", "caption_word_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise bad(f"{key} {getattr(self, key)} is not in [0, 1)")
        if self.min_timestep < 0 or (self.max_timestep is not None and self.max_timestep <= self.min_timestep):
            raise bad(f"timestep range [{self.min_timestep}, {self.max_timestep}) is empty or negative")
        if self.text_noise_scale < 0.0:
            raise bad(f"text_noise_scale {self.text_noise_scale} must be ≥ 0")
        if self.caption_word_dropout and self.caches_text:
            raise bad("caption_word_dropout changes the caption text, which cached text encoder outputs cannot "
                      "follow: set cache_text_encoder_outputs = false")
        if self.text_noise_scale and not self.caches_text:
            raise bad("text_noise_scale adds noise to cached text embeddings: it needs cache_text_encoder_outputs "
                      "(and no shuffle_caption or text-encoder training)")

    def settings(self, kind: type[S]) -> S:
        """The method's settings as the class the method declared (a method reads its own keys through this)."""
        if not isinstance(self.method_settings, kind):
            raise PrivloraError(f"method {self.method}: its settings are {type(self.method_settings).__name__}, "
                                f"not {kind.__name__}")
        return self.method_settings

    def flat(self) -> dict[str, Any]:
        """Every key of the run, shared and the method's, as one flat mapping (presets and flags are flat)."""
        shared = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "method_settings"}
        return {**shared, **self.method_settings.values()}

    @property
    def caches_text(self) -> bool:
        if self.cache_text_encoder_outputs is None:
            return not (self.train_text_encoder or self.shuffle_caption)
        return self.cache_text_encoder_outputs and not self.train_text_encoder
