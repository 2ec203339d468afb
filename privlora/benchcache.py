"""``<out>/phases.json``: the bench's record of its finished pieces (an audit, one model's samples, one run's
selection), each reused while the inputs it was computed from are unchanged."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from privlora.io import write_json

AUDIT_CACHE = "audit-cache"  # <out>/audit-cache: every audit of the bench keeps each model's results there


class PhaseCache:
    """For every finished piece of the bench, the inputs it was computed from and its result. A piece is reused
    while its inputs are unchanged; LoRA files enter the inputs by size and mtime (``file_stamp``), so a re-trained
    run invalidates what was computed from it."""

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
    """Identifies one version of a file: a re-trained run's new LoRA invalidates what was computed from the old."""
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"
