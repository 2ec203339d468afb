"""A model under audit as the attacks see it: seeded, batched and cached UNet queries.

Every sample's noise is a function of (audit seed, the sample's content hash, draw index) only, so two models
are always asked exactly the same questions, whatever the batch composition or the attack order. Loss-map
queries are cached per (sample, timestep, draw, caption variant): attacks that ask the same question
(``loss``, ``ref_loss``, ``mlp``) pay for it once per model.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from privlora.attacks.base import Batch, Query
from privlora.diffusion import denoise, loss_map

TextEncoder = Callable[[list[str]], torch.Tensor]  # captions -> (B, L, D) embeddings (SDXL: packed)


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts (Python's hash() is salted per process, so it cannot be used)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def caption_variant(caption: str, variant: str, key: str, seed: int) -> str:
    """``full``: the caption; ``empty``: ""; ``partial:r``: the caption with a seeded fraction r of its words
    dropped."""
    if variant == "full":
        return caption
    if variant == "empty":
        return ""
    if variant.startswith("partial:"):
        words = caption.split()
        n_drop = int(float(variant.split(":", 1)[1]) * len(words) + 0.5)
        rng = np.random.default_rng(stable_seed(seed, key, variant))
        dropped = set(rng.permutation(len(words))[:n_drop].tolist())
        return " ".join(w for i, w in enumerate(words) if i not in dropped)
    raise ValueError(f"unknown caption variant {variant!r}")


class Target:
    def __init__(
        self,
        name: str,
        unet,
        scheduler,
        encode_text: TextEncoder,
        *,
        seed: int = 0,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        activate: Callable[[], None] | None = None,
        reference: Target | None = None,
        source: Path | None = None,
    ):
        self.name, self.unet, self.scheduler = name, unet, scheduler
        self.source = source  # the audited LoRA file; None for the base model
        self.seed, self.batch_size, self.device = seed, batch_size, torch.device(device)
        self.prediction_type = scheduler.config.prediction_type
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.alphas_cumprod = scheduler.alphas_cumprod.double().cpu()
        self.reference = reference if reference is not None else self  # the public base model, for calibration
        self.unet_queries = 0  # sample-level UNet evaluations actually run
        self._encode_text, self._activate = encode_text, activate or (lambda: None)
        self._text: dict[str, torch.Tensor] = {}
        self._maps: dict[tuple, torch.Tensor] = {}

    # ------------------------------------------------------------ inputs

    def noise(self, key: str, draw: int, shape: tuple[int, ...]) -> torch.Tensor:
        gen = torch.Generator().manual_seed(stable_seed(self.seed, key, draw))
        return torch.randn(shape, generator=gen)

    def embed(self, captions: list[str]) -> torch.Tensor:
        todo = [c for c in dict.fromkeys(captions) if c not in self._text]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            self._activate()
            with torch.no_grad():
                self._text.update(zip(chunk, self._encode_text(chunk).float().cpu()))
        return torch.stack([self._text[c] for c in captions])

    def text(self, batch: Batch, variant: str = "full") -> torch.Tensor:
        return self.embed([caption_variant(c, variant, k, self.seed) for c, k in zip(batch.captions, batch.keys)])

    def alpha_bar(self, t: torch.Tensor | int) -> torch.Tensor:
        """ᾱ_t as float64, shaped to broadcast over (N, C, H, W)."""
        t = torch.as_tensor(t).reshape(-1)
        return self.alphas_cumprod[t].reshape(-1, 1, 1, 1)

    # ------------------------------------------------------------ queries

    def loss_maps(self, batch: Batch, queries: list[Query]) -> torch.Tensor:
        """Per-element training loss (ε or v target) of each sample under each query: (B, Q, C, H, W), cached."""
        return self.sample_loss_maps(batch, [queries] * len(batch))

    def sample_loss_maps(self, batch: Batch, queries: list[list[Query]]) -> torch.Tensor:
        """As ``loss_maps``, with each sample's own queries (the same number for every sample)."""
        per = len(queries[0]) if queries else 0
        if any(len(qs) != per for qs in queries):
            raise ValueError("sample_loss_maps: every sample needs the same number of queries")
        ids = [(k, cap, q) for k, cap, qs in zip(batch.keys, batch.captions, queries) for q in qs]
        rows = [(i, q) for i, (k, cap, q) in enumerate(ids) if (k, cap, q) not in self._maps]
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            maps = self._run_loss_maps(batch, [(i // per, q) for i, q in chunk])
            self._maps.update((ids[i], m) for (i, _), m in zip(chunk, maps))
        out = torch.stack([self._maps[i] for i in ids])
        return out.reshape(len(batch), per, *out.shape[1:])

    def _run_loss_maps(self, batch: Batch, rows: list[tuple[int, Query]]) -> torch.Tensor:
        shape = tuple(batch.latents.shape[1:])
        latents = torch.stack([batch.latents[j] for j, _ in rows])
        noise = torch.stack([self.noise(batch.keys[j], q.draw, shape) for j, q in rows])
        t = torch.tensor([q.t for _, q in rows], dtype=torch.long)
        captions = [caption_variant(batch.captions[j], q.caption, batch.keys[j], self.seed) for j, q in rows]
        emb = self.embed(captions)
        self._activate()
        self.unet_queries += len(rows)
        dev = self.device
        with torch.no_grad():
            maps = loss_map(self.unet, self.scheduler, latents.to(dev), emb.to(dev), t.to(dev), noise.to(dev))
        return maps.float().cpu()

    def eps(self, x: torch.Tensor, t: torch.Tensor | int, emb: torch.Tensor) -> torch.Tensor:
        """ε̂_θ(x_t, t, c), batched; v-prediction output is converted: ε = √ᾱ·v + √(1−ᾱ)·x_t. Not cached."""
        t = torch.as_tensor(t, dtype=torch.long).reshape(-1).expand(x.shape[0])
        out = []
        for s in range(0, x.shape[0], self.batch_size):
            xs, ts, es = x[s:s + self.batch_size], t[s:s + self.batch_size], emb[s:s + self.batch_size]
            self._activate()
            self.unet_queries += xs.shape[0]
            with torch.no_grad():
                pred = denoise(self.unet, xs.to(self.device), ts.to(self.device), es.to(self.device)).float().cpu()
            if self.prediction_type == "v_prediction":
                a = self.alpha_bar(ts).float()
                pred = a.sqrt() * pred + (1 - a).sqrt() * xs.float()
            out.append(pred)
        return torch.cat(out)

    def clear_cache(self) -> None:
        self._maps.clear()
        self._text.clear()
