"""Encoding the training data once (kohya's ``cache_latents`` / ``cache_text_encoder_outputs``).

Each image is encoded once with the VAE's mean latent and each caption once with the frozen text encoder; the
UNet then never waits on them. The result is a :class:`~privlora.data.cache.RoleData` per role.
"""
from __future__ import annotations

from pathlib import Path

import torch

from privlora.data.augment import Augment
from privlora.data.cache import RoleData
from privlora.data.images import open_rgb, to_tensor
from privlora.data.readers import Example
from privlora.models.loading import encode_images, encode_prompt


@torch.no_grad()
def encode_latents(base, examples: list[Example], resolution: int, center_crop: bool, device,
                   batch_size: int = 32, flipped: bool = False) -> torch.Tensor:
    """Mean VAE latents of the images (``flipped``: of the left-right mirrored images)."""
    out = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        pixels = torch.stack([to_tensor(open_rgb(e.path), resolution, center_crop=center_crop) for e in chunk])
        pixels = pixels.flip(-1) if flipped else pixels
        out.append(encode_images(base, pixels.to(device, base.vae.dtype), sample=False).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_texts(base, captions: list[str], clip_skip: int | None, device, batch_size: int = 64,
                 max_token_length: int | None = None) -> torch.Tensor:
    out = [encode_prompt(base, captions[s:s + batch_size], clip_skip=clip_skip,
                         max_token_length=max_token_length).float().cpu()
           for s in range(0, len(captions), batch_size)]
    return torch.cat(out)


class Cache:
    """Encodes each distinct image/caption once across all roles (member roles repeat training images)."""

    def __init__(self, base, cfg, device):
        self.base, self.cfg, self.device = base, cfg, device
        self._latents: dict[bool, dict[Path, torch.Tensor]] = {False: {}, True: {}}  # flipped? -> path -> latent
        self._text: dict[str, torch.Tensor] = {}

    def role(self, examples: list[Example], expand_repeats: bool = False, augment: Augment | None = None) -> RoleData:
        """``augment``: the training role's augmentation. Crop/jitter need pixels (no latent cache); a flip alone
        caches the mirrored images' latents too."""
        cfg = self.cfg
        pixels = not cfg.cache_latents or (augment is not None and augment.needs_pixels)
        latents = None if pixels else self._lookup_latents(examples)
        flipped = self._lookup_latents(examples, True) if not pixels and augment and augment.random_flip else None
        text = self._lookup_text([e.caption for e in examples]) if cfg.caches_text else None
        return RoleData(examples, resolution=cfg.resolution, latents=latents, text_emb=text,
                        center_crop=cfg.center_crop, expand_repeats=expand_repeats, latents_flipped=flipped)

    def _lookup_latents(self, examples: list[Example], flipped: bool = False) -> torch.Tensor:
        known = self._latents[flipped]
        todo = list(dict.fromkeys(e for e in examples if e.path not in known))
        if todo:
            enc = encode_latents(self.base, todo, self.cfg.resolution, self.cfg.center_crop, self.device,
                                 flipped=flipped)
            known.update({e.path: z for e, z in zip(todo, enc)})
        return torch.stack([known[e.path] for e in examples])

    def _lookup_text(self, captions: list[str]) -> torch.Tensor:
        todo = [c for c in dict.fromkeys(captions) if c not in self._text]
        if todo:
            enc = encode_texts(self.base, todo, self.cfg.clip_skip, self.device,
                               max_token_length=self.cfg.max_token_length)
            self._text.update(dict(zip(todo, enc)))
        return torch.stack([self._text[c] for c in captions])
