"""kohya's caption handling: ``shuffle_caption`` / ``keep_tokens`` and ``max_token_length`` (75 | 150 | 225).

Long prompts (kohya, SD1/2): the caption is tokenised without truncation up to n·w tokens (w = the tokenizer's
length − 2, 75 for CLIP), cut into n windows of w tokens, and each window is encoded as BOS + w tokens + EOS
(77 positions for CLIP); of the n hidden-state blocks kohya keeps the first window's BOS, every window's w
inner positions and the last window's final position: 1 + n·w + 1 positions (227 for 225). ``clip_skip``
applies to each window. A short caption still becomes n windows: the padding windows are encoded too and
are keys of the UNet's cross-attention, so they change its output (tests/test_fidelity.py measures it).
On a tokenizer whose length is not 77 (the embedded tiny-sd: 32) the window is that length − 2 and
max_token_length only chooses the number of windows (max_token_length / 75).
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from privlora.errors import PrivloraError

WINDOW_TOKENS = 75  # kohya counts max_token_length in CLIP windows of 75


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


def split_windows(ids: torch.Tensor, n_windows: int, bos: int, eos: int, pad: int) -> torch.Tensor:
    """(B, n·w + 2) ids → (B·n, w + 2): BOS + each window of w tokens + the sequence's last id (kohya).

    With pad ≠ eos (SD2's tokenizer) kohya also ends every window that does not end in EOS/pad with EOS, and
    turns a window that starts with padding into an empty prompt (BOS, EOS, pad…).
    """
    w = (ids.shape[1] - 2) // n_windows
    chunks = []
    for i in range(1, ids.shape[1] - 1, w):
        chunk = torch.cat([ids[:, :1], ids[:, i:i + w], ids[:, -1:]], dim=1)
        if pad != eos:
            chunk = chunk.clone()
            chunk[(chunk[:, -2] != eos) & (chunk[:, -2] != pad), -1] = eos
            chunk[chunk[:, 1] == pad, 1] = eos
        chunks.append(chunk)
    return torch.stack(chunks, dim=1).reshape(-1, w + 2)


def merge_windows(hidden: torch.Tensor, n_windows: int) -> torch.Tensor:
    """(B·n, w + 2, D) → (B, n·w + 2, D): the first BOS, each window's inner w positions, the last position."""
    per = hidden.shape[1]
    flat = hidden.reshape(-1, n_windows * per, hidden.shape[-1])
    inner = [flat[:, i:i + per - 2] for i in range(1, n_windows * per, per)]
    return torch.cat([flat[:, :1], *inner, flat[:, -1:]], dim=1)


def encode_long(base, captions: list[str], max_token_length: int, clip_skip: int | None) -> torch.Tensor:
    """kohya's max_token_length encoding of a batch of captions: (B, n·w + 2, D)."""
    from privlora.models.loading import encode_ids

    tok = base.tokenizer
    window = min(tok.model_max_length, base.text_encoder.config.max_position_embeddings) - 2
    n = max_token_length // WINDOW_TOKENS
    ids = tok(list(captions), padding="max_length", max_length=n * window + 2, truncation=True,
              return_tensors="pt").input_ids
    windows = split_windows(ids, n, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    return merge_windows(encode_ids(base, windows, clip_skip), n)


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

    def encode(self, base, captions: list[str]) -> torch.Tensor:
        from privlora.models.loading import encode_prompt

        return encode_prompt(base, captions, clip_skip=self.clip_skip, max_token_length=self.max_token_length)


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
