"""The one interface every membership-inference attack implements, and the batches it sees.

An attack gets a model (a :class:`~privlora.attacks.target.Target`: seeded, batched, cached UNet queries) and a
:class:`Batch` of samples, and returns one score per sample — higher means "more likely a member". Attacks
that learn something (a classifier, a calibration) do it in :meth:`Attack.fit`, which only ever receives
batches of the auxiliary roles.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from privlora.errors import PrivloraError

AUX_ROLES = ("member_aux", "nonmember_aux")
TEST_ROLES = ("member_test", "nonmember_test")


@dataclass
class Batch:
    """Samples with their cached VAE latents. ``keys`` (content hashes) seed each sample's noise."""

    keys: list[str]
    paths: list[Path]
    roles: list[str]
    captions: list[str]
    latents: torch.Tensor  # (B, C, H, W), fp32, on the CPU

    def __len__(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class Query:
    """One noised copy of a sample: timestep ``t``, the sample's ``draw``-th seeded noise, a caption variant."""

    t: int
    draw: int = 0
    caption: str = "full"  # "full" | "empty" | "partial:<fraction of words dropped>"


class Attack(ABC):
    """Base class: subclasses are dataclasses whose fields are the attack's parameters."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for the report: what the score is
    fits: ClassVar[bool] = False  # True: needs fit() on the aux roles before score()
    decision_threshold: ClassVar[float | None] = None  # the attack's own rule "member if score > τ", if it has one
    decision_label: ClassVar[str] = "accuracy of its own decision"  # what the report calls that rule's accuracy

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def check(self, num_train_timesteps: int) -> None:
        """Raise PrivloraError if a parameter cannot work with this scheduler."""
        for t in self.timesteps_used():
            if not 0 <= t < num_train_timesteps:
                raise PrivloraError(f"attack {self.name}: timestep {t} is outside 0..{num_train_timesteps - 1}")

    def timesteps_used(self) -> list[int]:
        return []

    @abstractmethod
    def queries_per_sample(self) -> int:
        """UNet evaluations one sample costs this attack (before any sharing between attacks)."""

    def prepare(self, model) -> str | None:
        """Per-model setup before fit/score. Returns None, or one line saying why this attack does not apply to
        this model (it is then skipped for it, and the report says why). Raise PrivloraError for bad input."""
        return None

    def side_files(self, lora: Path) -> list[Path]:
        """Files beside an audited LoRA that ``prepare`` reads; the audit's model cache keys a model on them."""
        return []

    def details(self) -> dict[str, Any]:
        """What the report should know about this attack on this model (after prepare). ``held_out: False``: the
        attack was trained on the test samples with their labels, so its test scores are not a held-out measurement."""
        return {}

    def fit(self, model, member: list[Batch], nonmember: list[Batch]) -> dict[str, Any]:
        """Learn from auxiliary members / non-members; returns a summary for the report."""
        return {}

    @abstractmethod
    def score(self, model, batch: Batch) -> torch.Tensor:
        """One float per sample, shape (B,), higher = more likely a member."""


def require_aux(attack: str, batches: list[Batch]) -> None:
    """Guard for fit(): test-role samples must never reach training or calibration."""
    for batch in batches:
        leaked = [str(p) for p, r in zip(batch.paths, batch.roles) if r not in AUX_ROLES]
        if leaked:
            raise RuntimeError(f"attack {attack}: refusing to fit on non-auxiliary samples (e.g. {leaked[0]})")
