"""Sample-prompt files in kohya's format: one prompt per line with optional per-line options.

    a red circle --n blurry --w 64 --h 64 --d 5 --s 20 --l 4.5

``--n`` negative prompt, ``--w``/``--h`` size in pixels, ``--d`` seed, ``--s`` steps, ``--l`` guidance scale.
Blank lines and lines starting with ``#`` are skipped.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from privlora.errors import PrivloraError

# " --x" starts an option; the prompt itself may contain single dashes.
_OPTION_START = re.compile(r"(?:^|\s+)--(?=[A-Za-z])")
_INT_OPTIONS = {"w": "width", "h": "height", "d": "seed", "s": "steps"}
_FLOAT_OPTIONS = {"l": "guidance"}
_TEXT_OPTIONS = {"n": "negative_prompt"}


@dataclass
class PromptLine:
    """One prompt and the settings its line overrides (None: use the command's setting)."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    line: int = 0  # 1-based line number in its file, 0 for a prompt given on the command line


def parse_prompt_line(text: str, where: str = "prompt") -> PromptLine:
    """Parse one line; ``where`` (``file:line``) prefixes every error."""
    parts = _OPTION_START.split(text.strip())
    spec = PromptLine(prompt=parts[0].strip())
    seen: set[str] = set()
    for part in parts[1:]:
        key, value = (part.split(None, 1) + [""])[:2]
        value = value.strip()
        if key in seen:
            raise PrivloraError(f"{where}: option --{key} is given twice")
        seen.add(key)
        _set_option(spec, key, value, where)
    return spec


def _set_option(spec: PromptLine, key: str, value: str, where: str) -> None:
    if key not in _INT_OPTIONS | _FLOAT_OPTIONS | _TEXT_OPTIONS:
        raise PrivloraError(f"{where}: unknown option --{key} (known: --n negative prompt, --w width, --h height, "
                            "--d seed, --s steps, --l guidance)")
    if not value:
        raise PrivloraError(f"{where}: option --{key} needs a value")
    if key in _TEXT_OPTIONS:
        setattr(spec, _TEXT_OPTIONS[key], value)
    elif key in _FLOAT_OPTIONS:
        number = _number(float, key, value, where)
        if not math.isfinite(number):
            raise PrivloraError(f"{where}: option --{key} {value!r} is not a finite number")
        setattr(spec, _FLOAT_OPTIONS[key], number)
    else:
        setattr(spec, _INT_OPTIONS[key], _checked_int(key, _number(int, key, value, where), where))


def _number(kind: type, key: str, value: str, where: str):
    try:
        return kind(value)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise PrivloraError(f"{where}: option --{key} {value!r} is not {noun}") from None


def _checked_int(key: str, value: int, where: str) -> int:
    if key in ("w", "h") and (value <= 0 or value % 8):
        raise PrivloraError(f"{where}: option --{key} {value} is not a positive multiple of 8")
    if key == "s" and value < 1:
        raise PrivloraError(f"{where}: option --s {value}: steps must be ≥ 1")
    if key == "d" and value < 0:
        raise PrivloraError(f"{where}: option --d {value}: seeds must be ≥ 0")
    return value


def read_prompts(path: str | Path) -> list[PromptLine]:
    """Every prompt of a prompts file, in order; errors name ``file:line``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PrivloraError(f"{path}: prompts file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PrivloraError(f"{path}: cannot read the prompts file ({e})") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        spec = parse_prompt_line(line, f"{path}:{number}")
        spec.line = number
        prompts.append(spec)
    if not prompts:
        raise PrivloraError(f"{path}: no prompts (only blank lines and # comments)")
    return prompts
