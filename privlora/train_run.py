"""The state of one training run as the loop holds it: ``Run`` (everything ``setup`` built) and ``Progress``
(what a resumable state saves of the loop's position)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from privlora.config import TrainConfig
from privlora.data.augment import Augment
from privlora.denoiser import Denoiser
from privlora.objectives.base import Objective
from privlora.rundir import RunDir

if TYPE_CHECKING:
    from accelerate import Accelerator

    from privlora.models.loading import BaseModel
from privlora.train_probes import FixedNoiseProbe


@dataclass
class Progress:
    step: int = 0
    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # batches consumed in the epoch under way
    collapsed_epochs: int = 0
    history: list = field(default_factory=list)
    hessian: list = field(default_factory=list)  # {"step", "hessian_top_eig"} every hessian_every_n_steps
    period: dict = field(default_factory=dict)  # per-step log key -> [sum, count, max] since the last evaluation


@dataclass
class Run:
    cfg: TrainConfig
    out: Path
    accelerator: Accelerator
    base: BaseModel
    unet: torch.nn.Module  # the accelerate-wrapped UNet
    trainable: list
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any  # accelerate's AcceleratedScheduler around a torch LRScheduler
    loader: DataLoader
    loader_order: torch.Generator  # draws each epoch's data order
    noise: torch.Generator  # noise and timesteps of the training steps
    objective: Objective
    denoiser: Denoiser
    probe: FixedNoiseProbe
    base_maps: dict  # fixed-noise loss maps of the base model, per role
    base_losses: dict
    metadata: dict
    max_steps: int
    epoch_start_order: torch.Tensor | None = None
    augment: Augment = field(default_factory=lambda: Augment(0))  # applied to every training batch

    @property
    def dir(self) -> RunDir:
        return RunDir(self.out, self.cfg.output_name)
