"""Training methods behind one interface (:class:`Objective`), registered in ``METHODS`` by name.

Adding a method means adding one module with an ``Objective`` subclass and listing it here; config validation,
the CLI's ``--method`` choices, the demo and the docs read this registry.
"""
from __future__ import annotations

from typing import TYPE_CHECKING
from collections.abc import Callable, Iterator

import torch

from privlora.objectives.adversarial import make_attacker
from privlora.objectives.attacker import LossMapAttacker
from privlora.objectives.base import BuildContext, Objective, StepOutput
from privlora.objectives.distill_lora import DistillObjective
from privlora.objectives.dp_lora import DPLoraObjective
from privlora.objectives.lora import LoraObjective
from privlora.objectives.mp_lora import MPLoraObjective
from privlora.objectives.smp_lora import SMPLoraObjective

if TYPE_CHECKING:
    from privlora.config import TrainConfig

METHODS: dict[str, type[Objective]] = {
    cls.name: cls for cls in (LoraObjective, MPLoraObjective, SMPLoraObjective, DPLoraObjective, DistillObjective)
}


def build_objective(cfg: TrainConfig, *, latent_channels: int, member_aux: Iterator[dict] | None = None,
                    nonmember_aux: Iterator[dict] | None = None,
                    grad_sync: Callable[[torch.nn.Module], None] | None = None,
                    context: BuildContext | None = None) -> Objective:
    ctx = context or BuildContext(latent_channels, member_aux, nonmember_aux, grad_sync)
    return METHODS[cfg.method].from_config(cfg, ctx)


__all__ = ["METHODS", "BuildContext", "Objective", "StepOutput", "build_objective", "make_attacker",
           "LossMapAttacker"]
