"""Canaries for the one-run ε audit (privlora.attacks.canary): extra training images, each included with
probability ½ by a secret coin, the coins kept in ``<output_dir>/canaries.json``.

The canaries are not part of the five membership roles: they only join the training set. ``canaries.json`` is as
private as ``splits.json`` — it says which canaries were trained on — and nothing in the LoRA file refers to it.
Generated canaries are sprites of their own namespace (``"canary"``), never the private or public ones.
"""
from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from privlora.data.readers import Example, read_examples
from privlora.errors import PrivloraError
from privlora.files import file_error, sha256_file
from privlora.io import write_json
from privlora.rundir import RunDir

CANARY_NAME = RunDir.CANARIES
CANARY_VERSION = 1
CANARY_WARNING = ("PRIVATE: which canaries were trained on (the one-run audit's secret). Do not publish it with the "
                  "LoRA.")
GENERATED = "generated"


def prepare_canaries(cfg, out: Path, split_hashes: set[str], draw: bool) -> list[Example]:
    """The canaries included in training. ``draw``: pick the canaries and flip their coins now (a new run's main
    process) and write canaries.json; else read them back (a resume, or another process of the same run)."""
    if not cfg.canaries:
        return []
    path = out / CANARY_NAME
    if not draw:
        if not path.is_file():
            raise file_error(path, "missing: this run was started with canaries, so resuming needs its canary file")
        record = read_canaries(path)
        if len(record["canaries"]) != cfg.canaries:
            raise file_error(path, f"holds {len(record['canaries'])} canaries, the settings say {cfg.canaries}")
        return [Example(Path(c["path"]), c["caption"]) for c in record["canaries"] if c["included"]]
    candidates = _candidates(cfg, out)
    rows: list[dict[str, Any]] = []
    for example in candidates:
        digest = sha256_file(example.path)
        if digest in split_hashes:
            raise file_error(example.path, "canary has the content of an image of the split; canaries must be new")
        rows.append({"path": str(example.path.resolve()), "caption": example.caption, "sha256": digest,
                     "included": bool(secrets.randbits(1))})
    if len({r["sha256"] for r in rows}) != len(rows):
        raise PrivloraError(f"{cfg.canary_source}: two canaries have the same content")
    write_json(path, {"warning": CANARY_WARNING, "version": CANARY_VERSION, "source": str(cfg.canary_source),
                      "inclusion": "each canary independently with probability 1/2 (secrets module)",
                      "canaries": rows})
    return [Example(Path(r["path"]), r["caption"]) for r in rows if r["included"]]


def _candidates(cfg, out: Path) -> list[Example]:
    if cfg.canary_source == GENERATED:
        from privlora.data import synthetic

        folder = synthetic.write_folder(out / "canaries", cfg.canaries, seed=cfg.seed, namespace="canary",
                                        resolution=cfg.resolution, layout="flat", style=cfg.synthetic_style)
        return read_examples(folder)
    pool = read_examples(cfg.canary_source)
    if len(pool) < cfg.canaries:
        raise file_error(cfg.canary_source, f"holds {len(pool)} images; {cfg.canaries} canaries asked for")
    rng = secrets.SystemRandom()
    return rng.sample(sorted(pool, key=lambda e: str(e.path)), cfg.canaries)


def read_canaries(path: str | Path) -> dict[str, Any]:
    import json

    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise file_error(path, f"cannot read canary file ({e.strerror or e})") from None
    except ValueError as e:
        raise file_error(path, f"not a valid JSON canary file ({e})") from None
    if not isinstance(record, dict) or record.get("version") != CANARY_VERSION or not isinstance(
            record.get("canaries"), list):
        raise file_error(path, f"not a privlora canary file of version {CANARY_VERSION}")
    for c in record["canaries"]:
        if not isinstance(c, dict) or not {"path", "caption", "sha256", "included"} <= set(c):
            raise file_error(path, f"malformed canary entry: {str(c)[:200]}")
    return record
