"""TOML in and out, in one place: privlora's presets and bench files are read with ``inherit_chain`` (each file
through ``load_toml``); ``toml_literal`` writes a Python value as TOML (the resolved config), ``parse_toml_value``
reads one from a command line (``--methods lora:privacy_alpha=5``)."""
from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from privlora.errors import PrivloraError

T = TypeVar("T")


def load_toml(path: Path, seen: tuple[Path, ...], what: str) -> dict:
    """A TOML file as a dict, with the checks every privlora TOML reader makes: it exists, it is not already
    being read (an ``inherit`` loop), it parses."""
    if not path.is_file():
        raise PrivloraError(f"{path}: {what} not found")
    if path.resolve() in seen:
        raise PrivloraError(f"{path}: inherit loop")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PrivloraError(f"{path}: not valid TOML ({e})") from None


def inherit_chain(path: str | Path, what: str, read: Callable[[Path, dict], T]) -> list[T]:
    """A TOML file and the files it inherits from (``inherit = "other.toml"``, relative to the file naming it),
    oldest ancestor first, each as ``read(its path, its table without the inherit key)``; the caller merges them
    by its own rule. A file is read, and ``read`` (its checks) run on it, before its parent is opened; a missing
    file (``what``: "config file", "bench file") or an inherit loop is a one-line error."""
    file, chain = Path(path), []
    seen: tuple[Path, ...] = ()
    while True:
        data = load_toml(file, seen, what)
        parent = data.pop("inherit", None)
        chain.append(read(file, data))
        if parent is None:
            return chain[::-1]
        seen = (*seen, file.resolve())
        file = file.parent / parent


def toml_literal(value: Any) -> str:
    """``value`` written as a TOML value: booleans, numbers, lists of them, anything else as a string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a valid TOML basic string


def parse_toml_value(text: str) -> Any:
    """``text`` read as a TOML value (``5`` → 5, ``true`` → True, ``"a"`` → "a"); text that is none stays text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
