"""The denoising query every part of privlora shares: noise a latent, ask the UNet, get a loss map.

Training (all objectives), the tiny-model builder and the audit attacks all go through
``loss_map`` so that a loss means the same thing everywhere; every UNet call goes through ``denoise``, which alone
knows how SDXL's added conditioning is passed.
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
    return denoise(unet, noisy, timesteps, text_emb)


# --- the one UNet call, and SDXL's conditioning -------------------------------------------------------------
#
# SD1.x / SD2.x condition the UNet on the text encoder's hidden states alone. SDXL base also takes "added
# conditioning": text encoder 2's pooled projection and six size ids. So that every caller (training, every
# objective, every attack, caches) keeps handling one tensor per caption, an SDXL caption's conditioning travels
# packed: (L + 1, D), the L positions of te1 ⊕ te2 hidden states followed by one row holding the pooled
# projection (zero-padded to D). ``denoise`` unpacks it; nothing else needs to know.
#
# The size ids (original H, W; crop top, left; target H, W) are those of a training image at the training
# resolution, centre-cropped with no offset: (res, res, 0, 0, res, res), res = the latent side × 8 (SDXL's VAE).
# They are the defaults diffusers' SDXL pipeline uses at that size. kohya records each image's own original size
# and crop offset instead; with images pre-sized to the training resolution the two agree.

SDXL_LATENT_SCALE = 8  # pixels per latent cell of SDXL's VAE (4 levels)


def takes_added_cond(unet) -> bool:
    """Whether the UNet is SDXL-shaped (``addition_embed_type = "text_time"``); looks through DDP/compile wrappers
    and accepts any callable carrying the UNet's ``config``."""
    config = getattr(getattr(unet, "module", unet), "config", None)
    return getattr(config, "addition_embed_type", None) == "text_time"


def pack_sdxl(hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """(B, L, D) hidden states and (B, P) pooled projection (P ≤ D) → (B, L + 1, D)."""
    row = F.pad(pooled.to(hidden.dtype), (0, hidden.shape[-1] - pooled.shape[-1]))
    return torch.cat([hidden, row[:, None, :]], dim=1)


def unpack_sdxl(cond: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return cond[:, :-1], cond[:, -1, :pooled_dim]


def sdxl_time_ids(latents: torch.Tensor) -> torch.Tensor:
    """(B, 6) size ids of centre-cropped training images at the latents' resolution: (H, W, 0, 0, H, W)."""
    h, w = (int(s) * SDXL_LATENT_SCALE for s in latents.shape[-2:])
    ids = torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32, device=latents.device)
    return ids.expand(latents.shape[0], 6)


def denoise(unet, x_t: torch.Tensor, timesteps: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """The UNet's raw output on ``x_t``: the only place the UNet is called with its conditioning."""
    if not takes_added_cond(unet):
        return unet(x_t, timesteps, encoder_hidden_states=text_emb, return_dict=False)[0]
    config = getattr(unet, "module", unet).config
    hidden, pooled = unpack_sdxl(text_emb, config.projection_class_embeddings_input_dim
                                 - 6 * config.addition_time_embed_dim)
    added = {"text_embeds": pooled, "time_ids": sdxl_time_ids(x_t)}
    return unet(x_t, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)[0]


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


def sample_timesteps(n: int, num_train_timesteps: int, generator: torch.Generator | None, device,
                     low: int = 0, high: int | None = None) -> torch.Tensor:
    """n timesteps uniform in [low, high) (default: all of [0, num_train_timesteps)), drawn on the CPU."""
    top = num_train_timesteps if high is None else min(high, num_train_timesteps)
    return torch.randint(low, top, (n,), generator=generator, device="cpu").to(device)
