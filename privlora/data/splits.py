"""The paper's five data roles, how to make them, the rules they obey, and the (private) manifest.

``train`` (D_tr) is what the LoRA learns. ``member_aux`` (D^m_aux) and ``nonmember_aux`` (D^nm_aux) train
the proxy attacker; ``member_test`` (D^m_te) and ``nonmember_test`` (D^nm_te) are for the audit.
Members are subsets of ``train``; non-members must never be trained on.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from privlora.data.images import file_error, sha256_file
from privlora.data.readers import Example, read_examples
from privlora.errors import PrivloraError
from privlora.io import write_json

ROLES = ("train", "member_aux", "member_test", "nonmember_aux", "nonmember_test")
PAPER_NAMES = {
    "train": "D_tr",
    "member_aux": "D^m_aux",
    "member_test": "D^m_te",
    "nonmember_aux": "D^nm_aux",
    "nonmember_test": "D^nm_te",
}
MEMBER_ROLES = ("member_aux", "member_test")
NONMEMBER_ROLES = ("nonmember_aux", "nonmember_test")
MANIFEST_WARNING = (
    "PRIVATE: this file identifies which images were used for training (membership). Do not publish it."
)
MANIFEST_VERSION = 1


@dataclass
class Splits:
    train: list[Example]
    member_aux: list[Example]
    member_test: list[Example]
    nonmember_aux: list[Example]
    nonmember_test: list[Example]
    hashes: dict[Path, str] = field(default_factory=dict)
    seed: int | None = None

    def role(self, name: str) -> list[Example]:
        if name not in ROLES:
            raise PrivloraError(f"unknown split role '{name}' (roles: {', '.join(ROLES)})")
        return getattr(self, name)

    def items(self) -> list[tuple[str, list[Example]]]:
        return [(name, self.role(name)) for name in ROLES]

    def hash_of(self, example: Example) -> str:
        if example.path not in self.hashes:
            self.hashes[example.path] = sha256_file(example.path)
        return self.hashes[example.path]


# --- making splits -----------------------------------------------------------------------------


def auto_split(
    examples: list[Example],
    *,
    n_nonmember_aux: int = 200,
    n_nonmember_test: int = 200,
    n_member_aux: int = 200,
    n_member_test: int | None = None,
    seed: int,
) -> Splits:
    """The paper's protocol: hold out non-members, train on the rest, and pick members from the trained set.

    Pokemon (833 images): 200 + 200 non-members, 433 trained on, of which 200 are member_aux and the other
    233 member_test (or only ``n_member_test`` of them). Deterministic for a given ``seed`` and image set.
    """
    _require_enough_images(len(examples), n_nonmember_aux, n_nonmember_test, n_member_aux, n_member_test)
    ordered = sorted(examples, key=lambda e: str(e.path))
    hashes = {e.path: sha256_file(e.path) for e in ordered}
    _reject_duplicates(ordered, hashes, "the dataset")
    shuffled = [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]
    nonmember_aux = shuffled[:n_nonmember_aux]
    nonmember_test = shuffled[n_nonmember_aux : n_nonmember_aux + n_nonmember_test]
    trained = shuffled[n_nonmember_aux + n_nonmember_test :]
    member_test = trained[n_member_aux:] if n_member_test is None else trained[n_member_aux:][:n_member_test]
    splits = Splits(
        train=_by_path(trained),
        member_aux=_by_path(trained[:n_member_aux]),
        member_test=_by_path(member_test),
        nonmember_aux=_by_path(nonmember_aux),
        nonmember_test=_by_path(nonmember_test),
        hashes=hashes,
        seed=seed,
    )
    validate(splits)
    return splits


def _require_enough_images(
    available: int, n_nonmember_aux: int, n_nonmember_test: int, n_member_aux: int, n_member_test: int | None
) -> None:
    counts = dict(n_nonmember_aux=n_nonmember_aux, n_nonmember_test=n_nonmember_test, n_member_aux=n_member_aux)
    counts["n_member_test"] = 1 if n_member_test is None else n_member_test  # None: all the rest, at least 1
    for name, count in counts.items():
        if count < 1:
            raise PrivloraError(f"{name} must be at least 1, got {count}")
    needed = sum(counts.values())
    if available < needed:
        raise PrivloraError(
            f"too few images for this split: need at least {needed} "
            f"({n_nonmember_aux} non-member aux + {n_nonmember_test} non-member test + {n_member_aux} member aux "
            f"+ {counts['n_member_test']} member test), found {available}"
        )


def _by_path(examples: list[Example]) -> list[Example]:
    return sorted(examples, key=lambda e: str(e.path))


def splits_from_dirs(
    root_or_mapping: str | Path | Mapping[str, str | Path],
    caption_extension: str = ".txt",
    require_captions: bool = True,
) -> Splits:
    """Five explicit folders, by role name or paper name (``D_tr``, ``D^m_aux``, ...).

    The member folders hold copies of training images: each is matched to its training image by content
    hash, and the split refers to the training image (its path and caption).
    """
    dirs = _role_dirs(root_or_mapping)
    hashes: dict[Path, str] = {}
    splits_by_role: dict[str, list[Example]] = {}
    for role in ("train", *NONMEMBER_ROLES):
        splits_by_role[role] = read_examples(dirs[role], caption_extension, require_captions)
        hashes.update((e.path, sha256_file(e.path)) for e in splits_by_role[role])
    train_by_hash: dict[str, Example] = {}
    for example in splits_by_role["train"]:
        train_by_hash.setdefault(hashes[example.path], example)
    for role in MEMBER_ROLES:
        copies = read_examples(dirs[role], caption_extension, require_captions=False)
        splits_by_role[role] = _match_to_training(copies, train_by_hash, role)
    splits = Splits(**splits_by_role, hashes=hashes)  # type: ignore[arg-type]  # the five role lists
    validate(splits)
    return splits


def _role_dirs(root_or_mapping: str | Path | Mapping[str, str | Path]) -> dict[str, Path]:
    if isinstance(root_or_mapping, Mapping):
        return _dirs_from_mapping(root_or_mapping)
    root = Path(root_or_mapping)
    if not root.is_dir():
        raise file_error(root, "no such folder")
    dirs = {}
    for role in ROLES:
        present = [root / name for name in (PAPER_NAMES[role], role) if (root / name).is_dir()]
        if not present:
            raise file_error(root, f"missing folder for role {role} (expected '{PAPER_NAMES[role]}' or '{role}')")
        if len(present) > 1:
            raise file_error(root, f"both '{PAPER_NAMES[role]}' and '{role}' exist; keep one")
        dirs[role] = present[0]
    return dirs


def _dirs_from_mapping(mapping: Mapping[str, str | Path]) -> dict[str, Path]:
    by_paper_name = {paper: role for role, paper in PAPER_NAMES.items()}
    dirs = {}
    for key, directory in mapping.items():
        role = by_paper_name.get(key, key)
        if role not in ROLES:
            raise PrivloraError(f"unknown split role '{key}' (roles: {', '.join(ROLES)})")
        dirs[role] = Path(directory)
    missing = [role for role in ROLES if role not in dirs]
    if missing:
        raise PrivloraError(f"no folder given for split role(s): {', '.join(missing)}")
    return dirs


def _match_to_training(copies: list[Example], train_by_hash: dict[str, Example], role: str) -> list[Example]:
    copy_of: dict[Path, Path] = {}  # training image -> the copy that matched it
    for copy in copies:
        original = train_by_hash.get(sha256_file(copy.path))
        if original is None:
            raise file_error(copy.path, f"{role} image is not in the training set (no training image has this content)")
        if original.path in copy_of:
            raise file_error(copy.path, f"same content as {copy_of[original.path]} (duplicate within {role})")
        copy_of[original.path] = copy.path
    return _by_path([e for e in train_by_hash.values() if e.path in copy_of])


# --- rules -------------------------------------------------------------------------------------


def validate(splits: Splits) -> None:
    """Raise PrivloraError unless the five roles obey the membership rules.

    No role is empty; no role holds the same content twice; members are (by content) training images;
    no non-member has the content of a training image; the aux and test sets do not overlap.
    """
    for role, examples in splits.items():
        if not examples:
            raise PrivloraError(f"split role {role} ({PAPER_NAMES[role]}) is empty")
        _reject_duplicates(examples, _hashes_for(splits, examples), role)
    train = _index_by_hash(splits, splits.train)
    for role in MEMBER_ROLES:
        for example in splits.role(role):
            if splits.hash_of(example) not in train:
                raise file_error(example.path, f"{role} image is not in the training set")
    for role in NONMEMBER_ROLES:
        for example in splits.role(role):
            twin = train.get(splits.hash_of(example))
            if twin is not None:
                raise file_error(example.path, f"{role} image is also in the training set (same content as {twin})")
    _reject_overlap(splits, "member_aux", "member_test")
    _reject_overlap(splits, "nonmember_aux", "nonmember_test")


def _hashes_for(splits: Splits, examples: list[Example]) -> dict[Path, str]:
    return {e.path: splits.hash_of(e) for e in examples}


def _index_by_hash(splits: Splits, examples: list[Example]) -> dict[str, Path]:
    return {splits.hash_of(e): e.path for e in examples}


def _reject_duplicates(examples: list[Example], hashes: dict[Path, str], where: str) -> None:
    seen: dict[str, Path] = {}
    for example in examples:
        digest = hashes[example.path]
        if digest in seen:
            if seen[digest] == example.path:
                raise file_error(example.path, f"listed twice in {where}")
            raise file_error(example.path, f"same content as {seen[digest]} (duplicate within {where})")
        seen[digest] = example.path


def _reject_overlap(splits: Splits, first: str, second: str) -> None:
    first_hashes = _index_by_hash(splits, splits.role(first))
    for example in splits.role(second):
        twin = first_hashes.get(splits.hash_of(example))
        if twin is not None:
            raise file_error(example.path, f"is in both {first} and {second} (same content as {twin})")


# --- manifest ----------------------------------------------------------------------------------


def write_manifest(path: str | Path, splits: Splits, root: str | Path | None = None) -> Path:
    """Write the split as private JSON; image paths are stored relative to ``root`` (default: the manifest's folder)."""
    path = Path(path)
    root = Path(root if root is not None else path.parent).resolve()
    roles = {role: [_manifest_entry(splits, e, root) for e in examples] for role, examples in splits.items()}
    return write_role_entries(path, root, roles, splits.seed)


def write_role_entries(path: Path, root: Path, roles: dict[str, list[dict]], seed: int | None = None) -> Path:
    """A manifest from entries of another (select's aux halves, a DP run's non-member quarters, a shadow's
    half): the same private envelope, the entries' hashes kept so every image is still verified on reading."""
    return write_json(path, {"warning": MANIFEST_WARNING, "version": MANIFEST_VERSION, "seed": seed, "root": str(root),
                             "root_from_manifest": Path(os.path.relpath(root, path.parent.resolve())).as_posix(),
                             "roles": roles})


def _manifest_entry(splits: Splits, example: Example, root: Path) -> dict[str, Any]:
    relative = Path(os.path.relpath(example.path.resolve(), root)).as_posix()
    return {"path": relative, "sha256": splits.hash_of(example), "caption": example.caption, "repeats": example.repeats}


def read_manifest(path: str | Path, verify_hashes: bool = True) -> Splits:
    """Read a manifest back, checking every image still exists and (by default) still has the same content.

    If the stored absolute root no longer exists, the root is found relative to the manifest instead,
    so a project folder can be moved as a whole.
    """
    path = Path(path)
    manifest = _load_manifest(path)
    root = _manifest_root(path, manifest)
    hashes: dict[Path, str] = {}
    roles = {role: _manifest_role(path, manifest, role, root, hashes, verify_hashes) for role in ROLES}
    splits = Splits(**roles, hashes=hashes, seed=manifest.get("seed"))
    validate(splits)
    return splits


def _load_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise file_error(path, f"cannot read manifest ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise file_error(path, f"not a valid JSON manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        raise file_error(path, f"not a privlora split manifest of version {MANIFEST_VERSION}")
    if not isinstance(manifest.get("root"), str) or not isinstance(manifest.get("roles"), dict):
        raise file_error(path, "manifest lacks 'root' or 'roles'")
    return manifest


def _manifest_root(path: Path, manifest: dict[str, Any]) -> Path:
    root = Path(manifest["root"])
    fallback = manifest.get("root_from_manifest")
    if not root.is_dir() and isinstance(fallback, str):
        root = path.parent / fallback
    return root


def _manifest_role(
    path: Path, manifest: dict[str, Any], role: str, root: Path, hashes: dict[Path, str], verify_hashes: bool
) -> list[Example]:
    entries = manifest["roles"].get(role)
    if not isinstance(entries, list):
        raise file_error(path, f"manifest has no list for role {role}")
    examples = []
    for entry in entries:
        example, digest = _manifest_example(path, entry, root, role)
        if not example.path.is_file():
            raise file_error(path, f"{example.path}: file is missing")
        if verify_hashes:
            actual = hashes.get(example.path) or sha256_file(example.path)
            if actual != digest:
                raise file_error(path, f"{example.path}: content hash does not match the manifest")
        hashes[example.path] = digest
        examples.append(example)
    return examples


def _manifest_example(path: Path, entry: Any, root: Path, role: str) -> tuple[Example, str]:
    valid = (
        isinstance(entry, dict)
        and isinstance(entry.get("path"), str)
        and isinstance(entry.get("sha256"), str)
        and isinstance(entry.get("caption"), str)
        and isinstance(entry.get("repeats", 1), int)
    )
    if not valid:
        raise file_error(path, f"malformed entry in role {role}: {json.dumps(entry)[:200]}")
    return Example(root / entry["path"], entry["caption"], entry.get("repeats", 1)), entry["sha256"]
