"""Training methods behind one interface (:class:`Objective`), registered in ``METHODS`` by name.

Adding a method means adding one module with an ``Objective`` subclass (and its ``MethodSettings``) and one
``register_method`` call; the config reader, the CLI's ``--method`` choices and flags, the demo and the docs read
this registry (peft's ``register_peft_method`` is the model).
"""
from __future__ import annotations

from dataclasses import fields
from collections.abc import Callable, Iterator

import torch

from privlora.errors import PrivloraError
from privlora.objectives.adversarial import make_attacker
from privlora.objectives.attacker import LossMapAttacker
from privlora.objectives.base import BuildContext, Objective, StepOutput
from privlora.objectives.distill_lora import DistillObjective
from privlora.objectives.dp_lora import DPLoraObjective
from privlora.objectives.lora import LoraObjective
from privlora.objectives.loss_floor import LossFloorObjective
from privlora.objectives.mp_lora import MPLoraObjective
from privlora.objectives.shard_merge import ShardMergeObjective
from privlora.objectives.smp_lora import SMPLoraObjective
from privlora.settings import TrainConfig

METHODS: dict[str, type[Objective]] = {}


def register_method(cls: type[Objective]) -> type[Objective]:
    """Make ``cls`` available as ``--method <cls.name>`` with its settings' keys as flags and preset keys.

    A key may belong to one settings class only (two methods may share one class: MP- and SMP-LoRA), and never
    shadow a shared key."""
    if cls.name in METHODS:
        raise PrivloraError(f"method {cls.name!r} is registered twice")
    taken = {f.name: "the shared settings" for f in fields(TrainConfig)}
    for other in METHODS.values():
        if other.settings_cls is not cls.settings_cls:
            taken.update({f.name: f"{other.name}'s settings" for f in fields(other.settings_cls)})
    for f in fields(cls.settings_cls):
        if f.name in taken:
            raise PrivloraError(f"method {cls.name!r}: key {f.name!r} is already one of {taken[f.name]}")
    METHODS[cls.name] = cls
    return cls


for _cls in (LoraObjective, MPLoraObjective, SMPLoraObjective, DPLoraObjective, DistillObjective,
             LossFloorObjective, ShardMergeObjective):
    register_method(_cls)


def build_objective(cfg: TrainConfig, *, latent_channels: int, member_aux: Iterator[dict] | None = None,
                    nonmember_aux: Iterator[dict] | None = None,
                    grad_sync: Callable[[torch.nn.Module], None] | None = None,
                    context: BuildContext | None = None) -> Objective:
    ctx = context or BuildContext(latent_channels, member_aux, nonmember_aux, grad_sync)
    return METHODS[cfg.method].from_config(cfg, ctx)


__all__ = ["METHODS", "BuildContext", "Objective", "StepOutput", "build_objective", "make_attacker",
           "LossMapAttacker", "register_method"]
