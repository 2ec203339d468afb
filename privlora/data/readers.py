"""Reading (image, caption) examples from the three supported dataset layouts.

(a) kohya folders: ``<dir>/<repeats>_<name>/img.png`` + ``img.txt`` (images directly in ``<dir>`` get repeats=1);
(b) a kohya-style dataset TOML with ``[[datasets]]`` / ``[[datasets.subsets]]``;
(c) a Hugging Face imagefolder with ``metadata.jsonl`` lines ``{"file_name": ..., "text": ...}``.

Captions are the caption file's text with whitespace runs (newlines included) collapsed to one space.
With ``require_captions=False`` a missing or empty caption becomes ``""`` (unconditional training).
"""
from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privlora.data.images import file_error, is_image_file

METADATA_FILE = "metadata.jsonl"

_REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")
_TOML_TOP_KEYS = {"general", "datasets"}
_TOML_GENERAL_KEYS = {"caption_extension", "resolution"}
_TOML_DATASET_KEYS = {"caption_extension", "resolution", "subsets"}
_TOML_SUBSET_KEYS = {"image_dir", "num_repeats", "caption_extension"}


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str
    repeats: int = 1


@dataclass(frozen=True)
class DatasetToml:
    examples: list[Example]
    resolution: int | tuple[int, int] | None  # (width, height) when not square


def read_examples(
    source: str | Path, caption_extension: str = ".txt", require_captions: bool = True
) -> list[Example]:
    """Read examples from a ``.toml`` file, a folder with ``metadata.jsonl``, or a kohya folder."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".toml":
        return read_dataset_toml(source, caption_extension, require_captions)
    if source.is_file():
        raise file_error(source, "expected a folder of images or a dataset .toml file")
    if not source.is_dir():
        raise file_error(source, "no such file or folder")
    if (source / METADATA_FILE).is_file():
        return read_imagefolder_jsonl(source, require_captions)
    return read_kohya_folder(source, caption_extension, require_captions)


def read_kohya_folder(
    train_data_dir: str | Path, caption_extension: str = ".txt", require_captions: bool = True
) -> list[Example]:
    """Images in ``<repeats>_<name>`` subfolders (and directly in the folder, repeats=1), with caption files."""
    root = _existing_dir(train_data_dir)
    caption_extension = _normalise_extension(caption_extension)
    examples = _read_flat_dir(root, 1, caption_extension, require_captions)
    for sub in _visible_subdirs(root):
        match = _REPEATS_FOLDER.match(sub.name)
        if match is None:
            if _images_in(sub):
                raise file_error(sub, "subfolder name must be '<repeats>_<name>', e.g. '10_pikachu'")
            continue
        repeats = int(match.group(1))
        if repeats < 1:
            raise file_error(sub, "the repeat count in the folder name must be at least 1")
        examples += _read_flat_dir(sub, repeats, caption_extension, require_captions)
    return _nonempty_sorted(examples, root)


def read_dataset_toml(
    path: str | Path, caption_extension: str = ".txt", require_captions: bool = True
) -> list[Example]:
    """Examples of every subset of every dataset in a kohya-style dataset TOML.

    ``caption_extension`` applies where neither the subset, its dataset nor ``[general]`` sets one.
    """
    return parse_dataset_toml(path, caption_extension, require_captions).examples


def parse_dataset_toml(
    path: str | Path, caption_extension: str = ".txt", require_captions: bool = True
) -> DatasetToml:
    """The TOML's examples and its (single) resolution setting, if any."""
    path = Path(path)
    config = _load_toml(path)
    _reject_unknown_keys(path, config, _TOML_TOP_KEYS, "")
    general = _table(path, config.get("general", {}), "general")
    _reject_unknown_keys(path, general, _TOML_GENERAL_KEYS, "general")
    examples: list[Example] = []
    resolutions = set()
    for i, dataset in enumerate(_array_of_tables(path, config.get("datasets", []), "datasets")):
        _reject_unknown_keys(path, dataset, _TOML_DATASET_KEYS, f"datasets[{i}]")
        defaults = {"caption_extension": caption_extension, **general, **dataset}
        resolutions.add(_toml_resolution(path, defaults.get("resolution")))
        for j, subset in enumerate(_array_of_tables(path, dataset.get("subsets", []), f"datasets[{i}].subsets")):
            examples += _read_toml_subset(path, subset, defaults, require_captions, f"datasets[{i}].subsets[{j}]")
    resolutions.discard(None)
    if len(resolutions) > 1:
        raise file_error(path, "datasets with different resolutions are not supported")
    return DatasetToml(_nonempty_sorted(examples, path), resolutions.pop() if resolutions else None)


def read_imagefolder_jsonl(directory: str | Path, require_captions: bool = True) -> list[Example]:
    """Images listed in ``<dir>/metadata.jsonl``; an image in the folder but not listed is an error."""
    root = _existing_dir(directory)
    metadata = root / METADATA_FILE
    captions: dict[Path, str] = {}
    for line_number, record in _jsonl_records(metadata):
        image, caption = _metadata_entry(metadata, line_number, record, root, require_captions)
        if image in captions:
            raise file_error(metadata, f"line {line_number}: '{record['file_name']}' is listed twice")
        captions[image] = caption
    for image in _images_in(root, recursive=True):
        if image not in captions:
            if require_captions:
                raise file_error(image, f"no caption: the image is not listed in {metadata}")
            captions[image] = ""
    return _nonempty_sorted([Example(p, c) for p, c in captions.items()], root)


# --- kohya folders -----------------------------------------------------------------------------


def _read_flat_dir(folder: Path, repeats: int, caption_extension: str, require_captions: bool) -> list[Example]:
    return [
        Example(image, _read_caption(image, caption_extension, require_captions), repeats)
        for image in _images_in(folder)
    ]


def _read_caption(image: Path, caption_extension: str, require_captions: bool) -> str:
    caption_file = image.with_suffix(caption_extension)
    if not caption_file.is_file():
        if require_captions:
            raise file_error(image, f"missing caption file {caption_file.name}{_other_caption_hint(image)}")
        return ""
    try:
        text = caption_file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise file_error(caption_file, "caption file is not valid UTF-8") from None
    except OSError as e:
        raise file_error(caption_file, f"cannot read caption file ({e.strerror or e})") from None
    caption = " ".join(text.split())
    if not caption and require_captions:
        raise file_error(caption_file, "caption file is empty")
    return caption


def _other_caption_hint(image: Path) -> str:
    for extension in (".txt", ".caption"):
        if image.with_suffix(extension).is_file():
            return f" (found {image.with_suffix(extension).name}; set the caption extension to {extension})"
    return ""


def _normalise_extension(extension: str) -> str:
    return extension if extension.startswith(".") else f".{extension}"


# --- dataset TOML ------------------------------------------------------------------------------


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise file_error(path, f"invalid TOML ({e})") from None
    except OSError as e:
        raise file_error(path, f"cannot read file ({e.strerror or e})") from None


def _reject_unknown_keys(path: Path, table: dict[str, Any], known: set[str], where: str) -> None:
    for key in table:
        if key not in known:
            name = f"{where}.{key}" if where else key
            raise file_error(path, f"unknown key '{name}' (known here: {', '.join(sorted(known))})")


def _table(path: Path, value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise file_error(path, f"'{name}' must be a table")
    return value


def _array_of_tables(path: Path, value: Any, name: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise file_error(path, f"'{name}' must be an array of tables")
    return value


def _toml_resolution(path: Path, value: Any) -> int | tuple[int, int] | None:
    if value is None:
        return None
    if _is_positive_int(value):
        return value
    if isinstance(value, list) and len(value) == 2 and all(_is_positive_int(v) for v in value):
        return value[0] if value[0] == value[1] else (value[0], value[1])
    raise file_error(path, f"'resolution' must be a positive integer or [width, height], got {value!r}")


def _read_toml_subset(
    path: Path, subset: dict[str, Any], defaults: dict[str, Any], require_captions: bool, where: str
) -> list[Example]:
    _reject_unknown_keys(path, subset, _TOML_SUBSET_KEYS, where)
    if not isinstance(subset.get("image_dir"), str):
        raise file_error(path, f"{where}: 'image_dir' (a string) is required")
    repeats = subset.get("num_repeats", 1)
    if not _is_positive_int(repeats):
        raise file_error(path, f"{where}: 'num_repeats' must be a positive integer, got {repeats!r}")
    extension = subset.get("caption_extension", defaults["caption_extension"])
    if not isinstance(extension, str) or not extension:
        raise file_error(path, f"{where}: 'caption_extension' must be a non-empty string")
    image_dir = _joined(path.parent, Path(subset["image_dir"]).expanduser())
    return _read_flat_dir(_existing_dir(image_dir), repeats, _normalise_extension(extension), require_captions)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# --- metadata.jsonl ----------------------------------------------------------------------------


def _jsonl_records(metadata: Path) -> list[tuple[int, Any]]:
    try:
        lines = metadata.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise file_error(metadata, "not valid UTF-8") from None
    except OSError as e:
        raise file_error(metadata, f"cannot read file ({e.strerror or e})") from None
    records = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append((line_number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise file_error(metadata, f"line {line_number}: invalid JSON ({e.msg})") from None
    return records


def _metadata_entry(
    metadata: Path, line_number: int, record: Any, root: Path, require_captions: bool
) -> tuple[Path, str]:
    where = f"line {line_number}"
    if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
        raise file_error(metadata, f"{where}: expected an object with a 'file_name' string")
    text = record.get("text", "" if not require_captions else None)
    if not isinstance(text, str):
        raise file_error(metadata, f"{where}: expected a 'text' string (the caption)")
    if require_captions and not text.strip():
        raise file_error(metadata, f"{where}: empty caption for '{record['file_name']}'")
    image = _joined(root, record["file_name"])
    if not image.is_file():
        raise file_error(metadata, f"{where}: listed file '{record['file_name']}' does not exist")
    if not is_image_file(image):
        raise file_error(metadata, f"{where}: '{record['file_name']}' is not an image file")
    return image, " ".join(text.split())


# --- shared helpers ----------------------------------------------------------------------------


def _joined(base: Path, relative: str | Path) -> Path:
    """``base / relative`` with ``..`` folded away, so the same file always gets the same Path."""
    return Path(os.path.normpath(base / relative))


def _existing_dir(directory: str | Path) -> Path:
    directory = Path(os.path.normpath(directory))
    if not directory.is_dir():
        raise file_error(directory, "no such folder")
    return directory


def _visible_subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path, recursive: bool = False) -> list[Path]:
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in candidates if is_image_file(p) and not _in_hidden_dir(p, folder))


def _in_hidden_dir(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts[:-1])


def _nonempty_sorted(examples: list[Example], source: Path) -> list[Example]:
    if not examples:
        raise file_error(source, "no images found")
    return sorted(examples, key=lambda e: (str(e.path), e.repeats, e.caption))
