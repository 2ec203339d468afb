"""The diffusers pipeline around privlora's modules, built in one place (sampling and the audit's LoRA loading)."""
from __future__ import annotations

from typing import Any


def sd_pipeline(*, unet, vae, text_encoder, tokenizer, scheduler) -> Any:
    """A ``StableDiffusionPipeline`` sharing (not copying) the given modules; no safety checker, no progress bar."""
    from diffusers import StableDiffusionPipeline

    pipe: Any = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                        scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
