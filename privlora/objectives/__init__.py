"""Training objectives behind one interface (``Objective``); the loop picks one by name from ``OBJECTIVES``."""
from __future__ import annotations

from typing import Iterator

from privlora.objectives.adversarial import dropout_generator_for
from privlora.objectives.attacker import LossMapAttacker
from privlora.objectives.base import Objective, StepOutput
from privlora.objectives.lora import LoraObjective
from privlora.objectives.mp_lora import MPLoraObjective
from privlora.objectives.smp_lora import SMPLoraObjective

ADVERSARIAL = {"mp_lora": MPLoraObjective, "smp_lora": SMPLoraObjective}


def make_attacker(cfg, latent_channels: int) -> LossMapAttacker:
    return LossMapAttacker(latent_channels, cfg.attacker_pool, cfg.attacker_hidden, cfg.attacker_dropout)


def build_objective(cfg, *, latent_channels: int, member_aux: Iterator[dict] | None = None,
                    nonmember_aux: Iterator[dict] | None = None, grad_sync=None) -> Objective:
    if cfg.method == "lora":
        return LoraObjective()
    return ADVERSARIAL[cfg.method](
        make_attacker(cfg, latent_channels),
        alpha=cfg.privacy_alpha, beta=cfg.privacy_beta, k_steps=cfg.k_steps, adv_step=cfg.adv_step,
        lr=cfg.attacker_lr, weight_decay=cfg.attacker_weight_decay,
        member_aux=member_aux, nonmember_aux=nonmember_aux, grad_sync=grad_sync, attacker_input=cfg.attacker_input,
        dropout_generator=dropout_generator_for(cfg),
    )


__all__ = ["Objective", "StepOutput", "build_objective", "make_attacker", "LossMapAttacker"]
