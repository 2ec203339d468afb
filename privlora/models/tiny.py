"""The embedded default model ("tiny-sd"): an SD1.x-shaped latent diffusion model small enough for a 2-core CPU.

32×32 RGB images, a 3-level VAE (×4 downsampling) giving 4×8×8 latents, a 3-level cross-attention UNet and a
2-layer CLIP text encoder. ``scripts/build_tiny_sd.py`` pretrains it on the public synthetic split and writes
the diffusers folder to ``privlora/assets/tiny-sd``.
"""
from __future__ import annotations

from pathlib import Path

TINY_SD_PATH = Path(__file__).resolve().parent.parent / "assets" / "tiny-sd"
TINY_ALIASES = ("tiny-sd", "tiny")
RESOLUTION = 32
MAX_TOKENS = 32  # caption length the tiny text encoder is built for


def unet_config() -> dict:
    return dict(
        sample_size=RESOLUTION // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def vae_config() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=RESOLUTION,
    )


def text_encoder_config(vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=64,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def scheduler_config() -> dict:
    # SD1.x's training schedule.
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
