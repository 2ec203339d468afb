"""Per-role training data: latents and text embeddings cached in memory, or images encoded every step.

Caching (kohya's ``cache_latents`` / ``cache_text_encoder_outputs``) encodes each image once with the VAE's
mean latent and each caption once with the frozen text encoder; the UNet then never waits on them.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from privlora.data.images import open_rgb, to_tensor
from privlora.data.readers import Example


class RoleData(Dataset):
    """One role's examples. Items: ``index`` and ``latents`` or ``pixel_values``, ``text_emb`` or ``caption``."""

    def __init__(self, examples: list[Example], *, resolution: int, latents: torch.Tensor | None = None,
                 text_emb: torch.Tensor | None = None, center_crop: bool = True, random_flip: bool = False,
                 expand_repeats: bool = False):
        self.examples = examples
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.latents, self.text_emb = latents, text_emb
        self.order = [i for i, ex in enumerate(examples) for _ in range(ex.repeats if expand_repeats else 1)]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict:
        j = self.order[i]
        item: dict = {"index": j}
        if self.latents is not None:
            item["latents"] = self.latents[j]
        else:
            img = open_rgb(self.examples[j].path)
            item["pixel_values"] = to_tensor(img, self.resolution, center_crop=self.center_crop,
                                             random_flip=self.random_flip)
        if self.text_emb is not None:
            item["text_emb"] = self.text_emb[j]
        else:
            item["caption"] = self.examples[j].caption
        return item

    def subset(self, n: int, generator: torch.Generator) -> RoleData:
        """n examples drawn at random (without replacement) with ``generator``: a seeded random subset, not
        the first n (roles come in file-path order)."""
        picked = torch.randperm(len(self.examples), generator=generator)[:n].tolist()
        sub = RoleData([self.examples[i] for i in picked], resolution=self.resolution, center_crop=self.center_crop)
        sub.latents = None if self.latents is None else self.latents[picked]
        sub.text_emb = None if self.text_emb is None else self.text_emb[picked]
        return sub


@torch.no_grad()
def encode_latents(base, examples: list[Example], resolution: int, center_crop: bool, device,
                   batch_size: int = 32) -> torch.Tensor:
    from privlora.models.loading import encode_images

    out = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        pixels = torch.stack([to_tensor(open_rgb(e.path), resolution, center_crop=center_crop) for e in chunk])
        out.append(encode_images(base, pixels.to(device, base.vae.dtype), sample=False).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_texts(base, captions: list[str], clip_skip: int | None, device, batch_size: int = 64,
                 max_token_length: int | None = None) -> torch.Tensor:
    from privlora.models.loading import encode_prompt

    out = [encode_prompt(base, captions[s:s + batch_size], clip_skip=clip_skip,
                         max_token_length=max_token_length).float().cpu()
           for s in range(0, len(captions), batch_size)]
    return torch.cat(out)


class Cache:
    """Encodes each distinct image/caption once across all roles (member roles repeat training images)."""

    def __init__(self, base, cfg, device):
        self.base, self.cfg, self.device = base, cfg, device
        self._latents: dict[Path, torch.Tensor] = {}
        self._text: dict[str, torch.Tensor] = {}

    def role(self, examples: list[Example], expand_repeats: bool = False) -> RoleData:
        cfg = self.cfg
        latents = self._lookup_latents(examples) if cfg.cache_latents else None
        text = self._lookup_text([e.caption for e in examples]) if cfg.caches_text else None
        return RoleData(examples, resolution=cfg.resolution, latents=latents, text_emb=text,
                        center_crop=cfg.center_crop, random_flip=cfg.random_flip, expand_repeats=expand_repeats)

    def _lookup_latents(self, examples: list[Example]) -> torch.Tensor:
        todo = list(dict.fromkeys(e for e in examples if e.path not in self._latents))
        if todo:
            enc = encode_latents(self.base, todo, self.cfg.resolution, self.cfg.center_crop, self.device)
            self._latents.update({e.path: z for e, z in zip(todo, enc)})
        return torch.stack([self._latents[e.path] for e in examples])

    def _lookup_text(self, captions: list[str]) -> torch.Tensor:
        todo = [c for c in dict.fromkeys(captions) if c not in self._text]
        if todo:
            enc = encode_texts(self.base, todo, self.cfg.clip_skip, self.device,
                               max_token_length=self.cfg.max_token_length)
            self._text.update(dict(zip(todo, enc)))
        return torch.stack([self._text[c] for c in captions])
