"""File policy shared by every entry point: which suffixes are pickles, how files are hashed, how an exception
becomes one line of an error message."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from privlora.errors import PrivloraError

# Loading these runs pickle: refused unless the user passes --allow_pickle (base models only; never LoRA files).
PICKLE_SUFFIXES = (".ckpt", ".pt", ".bin", ".pth")
_HASH_CHUNK = 1 << 20


def file_error(path: str | Path, problem: str) -> PrivloraError:
    """A PrivloraError reading ``<path>: <problem>`` on one line, whatever the problem text holds."""
    one_line = " ".join(str(problem).split())
    shown = str(path)
    if "\n" in shown or "\r" in shown:
        shown = repr(shown)
    return PrivloraError(f"{shown}: {one_line}")


def sha256_file(paths: str | Path | list[Path], chunk: int = _HASH_CHUNK) -> str:
    """Hex SHA-256 of a file's bytes (or of several files concatenated in the given order), read in chunks."""
    digest = hashlib.sha256()
    for path in paths if isinstance(paths, list) else [paths]:
        try:
            with open(path, "rb") as f:
                while block := f.read(chunk):
                    digest.update(block)
        except OSError as e:
            raise file_error(path, f"cannot read file ({e.strerror or e})") from None
    return digest.hexdigest()


def one_line_error(e: BaseException, limit: int = 300) -> str:
    """An exception's text on one line, at most ``limit`` characters; a torch "size mismatch" line is kept alone."""
    text = str(e)
    found = re.search(r"size mismatch for [^\n]+", text)
    text = " ".join((found.group(0) if found else text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def safetensors_keys(path: str | Path) -> list[str]:
    """The tensor names in a .safetensors file's header; a one-line error if the header is unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise PrivloraError(f"{path}: not a readable .safetensors file ({one_line_error(e)})") from None
