"""``<out>/phases.json``: the bench's record of its finished pieces (an audit, one model's samples, one run's
selection), each reused while the inputs it was computed from are unchanged. The record does not depend on where the
bench folder lies: files inside it are named relative to it (``bench_path``) and identified by their content
(``file_stamp``), so a bench folder that is moved or copied (even by a copy that does not keep modification times)
reuses every finished piece."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from privlora.files import sha256_file
from privlora.io import write_json

AUDIT_CACHE = "audit-cache"  # <out>/audit-cache: every audit of the bench keeps each model's results there


class PhaseCache:
    """For every finished piece of the bench, the inputs it was computed from and its result. A piece is reused
    while its inputs are unchanged; LoRA files enter the inputs by size and content (``file_stamp``), so a re-trained
    run whose file changed invalidates what was computed from it."""

    def __init__(self, out: Path):
        self.path = out / "phases.json"

    def _read(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get(self, key: str, inputs: dict) -> Any:
        entry = self._read().get(key)
        return entry["result"] if entry and entry["inputs"] == json.loads(json.dumps(inputs)) else None

    def put(self, key: str, inputs: dict, result: Any) -> None:
        stored = self._read()
        stored[key] = {"inputs": inputs, "result": result}
        write_json(self.path, stored)


def file_stamp(path: Path) -> str:
    """Identifies one version of a file by its size and SHA-256: a re-trained run's changed LoRA invalidates what
    was computed from the old one, and a copy of the file (another place, another mtime) is the same version. The
    digest is kept per path, size and mtime, so a bench hashes each file once however often it asks."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(path)
    return f"{st.st_size}:{_DIGESTS[key]}"


_DIGESTS: dict[tuple[str, int, int], str] = {}


def bench_path(path: Path, out: Path) -> str:
    """A path as phases.json records it: relative to the bench folder ``out`` when inside it, else as given."""
    try:
        return Path(path).resolve().relative_to(Path(out).resolve()).as_posix()
    except ValueError:
        return str(path)
