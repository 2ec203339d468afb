"""Resumable training state: written atomically as ``<output_dir>/state-stepNNNNNN/``, pointed to by ``state-latest``.

A state holds everything a resumed run needs to continue bit-identically: LoRA weights, optimizer, lr
scheduler, the objective's attacker and its optimizer, every RNG (torch, numpy, python, the run's noise
generator, the data order at the start of the current epoch, per process) and the progress counters. It is
a ``torch.save`` file read back with ``weights_only=True`` (no arbitrary objects are unpickled).
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from privlora.errors import PrivloraError
from privlora.io import write_text
from privlora.rundir import RunDir

LATEST = RunDir.LATEST


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(np.asarray(keys).astype(np.int64)), pos, has_gauss, cached]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_state(out: Path, step: int, payload: dict, rank_payload: dict, accelerator, keep: int = 2) -> Path:
    """Every process writes its own RNG file, then the main process writes the rest and renames atomically."""
    final = RunDir(out).state(step)
    tmp = out / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    _save(rank_payload, tmp / f"rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _save(payload, tmp / "state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_text(out / LATEST, final.name + "\n")
        for old in RunDir(out).states()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _save(obj, path: Path) -> None:
    torch.save(obj, path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def resolve(resume: str, out: Path) -> Path:
    """``latest`` → the state ``state-latest`` names in the output folder; else a state folder path."""
    if resume == "latest":
        pointer = out / LATEST
        if not pointer.is_file():
            raise PrivloraError(f"{pointer}: no saved state to resume from (train with --save_state)")
        path = out / pointer.read_text().strip()
    else:
        path = Path(resume)
    if not (path / "state.pt").is_file():
        raise PrivloraError(f"{path}: not a privlora training state (no state.pt)")
    return path


def load_state(path: Path, rank: int) -> tuple[dict, dict]:
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        rank_file = path / f"rank{rank}.pt"
        if not rank_file.is_file():
            raise PrivloraError(f"{path}: saved with fewer processes (no {rank_file.name}); resume with the same count")
        return state, torch.load(rank_file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as e:
        raise PrivloraError(f"{path}: cannot read the training state ({e})") from None
