"""TOML in and out, in one place: privlora's presets and bench files are read with ``load_toml`` and
``inherit_chain``; ``toml_literal`` writes a Python value as TOML (the resolved config), ``parse_toml_value``
reads one from a command line (``--methods lora:privacy_alpha=5``)."""
from __future__ import annotations

import json
import tomllib
from typing import Any


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
