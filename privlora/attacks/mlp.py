"""``mlp``: the MP-LoRA paper's attacker form — an MLP on the per-element loss map (Luo et al., AAAI 2025).

A fresh :class:`~privlora.models.attacker_net.LossMapAttacker` is trained on the auxiliary members and
non-members only, then scores the test roles. Input: the loss map averaged over the same queries as ``loss``
(so the two share UNet work), as log-loss standardised with the auxiliary statistics — the reference trains
with lr 1e-5 for thousands of steps; standardising lets a few hundred full-batch steps suffice.
Score: the member logit minus the non-member logit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from privlora.attacks.base import Batch, require_aux
from privlora.attacks.loss import LossAttack
from privlora.attacks.target import stable_seed
from privlora.models.attacker_net import MEMBER, NONMEMBER, LossMapAttacker


@dataclass
class MlpAttack(LossAttack):
    name = "mlp"
    summary = "member logit of an MLP on the loss map, trained on the aux roles only"
    fits = True
    hidden: tuple[int, ...] = (512, 256)
    dropout: float = 0.5
    pool: int = 64
    steps: int = 300
    lr: float = 1e-3
    weight_decay: float = 1e-4

    def __post_init__(self):
        self._net: LossMapAttacker | None = None
        self._mean = self._std = None

    def features(self, model, batch: Batch) -> torch.Tensor:
        return self.mean_maps(model, batch).clamp_min(1e-8).log()

    def mean_maps(self, model, batch: Batch) -> torch.Tensor:
        return model.loss_maps(batch, self.queries()).mean(dim=1)

    def fit(self, model, member: list[Batch], nonmember: list[Batch]) -> dict[str, Any]:
        require_aux(self.name, member + nonmember)
        xm = torch.cat([self.features(model, b) for b in member])
        xn = torch.cat([self.features(model, b) for b in nonmember])
        x = torch.cat([xm, xn])
        y = torch.cat([torch.full((len(xm),), MEMBER), torch.full((len(xn),), NONMEMBER)]).long()
        self._mean, self._std = x.mean(0), x.std(0).clamp_min(1e-6)
        x = (x - self._mean) / self._std
        weight = torch.tensor([len(y) / (2.0 * max(len(xn), 1)), len(y) / (2.0 * max(len(xm), 1))])  # by label id
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stable_seed(model.seed, self.name))
            net = LossMapAttacker(channels=x.shape[1], pool=min(self.pool, x.shape[-1]),
                                  hidden=list(self.hidden), dropout=self.dropout)
            opt = torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            net.train()
            for _ in range(self.steps):
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(net(x), y, weight=weight)
                loss.backward()
                opt.step()
        net.eval()
        self._net = net
        with torch.no_grad():
            acc = (net(x).argmax(-1) == y).float().mean().item()
        return {"n_member": len(xm), "n_nonmember": len(xn), "final_loss": loss.item(), "train_accuracy": acc}

    def score(self, model, batch: Batch) -> torch.Tensor:
        if self._net is None:
            raise RuntimeError("attack mlp: score() before fit()")
        x = (self.features(model, batch) - self._mean) / self._std
        with torch.no_grad():
            logits = self._net(x)
        return logits[:, MEMBER] - logits[:, NONMEMBER]
