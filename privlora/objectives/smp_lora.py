"""SMP-LoRA (stable ratio form): the LoRA minimises L_ada / (β + α·L_adv + 1e-5).

The gradient with respect to L_ada is 1/(β + α·L_adv): a confident attacker (small L_adv) amplifies
the adaptation gradient less than a fooled one shrinks it, and the loss stays bounded below by 0.
"""
from __future__ import annotations

import torch

from privlora.objectives.adversarial import AdversarialObjective

EPS = 1e-5


class SMPLoraObjective(AdversarialObjective):
    name = "smp_lora"
    summary = "SMP-LoRA: minimise L_ada / (β + α·L_adv) against a co-trained proxy attacker"

    def combine(self, l_ada: torch.Tensor, l_adv: torch.Tensor) -> torch.Tensor:
        return l_ada / (self.beta + self.alpha * l_adv + EPS)
