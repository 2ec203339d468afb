"""The training loop: one recipe for every method registered in ``privlora.objectives.METHODS``.

``train`` reads top to bottom: the method's prerequisite runs (if any) first; ``setup`` loads and checks
everything, injects LoRA and caches the data; the loop then runs (augmentation → method's gradients → method's
clipping → LoRA step → method's after-step) per batch, evaluates on fixed noise at each epoch end and saves.
The method (``run.objective``) is the only method-specific piece.
"""
from __future__ import annotations

import itertools
import json
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from privlora import checkpoint
from privlora.captions import CaptionShuffler, TextEncoding, captions_fixed
from privlora.config import TrainConfig, ran_with, write_resolved_config
from privlora.data.augment import Augment
from privlora.data.cache import RoleData
from privlora.data.canaries import prepare_canaries
from privlora.data.halves import train_subset
from privlora.data.prepare import prepare_splits, write_run_files
from privlora.denoiser import Denoiser, adapters_disabled
from privlora.errors import Interrupted, PrivloraError
from privlora.io import save_safetensors, write_json
from privlora.models.cache import Cache
from privlora.models.clip_layout import standard_name
from privlora.models.loading import SDXL, is_sd2, load_base
from privlora.models.lora import (LoraSpec, add_lora, save_diffusers, save_kohya, text_encoder_lora_config,
                                  unet_lora_config)
from privlora.objectives import METHODS, BuildContext, build_objective
from privlora.objectives.base import BEST_SUFFIX, Objective
from privlora.progress import report as report_progress
from privlora.rundir import RunDir

if TYPE_CHECKING:
    from accelerate import Accelerator

    from privlora.models.loading import BaseModel

EVAL_ROLES = ("member_aux", "nonmember_aux", "member_test", "nonmember_test")
# Changing these between a run and its resume would silently train something else; so would the method's own
# settings (all but its ``resume_free`` ones).
RESUME_MUST_MATCH = ("method", "network_dim", "network_alpha", "conv_dim", "train_text_encoder", "train_batch_size",
                     "gradient_accumulation_steps", "seed", "pretrained_model_name_or_path", "resolution",
                     "random_flip", "random_crop_scale", "color_jitter", "train_subset", "split_seed")


@dataclass
class Progress:
    step: int = 0
    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # batches consumed in the epoch under way
    collapsed_epochs: int = 0
    history: list = field(default_factory=list)
    hessian: list = field(default_factory=list)  # {"step", "hessian_top_eig"} every hessian_every_n_steps
    period: dict = field(default_factory=dict)  # per-step log key -> [sum, count, max] since the last evaluation


def train(cfg: TrainConfig) -> Path:
    check_output_dir(cfg, Path(cfg.output_dir))  # before any prerequisite run spends time
    run_prerequisites(cfg)
    run = setup(cfg)
    progress = restore(run, checkpoint.resolve(cfg.resume, run.out)) if cfg.resume else Progress()
    interrupt = InterruptFlag()
    bar = tqdm(total=run.max_steps, initial=progress.step, desc=cfg.method, dynamic_ncols=True,
               disable=not run.accelerator.is_main_process)
    started = time.time()
    with interrupt:
        while progress.step < run.max_steps:
            if progress.batch_in_epoch == 0:
                run.epoch_start_order = run.loader_order.get_state()
            logs: dict = {}
            for batch in itertools.islice(run.loader, progress.batch_in_epoch, None):
                progress.batch_in_epoch += 1
                batch = run.augment(batch, progress.epoch, progress.batch_in_epoch)  # seeded by position: resumable
                logs = train_step(run, batch, progress.step) or logs
                if not run.accelerator.sync_gradients:
                    continue
                progress.step += 1
                after_step(run, progress, logs, bar)
                report_progress(progress.step, run.max_steps)  # a bench parent's live bar (no-op otherwise)
                if interrupt.requested:
                    path = save_state(run, progress)
                    raise Interrupted(f"interrupted at step {progress.step}; resume with --resume {path}")
                if progress.step >= run.max_steps:
                    break
            end_epoch(run, progress, logs, bar)
    bar.close()
    run.metadata.update(ss_steps=str(progress.step), ss_epoch=str(progress.epoch),
                        privlora_train_seconds=f"{time.time() - started:.1f}")
    final = save_lora(run, cfg.output_name)
    if cfg.save_state:
        save_state(run, progress)
    run.accelerator.end_training()
    return final


def train_step(run: Run, batch: dict, step: int) -> dict | None:
    """One forward/backward of the objective; the LoRA step and the method's after-step when gradients sync."""
    acc = run.accelerator
    with acc.accumulate(run.unet):
        result = run.objective.gradients(batch, run.denoiser, run.trainable, acc.backward)
        if not torch.isfinite(result.loss):
            raise PrivloraError(f"{run.out}: non-finite loss ({result.loss.item()}) at step {step + 1}; training "
                                "stopped and the last saved checkpoint is intact (try a lower learning rate)")
        if acc.sync_gradients and acc.num_processes > 1 and run.cfg.train_text_encoder:
            # DDP wraps the UNet only; the text encoders' LoRA gradients are averaged here.
            for te in run.base.text_encoders:
                average_gradients(acc, te.parameters())
        if acc.sync_gradients:
            grad_norm = run.objective.clip(run.trainable, run.cfg.max_grad_norm, acc.clip_grad_norm_)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    if not acc.sync_gradients:
        return None
    logs = {**result.logs, **run.objective.after_lora_step(run.denoiser), "lr": run.lr_scheduler.get_last_lr()[0]}
    return logs if grad_norm is None else {**logs, "grad_norm": grad_norm}


def after_step(run: Run, progress: Progress, logs: dict, bar) -> None:
    cfg = run.cfg
    add_to_period(progress.period, logs)
    if cfg.hessian_every_n_steps and progress.step % cfg.hessian_every_n_steps == 0:
        logs = {**logs, "hessian_top_eig": lora_hessian_top_eig(run)}
        progress.hessian.append({"step": progress.step, "hessian_top_eig": logs["hessian_top_eig"]})
    if progress.step % cfg.log_every_n_steps == 0:
        run.accelerator.log({f"train/{k}": v for k, v in logs.items()}, step=progress.step)
    bar.update(1)
    bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k in run.objective.log_keys})
    if progress.step < run.max_steps and (
            (cfg.save_every_n_steps and progress.step % cfg.save_every_n_steps == 0)
            or progress.step in fraction_steps(cfg.save_at_fractions, run.max_steps)):
        save_point(run, progress, run.dir.checkpoint_name(step=progress.step))


def end_epoch(run: Run, progress: Progress, logs: dict, bar) -> None:
    """Fixed-noise evaluation, the collapse guard, history and per-epoch saves."""
    cfg, acc = run.cfg, run.accelerator
    progress.epoch += 1
    progress.batch_in_epoch = 0
    method_logs = run.objective.epoch_logs()
    if method_logs:
        acc.log({f"epoch/{k}": v for k, v in method_logs.items()}, step=progress.step)
        bar.write(f"epoch {progress.epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in method_logs.items()))
        logs = {**logs, **method_logs}
    if progress.epoch % cfg.eval_every_n_epochs == 0 or progress.step >= run.max_steps:
        evaluate_and_log(run, progress, logs, bar)
    if cfg.sample_prompts and cfg.sample_every_n_epochs and progress.epoch % cfg.sample_every_n_epochs == 0 \
            and acc.is_main_process:
        from privlora.sample import sample_during_training

        sample_during_training(run.base, cfg.sample_prompts, progress.epoch, run.out,
                               acc.get_tracker("tensorboard", unwrap=True), sampler=cfg.sample_sampler,
                               steps=cfg.sample_steps, seed=cfg.seed,
                               encoding=TextEncoding(cfg.clip_skip, cfg.max_token_length))
    if progress.step >= run.max_steps:  # the final save follows
        return
    lora_due = due(progress.epoch, cfg.save_every_n_epochs)
    state_due = due(progress.epoch, cfg.state_every_n_epochs)
    if lora_due:
        run.metadata.update(ss_steps=str(progress.step), ss_epoch=str(progress.epoch))
        save_lora(run, run.dir.checkpoint_name(epoch=progress.epoch))
    if state_due or (lora_due and cfg.save_state):
        save_state(run, progress)


def fraction_steps(fractions: list[float] | None, max_steps: int) -> set[int]:
    """The steps at these fractions of the run (each at least 1): where ``save_at_fractions`` saves."""
    return {max(1, round(f * max_steps)) for f in fractions or ()}


def due(epoch: int, every: int | None) -> bool:
    return every is not None and every > 0 and epoch % every == 0


def save_point(run: Run, progress: Progress, name: str) -> None:
    """An intermediate LoRA file (its metadata names its step and epoch, as kohya's do), plus a resumable state
    when --save_state is on."""
    run.metadata.update(ss_steps=str(progress.step), ss_epoch=str(progress.epoch))
    save_lora(run, name)
    if run.cfg.save_state:
        save_state(run, progress)


def evaluate_and_log(run: Run, progress: Progress, logs: dict, bar) -> None:
    cfg, acc = run.cfg, run.accelerator
    run.unet.eval()
    with captions_fixed(run.denoiser):
        record = evaluate_epoch(progress.epoch, progress.step, run.probe, run.denoiser, run.objective, run.base_maps,
                                logs)
        record.update(run.objective.evaluate_own(run.denoiser, cfg.seed + 7 + progress.step))
    run.unet.train()
    record.update(period_summary(progress.period))
    progress.period = {}
    best = run.objective.best_snapshot(record)
    if best is not None:
        save_modules(run, cfg.output_name, suffix=BEST_SUFFIX, extra=best)
    progress.history.append(record)
    acc.log({f"epoch/{k}": v for k, v in record.items() if k not in ("epoch", "step")}, step=progress.step)
    worse = record["member_test_loss"] > run.base_losses["member_test"]
    progress.collapsed_epochs = progress.collapsed_epochs + 1 if worse else 0
    if progress.collapsed_epochs == cfg.collapse_patience:
        bar.write(f"warning: member_test loss ({record['member_test_loss']:.4f}) has been above the base model's "
                  f"({run.base_losses['member_test']:.4f}) for {progress.collapsed_epochs} evaluations: "
                  "utility collapse")
    if acc.is_main_process:
        write_json(run.dir.history, {"base": run.base_losses, "epochs": progress.history,
                                              **({"hessian": progress.hessian} if progress.hessian else {})})


# --- setup ---------------------------------------------------------------------------------------------------

@dataclass
class Run:
    cfg: TrainConfig
    out: Path
    accelerator: Accelerator
    base: BaseModel
    unet: torch.nn.Module  # the accelerate-wrapped UNet
    trainable: list
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any  # accelerate's AcceleratedScheduler around a torch LRScheduler
    loader: DataLoader
    loader_order: torch.Generator  # draws each epoch's data order
    noise: torch.Generator  # noise and timesteps of the training steps
    objective: Objective
    denoiser: Denoiser
    probe: FixedNoiseProbe
    base_maps: dict  # fixed-noise loss maps of the base model, per role
    base_losses: dict
    metadata: dict
    max_steps: int
    epoch_start_order: torch.Tensor | None = None
    augment: Augment = field(default_factory=lambda: Augment(0))  # applied to every training batch

    @property
    def dir(self) -> RunDir:
        return RunDir(self.out, self.cfg.output_name)


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
    objective.plan(max_steps)
    if accelerator.is_main_process:
        write_resolved_config(cfg, out, objective.metadata())
    # accelerate steps a prepared scheduler once per process per optimizer step
    lr_scheduler = accelerator.prepare(make_lr_scheduler(cfg, optimizer, max_steps, accelerator.num_processes))
    noise = torch.Generator().manual_seed(cfg.seed + accelerator.process_index)
    denoiser = Denoiser(base, device=device, generator=noise, clip_skip=cfg.clip_skip, noise_offset=cfg.noise_offset,
                        min_snr_gamma=cfg.min_snr_gamma, autocast=accelerator.autocast)
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


def run_prerequisites(cfg: TrainConfig) -> None:
    """The runs the method needs first, each trained unless finished (its LoRA file is there, trained with exactly
    the settings asked now; other settings are an error rather than a silently stale prerequisite)."""
    for pre in METHODS[cfg.method].prerequisites(cfg):
        final = RunDir(Path(pre.output_dir), pre.output_name).lora()
        if not final.exists():
            print(f"{cfg.method}: training the prerequisite run {pre.output_dir}")
            try:
                train(pre)
            except Interrupted:  # its own "--resume <its state>" would mislead: this run has another command
                raise Interrupted(f"interrupted while training the prerequisite run {pre.output_dir}; run the same "
                                  "command again (finished prerequisites are reused, this one starts over)") from None
        elif not ran_with(pre, pre.output_dir):
            raise PrivloraError(f"{final}: trained with other settings than this run needs now; "
                                f"delete {pre.output_dir} to train it again")


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


# --- evaluation ------------------------------------------------------------------------------------------------

def lora_hessian_top_eig(run: Run) -> float:
    """Top Hessian eigenvalue of the objective's LoRA loss w.r.t. the LoRA weights, on a fixed batch (the first
    training examples) and fixed noise, timesteps and dropout masks, so successive values are comparable.
    Every generator it touches is restored afterwards: the run continues exactly as without it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from privlora.hessian import top_eigenvalue

    data = run.loader.dataset
    n = min(run.cfg.train_batch_size, len(data))  # type: ignore[arg-type]  # map-style, sized
    batch = torch.utils.data.default_collate([data[i] for i in range(n)])
    gens = [run.denoiser.generator, *run.objective.generators()]
    saved = [g.get_state() for g in gens]
    fixed = torch.Generator().manual_seed(run.cfg.seed + 8)

    def loss() -> torch.Tensor:
        for g in gens:
            g.set_state(fixed.get_state())
        return run.objective.lora_loss(batch, run.denoiser).loss

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        # the math attention kernel: the fused ones have no double backward
        # fork: LoRA dropout's RNG
        with torch.random.fork_rng(devices=devices), sdpa_kernel(SDPBackend.MATH), captions_fixed(run.denoiser):
            torch.manual_seed(run.cfg.seed + 10)
            return top_eigenvalue(loss, run.trainable, run.cfg.hessian_iters,
                                  torch.Generator().manual_seed(run.cfg.seed + 9))
    finally:
        for g, state in zip(gens, saved):
            g.set_state(state)


PERIOD_SKIP = ("lr",)  # schedules, not measurements
PERIOD_MAXIMA = ("grad_norm",)  # spikes matter here, so history.json also gets <key>_max


def add_to_period(period: dict, logs: dict) -> None:
    """Add one step's numeric logs to the running [sum, count, max] of the current evaluation period."""
    for key, value in logs.items():
        if key in PERIOD_SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        total, count, high = period.get(key, (0.0, 0, float(value)))
        period[key] = [total + float(value), count + 1, max(high, float(value))]


def period_summary(period: dict) -> dict[str, float]:
    """``<key>_mean`` of every per-step log over the period (and ``<key>_max`` for PERIOD_MAXIMA)."""
    out = {f"{key}_mean": total / count for key, (total, count, _) in period.items() if count}
    out.update({f"{key}_max": period[key][2] for key in PERIOD_MAXIMA if key in period})
    return out


def probe_roles(roles: dict[str, RoleData], cfg: TrainConfig) -> dict[str, RoleData]:
    """The fixed-noise probe's samples: a random subset of eval_samples per role, drawn with the run's seed."""
    gen = torch.Generator().manual_seed(cfg.seed + 4)
    return {r: d.subset(min(cfg.eval_samples, len(d)), gen) for r, d in roles.items()}


class FixedNoiseProbe:
    """Loss maps of fixed samples under fixed noise and timesteps: comparable from one epoch to the next.

    The samples are a seeded random subset of each role (``probe_roles``), not the first ones in file order.
    """

    def __init__(self, roles: dict[str, RoleData], seed: int, num_train_timesteps: int = 1000):
        self.roles, self.seed = roles, seed
        gen = torch.Generator().manual_seed(seed)
        self.noise: dict[str, torch.Tensor | None] = {}
        self.timesteps: dict[str, torch.Tensor] = {}
        for role, data in roles.items():
            first = data[0]
            self.timesteps[role] = torch.randint(0, num_train_timesteps, (len(data),), generator=gen)
            self.noise[role] = (torch.randn((len(data), *first["latents"].shape), generator=gen)
                                if "latents" in first else None)

    @torch.no_grad()
    def maps(self, denoiser: Denoiser, batch_size: int = 64) -> dict[str, torch.Tensor]:
        out = {}
        for role, data in self.roles.items():
            chunks = []
            for s in range(0, len(data), batch_size):
                idx = list(range(s, min(s + batch_size, len(data))))
                batch = torch.utils.data.default_collate([data[i] for i in idx])
                role_noise = self.noise[role]
                noise = None if role_noise is None else role_noise[idx]
                g = torch.Generator().manual_seed(self.seed + s)
                chunks.append(denoiser.loss_map(batch, noise=noise, timesteps=self.timesteps[role][idx],
                                                generator=g)[0])
            out[role] = torch.cat(chunks).float()
        return out


def evaluate_epoch(epoch: int, step: int, probe: FixedNoiseProbe, denoiser: Denoiser, objective,
                   base_maps: dict[str, torch.Tensor], last_logs: dict) -> dict:
    maps = probe.maps(denoiser)
    record: dict[str, Any] = {"epoch": epoch, "step": step}
    record.update({k: v for k, v in last_logs.items() if k != "lr"})
    record.update({f"{r}_loss": m.mean().item() for r, m in maps.items()})
    record["member_gap"] = record["nonmember_test_loss"] - record["member_test_loss"]
    record.update(objective.evaluate(maps, base_maps, probe.timesteps))
    return record


# --- saving and resuming ---------------------------------------------------------------------------------------

def lora_metadata(cfg: TrainConfig, base) -> dict[str, str]:
    """Hyperparameters and the base model's identity — never anything derived from the training data."""
    keys = ("method", "network_dim", "network_alpha", "conv_dim", "conv_alpha", "train_text_encoder", "unet_lr",
            "text_encoder_lr", "optimizer_type", "lr_scheduler", "lr_warmup_steps", "train_batch_size",
            "gradient_accumulation_steps", "max_train_epochs", "max_train_steps", "resolution", "mixed_precision",
            "clip_skip", "noise_offset", "min_snr_gamma", "seed", "max_token_length", "shuffle_caption",
            "keep_tokens", "random_flip", "random_crop_scale", "color_jitter", "network_dropout", "weight_decay")
    hyperparameters = {**{k: getattr(cfg, k) for k in keys}, **cfg.method_settings.values()}
    sdxl = base.family == SDXL
    v2 = not sdxl and is_sd2(base.unet.config)
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.network_dim),
        "ss_network_alpha": str(cfg.network_alpha),
        # kohya's model-version names (SDXL base: library/sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0)
        "ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v2" if v2 else "sd_v1",
        "ss_v2": str(v2),
        "ss_v_parameterization": str(base.prediction_type == "v_prediction"),
        "ss_sd_model_name": Path(str(base.name)).name,
        "sshs_model_hash": base.sha256,
        "ss_training_started_at": str(int(time.time())),
        "privlora_method": cfg.method,
        "privlora_prediction_type": base.prediction_type,
        "privlora_hyperparameters": json.dumps(hyperparameters),
    }


def save_lora(run: Run, name: str) -> Path:
    cfg, acc, base = run.cfg, run.accelerator, run.base
    path = run.dir.path / f"{name}.safetensors"  # name: one of run.dir's checkpoint names
    acc.wait_for_everyone()
    if acc.is_main_process:
        unet = acc.unwrap_model(run.unet)
        te = base.text_encoder if cfg.train_text_encoder else None
        te2 = base.text_encoder_2 if cfg.train_text_encoder else None
        metadata = {**run.metadata, **run.objective.metadata()}
        (save_kohya if cfg.save_format == "kohya" else save_diffusers)(path, unet, te, metadata, text_encoder_2=te2)
    save_modules(run, name)
    return path


def save_modules(run: Run, name: str, suffix: str = "", extra: dict[str, str] | None = None) -> None:
    """The objective's trained modules as ``<name>.<module><suffix>.safetensors`` (main process)."""
    if not run.accelerator.is_main_process:
        return
    for mod_name, module in run.objective.modules().items():
        meta = {"privlora_module": mod_name, **run.objective.module_metadata(), **(extra or {})}
        save_safetensors(run.dir.module(name, mod_name, suffix), module.state_dict(), metadata=meta)


def lora_parameters(run: Run) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters by a name that does not depend on the transformers version (standard CLIP path)."""
    names = {}
    models = (("unet", run.accelerator.unwrap_model(run.unet)), ("text_encoder", run.base.text_encoder),
              ("text_encoder_2", run.base.text_encoder_2))
    for prefix, model in models:
        if model is None:
            continue
        for n, p in model.named_parameters():
            if p.requires_grad:
                names[state_name(f"{prefix}.{n}")] = p
    return names


def state_name(name: str) -> str:
    """``text_encoder.encoder…`` (transformers >= 5.6) and ``text_encoder.text_model.encoder…`` are one name."""
    prefix, rest = name.split(".", 1)
    return f"{prefix}.{standard_name(rest)}" if prefix in ("text_encoder", "text_encoder_2") else name


def lora_state(run: Run) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in lora_parameters(run).items()}


def save_state(run: Run, progress: Progress) -> Path:
    payload = {
        "lora": lora_state(run), "optimizer": run.optimizer.state_dict(), "lr_scheduler": run.lr_scheduler.state_dict(),
        "objective": run.objective.state_dict(), "progress": asdict(progress),
        "config": resume_settings(run.cfg),
    }
    rank_payload = {"rng": checkpoint.rng_state(), "noise": run.noise.get_state(), **caption_state(run.denoiser),
                    "order": run.loader_order.get_state(), "epoch_start_order": run.epoch_start_order}
    return checkpoint.save_state(run.out, progress.step, payload, rank_payload, run.accelerator)


def restore(run: Run, path: Path) -> Progress:
    state, rank_state = checkpoint.load_state(path, run.accelerator.process_index)
    now = resume_settings(run.cfg)
    changed = [k for k, v in state["config"].items() if k in now and now[k] != v]
    if changed:
        raise PrivloraError(f"{path}: saved with different {', '.join(changed)}; resume with the same settings")
    params = lora_parameters(run)
    saved = {state_name(n): v for n, v in state["lora"].items()}
    if set(params) != set(saved):
        raise PrivloraError(f"{path}: its LoRA layers do not match this model and config")
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)
    run.optimizer.load_state_dict(state["optimizer"])
    run.lr_scheduler.load_state_dict(state["lr_scheduler"])
    # states saved before the method kept its own batch counts had them beside it
    run.objective.load_state_dict({"aux_served": state.get("aux_served", {}), **state["objective"]})
    progress = Progress(**{k: v for k, v in state["progress"].items() if k in Progress.__dataclass_fields__})
    checkpoint.set_rng_state(rank_state["rng"])
    run.noise.set_state(rank_state["noise"])
    if "caption_shuffle" in rank_state and run.denoiser.caption_shuffle is not None:
        run.denoiser.caption_shuffle.generator.set_state(rank_state["caption_shuffle"])
    run.epoch_start_order = rank_state["epoch_start_order"]
    # Mid-epoch: replay this epoch's data order (the loop then skips the batches already seen).
    run.loader_order.set_state(rank_state["epoch_start_order"] if progress.batch_in_epoch else rank_state["order"])
    return progress


def resume_settings(cfg: TrainConfig) -> dict:
    """What a resumed run must share with its state: the shared keys above and the method's own."""
    s = cfg.method_settings
    return {**{k: getattr(cfg, k) for k in RESUME_MUST_MATCH}, **{k: getattr(s, k) for k in s.resume_keys()}}


def caption_state(denoiser: Denoiser) -> dict:
    shuffle = denoiser.caption_shuffle
    return {} if shuffle is None else {"caption_shuffle": shuffle.generator.get_state()}


class InterruptFlag:
    """First Ctrl-C: finish the current step, save a resumable state, exit. Second Ctrl-C: stop at once."""

    def __init__(self):
        self.requested = False

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: saving a resumable state after this step (press again to abort without saving)")

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
