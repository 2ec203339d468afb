"""Image generation with a base model and an optional LoRA, through diffusers' own ``StableDiffusionPipeline``.

The LoRA goes through ``pipe.load_lora_weights`` — the path a user of A1111-style files takes — so what is
sampled here is what anyone loading the file would get. Every image is reproducible from ``settings.json``:
image ``i`` uses a CPU generator seeded with ``seed + i`` (or its prompt line's ``--d``).
"""
from __future__ import annotations

import io
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from privlora.captions import (TextEncoding, check_encoding_flags, lora_hyperparameters, read_lora_metadata,
                               text_encoding)
from privlora.errors import PrivloraError
from privlora.models.lora_files import check_lora_file
from privlora.models.vae import native_side
from privlora.io import write_bytes, write_json
from privlora.prompts import PromptLine, read_prompts

SAMPLERS = ("ddim", "euler", "dpmpp_2m")
ADAPTER_NAME = "privlora"
_IMAGE_NAME = re.compile(r"^\d{5}\.png$")


@dataclass
class ImageJob:
    """Everything that determines one image; written per image to ``settings.json``."""

    file: str
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    sampler: str
    lora: str | None
    lora_sha256: str | None
    lora_scale: float | None
    base_model: str
    base_model_sha256: str
    clip_skip: int | None = None  # prompts encoded as in training (kohya's clip_skip / max_token_length)
    max_token_length: int | None = None


# ---------------------------------------------------------------- pipeline


def make_scheduler(sampler: str, config: Any):
    """The inference scheduler for ``sampler``, built from the base model's scheduler config."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if sampler == "ddim":
        return DDIMScheduler.from_config(config)
    if sampler == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if sampler == "dpmpp_2m":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    raise PrivloraError(f"sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")


def build_pipeline(unet, vae, text_encoder, tokenizer, scheduler_config: Any, sampler: str = "ddim",
                   text_encoder_2=None, tokenizer_2=None):
    """A ``StableDiffusionPipeline`` sharing (not copying) the given modules; no safety checker.
    With ``text_encoder_2``: a ``StableDiffusionXLPipeline``."""
    from privlora.models.pipeline import sd_pipeline

    return sd_pipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                       scheduler=make_scheduler(sampler, scheduler_config), text_encoder_2=text_encoder_2,
                       tokenizer_2=tokenizer_2)


def load_lora(pipe, path: str | Path, base_name: str | None = None) -> None:
    """Load a kohya- or diffusers-format LoRA as adapter ``ADAPTER_NAME`` (``models.lora.load_lora_adapter``:
    diffusers' own loader; every module of the file must fit the base model)."""
    from privlora.models.lora import load_lora_adapter

    load_lora_adapter(pipe, path, ADAPTER_NAME, base_name)


# ---------------------------------------------------------------- planning and generating


def plan_jobs(prompts: list[PromptLine], n: int, *, seed: int, steps: int, guidance: float, sampler: str,
              width: int, height: int, negative_prompt: str = "", lora: dict | None = None,
              base: dict | None = None, encoding: TextEncoding | None = None) -> list[ImageJob]:
    """One job per image: prompts are used in turn; a line's ``--d`` seeds its first use, +1 per repeat."""
    lora, base, encoding = lora or {}, base or {}, encoding or TextEncoding()
    jobs = []
    for i in range(n):
        p = prompts[i % len(prompts)]
        repeat = i // len(prompts)
        jobs.append(ImageJob(
            file=f"{i:05d}.png",
            prompt=p.prompt,
            negative_prompt=p.negative_prompt if p.negative_prompt is not None else negative_prompt,
            seed=(p.seed + repeat) if p.seed is not None else seed + i,
            steps=p.steps or steps,
            guidance=p.guidance if p.guidance is not None else guidance,
            width=p.width or width,
            height=p.height or height,
            sampler=sampler,
            lora=lora.get("file"),
            lora_sha256=lora.get("sha256"),
            lora_scale=lora.get("scale"),
            base_model=base.get("name", ""),
            base_model_sha256=base.get("sha256", ""),
            clip_skip=encoding.clip_skip,
            max_token_length=encoding.max_token_length,
        ))
    return jobs


def generate(pipe, job: ImageJob) -> Image.Image:
    """One image, deterministic for the job's seed (a CPU generator, so the same on any device)."""
    kwargs: dict[str, Any] = {}
    if job.lora_scale is not None:
        kwargs["cross_attention_kwargs"] = {"scale": job.lora_scale}
    if job.clip_skip or job.max_token_length:
        kwargs.update(prompt_embeds(pipe, job))
    else:  # the pipeline's own encoding: one 77-token window, last layer
        kwargs.update(prompt=job.prompt, negative_prompt=job.negative_prompt or None)
    out = pipe(
        num_inference_steps=job.steps, guidance_scale=job.guidance, width=job.width, height=job.height,
        generator=torch.Generator(device="cpu").manual_seed(job.seed), output_type="np", **kwargs,
    )
    return Image.fromarray(_to_uint8(out.images[0]))


def prompt_embeds(pipe, job: ImageJob) -> dict[str, torch.Tensor]:
    """The prompt and negative prompt encoded as in training (``models.loading.encode_text``), the LoRA scale
    applied to the text encoder's LoRA as the pipeline itself does."""
    from diffusers.utils import scale_lora_layers, unscale_lora_layers

    from privlora.diffusion import unpack_sdxl
    from privlora.models.loading import encode_text, is_sdxl

    encoding = TextEncoding(job.clip_skip, job.max_token_length)
    encoders = [te for te in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if te is not None]
    if job.lora_scale is not None:
        for te in encoders:
            scale_lora_layers(te, job.lora_scale)
    try:
        with torch.no_grad():
            both = encode_text(pipe, [job.prompt, job.negative_prompt or ""], encoding)
    finally:
        if job.lora_scale is not None:
            for te in encoders:
                unscale_lora_layers(te, job.lora_scale)
    if not is_sdxl(pipe):
        return {"prompt_embeds": both[:1], "negative_prompt_embeds": both[1:]}
    hidden, pooled = unpack_sdxl(both, pipe.text_encoder_2.config.projection_dim)
    return {"prompt_embeds": hidden[:1], "negative_prompt_embeds": hidden[1:],
            "pooled_prompt_embeds": pooled[:1], "negative_pooled_prompt_embeds": pooled[1:]}


def _to_uint8(array: np.ndarray) -> np.ndarray:
    return (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def png_bytes(image: Image.Image, parameters: dict | None = None) -> bytes:
    """PNG bytes with the generation settings in a ``parameters`` text chunk (no timestamps: same bytes per run)."""
    import json

    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", json.dumps(parameters, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def contact_sheet(images: list[Image.Image], columns: int | None = None, gap: int = 2) -> Image.Image:
    """All images on one sheet, ``columns`` per row (default: a near-square grid), cells the largest size."""
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    cell_w, cell_h = max(im.width for im in images), max(im.height for im in images)
    sheet = Image.new("RGB", (columns * cell_w + (columns + 1) * gap, rows * cell_h + (rows + 1) * gap), (40, 40, 40))
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        sheet.paste(im.convert("RGB"), (gap + c * (cell_w + gap), gap + r * (cell_h + gap)))
    return sheet


# ---------------------------------------------------------------- the `sample` command


def sample(base_model: str, out_dir: str | Path, *, prompt: str | None = None, prompts_file: str | Path | None = None,
           n: int | None = None, steps: int = 30, guidance: float = 7.5, sampler: str = "ddim", seed: int = 0,
           lora: str | Path | None = None, lora_scale: float = 1.0, width: int | None = None,
           height: int | None = None, negative_prompt: str = "", config_dir: str | None = None,
           prediction_type: str | None = None, device: str | None = None, overwrite: bool = False,
           clip_skip: int | None = None, max_token_length: int | None = None) -> list[Path]:
    """Generate ``n`` images into ``out_dir`` (``00000.png`` …, ``grid.png``, ``settings.json``); returns the PNGs.

    Prompts are encoded as the LoRA was trained (``clip_skip`` / ``max_token_length``: the arguments, else the
    LoRA's metadata, else the pipeline's plain encoding). Everything a user can get wrong (prompts file, sizes,
    LoRA file, output folder) is checked before the model is loaded.
    """
    prompts = _prompts(prompt, prompts_file)
    n = len(prompts) if n is None else n
    _check_settings(n, steps, sampler, width, height, guidance, lora_scale)
    check_encoding_flags(clip_skip, max_token_length)
    lora_path = check_lora_file(lora) if lora else None
    trained = lora_hyperparameters(read_lora_metadata(lora_path)) if lora_path else {}
    encoding = text_encoding(trained, clip_skip, max_token_length, str(lora_path))
    out = _prepare_out_dir(Path(out_dir), overwrite)

    from privlora.models.loading import load_base, sha256_file

    base = load_base(base_model, config_dir=config_dir, prediction_type=prediction_type)
    pipe = build_pipeline(base.unet, base.vae, base.text_encoder, base.tokenizer, base.noise_scheduler.config, sampler,
                          text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2)
    pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lora_info = None
    if lora_path:
        load_lora(pipe, lora_path, base.name)
        lora_info = {"file": str(lora_path), "sha256": sha256_file(lora_path), "scale": lora_scale}
    side = native_side(pipe)
    jobs = plan_jobs(prompts, n, seed=seed, steps=steps, guidance=guidance, sampler=sampler,
                     width=width or side, height=height or side, negative_prompt=negative_prompt,
                     lora=lora_info, base={"name": base.name, "sha256": base.sha256}, encoding=encoding)
    return _write_images(pipe, jobs, out)


def _prompts(prompt: str | None, prompts_file: str | Path | None) -> list[PromptLine]:
    if (prompt is None) == (prompts_file is None):
        raise PrivloraError("give exactly one of --prompt TEXT or --prompts FILE")
    return read_prompts(prompts_file) if prompts_file is not None else [PromptLine(prompt=str(prompt))]


def _check_settings(n: int, steps: int, sampler: str, width: int | None, height: int | None, guidance: float,
                    lora_scale: float) -> None:
    if n < 1:
        raise PrivloraError(f"--n {n}: the number of images must be ≥ 1")
    if steps < 1:
        raise PrivloraError(f"--steps {steps}: must be ≥ 1")
    if sampler not in SAMPLERS:
        raise PrivloraError(f"--sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
    for name, value in (("width", width), ("height", height)):
        if value is not None and (value <= 0 or value % 8):
            raise PrivloraError(f"--{name} {value} is not a positive multiple of 8")
    for name, number in (("guidance", guidance), ("lora_scale", lora_scale)):
        if not math.isfinite(number):
            raise PrivloraError(f"--{name} {number} is not a finite number")


def _prepare_out_dir(out: Path, overwrite: bool) -> Path:
    old = [p for p in out.iterdir() if _IMAGE_NAME.match(p.name) or p.name in ("grid.png", "settings.json")] \
        if out.is_dir() else []
    if old and not overwrite:
        raise PrivloraError(f"{out}: already holds samples ({old[0].name}); pass --overwrite or choose another --out")
    if out.exists() and not out.is_dir():
        raise PrivloraError(f"{out}: exists and is not a folder")
    for p in old:  # stale images from a larger earlier run would not match the new settings.json
        p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write_images(pipe, jobs: list[ImageJob], out: Path) -> list[Path]:
    images, paths = [], []
    for job in jobs:
        image = generate(pipe, job)
        paths.append(write_bytes(out / job.file, png_bytes(image, asdict(job))))
        images.append(image)
    write_bytes(out / "grid.png", png_bytes(contact_sheet(images)))
    write_json(out / "settings.json", {"versions": _versions(), "images": [asdict(j) for j in jobs]})
    return paths


def _versions() -> dict[str, str]:
    import diffusers

    import privlora

    return {"privlora": getattr(privlora, "__version__", "unknown"), "diffusers": diffusers.__version__,
            "torch": torch.__version__}


# ---------------------------------------------------------------- sampling during training


def sample_during_training(model, prompts_file: str | Path, epoch: int, output_dir: str | Path, writer=None, *,
                           sampler: str = "ddim", steps: int = 20, guidance: float = 7.5, seed: int = 0,
                           encoding: TextEncoding | None = None) -> list[Path]:
    """Sample the model being trained (LoRA injected in memory by peft) once per prompt line.

    ``model``: a ``StableDiffusionPipeline`` or anything with ``unet``, ``vae``, ``text_encoder``, ``tokenizer``
    and ``noise_scheduler`` (privlora's ``BaseModel``). Writes ``<output_dir>/samples/e{epoch:04d}_{i}.png`` and,
    given a TensorBoard ``SummaryWriter``, logs each image as ``samples/{i}`` at step ``epoch``. Prompt ``i``
    uses seed ``seed + i`` (or its ``--d``) every epoch, so epochs are comparable. Train/eval modes are restored.
    ``encoding``: the training run's clip_skip / max_token_length.
    """
    prompts = read_prompts(prompts_file)
    pipe = _training_pipeline(model, sampler)
    modules = [m for m in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None), pipe.vae)
               if m is not None]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        side = native_side(pipe)
        jobs = plan_jobs(prompts, len(prompts), seed=seed, steps=steps, guidance=guidance, sampler=sampler,
                         width=side, height=side, encoding=encoding)
        return [_save_training_sample(pipe, job, i, epoch, Path(output_dir), writer) for i, job in enumerate(jobs)]
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def _training_pipeline(model, sampler: str):
    # A fresh pipeline around the same modules: a caller's pipeline keeps its own scheduler.
    config = model.noise_scheduler.config if hasattr(model, "noise_scheduler") else model.scheduler.config
    unet = getattr(model.unet, "module", model.unet)  # unwrap DistributedDataParallel
    return build_pipeline(unet, model.vae, model.text_encoder, model.tokenizer, config, sampler,
                          text_encoder_2=getattr(model, "text_encoder_2", None),
                          tokenizer_2=getattr(model, "tokenizer_2", None))


def _save_training_sample(pipe, job: ImageJob, i: int, epoch: int, output_dir: Path, writer) -> Path:
    image = generate(pipe, job)
    path = write_bytes(output_dir / "samples" / f"e{epoch:04d}_{i}.png", png_bytes(image, asdict(job)))
    if writer is not None:
        writer.add_image(f"samples/{i}", np.asarray(image), global_step=epoch, dataformats="HWC")
    return path
