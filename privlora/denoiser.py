"""The model under training seen as one function: a batch in, its per-element denoising loss map out."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from privlora.diffusion import loss_map, min_snr_weights, sample_noise, sample_timesteps
from privlora.models.vae import vae_scale_factor

if TYPE_CHECKING:
    from privlora.captions import CaptionShuffler


class Denoiser:
    def __init__(self, base, *, device, generator: torch.Generator, clip_skip: int | None = None,
                 noise_offset: float = 0.0, min_snr_gamma: float | None = None, autocast=None,
                 timestep_range: tuple[int, int | None] = (0, None)):
        self.base, self.device, self.generator = base, device, generator
        self.timestep_range = timestep_range  # [low, high) of the drawn timesteps (kohya's min/max_timestep)
        self.clip_skip, self.noise_offset, self.min_snr_gamma = clip_skip, noise_offset, min_snr_gamma
        self.autocast = autocast or contextlib.nullcontext
        self.unet = base.unet  # may be replaced by the accelerate-wrapped module
        self.max_token_length: int | None = None  # kohya's long prompts (privlora.captions)
        self.caption_shuffle: CaptionShuffler | None = None  # a CaptionShuffler when shuffle_caption is on

    def latents(self, batch: dict) -> torch.Tensor:
        if "latents" in batch:
            return batch["latents"].to(self.device, torch.float32)
        from privlora.models.loading import encode_images

        with torch.no_grad():
            return encode_images(self.base, batch["pixel_values"].to(self.device, self.base.vae.dtype),
                                 generator=self.generator).float()

    def text(self, batch: dict) -> torch.Tensor:
        if "text_emb" in batch:
            return batch["text_emb"].to(self.device)
        from privlora.captions import SHUFFLED
        from privlora.models.loading import encode_prompt

        captions = list(batch["caption"])
        if self.caption_shuffle is not None and SHUFFLED not in batch:  # kohya's shuffle_caption, per step
            captions = self.caption_shuffle(captions)
        return encode_prompt(self.base, captions, clip_skip=self.clip_skip, max_token_length=self.max_token_length)

    def loss_map(self, batch: dict, *, generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                 timesteps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) squared error and the timesteps used; noise/timesteps drawn on the CPU from the
        run's generator unless given, so a seed gives the same run on any device."""
        z = self.latents(batch)
        if noise is None or timesteps is None:
            drawn_noise, drawn_t = self.draw(batch, generator)
            noise = drawn_noise if noise is None else noise
            timesteps = drawn_t if timesteps is None else timesteps
        noise, timesteps = noise.to(self.device, z.dtype), timesteps.to(self.device)
        with self.autocast():
            c = self.text(batch)
            maps = loss_map(self.unet, self.base.noise_scheduler, z, c, timesteps, noise)
        return maps, timesteps

    @property
    def num_train_timesteps(self) -> int:
        return int(self.base.noise_scheduler.config.num_train_timesteps)

    def draw(self, batch: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and timesteps for a batch, from the run's generator (on the CPU)."""
        gen = generator or self.generator
        if "latents" in batch:
            shape = batch["latents"].shape
        else:
            px = batch["pixel_values"]
            factor = vae_scale_factor(self.base.vae)
            shape = (px.shape[0], self.base.vae.config.latent_channels, px.shape[2] // factor, px.shape[3] // factor)
        noise = sample_noise(torch.empty(shape), gen, self.noise_offset)
        timesteps = sample_timesteps(shape[0], self.base.noise_scheduler.config.num_train_timesteps, gen, "cpu",
                                     *self.timestep_range)
        return noise, timesteps

    def reference_map(self, batch: dict, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The public base model's loss map (LoRA switched off) on the same noise and timesteps, no gradient."""
        with torch.no_grad(), adapters_disabled(self.base):
            return self.loss_map(batch, noise=noise, timesteps=timesteps)[0]

    def adaptation_loss(self, maps: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """L_ada: the mean of the loss map, per-sample weighted by Min-SNR-γ when set."""
        w = min_snr_weights(self.base.noise_scheduler, timesteps, self.min_snr_gamma)
        return (maps.mean(dim=(1, 2, 3)) * w).mean()


@contextlib.contextmanager
def adapters_disabled(base):
    """Run the base model as published, without the LoRA (for base-model reference losses)."""
    models = [m for m in (base.unet, *base.text_encoders) if getattr(m, "_hf_peft_config_loaded", False)]
    for m in models:
        m.disable_adapters()
    try:
        yield
    finally:
        for m in models:
            m.enable_adapters()
