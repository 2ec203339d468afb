"""The layout of a training run's output folder, in one place: train writes it; bench, select, audit and the shadow
attacks read it.

``<output_dir>/``
    ``<name>.safetensors``                 the final LoRA (``<name>`` = output_name)
    ``<name>-eNNNN.safetensors``           intermediate LoRAs by epoch, ``<name>-stepNNNNNN.safetensors`` by step
    ``<checkpoint>.<module>[_best].safetensors``  a method's extra modules (MP-/SMP-LoRA's attacker)
    ``splits.json``                        the split (private: it names the training images)
    ``canaries.json``                      the canaries' secret coins (private)
    ``resolved_config.toml``               every setting, as a preset to train from again
    ``history.json``                       the per-evaluation record
    ``state-stepNNNNNN/``, ``state-latest``  resumable states and the pointer to the newest
    ``train_time.json``, ``select.json``   written by the bench and by ``privlora select``
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    path: Path
    name: str = "lora"

    SPLITS = "splits.json"
    CANARIES = "canaries.json"
    RESOLVED = "resolved_config.toml"
    HISTORY = "history.json"
    LATEST = "state-latest"
    TRAIN_TIME = "train_time.json"
    SELECT = "select.json"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def splits(self) -> Path:
        return self.path / self.SPLITS

    @property
    def canaries(self) -> Path:
        return self.path / self.CANARIES

    @property
    def resolved(self) -> Path:
        return self.path / self.RESOLVED

    @property
    def history(self) -> Path:
        return self.path / self.HISTORY

    @property
    def latest(self) -> Path:
        return self.path / self.LATEST

    @property
    def train_time(self) -> Path:
        return self.path / self.TRAIN_TIME

    @property
    def select(self) -> Path:
        return self.path / self.SELECT

    def checkpoint_name(self, *, epoch: int | None = None, step: int | None = None) -> str:
        """``<name>`` (final), ``<name>-eNNNN`` or ``<name>-stepNNNNNN``."""
        if epoch is not None:
            return f"{self.name}-e{epoch:04d}"
        if step is not None:
            return f"{self.name}-step{step:06d}"
        return self.name

    def lora(self, *, epoch: int | None = None, step: int | None = None) -> Path:
        return self.path / f"{self.checkpoint_name(epoch=epoch, step=step)}.safetensors"

    def module(self, checkpoint: str, module: str, suffix: str = "") -> Path:
        return self.path / f"{checkpoint}.{module}{suffix}.safetensors"

    def state(self, step: int) -> Path:
        return self.path / f"state-step{step:06d}"

    def states(self) -> list[Path]:
        return sorted(p for p in self.path.glob("state-step*") if p.is_dir())

    def is_finished(self) -> bool:
        return self.lora().is_file()

    def checkpoints(self) -> list[Path]:
        """The intermediate LoRA files and the final one, in training order (epoch and step files by their number;
        the final one last)."""
        pattern = re.compile(rf"^{re.escape(self.name)}(?:-e(?P<epoch>\d{{4,}})|-step(?P<step>\d{{6,}}))?"
                             r"\.safetensors$")
        found = []
        for path in self.path.glob(f"{self.name}*.safetensors"):
            m = pattern.match(path.name)
            if m:
                number = int(m["epoch"] or 0) or int(m["step"] or 0)
                found.append(((1, 0) if not (m["epoch"] or m["step"]) else (0, number), path))
        return [p for _, p in sorted(found)]
