"""Distilled LoRA: a student taught, image by image, by a teacher that never saw the image (after Fu et al. 2024,
"Dual-Model Defense in Machine Learning as a Service through disjoint data splitting", arXiv 2410.16657).

The train role is split into two seeded, disjoint halves (``privlora.data.halves``); a plain-LoRA teacher is trained
on each (the method's prerequisite runs, in ``<output_dir>/teachers/half_a|half_b``). The student — the only LoRA
published — trains on every image with the target ``w·(true target) + (1 − w)·(prediction of the other half's
teacher)`` on the same noisy latents, so no image's own noise ever reaches the published weights unless w > 0.

The teachers are run by copying their LoRA weights into the student's LoRA parameters for a no-grad forward and
copying the student's back: teachers share the student's LoRA layout, so this costs a few LoRA-sized copies per
step and no extra UNet in memory (at SD1.5 size a second and third UNet would add ~3.4 GB in fp16).
Each image goes through its one teacher only, so a student step is about two UNet forwards and one backward.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from collections.abc import Callable, Iterator

import torch

from privlora.data.halves import HALVES, half_assignment
from privlora.diffusion import predict, training_target
from privlora.errors import PrivloraError
from privlora.models.lora import read_kohya_weights
from privlora.objectives.base import BuildContext, DenoiserLike, Objective, StepOutput
from privlora.settings import MethodSettings, one_process_refusal

if TYPE_CHECKING:
    from privlora.settings import TrainConfig


@dataclass
class DistillSettings(MethodSettings):
    """distill_lora's keys."""

    distill_true_noise_weight: float = field(default=0.0, metadata={
        "help": "w in target = w·ε_true + (1 − w)·ε_teacher"})
    distill_teacher_epochs: int | None = field(default=None, metadata={
        "help": "each teacher's max_train_epochs; default: the student's length"})

    def check(self, cfg: TrainConfig) -> str | None:
        if cfg.train_text_encoder:
            return "distill_lora trains and distils the UNet LoRA only; set train_text_encoder = false"
        if not 0.0 <= self.distill_true_noise_weight <= 1.0:
            return f"distill_true_noise_weight {self.distill_true_noise_weight} is not in [0, 1]"
        if self.distill_teacher_epochs is not None and self.distill_teacher_epochs < 1:
            return f"distill_teacher_epochs {self.distill_teacher_epochs} must be ≥ 1"
        if cfg.train_subset != "all":
            return "distill_lora's student trains on the whole train role; set train_subset = \"all\""
        if cfg.canaries:  # the halves are drawn over the train role; canaries would shift them (and reach both
            # teachers), so an image could be taught by the teacher that trained on it
            return "distill_lora does not support canaries (both teachers would train on them, and they would " \
                   "re-draw the student's halves); set canaries = 0"
        return one_process_refusal("distill_lora", "teachers")


def teacher_config(cfg: TrainConfig, half: str) -> TrainConfig:
    """The plain-LoRA run on one half: the student's settings, its own folder, no intermediate saves."""
    epochs, steps = cfg.max_train_epochs, cfg.max_train_steps
    teacher_epochs = cfg.settings(DistillSettings).distill_teacher_epochs
    if teacher_epochs:
        epochs, steps = teacher_epochs, None
    teacher = dataclasses.replace(
        cfg, method="lora", method_settings=MethodSettings(), train_subset=half,
        output_dir=str(Path(cfg.output_dir) / "teachers" / half),
        output_name=f"teacher_{half[-1]}", save_format="kohya", save_every_n_epochs=None, save_every_n_steps=None,
        save_state=False, resume=None, overwrite=False, sample_prompts=None, sample_every_n_epochs=None,
        hessian_every_n_steps=0, max_train_epochs=epochs, max_train_steps=steps)
    return teacher.validate(f"{half} teacher of {cfg.output_dir}")


def teacher_file(teacher: TrainConfig) -> Path:
    return Path(teacher.output_dir) / f"{teacher.output_name}.safetensors"


@contextlib.contextmanager
def student_kept(unet: torch.nn.Module,
                 params: list[torch.nn.Parameter]) -> Iterator[Callable[[list[torch.Tensor]], None]]:
    """Yields ``wear(weights)``, which puts a teacher's weights into the LoRA parameters; on exit the student's are
    back. LoRA dropout is off meanwhile: a teacher's prediction is its deterministic one."""
    saved = [p.detach().clone() for p in params]
    training = unet.training
    unet.eval()

    def wear(weights: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)
    try:
        yield wear
    finally:
        wear(saved)
        unet.train(training)


class DistillObjective(Objective):
    name = "distill_lora"
    summary = "distilled LoRA: a student learns each image from the teacher trained on the other half (Fu et al.)"
    settings_cls = DistillSettings
    log_keys = ("L_distill", "L_ada")

    def __init__(self, params: list[torch.nn.Parameter], teachers: list[list[torch.Tensor]], halves: torch.Tensor,
                 true_noise_weight: float = 0.0):
        self.params = params  # the student's LoRA parameters, in the order of each teacher's weights
        self.teachers = teachers  # teachers[k]: the weights of the teacher trained on half k
        self.halves = halves  # the half of each train-role example, by its "index"
        self.true_noise_weight = true_noise_weight

    @classmethod
    def prerequisites(cls, cfg: TrainConfig) -> list[TrainConfig]:
        return [teacher_config(cfg, half) for half in HALVES]

    @classmethod
    def from_config(cls, cfg: TrainConfig, ctx: BuildContext) -> DistillObjective:
        if ctx.num_processes > 1:
            raise PrivloraError("distill_lora runs in one process; launch it without torchrun/accelerate")
        if ctx.base is None:
            raise PrivloraError("distill_lora needs the base model to run its teachers")
        teachers = [read_kohya_weights(teacher_file(t), ctx.base.unet) for t in cls.prerequisites(cfg)]
        params = [p for p, _ in teachers[0]]
        halves = torch.tensor(half_assignment(len(ctx.train_examples), cfg.split_seed))
        weight = cfg.settings(DistillSettings).distill_true_noise_weight
        return cls(params, [[w for _, w in t] for t in teachers], halves, weight)

    @torch.no_grad()
    def target(self, index: torch.Tensor, unet: torch.nn.Module, scheduler, latents: torch.Tensor,
               text_emb: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Per image: w·(true target) + (1 − w)·(the prediction of the teacher that did not train on it)."""
        true = training_target(scheduler, latents, noise, timesteps).float()
        if self.true_noise_weight == 1.0:
            return true
        taught = torch.empty_like(true)
        teacher_of = (1 - self.halves[index.cpu().long()]).to(latents.device)
        with student_kept(unet, self.params) as wear:
            for k, weights in enumerate(self.teachers):
                rows = teacher_of == k
                if rows.any():
                    wear(weights)
                    taught[rows] = predict(unet, scheduler, latents[rows], text_emb[rows], timesteps[rows],
                                           noise[rows]).float()
        return self.true_noise_weight * true + (1.0 - self.true_noise_weight) * taught

    def lora_loss(self, batch: dict, denoiser: DenoiserLike) -> StepOutput:
        z = denoiser.latents(batch)
        noise, t = denoiser.draw(batch)
        noise, t = noise.to(z.device, z.dtype), t.to(z.device)
        scheduler = denoiser.base.noise_scheduler
        with denoiser.autocast():
            c = denoiser.text(batch)
            # the teachers run on the plain module: the student's wrapper (DDP, compile) is for the student
            target = self.target(batch["index"], denoiser.base.unet, scheduler, z, c, noise, t)
            pred = predict(denoiser.unet, scheduler, z, c, t, noise).float()
        l_distill = denoiser.adaptation_loss((pred - target).pow(2), t)
        with torch.no_grad():  # the student's plain denoising loss, for information
            l_ada = denoiser.adaptation_loss((pred - training_target(scheduler, z, noise, t).float()).pow(2), t)
        return StepOutput(l_distill, {"L_distill": l_distill.item(), "L_ada": l_ada.item()})

    def metadata(self) -> dict[str, str]:
        return {"privlora_distill_teachers": "2 plain LoRAs on disjoint halves of the training images (private; "
                                             "not in this file)"}
