"""Membership-inference attacks on (LoRA-adapted) latent diffusion models, one module each.

Every attack implements :class:`~privlora.attacks.base.Attack`: given a model (a
:class:`~privlora.attacks.target.Target`) and a :class:`~privlora.attacks.base.Batch`, return one score per
sample, higher = more likely a member. ``privlora.audit`` runs them and ``privlora.attacks.metrics`` scores them.
"""
from __future__ import annotations

from typing import Any

from privlora.attacks.base import AUX_ROLES, TEST_ROLES, Attack, Batch, Query
from privlora.attacks.clid import ClidAttack
from privlora.attacks.lira import LiraAttack, LiraOfflineAttack, RmiaAttack
from privlora.attacks.loss import LossAttack
from privlora.attacks.mlp import MlpAttack
from privlora.attacks.pia import PIAAttack
from privlora.attacks.proxy import ProxyAttack
from privlora.attacks.ref_loss import RefLossAttack
from privlora.attacks.secmi import SecMIAttack
from privlora.attacks.target import Target
from privlora.errors import PrivloraError

ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls for cls in (LossAttack, RefLossAttack, MlpAttack, SecMIAttack, PIAAttack, ClidAttack, ProxyAttack,
                              LiraAttack, LiraOfflineAttack, RmiaAttack)
}
# opt-in: proxy applies only to MP-/SMP-LoRA files (and only reference-step runs give a held-out number); lira,
# lira_offline and rmia train shadow LoRAs first (--shadows K)
SHADOW_ATTACKS = ("lira", "lira_offline", "rmia")
DEFAULT_ATTACKS = tuple(n for n in ATTACKS if n != "proxy" and n not in SHADOW_ATTACKS)


def parse_attack_names(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"loss,pia"`` (or a list) → validated, de-duplicated names in the given order."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in ATTACKS]
    if unknown or not names:
        raise PrivloraError(f"--attacks: unknown attack {unknown[0]!r} (choose from {', '.join(ATTACKS)})" if unknown
                            else "--attacks: no attack given")
    return list(dict.fromkeys(names))


def build_attacks(names: list[str], params: dict[str, dict[str, Any]] | None = None) -> list[Attack]:
    """Fresh attack objects (fitted state must never carry over from one model to the next)."""
    params = params or {}
    attacks = []
    for name in names:
        try:
            attacks.append(ATTACKS[name](**params.get(name, {})))
        except TypeError as e:
            raise PrivloraError(f"attack {name}: bad parameters ({e})") from None
    return attacks


__all__ = ["ATTACKS", "AUX_ROLES", "Attack", "Batch", "DEFAULT_ATTACKS", "Query", "SHADOW_ATTACKS", "TEST_ROLES",
           "Target", "build_attacks", "parse_attack_names"]
