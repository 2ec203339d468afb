"""The VAE's geometry and the model's native image side, computed in one place."""
from __future__ import annotations

from typing import Any


def vae_scale_factor(vae_or_config: Any) -> int:
    """Pixels per latent cell along one side: 2 ** (number of VAE blocks - 1), 8 for Stable Diffusion.

    Takes the VAE module or its config (diffusers' ``StableDiffusionPipeline.vae_scale_factor`` is the same number).
    """
    config = getattr(vae_or_config, "config", vae_or_config)
    return 2 ** (len(config.block_out_channels) - 1)


def native_side(model: Any) -> int:
    """The image side in pixels the model was built for: the UNet's sample size × the VAE's downsampling factor.

    ``model``: anything with ``unet`` and ``vae`` (privlora's ``BaseModel``, a diffusers pipeline).
    """
    size = model.unet.config.sample_size
    return int((size[0] if isinstance(size, (list, tuple)) else size) * vae_scale_factor(model.vae))
