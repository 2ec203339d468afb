"""``setup``: everything a run needs before its first step, loaded and checked: the split, the base model with
LoRA injected, the cached data, the method, the optimizer and schedule, the denoiser and the probe."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from privlora.captions import CaptionShuffler, captions_fixed
from privlora.config import TrainConfig, write_resolved_config
from privlora.data.augment import Augment
from privlora.data.canaries import prepare_canaries
from privlora.data.halves import train_subset
from privlora.data.prepare import prepare_splits, write_run_files
from privlora.denoiser import Denoiser, adapters_disabled
from privlora.errors import PrivloraError
from privlora.models.cache import Cache
from privlora.models.loading import load_base
from privlora.models.lora import (LoraSpec, add_lora, text_encoder_lora_config,
                                  unet_lora_config)
from privlora.objectives import BuildContext, build_objective
from privlora.rundir import RunDir

if TYPE_CHECKING:

    pass
from privlora.train_probes import FixedNoiseProbe, probe_roles
from privlora.train_run import Run
from privlora.train_state import lora_metadata


EVAL_ROLES = ("member_aux", "nonmember_aux", "member_test", "nonmember_test")


def setup(cfg: TrainConfig) -> Run:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    out = Path(cfg.output_dir)
    check_output_dir(cfg, out)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with="tensorboard",
                              cpu=not torch.cuda.is_available(),  # lets torchrun start multi-process CPU (gloo)
                              project_config=ProjectConfiguration(str(out), logging_dir=str(out / "logs")),
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    with accelerator.main_process_first():  # only the main process generates synthetic data and flips canary coins
        splits, skipped = prepare_splits(cfg, out)  # reads and checks every image; writes nothing yet
        canaries = prepare_canaries(cfg, out, set(splits.hashes.values()),
                                    draw=accelerator.is_main_process and not cfg.resume)
    base = load_base(cfg.pretrained_model_name_or_path, config_dir=cfg.config_dir, allow_pickle=cfg.allow_pickle,
                     prediction_type=cfg.prediction_type)
    if accelerator.is_main_process and not cfg.resume:
        write_run_files(out, splits, skipped)
    set_seed(cfg.seed)
    device = accelerator.device
    trainable, param_groups = inject_lora(cfg, base, device)
    if cfg.scale_lr:  # the usual linear rule: lr per sample stays what the preset says
        for group in param_groups:
            group["lr"] *= cfg.train_batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes

    cache = Cache(base, cfg, device)
    augment = Augment.from_config(cfg, accelerator.process_index)
    train_examples = train_subset(splits.train, cfg.train_subset, cfg.split_seed) + canaries
    if not train_examples:
        raise PrivloraError(f"{out}: train_subset {cfg.train_subset} of the {len(splits.train)} training images is "
                            "empty; use fewer shards or more images")
    train_data = cache.role(train_examples, expand_repeats=True, augment=augment)
    roles = {role: cache.role(splits.role(role)) for role in EVAL_ROLES}
    grad_sync = (lambda m: average_gradients(accelerator, m.parameters())) if accelerator.num_processes > 1 else None
    context = BuildContext(base.unet.config.in_channels, grad_sync=grad_sync, num_train_images=len(train_examples),
                           num_processes=accelerator.num_processes, process_index=accelerator.process_index,
                           roles=roles, base=base, train_examples=train_examples)
    objective = build_objective(cfg, latent_channels=context.latent_channels, context=context)
    for module in objective.modules().values():
        module.to(device)
    loader_order = objective.data_order_generator(cfg.seed)
    loader = objective.make_loader(train_data, cfg.train_batch_size, loader_order)

    optimizer = make_optimizer(cfg, param_groups)
    unet = torch.compile(base.unet) if cfg.compile else base.unet  # base.unet stays the plain module
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)  # loader: this process's shard
    steps_per_epoch = math.ceil(len(loader) / cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_steps or steps_per_epoch * (cfg.max_train_epochs or 1)
    if objective.built_not_trained:  # its LoRA is complete: the loop evaluates and saves it, training nothing
        max_steps = 0
    objective.plan(max_steps)
    if accelerator.is_main_process:
        write_resolved_config(cfg, out, objective.metadata())
    # accelerate steps a prepared scheduler once per process per optimizer step
    lr_scheduler = accelerator.prepare(make_lr_scheduler(cfg, optimizer, max_steps, accelerator.num_processes))
    noise = torch.Generator().manual_seed(cfg.seed + accelerator.process_index)
    denoiser = Denoiser(base, device=device, generator=noise, clip_skip=cfg.clip_skip, noise_offset=cfg.noise_offset,
                        min_snr_gamma=cfg.min_snr_gamma, autocast=accelerator.autocast,
                        timestep_range=(cfg.min_timestep, cfg.max_timestep))
    denoiser.unet = unet
    configure_captions(denoiser, cfg, accelerator.process_index)
    probe = FixedNoiseProbe(probe_roles(roles, cfg), cfg.seed + 3)
    with adapters_disabled(base), captions_fixed(denoiser):
        base_maps = probe.maps(denoiser)
    base_losses = {r: m.mean().item() for r, m in base_maps.items()}
    accelerator.init_trackers("privlora", config={k: v for k, v in cfg.flat().items()
                                                  if isinstance(v, (int, float, str, bool))})
    unet.train()
    run = Run(cfg, out, accelerator, base, unet, trainable, optimizer, lr_scheduler, loader, loader_order, noise,
              objective, denoiser, probe, base_maps, base_losses, lora_metadata(cfg, base), max_steps)
    run.augment = augment
    return run


def configure_captions(denoiser: Denoiser, cfg: TrainConfig, rank: int) -> None:
    """kohya's max_token_length and (seeded, per-step) shuffle_caption on the denoiser's text encoding."""
    denoiser.max_token_length = cfg.max_token_length
    if cfg.shuffle_caption:
        denoiser.caption_shuffle = CaptionShuffler(cfg.keep_tokens, cfg.seed + 11 + 10 * rank)


def inject_lora(cfg: TrainConfig, base, device) -> tuple[list, list[dict[str, Any]]]:
    """Frozen base in the compute dtype, LoRA on the UNet (and text encoder) in fp32; returns its parameters."""
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    for m in base.modules:
        m.to(device).requires_grad_(False)
        if weight_dtype != torch.float32:
            m.to(dtype=weight_dtype)
    spec = LoraSpec(cfg.network_dim, cfg.network_alpha, cfg.conv_dim, cfg.conv_alpha, cfg.network_dropout)
    groups: list[dict[str, Any]]
    groups = [{"params": add_lora(base.unet, unet_lora_config(spec, base.unet)), "lr": cfg.unet_lr}]
    if cfg.train_text_encoder:
        for te in base.text_encoders:  # SDXL: both encoders, as kohya's SDXL LoRA
            groups.append({"params": add_lora(te, text_encoder_lora_config(spec)), "lr": cfg.text_encoder_lr})
    for group in groups:
        for p in group["params"]:
            p.data = p.data.float()
    if cfg.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    if cfg.channels_last:
        base.unet.to(memory_format=torch.channels_last)
    return [p for g in groups for p in g["params"]], groups


def average_gradients(accelerator, params) -> None:
    for p in params:
        if p.grad is not None:
            p.grad.copy_(accelerator.reduce(p.grad, reduction="mean"))


def check_output_dir(cfg: TrainConfig, out: Path) -> None:
    final = RunDir(out, cfg.output_name).lora()
    if final.exists() and not (cfg.overwrite or cfg.resume):
        raise PrivloraError(f"{final}: a finished run is already there; "
                            "pass --overwrite or choose another --output_dir")


def make_optimizer(cfg: TrainConfig, params: list[dict]) -> torch.optim.Optimizer:
    kwargs: dict[str, Any] = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    if cfg.optimizer_type == "AdamW8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise PrivloraError("optimizer_type AdamW8bit: bitsandbytes is not installed "
                                "(pip install bitsandbytes; it needs a CUDA GPU) — or use AdamW") from None
        if not torch.cuda.is_available():
            raise PrivloraError("optimizer_type AdamW8bit needs a CUDA GPU; use AdamW on this machine")
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, fused=torch.cuda.is_available(), **kwargs)


def make_lr_scheduler(cfg: TrainConfig, optimizer, max_steps: int, num_processes: int = 1):
    from diffusers.optimization import get_scheduler

    try:
        return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * num_processes,
                             num_training_steps=max_steps * num_processes)
    except ValueError as e:
        raise PrivloraError(f"lr_scheduler {cfg.lr_scheduler!r}: {e}") from None

