"""Data augmentation of training batches: horizontal flip, random resized crop, colour jitter, and conditioning
randomisation (caption swap, caption word dropout, Gaussian noise on the text embeddings; Somepalli et al.,
NeurIPS 2023, "Understanding and Mitigating Copying in Diffusion Models").

Applied by the training loop to every training batch (any method) before the objective sees it. The draws come
from a generator seeded from (seed, process, epoch, batch position), never from a running stream, so a run resumed
mid-epoch augments each batch exactly as the uninterrupted run did. Draws are made on the CPU; the transforms run
batched on the batch's device. Pixel values are in [-1, 1] (``privlora.data.images.to_tensor``).

With ``random_flip`` alone the training latents stay cached: both orientations are encoded once (as kohya does)
and a batch picks one per image (``latents_flipped``). Crop and jitter need pixels, so the training role is then
VAE-encoded every step.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FLIPPED = "latents_flipped"  # a cached-latents batch's second orientation (random_flip with cache_latents)
_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
Box = tuple[int, int, int, int]  # top, left, height, width
_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


def position_generator(seed: int, *position: int) -> torch.Generator:
    """A CPU generator that depends only on ``seed`` and ``position`` (hashed: neighbouring seeds do not overlap)."""
    key = ":".join(str(int(v)) for v in (seed, *position)).encode()
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)


def flip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Images (B, C, H, W) with ``mask[i]`` true mirrored left-right."""
    return torch.where(mask.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)


def crop_boxes(n: int, height: int, width: int, scale: float, generator: torch.Generator) -> list[Box]:
    """(top, left, h, w) per image: area fraction in [scale, 1], aspect ratio w/h in [3/4, 4/3], placed uniformly
    inside the image (a side longer than the image's is clamped to it, as no retries are made)."""
    area = torch.empty(n).uniform_(scale, 1.0, generator=generator) * (height * width)
    ratio = torch.empty(n).uniform_(*_LOG_RATIO, generator=generator).exp()
    where = torch.rand(n, 2, generator=generator)
    boxes = []
    for a, r, (u, v) in zip(area.tolist(), ratio.tolist(), where.tolist()):
        h = min(height, max(1, round(math.sqrt(a / r))))
        w = min(width, max(1, round(math.sqrt(a * r))))
        boxes.append((int(u * (height - h + 1)), int(v * (width - w + 1)), h, w))
    return boxes


def resized_crop(x: torch.Tensor, boxes: list[Box]) -> torch.Tensor:
    """Each image's box cut out and resized (bilinear, antialiased) back to the batch's H × W."""
    size = x.shape[-2:]
    out = [F.interpolate(img[None, :, top:top + h, left:left + w], size=size, mode="bilinear", align_corners=False,
                         antialias=True)[0] for img, (top, left, h, w) in zip(x, boxes)]
    return torch.stack(out).to(x.dtype)


def _grey(x01: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(_GREY, device=x01.device, dtype=x01.dtype).view(1, 3, 1, 1)
    return (x01 * weights).sum(1, keepdim=True)


def jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation (columns of ``factors``, (B, 3)) applied in that order on [-1, 1]
    images, as torchvision's adjust_* do on [0, 1]: each result is clamped to the valid range."""
    f = factors.to(x.device, x.dtype).view(-1, 3, 1, 1, 1)
    y = ((x + 1) / 2 * f[:, 0]).clamp(0, 1)
    mean = _grey(y).mean(dim=(1, 2, 3), keepdim=True)
    y = ((y - mean) * f[:, 1] + mean).clamp(0, 1)
    g = _grey(y)
    y = ((y - g) * f[:, 2] + g).clamp(0, 1)
    return y * 2 - 1


@dataclass(frozen=True)
class Augment:
    """The training batch's augmentation (``TrainConfig.random_flip``, ``random_crop_scale``, ``color_jitter``)."""

    seed: int
    random_flip: bool = False
    crop_scale: float = 1.0
    color_jitter: float = 0.0
    caption_swap: float = 0.0
    word_dropout: float = 0.0
    text_noise: float = 0.0

    @classmethod
    def from_config(cls, cfg, rank: int = 0) -> Augment:
        return cls(cfg.seed + 12 + 10 * rank, cfg.random_flip, cfg.random_crop_scale, cfg.color_jitter,
                   cfg.caption_swap_rate, cfg.caption_word_dropout, cfg.text_noise_scale)

    @property
    def needs_pixels(self) -> bool:
        """Crop and jitter work on pixels: the training images cannot be latent-cached."""
        return self.crop_scale < 1.0 or self.color_jitter > 0.0

    @property
    def conditions(self) -> bool:
        return bool(self.caption_swap or self.word_dropout or self.text_noise)

    @property
    def active(self) -> bool:
        return self.random_flip or self.needs_pixels or self.conditions

    def __call__(self, batch: dict, *position: int) -> dict:
        """``batch`` augmented with draws from (seed, *position); untouched when every setting is off."""
        if not self.active or not batch:
            return batch
        gen = position_generator(self.seed, *position)
        batch = dict(batch)
        if "pixel_values" in batch:
            batch["pixel_values"] = self.pixels(batch["pixel_values"], gen)
        elif self.random_flip:
            batch["latents"] = flip_cached(batch, torch.rand(len(batch["latents"]), generator=gen) < 0.5)
        batch.pop(FLIPPED, None)
        if self.conditions:  # its own generator: the image transforms draw exactly as without it
            batch = self.conditioning(batch, position_generator(self.seed + 7919, *position))
        return batch

    def conditioning(self, batch: dict, gen: torch.Generator) -> dict:
        """Caption swap within the batch, then word dropout (captions) or embedding noise (cached text)."""
        n = len(batch["text_emb"]) if "text_emb" in batch else len(batch["caption"])
        if self.caption_swap and n > 1:
            swap = (torch.rand(n, generator=gen) < self.caption_swap).tolist()
            other = [(i + 1 + int(j)) % n for i, j in enumerate(torch.randint(0, n - 1, (n,), generator=gen))]
            order = [o if s else i for i, (s, o) in enumerate(zip(swap, other))]
            if "text_emb" in batch:
                batch["text_emb"] = batch["text_emb"][order]
            else:
                batch["caption"] = [batch["caption"][i] for i in order]
        if self.word_dropout and "caption" in batch:
            batch["caption"] = [drop_tags(c, self.word_dropout, gen) for c in batch["caption"]]
        if self.text_noise and "text_emb" in batch:
            emb = batch["text_emb"]
            noise = torch.randn(emb.shape, generator=gen) * self.text_noise
            batch["text_emb"] = emb + noise.to(emb.device, emb.dtype)
        return batch

    def pixels(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, _, height, width = x.shape
        if self.crop_scale < 1.0:
            x = resized_crop(x, crop_boxes(n, height, width, self.crop_scale, gen))
        if self.random_flip:
            x = flip(x, torch.rand(n, generator=gen) < 0.5)
        if self.color_jitter > 0.0:
            s = self.color_jitter
            x = jitter(x, torch.empty(n, 3).uniform_(1 - s, 1 + s, generator=gen))
        return x


def drop_tags(caption: str, rate: float, gen: torch.Generator) -> str:
    """Each comma-separated tag dropped with probability ``rate`` (at least one kept)."""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    if not tags:
        return caption
    keep = (torch.rand(len(tags), generator=gen) >= rate).tolist()
    kept = [t for t, k in zip(tags, keep) if k]
    return ", ".join(kept or tags[:1])


def flip_cached(batch: dict, mask: torch.Tensor) -> torch.Tensor:
    """Cached latents: per image, the flipped image's own encoding where ``mask`` (not a mirrored latent)."""
    latents, flipped = batch["latents"], batch[FLIPPED]
    return torch.where(mask.to(latents.device).view(-1, *[1] * (latents.dim() - 1)), flipped, latents)
