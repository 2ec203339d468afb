"""A CLIP-format BPE tokenizer built from a word list, so tiny-sd needs no downloaded vocabulary.

The files follow CLIP's layout: the 256 byte-level symbols of GPT-2/CLIP's ``bytes_to_unicode``, the same
symbols with the ``</w>`` end-of-word suffix, the merge results, then ``<|startoftext|>`` and
``<|endoftext|>`` as the last two ids (tiny-sd's text encoder uses bos = V-2, eos = pad = V-1). Merges are
learned on the word list itself until every word is a single ``word</w>`` token; any other text falls back to
byte-level characters, so nothing is ever unknown.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from privlora.errors import PrivloraError
from privlora.io import write_json, write_text

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
EOW = "</w>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return {b: table[b] for b in printable + [b for b in range(256) if b not in printable]}


def _symbols(word: str, byte_map: dict[int, str]) -> tuple[str, ...]:
    chars = [byte_map[b] for b in word.encode("utf-8")]
    chars[-1] += EOW
    return tuple(chars)


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def learn_merges(words: list[str], byte_map: dict[int, str]) -> list[tuple[str, str]]:
    """Greedy BPE on the word list (each word counted once) until every word is one symbol.

    Encoding applies merges by rank, which replays this exact sequence, so each word ends as one token.
    """
    seqs = [_symbols(w, byte_map) for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(p for s in seqs for p in zip(s, s[1:]))
        if not counts:
            return merges
        # most frequent first, ties broken lexicographically so the result is deterministic
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        seqs = [_merge_pair(s, pair) for s in seqs]


def _clean_words(words) -> list[str]:
    out = []
    for w in words:
        w = w.strip().lower()
        # CLIP's pre-tokenizer splits on anything that is not a letter run, so only such words can be one token
        if not w.isalpha():
            raise PrivloraError(f"tokenizer word {w!r} must consist of letters only")
        out.append(w)
    return sorted(set(out))


def _vocab(byte_map: dict[int, str], merges: list[tuple[str, str]]) -> dict[str, int]:
    tokens = list(byte_map.values()) + [c + EOW for c in byte_map.values()] + ["".join(m) for m in merges]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab


def _tokenizer_config(vocab: dict[str, int], max_length: int) -> dict:
    special = {
        str(vocab[t]): dict(content=t, lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
        for t in (BOS, EOS)
    }
    return dict(
        tokenizer_class="CLIPTokenizer",
        model_max_length=max_length,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
        do_lower_case=True,
        errors="replace",
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
        added_tokens_decoder=special,
    )


def build_clip_tokenizer_files(out_dir: str | Path, words, max_length: int | None = None) -> None:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into ``out_dir``."""
    if max_length is None:
        from privlora.models.tiny import MAX_TOKENS

        max_length = MAX_TOKENS
    out_dir = Path(out_dir)
    byte_map = bytes_to_unicode()
    merges = learn_merges(_clean_words(words), byte_map)
    vocab = _vocab(byte_map, merges)
    write_text(out_dir / "vocab.json", json.dumps(vocab, ensure_ascii=False, indent=None) + "\n")
    write_text(out_dir / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    write_json(out_dir / "tokenizer_config.json", _tokenizer_config(vocab, max_length))
    write_json(out_dir / "special_tokens_map.json", dict(bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS))


def verify_tokenizer(tokenizer, words) -> None:
    """Raise PrivloraError unless each word is one token and special tokens sit at the last two ids."""
    v = len(tokenizer)
    if tokenizer.bos_token_id != v - 2 or tokenizer.eos_token_id != v - 1 or tokenizer.pad_token_id != v - 1:
        raise PrivloraError(
            f"tokenizer special ids are bos={tokenizer.bos_token_id}, eos={tokenizer.eos_token_id}, "
            f"pad={tokenizer.pad_token_id}; expected {v - 2}, {v - 1}, {v - 1}"
        )
    for w in words:
        ids = tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise PrivloraError(f"tokenizer splits caption word {w!r} into {len(ids)} tokens")
