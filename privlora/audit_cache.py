"""``privlora audit --model_cache DIR``: each model's report entry, reused by a later audit while everything that
determines it is unchanged, so adding one LoRA to an audit scores that LoRA alone (issue 27).

It rests on the property ``audit_parts`` states: a model's numbers depend only on the audit seed, the samples and
the model, never on the other models audited beside it. ``privlora.audit.cache_keys`` writes down, per model,
everything those numbers depend on (the model file's sha256, the base model, the samples, every setting but the
list of other LoRAs and the output folder, shadows and canary files by content, the code that computes them); this
module stores an entry under the digest of that key, one JSON file each, and gives it back only for an identical
key. Entries are written atomically, so parallel parts of one audit (``--jobs``) can share a folder. An entry
whose key no audit asks for any more stays on disk until the folder is deleted.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from privlora.files import sha256_file
from privlora.io import write_text

FORMAT = 1  # bump when what an entry holds changes, so older entries are never read as newer ones
# the modules a model's numbers are computed by: an edit to any of them makes every entry stale
SCORING_CODE = ("attacks", "models", "data", "audit.py", "diffusion.py", "captions.py", "shadows.py")


class ModelCache:
    """Report entries of audited models, one file per key digest in ``folder``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        """The entry stored under exactly this key; None when there is none (or it cannot be read)."""
        path = self._file(key)
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return stored["entry"] if stored.get("key") == _canonical(key) else None

    def entries(self, keys: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The stored entry of each model (by name) whose key is found."""
        return {name: entry for name, key in keys.items() if (entry := self.get(key)) is not None}

    def put(self, key: dict[str, Any], entry: dict[str, Any]) -> None:
        write_text(self._file(key), json.dumps({"key": key, "entry": entry}) + "\n")

    def _file(self, key: dict[str, Any]) -> Path:
        return self.folder / f"{key_digest(key)}.json"


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()


def _canonical(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists), for comparing a stored key."""
    return json.loads(json.dumps(value))


def code_fingerprint() -> str:
    """The sha256 of the sources that compute a model's numbers (``SCORING_CODE``), in a fixed order."""
    package = Path(__file__).parent
    digest = hashlib.sha256()
    for entry in SCORING_CODE:
        files = sorted((package / entry).rglob("*.py")) if (package / entry).is_dir() else [package / entry]
        for path in files:
            digest.update(str(path.relative_to(package)).encode("utf-8") + b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()


def folder_stamps(folder: Path) -> str:
    """A digest of every file's relative path, size and mtime under ``folder``: a replaced VAE or text encoder
    of a base model folder changes it (its UNet hash alone would not)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def content_digest(value: Any) -> str:
    """The sha256 of a JSON-able value (the chosen samples, a shadow set's masks)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()


class FileHashes:
    """sha256 of files, each read once per audit (the base row's control shadows are the first LoRA's too)."""

    def __init__(self) -> None:
        self._seen: dict[Path, str] = {}

    def __call__(self, path: Path) -> str:
        if path not in self._seen:
            self._seen[path] = sha256_file(path)
        return self._seen[path]


def merge_cached(report: dict[str, Any], order: list[str], reused: dict[str, dict], keys: dict[str, dict],
                 cache: ModelCache) -> None:
    """Store the entries this audit computed, put the reused ones in their places (the audit's ``order``), and say
    in ``model_cache`` which were which. A reused entry keeps its seconds and unet_queries_run (what the audit that
    computed it spent); the report's ``unet_queries.total_run`` and ``wall_seconds`` count this audit's work."""
    fresh = {m["name"]: m for m in report["models"]}
    for name, entry in fresh.items():
        cache.put(keys[name], entry)
    report["models"] = [reused[name] if name in reused else fresh[name] for name in order]
    report["model_cache"] = {"folder": str(cache.folder), "reused": [n for n in order if n in reused],
                             "audited": [n for n in order if n in fresh]}


def merge_summaries(summaries: list[dict[str, Any]], order: list[str]) -> dict[str, Any]:
    """One ``model_cache`` summary from the parts' of a split audit (``audit_parts``), in the audit's order."""
    reused = {n for s in summaries for n in s["reused"]}
    audited = {n for s in summaries for n in s["audited"]}
    return {"folder": summaries[0]["folder"], "reused": [n for n in order if n in reused],
            "audited": [n for n in order if n in audited]}
