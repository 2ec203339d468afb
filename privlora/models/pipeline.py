"""The diffusers pipeline around privlora's modules, built in one place (sampling and the audit's LoRA loading)."""
from __future__ import annotations

from typing import Any


def sd_pipeline(*, unet, vae, text_encoder, tokenizer, scheduler, text_encoder_2=None, tokenizer_2=None) -> Any:
    """A ``StableDiffusionPipeline`` sharing (not copying) the given modules; no safety checker, no progress bar.

    With ``text_encoder_2`` (SDXL base): a ``StableDiffusionXLPipeline``, whose LoRA loader reads kohya's SDXL
    names (original-layout UNet blocks, ``lora_te1_`` / ``lora_te2_``)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if text_encoder_2 is not None:
        xl: Any = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                            tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                            scheduler=scheduler)
        xl.set_progress_bar_config(disable=True)
        return xl

    pipe: Any = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                        scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
