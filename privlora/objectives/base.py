"""The one interface between the training loop and a training method.

Per optimizer step the loop asks the method for gradients (``gradients``: by default the loss of
``lora_loss`` back-propagated into the LoRA weights), lets it clip them (``clip``), steps the LoRA optimizer,
then calls ``after_lora_step`` (where MP-/SMP-LoRA train their proxy attacker). The method also chooses how
training batches are drawn (``make_loader``) and what it adds to each epoch's record and to the LoRA file's
metadata. The loop never looks at which method it runs; a method overrides only what it must own.

A method owns its settings too: ``settings_cls`` (a ``MethodSettings`` dataclass: keys, defaults, validation, which
keys must match on resume); the registry (``privlora.objectives.METHODS``) turns them into flags and preset keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from privlora.settings import MethodSettings

if TYPE_CHECKING:
    from privlora.settings import TrainConfig

BEST_SUFFIX = "_best"  # <name>.<module>_best.safetensors: a method's modules at their best evaluation so far


@dataclass
class StepOutput:
    loss: torch.Tensor  # what the LoRA optimiser minimises (for a method that forms gradients itself: what it reports)
    logs: dict[str, float] = field(default_factory=dict)


class DenoiserLike(Protocol):
    base: Any  # the BaseModel (its plain UNet, scheduler, …)
    unet: Any  # the UNet under training (possibly wrapped by accelerate / torch.compile)
    autocast: Callable[[], Any]
    def latents(self, batch: dict) -> torch.Tensor: ...
    def text(self, batch: dict) -> torch.Tensor: ...
    def loss_map(self, batch: dict, *, generator: torch.Generator | None = None,
                 noise: torch.Tensor | None = None, timesteps: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]: ...
    def adaptation_loss(self, maps: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...
    # only for attacker_input = "calibrated" (the base model's map on the same noise):
    def draw(self, batch: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...
    def reference_map(self, batch: dict, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...


@dataclass
class BuildContext:
    """What the loop hands a method when it builds it."""

    latent_channels: int
    # batches of the aux roles, for a method that trains on them; None: the method draws them from ``roles``
    member_aux: Iterator[dict] | None = None
    nonmember_aux: Iterator[dict] | None = None
    grad_sync: Callable[[torch.nn.Module], None] | None = None  # multi-process: average a module's gradients
    num_train_images: int = 0  # distinct training images (the unit a DP guarantee protects)
    num_processes: int = 1
    process_index: int = 0
    roles: dict = field(default_factory=dict)  # role -> RoleData of the four audit roles (cached like training data)
    base: Any = None  # the loaded BaseModel, LoRA already injected into its UNet (and text encoder)
    train_examples: list = field(default_factory=list)  # the examples behind the training batches' "index"


class Objective:
    """Plain LoRA's behaviour; other methods override what they need."""

    name: ClassVar[str] = "base"
    summary: ClassVar[str] = ""  # one line for --help and the docs
    settings_cls: ClassVar[type[MethodSettings]] = MethodSettings  # the method's own keys (none for plain LoRA)
    log_keys: ClassVar[tuple[str, ...]] = ("L_ada",)  # per-step logs shown on the progress bar
    # Non-empty for a method whose LoRA is complete once ``from_config`` has built it (shard_merge puts the merge of
    # its prerequisite runs into the LoRA parameters): why the loop must take no optimizer step on it. The run then
    # evaluates and saves that LoRA with no training step; "" (every other method): the loop trains the LoRA.
    built_not_trained: ClassVar[str] = ""

    @classmethod
    def from_config(cls, cfg: TrainConfig, ctx: BuildContext) -> Objective:
        return cls()

    @classmethod
    def prerequisites(cls, cfg: TrainConfig) -> list[TrainConfig]:
        """Training runs that must have finished before this one starts (distill_lora's teachers); ``train`` runs
        each one whose output LoRA is missing and reuses the others."""
        return []

    def plan(self, max_steps: int) -> None:
        """Called once the run's length is known, before the first step."""

    # --- the step ---
    def lora_loss(self, batch: dict, denoiser: DenoiserLike) -> StepOutput:
        raise NotImplementedError

    def gradients(self, batch: dict, denoiser: DenoiserLike, params: list[torch.nn.Parameter],
                  backward: Callable[[torch.Tensor], None]) -> StepOutput:
        """Leave this batch's gradients in ``params``' ``.grad``; the default back-propagates ``lora_loss``."""
        out = self.lora_loss(batch, denoiser)
        backward(out.loss)
        return out

    def clip(self, params: list[torch.nn.Parameter], max_norm: float | None,
             clip_fn: Callable[[list[torch.nn.Parameter], float], Any]) -> float | None:
        """Global gradient-norm clipping before the optimizer step (none when ``max_norm`` is 0/None); returns the
        gradient's total norm before clipping, logged every step."""
        return float(clip_fn(params, max_norm or float("inf")))

    def after_lora_step(self, denoiser: DenoiserLike) -> dict[str, float]:
        return {}

    # --- data ---
    def data_order_generator(self, seed: int) -> torch.Generator:
        """The generator ``make_loader`` draws the data order (or sampling) from; its state is kept only in the
        private training state (state-*), so a method whose guarantee needs secret sampling seeds it secretly."""
        return torch.Generator().manual_seed(seed)

    def make_loader(self, data: Dataset, batch_size: int, generator: torch.Generator) -> DataLoader:
        """How training batches are drawn: shuffled fixed-size batches, each epoch's order from ``generator``."""
        return DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)

    # --- records ---
    def evaluate(self, maps: dict[str, torch.Tensor], reference: dict[str, torch.Tensor] | None = None,
                 timesteps: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Epoch-end metrics from fixed-noise loss maps of the aux and test roles (``reference``: the same under
        the base model; ``timesteps``: each map's); no training here."""
        return {}

    def evaluate_own(self, denoiser: DenoiserLike, seed: int) -> dict[str, float]:
        """At each evaluation: the method's own measurements that need fresh model queries (MP-/SMP-LoRA: the
        attacker's accuracy on fresh noise, as the reference measures it); ``seed`` differs per evaluation."""
        return {}

    def best_snapshot(self, record: dict[str, Any]) -> dict[str, str] | None:
        """After an evaluation (its ``record``): metadata to save ``modules()`` under ``BEST_SUFFIX`` when they are
        the best so far, else None."""
        return None

    def generators(self) -> list[torch.Generator]:
        """The method's own random sources used by ``lora_loss`` (fixed, then restored, by probes such as the
        Hessian estimate that must see the same loss every time)."""
        return []

    def epoch_logs(self) -> dict[str, float]:
        """Numbers recorded at every epoch end (history.json, TensorBoard, progress bar)."""
        return {}

    def metadata(self) -> dict[str, str]:
        """Extra LoRA-file metadata (never anything derived from the training data)."""
        return {}

    def modules(self) -> dict[str, torch.nn.Module]:
        """Extra trained modules to save beside the LoRA (the attacker)."""
        return {}

    def module_metadata(self) -> dict[str, str]:
        """Metadata of the files of ``modules()`` (what rebuilds them: sizes, kind)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
