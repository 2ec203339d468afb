"""kohya's caption handling: ``shuffle_caption`` / ``keep_tokens``, and the text encoding a LoRA was trained with.

``TextEncoding`` holds kohya's ``clip_skip`` and ``max_token_length`` (75 | 150 | 225) and where they came from;
encoding captions with it is the text encoder's job: ``privlora.models.loading.encode_text`` (long prompts in
75-token windows: ``encode_long`` there). This module knows strings, seeds and LoRA metadata, no model.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from privlora.errors import PrivloraError


def shuffle_tags(caption: str, keep_tokens: int, generator: torch.Generator) -> str:
    """kohya's shuffle_caption: comma-separated tags in a random order, the first ``keep_tokens`` in place."""
    tags = [t.strip() for t in caption.strip().split(",")]
    fixed, rest = tags[:keep_tokens], tags[keep_tokens:]
    order = torch.randperm(len(rest), generator=generator).tolist()
    return ", ".join(fixed + [rest[i] for i in order])


class CaptionShuffler:
    """Seeded per-step shuffling of a batch's captions (its generator is saved with the training state)."""

    def __init__(self, keep_tokens: int, seed: int):
        self.keep_tokens = keep_tokens
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, captions: list[str]) -> list[str]:
        return [shuffle_tags(c, self.keep_tokens, self.generator) for c in captions]


SHUFFLED = "captions_shuffled"  # batch key: its captions were shuffled already; the denoiser uses them as they are


def shuffled_once(batch: dict, denoiser) -> dict:
    """The batch with its captions shuffled now, once, so every forward that reuses the batch (the reference
    step's L_ada and L_adv copies) sees the same shuffle: kohya shuffles when a batch is fetched."""
    shuffle = getattr(denoiser, "caption_shuffle", None)
    if shuffle is None or "caption" not in batch or SHUFFLED in batch:
        return batch
    captions = shuffle(list(batch["caption"]))
    return {**batch, "caption": captions, SHUFFLED: [True] * len(captions)}


@contextlib.contextmanager
def captions_fixed(denoiser):
    """Evaluation sees each caption as written (no shuffling), and draws nothing from the shuffle generator."""
    saved = getattr(denoiser, "caption_shuffle", None)
    denoiser.caption_shuffle = None
    try:
        yield
    finally:
        denoiser.caption_shuffle = saved


# --- the text encoding a LoRA was trained with, for the audit and for sampling --------------------------------

MAX_TOKEN_LENGTHS = (75, 150, 225)


@dataclass(frozen=True)
class TextEncoding:
    """How captions become embeddings: kohya's clip_skip and max_token_length (None = one window / last layer)."""

    clip_skip: int | None = None
    max_token_length: int | None = None
    origin: str = field(default="default", compare=False)  # where the two values came from, for reports

    def as_dict(self) -> dict:
        return {"clip_skip": self.clip_skip, "max_token_length": self.max_token_length, "from": self.origin}


def check_encoding_flags(clip_skip: int | None, max_token_length: int | None) -> None:
    if max_token_length is not None and max_token_length not in MAX_TOKEN_LENGTHS:
        raise PrivloraError(f"--max_token_length {max_token_length} is not 75, 150 or 225")
    if clip_skip is not None and clip_skip < 1:
        raise PrivloraError(f"--clip_skip {clip_skip} must be at least 1")


def _normalised(clip_skip, max_token_length, where: str) -> tuple[int | None, int | None]:
    if max_token_length is not None and max_token_length not in MAX_TOKEN_LENGTHS:
        raise PrivloraError(f"{where}: its metadata says max_token_length {max_token_length!r} (not 75, 150 or 225)")
    if clip_skip is not None and (type(clip_skip) is not int or clip_skip < 1):
        raise PrivloraError(f"{where}: its metadata says clip_skip {clip_skip!r} (not a positive integer)")
    # 75 tokens is one window and clip_skip 1 the last layer: the plain encoding, spelled one way
    return (None if clip_skip == 1 else clip_skip), (None if max_token_length == 75 else max_token_length)


def lora_hyperparameters(metadata: dict[str, str]) -> dict:
    """The training settings privlora writes into a LoRA file's metadata ({} for other files)."""
    try:
        found = json.loads(metadata.get("privlora_hyperparameters", "{}"))
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def read_lora_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def text_encoding(hyperparameters: dict, clip_skip: int | None, max_token_length: int | None,
                  where: str) -> TextEncoding:
    """The flags where given, else what the LoRA was trained with (its metadata), else the plain encoding.

    ``where`` names the file the metadata came from, for errors (flags: check_encoding_flags)."""
    origins = []
    values: dict[str, int | None] = {}
    for name, flag in (("clip_skip", clip_skip), ("max_token_length", max_token_length)):
        if flag is not None:
            values[name], origin = flag, f"--{name}"
        elif hyperparameters.get(name) is not None:
            values[name], origin = hyperparameters[name], "LoRA metadata"
        else:
            values[name], origin = None, "default"
        origins.append(f"{name}: {origin}")
    skip, length = _normalised(values["clip_skip"], values["max_token_length"], where)
    return TextEncoding(skip, length, "; ".join(origins))
