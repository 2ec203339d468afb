"""The training loop: one recipe for every method registered in ``privlora.objectives.METHODS``.

``train`` reads top to bottom: the method's prerequisite runs (if any) first; ``setup`` loads and checks
everything, injects LoRA and caches the data; the loop then runs (augmentation → method's gradients → method's
clipping → LoRA step → method's after-step) per batch, evaluates on fixed noise at each epoch end and saves.
The method (``run.objective``) is the only method-specific piece.
"""
from __future__ import annotations

import itertools
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from privlora import checkpoint
from privlora.captions import TextEncoding, captions_fixed
from privlora.config import TrainConfig, ran_with
from privlora.errors import Interrupted, PrivloraError
from privlora.io import write_json
from privlora.objectives import METHODS
from privlora.objectives.base import BEST_SUFFIX
from privlora.progress import report as report_progress
from privlora.rundir import RunDir

if TYPE_CHECKING:

    pass
from privlora.train_probes import add_to_period, evaluate_epoch, period_summary
from privlora.train_run import Progress, Run
from privlora.train_setup import average_gradients, check_output_dir, setup
from privlora.train_state import check_resume, restore, save_lora, save_modules, save_state


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
    if run.max_steps == 0 and not progress.history:  # a LoRA complete when built (built_not_trained): evaluated once
        evaluate_and_log(run, progress, {}, bar)
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



def run_prerequisites(cfg: TrainConfig) -> None:
    """The runs the method needs first, each trained unless finished (its LoRA file is there, trained with exactly
    the settings asked now; other settings are an error rather than a silently stale prerequisite)."""
    prerequisites = METHODS[cfg.method].prerequisites(cfg)
    if prerequisites and cfg.resume:  # a state saved with other settings is refused before they spend time
        check_resume(cfg, checkpoint.resolve(cfg.resume, Path(cfg.output_dir)))
    for pre in prerequisites:
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
