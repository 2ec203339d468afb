"""MP-LoRA (min-max): the LoRA minimises L_ada − α·L_adv while the proxy attacker minimises its own loss.

Known to be unstable: pushing L_adv up without bound can be bought by ruining L_ada (Luo et al. 2025).
"""
from __future__ import annotations

import torch

from privlora.objectives.adversarial import AdversarialObjective


class MPLoraObjective(AdversarialObjective):
    name = "mp_lora"
    summary = "MP-LoRA: minimise L_ada − α·L_adv against a co-trained proxy attacker (min-max)"

    def combine(self, l_ada: torch.Tensor, l_adv: torch.Tensor) -> torch.Tensor:
        return l_ada - self.alpha * l_adv
