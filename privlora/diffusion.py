"""The denoising query every part of privlora shares: noise a latent, ask the UNet, get a loss map.

Training (all objectives), the tiny-model builder and the audit attacks all go through
``loss_map`` so that a loss means the same thing everywhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Epsilon for epsilon-prediction models, velocity for v-prediction models (SD2.x 768)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r} (use epsilon or v_prediction)")


def predict(unet, scheduler, latents: torch.Tensor, text_emb: torch.Tensor, timesteps: torch.Tensor,
            noise: torch.Tensor) -> torch.Tensor:
    """The UNet's output on the noised latents ``z_t``: in the scheduler's prediction space (ε or v)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    return unet(noisy, timesteps, encoder_hidden_states=text_emb, return_dict=False)[0]


def loss_map(
    unet,
    scheduler,
    latents: torch.Tensor,
    text_emb: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Per-sample, per-element squared error ``(ε̂_θ(z_t, t, c) − target)²``, shape (B, C, H, W), fp32."""
    pred = predict(unet, scheduler, latents, text_emb, timesteps, noise)
    target = training_target(scheduler, latents, noise, timesteps)
    return F.mse_loss(pred.float(), target.float(), reduction="none")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    ac = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return ac / (1.0 - ac)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-γ (Hang et al. 2023); ones when gamma is None."""
    if not gamma:
        return torch.ones(timesteps.shape[0], device=timesteps.device)
    s = snr(scheduler, timesteps)
    w = torch.clamp(s, max=gamma) / s
    if scheduler.config.prediction_type == "v_prediction":
        w = torch.clamp(s, max=gamma) / (s + 1.0)
    return w


def sample_noise(latents: torch.Tensor, generator: torch.Generator | None, noise_offset: float = 0.0) -> torch.Tensor:
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        off = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator, device=latents.device)
        noise = noise + noise_offset * off.to(latents.dtype)
    return noise


def sample_timesteps(n: int, num_train_timesteps: int, generator: torch.Generator | None, device) -> torch.Tensor:
    return torch.randint(0, num_train_timesteps, (n,), generator=generator, device="cpu").to(device)
