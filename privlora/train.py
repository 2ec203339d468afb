"""The training loop: one recipe for every objective (plain LoRA, MP-LoRA, SMP-LoRA).

Read ``train`` top to bottom: load and validate everything, inject LoRA, cache data, then
epochs × batches of (objective loss → backward → LoRA step → objective's after-step), with
per-epoch fixed-noise evaluation and saving. The objective is the only method-specific piece.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from privlora.config import TrainConfig, to_dict
from privlora.data.cache import Cache, RoleData
from privlora.data.prepare import prepare_splits, write_run_files
from privlora.denoiser import Denoiser, adapters_disabled
from privlora.errors import PrivloraError
from privlora.io import save_safetensors, write_json
from privlora.models.loading import load_base
from privlora.models.lora import LoraSpec, add_lora, save_diffusers, save_kohya, text_encoder_lora_config, unet_lora_config
from privlora.objectives import build_objective
from privlora.objectives.base import infinite

EVAL_ROLES = ("member_aux", "nonmember_aux", "member_test", "nonmember_test")


def train(cfg: TrainConfig) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    out = Path(cfg.output_dir)
    check_output_dir(cfg, out)
    splits, skipped = prepare_splits(cfg, out)  # reads and checks every image; writes nothing yet
    base = load_base(cfg.pretrained_model_name_or_path, config_dir=cfg.config_dir, allow_pickle=cfg.allow_pickle,
                     prediction_type=cfg.prediction_type)
    write_run_files(out, splits, skipped)

    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with="tensorboard",
                              project_config=ProjectConfiguration(str(out), logging_dir=str(out / "logs")),
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    set_seed(cfg.seed)
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    for m in (base.unet, base.vae, base.text_encoder):
        m.to(device).requires_grad_(False)
        if weight_dtype != torch.float32:
            m.to(dtype=weight_dtype)

    spec = LoraSpec(cfg.network_dim, cfg.network_alpha, cfg.conv_dim, cfg.conv_alpha, cfg.network_dropout)
    params = [{"params": add_lora(base.unet, unet_lora_config(spec, base.unet)), "lr": cfg.unet_lr}]
    if cfg.train_text_encoder:
        params.append({"params": add_lora(base.text_encoder, text_encoder_lora_config(spec)), "lr": cfg.text_encoder_lr})
    for group in params:  # LoRA weights train in fp32 even when the frozen base runs in half precision
        for p in group["params"]:
            p.data = p.data.float()
    if cfg.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()

    cache = Cache(base, cfg, device)
    train_data = cache.role(splits.train, expand_repeats=True)
    roles = {role: cache.role(getattr(splits, role)) for role in EVAL_ROLES}
    gen = torch.Generator().manual_seed(cfg.seed + accelerator.process_index)
    loader = DataLoader(train_data, batch_size=cfg.train_batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    aux_bs = cfg.attacker_batch_size or cfg.train_batch_size
    objective = build_objective(
        cfg, latent_channels=base.unet.config.in_channels,
        member_aux=infinite(aux_loader(roles["member_aux"], aux_bs, cfg.seed + 1)),
        nonmember_aux=infinite(aux_loader(roles["nonmember_aux"], aux_bs, cfg.seed + 2)))
    for module in objective.modules().values():
        module.to(device)

    optimizer = make_optimizer(cfg, params)
    steps_per_epoch = math.ceil(len(loader) / cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_steps or steps_per_epoch * cfg.max_train_epochs
    epochs = math.ceil(max_steps / steps_per_epoch)
    lr_scheduler = make_lr_scheduler(cfg, optimizer, max_steps)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(base.unet, optimizer, loader, lr_scheduler)
    denoiser = Denoiser(base, device=device, generator=gen, clip_skip=cfg.clip_skip, noise_offset=cfg.noise_offset,
                        min_snr_gamma=cfg.min_snr_gamma, autocast=accelerator.autocast)
    denoiser.unet = unet
    probe = FixedNoiseProbe({r: d.subset(min(cfg.eval_samples, len(d))) for r, d in roles.items()}, cfg.seed + 3)
    with adapters_disabled(base):
        base_losses = {r: m.mean().item() for r, m in probe.maps(denoiser).items()}

    trainable = [p for g in params for p in g["params"]]
    metadata = lora_metadata(cfg, base)
    history: list[dict] = []
    accelerator.init_trackers("privlora", config={k: v for k, v in to_dict(cfg).items()
                                                  if isinstance(v, (int, float, str, bool))})
    bar = tqdm(total=max_steps, desc=cfg.method, disable=not accelerator.is_main_process, dynamic_ncols=True)
    step, started, collapsed_epochs = 0, time.time(), 0
    for epoch in range(1, epochs + 1):
        unet.train()
        for batch in loader:
            with accelerator.accumulate(unet):
                result = objective.lora_loss(batch, denoiser)
                if not torch.isfinite(result.loss):
                    raise PrivloraError(f"{out}: non-finite loss ({result.loss.item()}) at step {step + 1}; "
                                        "stopped, the last saved checkpoint is intact")
                accelerator.backward(result.loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            logs = {**result.logs, **objective.after_lora_step(denoiser), "lr": lr_scheduler.get_last_lr()[0]}
            step += 1
            if step % cfg.log_every_n_steps == 0:
                accelerator.log({f"train/{k}": v for k, v in logs.items()}, step=step)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k in ("L_ada", "L_adv", "attacker_loss")})
            if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0:
                save_lora(accelerator, cfg, out, f"{cfg.output_name}-step{step:06d}", base, objective, metadata)
            if step >= max_steps:
                break

        unet.eval()
        record = evaluate_epoch(epoch, step, probe, denoiser, objective, base_losses, logs)
        history.append(record)
        accelerator.log({f"epoch/{k}": v for k, v in record.items() if k not in ("epoch", "step")}, step=step)
        collapsed_epochs = collapsed_epochs + 1 if record["member_test_loss"] > base_losses["member_test"] else 0
        if collapsed_epochs == cfg.collapse_patience:
            bar.write(f"warning: member_test loss ({record['member_test_loss']:.4f}) has been above the base model's "
                      f"({base_losses['member_test']:.4f}) for {collapsed_epochs} epochs: utility collapse")
        if accelerator.is_main_process:
            write_json(out / "history.json", {"base": base_losses, "epochs": history})
        if cfg.save_every_n_epochs and epoch % cfg.save_every_n_epochs == 0 and step < max_steps:
            save_lora(accelerator, cfg, out, f"{cfg.output_name}-e{epoch:04d}", base, objective, metadata)
        if step >= max_steps:
            break
    bar.close()
    metadata["ss_steps"], metadata["ss_epoch"] = str(step), str(epoch)
    metadata["privlora_train_seconds"] = f"{time.time() - started:.1f}"
    final = save_lora(accelerator, cfg, out, cfg.output_name, base, objective, metadata)
    accelerator.end_training()
    return final


def check_output_dir(cfg: TrainConfig, out: Path) -> None:
    final = out / f"{cfg.output_name}.safetensors"
    if final.exists() and not (cfg.overwrite or cfg.resume):
        raise PrivloraError(f"{final}: a finished run is already there; pass --overwrite or choose another --output_dir")


def aux_loader(data: RoleData, batch_size: int, seed: int) -> DataLoader:
    return DataLoader(data, batch_size=min(batch_size, len(data)), shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


def make_optimizer(cfg: TrainConfig, params: list[dict]) -> torch.optim.Optimizer:
    kwargs = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    if cfg.optimizer_type == "AdamW8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise PrivloraError("optimizer_type AdamW8bit: bitsandbytes is not installed "
                                "(pip install bitsandbytes; it needs a CUDA GPU) — or use AdamW") from None
        if not torch.cuda.is_available():
            raise PrivloraError("optimizer_type AdamW8bit needs a CUDA GPU; use AdamW on this machine")
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def make_lr_scheduler(cfg: TrainConfig, optimizer, max_steps: int):
    from diffusers.optimization import get_scheduler

    try:
        return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                             num_training_steps=max_steps)
    except ValueError as e:
        raise PrivloraError(f"lr_scheduler {cfg.lr_scheduler!r}: {e}") from None


class FixedNoiseProbe:
    """Loss maps of fixed samples under fixed noise and timesteps: comparable from one epoch to the next."""

    def __init__(self, roles: dict[str, RoleData], seed: int, num_train_timesteps: int = 1000):
        self.roles = roles
        gen = torch.Generator().manual_seed(seed)
        self.noise, self.timesteps = {}, {}
        for role, data in roles.items():
            first = data[0]
            shape = first["latents"].shape if "latents" in first else None
            self.timesteps[role] = torch.randint(0, num_train_timesteps, (len(data),), generator=gen)
            self.noise[role] = None if shape is None else torch.randn((len(data), *shape), generator=gen)
        self.seed = seed

    @torch.no_grad()
    def maps(self, denoiser: Denoiser, batch_size: int = 64) -> dict[str, torch.Tensor]:
        out = {}
        for role, data in self.roles.items():
            chunks = []
            for s in range(0, len(data), batch_size):
                idx = list(range(s, min(s + batch_size, len(data))))
                batch = torch.utils.data.default_collate([data[i] for i in idx])
                noise = None if self.noise[role] is None else self.noise[role][idx]
                g = torch.Generator().manual_seed(self.seed + s)
                chunks.append(denoiser.loss_map(batch, noise=noise, timesteps=self.timesteps[role][idx], generator=g)[0])
            out[role] = torch.cat(chunks).float()
        return out


def evaluate_epoch(epoch: int, step: int, probe: FixedNoiseProbe, denoiser: Denoiser, objective,
                   base_losses: dict[str, float], last_logs: dict) -> dict:
    maps = probe.maps(denoiser)
    record = {"epoch": epoch, "step": step}
    record.update({k: v for k, v in last_logs.items() if k != "lr"})
    record.update({f"{r}_loss": m.mean().item() for r, m in maps.items()})
    record["member_gap"] = record["nonmember_test_loss"] - record["member_test_loss"]
    record.update(objective.evaluate(maps))
    return record


def lora_metadata(cfg: TrainConfig, base) -> dict[str, str]:
    """Hyperparameters and the base model's identity — never anything derived from the training data."""
    keys = ("method", "network_dim", "network_alpha", "conv_dim", "conv_alpha", "train_text_encoder", "unet_lr",
            "text_encoder_lr", "optimizer_type", "lr_scheduler", "lr_warmup_steps", "train_batch_size",
            "gradient_accumulation_steps", "max_train_epochs", "max_train_steps", "resolution", "mixed_precision",
            "clip_skip", "noise_offset", "min_snr_gamma", "seed", "privacy_alpha", "privacy_beta", "k_steps",
            "adv_step", "attacker_lr", "attacker_pool")
    hp = {k: getattr(cfg, k) for k in keys}
    v2 = base.unet.config.cross_attention_dim == 1024
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.network_dim),
        "ss_network_alpha": str(cfg.network_alpha),
        "ss_base_model_version": "sd_v2" if v2 else "sd_v1",
        "ss_v2": str(v2),
        "ss_sd_model_name": Path(str(base.name)).name,
        "sshs_model_hash": base.sha256,
        "ss_training_started_at": str(int(time.time())),
        "privlora_method": cfg.method,
        "privlora_prediction_type": base.prediction_type,
        "privlora_hyperparameters": json.dumps(hp),
    }


def save_lora(accelerator, cfg: TrainConfig, out: Path, name: str, base, objective, metadata: dict) -> Path:
    path = out / f"{name}.safetensors"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unet = accelerator.unwrap_model(base.unet)
        te = base.text_encoder if cfg.train_text_encoder else None
        (save_kohya if cfg.save_format == "kohya" else save_diffusers)(path, unet, te, metadata)
        for mod_name, module in objective.modules().items():
            meta = {"privlora_module": mod_name, "channels": str(base.unet.config.in_channels),
                    "pool": str(cfg.attacker_pool), "hidden": json.dumps(cfg.attacker_hidden)}
            save_safetensors(out / f"{name}.{mod_name}.safetensors", module.state_dict(), metadata=meta)
    return path
