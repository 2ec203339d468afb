"""Saving and resuming a run: LoRA files with their metadata, the method's extra modules, and resumable states
(everything a resumed run needs to continue bit-exactly)."""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from privlora import checkpoint
from privlora.config import TrainConfig
from privlora.denoiser import Denoiser
from privlora.errors import PrivloraError
from privlora.io import save_safetensors
from privlora.models.clip_layout import standard_name
from privlora.models.loading import SDXL, is_sd2
from privlora.models.lora import (save_diffusers, save_kohya)

if TYPE_CHECKING:

    pass
from privlora.train_run import Progress, Run


# Changing these between a run and its resume would silently train something else; so would the method's own
# settings (all but its ``resume_free`` ones).
RESUME_MUST_MATCH = ("method", "network_dim", "network_alpha", "conv_dim", "train_text_encoder", "train_batch_size",
                     "gradient_accumulation_steps", "seed", "pretrained_model_name_or_path", "resolution",
                     "random_flip", "random_crop_scale", "color_jitter",
                     "caption_swap_rate", "caption_word_dropout", "text_noise_scale", "min_timestep", "max_timestep",
                     "train_subset", "split_seed")


def lora_metadata(cfg: TrainConfig, base) -> dict[str, str]:
    """Hyperparameters and the base model's identity — never anything derived from the training data."""
    keys = ("method", "network_dim", "network_alpha", "conv_dim", "conv_alpha", "train_text_encoder", "unet_lr",
            "text_encoder_lr", "optimizer_type", "lr_scheduler", "lr_warmup_steps", "train_batch_size",
            "gradient_accumulation_steps", "max_train_epochs", "max_train_steps", "resolution", "mixed_precision",
            "clip_skip", "noise_offset", "min_snr_gamma", "seed", "max_token_length", "shuffle_caption",
            "keep_tokens", "random_flip", "random_crop_scale", "color_jitter", "network_dropout", "weight_decay",
            "caption_swap_rate", "caption_word_dropout", "text_noise_scale", "min_timestep", "max_timestep")
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
    refuse_other_settings(run.cfg, state["config"], path)
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
    run.objective.load_state_dict(objective_state(state))
    progress = Progress(**{k: v for k, v in state["progress"].items() if k in Progress.__dataclass_fields__})
    checkpoint.set_rng_state(rank_state["rng"])
    run.noise.set_state(rank_state["noise"])
    if "caption_shuffle" in rank_state and run.denoiser.caption_shuffle is not None:
        run.denoiser.caption_shuffle.generator.set_state(rank_state["caption_shuffle"])
    run.epoch_start_order = rank_state["epoch_start_order"]
    # Mid-epoch: replay this epoch's data order (the loop then skips the batches already seen).
    run.loader_order.set_state(rank_state["epoch_start_order"] if progress.batch_in_epoch else rank_state["order"])
    return progress


def refuse_other_settings(cfg: TrainConfig, saved: dict, path: Path) -> None:
    """One line naming the settings a state at ``path`` was saved with (``saved``) that differ now."""
    now = resume_settings(cfg)
    changed = [k for k, v in saved.items() if k in now and now[k] != v]
    if changed:
        raise PrivloraError(f"{path}: saved with different {', '.join(changed)}; resume with the same settings")


def check_resume(cfg: TrainConfig, path: Path) -> None:
    """``refuse_other_settings`` before the run is set up (a method's prerequisite runs are trained before)."""
    state, _ = checkpoint.load_state(path, 0)
    refuse_other_settings(cfg, state["config"], path)


def objective_state(state: dict) -> dict:
    """The method's saved state; a state saved before methods kept their own aux batch counts and best attacker
    accuracy had them beside it (top-level ``aux_served``, ``progress.best_attacker_acc``): they are handed over."""
    old: dict = {"aux_served": state.get("aux_served", {})}
    if "best_attacker_acc" in state.get("progress", {}):
        old["best_test_acc"] = state["progress"]["best_attacker_acc"]
    return {**old, **state["objective"]}


def resume_settings(cfg: TrainConfig) -> dict:
    """What a resumed run must share with its state: the shared keys above and the method's own."""
    s = cfg.method_settings
    return {**{k: getattr(cfg, k) for k in RESUME_MUST_MATCH}, **{k: getattr(s, k) for k in s.resume_keys()}}


def caption_state(denoiser: Denoiser) -> dict:
    shuffle = denoiser.caption_shuffle
    return {} if shuffle is None else {"caption_shuffle": shuffle.generator.get_state()}
