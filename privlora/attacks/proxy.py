"""``proxy``: the attacker co-trained with an MP-/SMP-LoRA, scoring as the paper evaluates it (Luo et al., AAAI 2025).

Training saves the proxy attacker h_ω beside the LoRA: ``<name>.attacker.safetensors`` (final) and
``<name>.attacker_best.safetensors`` (best fresh-noise test accuracy, the reference's ``attack_model_best``). This
attack loads one of them and fits nothing. Each sample is scored as in training: one loss map at a random
timestep on fresh noise (both seeded by the audit seed, the sample and the draw, so identical for every model;
draws no other attack uses), minus the base model's map on the same noise when the attacker was trained with
``attacker_input = "calibrated"``, pooled by the attacker itself. Score: P(member). The attacker's own decision,
P(member) > 0.5, gives the paper's ASR (its accuracy on member_test ∪ nonmember_test).

A stronger attacker (``attacker_draws`` = K, ``attacker_timestep``, ``attacker_features``; metadata ``draws``,
``timestep``, ``features``) is replayed on its own input: K draws per score (each at its own random timestep,
shown as t/T when it was trained with timesteps), ``noises`` such scores averaged.

The base model, plain LoRA and DP-LoRA have no attacker file: the attack is skipped for them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from privlora.attacks.base import Attack, Batch, Query
from privlora.attacks.target import stable_seed
from privlora.captions import lora_hyperparameters, read_lora_metadata
from privlora.errors import PrivloraError
from privlora.objectives.attacker import Attacker, LossMapAttacker, ScalarAttacker

ATTACKER_FILES = {"final": "attacker", "best": "attacker_best"}  # <lora stem>.<this>.safetensors
ATTACKER_INPUTS = ("loss_map", "calibrated")
FIRST_DRAW = 10_000  # noise draws of their own: the attacker sees fresh noise, not the loss attack's


def attacker_file(lora: Path, which: str = "final") -> Path:
    return lora.with_name(f"{lora.stem}.{ATTACKER_FILES[which]}.safetensors")


def load_attacker(path: Path) -> tuple[Attacker, dict[str, str]]:
    """The attacker exactly as training saved it (architecture from its metadata), in eval mode."""
    from safetensors.torch import load_file

    try:
        meta, state = read_lora_metadata(path), load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise PrivloraError(f"{path}: not a readable .safetensors file ({' '.join(str(e).split())[:200]})") from None
    try:
        net = build_attacker(meta)
    except (KeyError, ValueError, TypeError):
        raise PrivloraError(f"{path}: no attacker metadata (channels, pool, hidden, dropout): not an attacker saved "
                            "by privlora train") from None
    if meta.get("features", "map") not in ("map", "scalar"):
        raise PrivloraError(f"{path}: unknown attacker features {meta['features']!r}")
    if meta.get("attacker_input", "loss_map") not in ATTACKER_INPUTS:
        raise PrivloraError(f"{path}: unknown attacker_input {meta['attacker_input']!r}")
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise PrivloraError(f"{path}: its weights do not fit the attacker its metadata describes "
                            f"({' '.join(str(e).split())[:200]})") from None
    return net.eval().requires_grad_(False), meta


def build_attacker(meta: dict[str, str]) -> Attacker:
    """The attacker network the metadata describes (without draws/timestep/features: the paper's)."""
    hidden, dropout = list(json.loads(meta["hidden"])), float(meta["dropout"])
    draws, timestep = int(meta.get("draws", "1")), meta.get("timestep", "false") == "true"
    if meta.get("features", "map") == "scalar":
        return ScalarAttacker(draws, timestep, hidden, dropout)
    if draws == 1 and not timestep:
        return LossMapAttacker(int(meta["channels"]), int(meta["pool"]), hidden, dropout)
    return LossMapAttacker(int(meta["channels"]), int(meta["pool"]), hidden, dropout, draws, timestep)


@dataclass
class ProxyAttack(Attack):
    name = "proxy"
    summary = ("P(member) of the attacker co-trained with the LoRA (saved beside it), one random timestep and fresh "
               "noise as in training; nothing fitted; decision P > 0.5 = the paper's ASR")
    decision_threshold = 0.5
    decision_label = "the paper's ASR: accuracy of the attacker's own decision, P(member) > 0.5"
    attacker: str = "final"  # "final" (<name>.attacker) | "best" (<name>.attacker_best)
    noises: int = 1  # the paper: one draw; more average P(member) over draws

    def __post_init__(self):
        self._net: Attacker | None = None
        self._calibrated = False
        self._details: dict[str, Any] = {}

    def check(self, num_train_timesteps: int) -> None:
        if self.attacker not in ATTACKER_FILES:
            raise PrivloraError(f"attack proxy: attacker {self.attacker!r} is not final or best")
        if self.noises < 1:
            raise PrivloraError(f"attack proxy: noises must be at least 1, got {self.noises}")
        super().check(num_train_timesteps)

    def queries_per_sample(self) -> int:
        return self.noises * self._draws()  # twice that (half on the base model) for a calibrated attacker

    def _draws(self) -> int:
        return int(getattr(self._net, "draws", 1))

    def prepare(self, model) -> str | None:
        if model.source is None:
            return "the base model has no co-trained attacker"
        path = attacker_file(Path(model.source), self.attacker)
        if not path.is_file():
            return f"no {path.name} beside the LoRA (only MP-LoRA / SMP-LoRA training saves one)"
        self._net, meta = load_attacker(path)
        channels = getattr(getattr(model.unet, "config", None), "in_channels", None)
        if channels is not None and int(meta["channels"]) != channels:
            raise PrivloraError(f"{path}: an attacker for {meta['channels']}-channel loss maps; "
                                f"the base model's latents have {channels}")
        self._calibrated = meta.get("attacker_input") == "calibrated"
        self._details = self._describe(path, meta, lora_hyperparameters(read_lora_metadata(model.source)))
        return None

    def side_files(self, lora: Path) -> list[Path]:
        return [attacker_file(lora, self.attacker)]

    def _describe(self, path: Path, meta: dict[str, str], trained: dict) -> dict[str, Any]:
        adv_step = trained.get("adv_step")
        # Only the reference step trains the attacker on the aux roles alone (fused: every training image,
        # member_test included), and the best attacker was chosen by its accuracy on the test roles.
        details = {"attacker_file": path.name, "attacker_input": meta.get("attacker_input", "loss_map"),
                   **{f"attacker_{k}": meta[k] for k in ("draws", "timestep", "features") if k in meta},
                   "adv_step": adv_step, "held_out": adv_step == "reference" and self.attacker == "final"}
        if "privlora_attacker_test_acc_fresh" in meta:
            details["training_test_acc_fresh"] = float(meta["privlora_attacker_test_acc_fresh"])
            details["training_step"] = int(meta.get("privlora_step", "0"))
        return details

    def details(self) -> dict[str, Any]:
        return dict(self._details)

    def timestep(self, model, key: str, draw: int) -> int:
        """The sample's random timestep for one draw, uniform over 0..T−1 (seeded, as its noise is)."""
        return stable_seed(model.seed, key, "proxy timestep", draw) % model.num_train_timesteps

    def queries(self, model, batch: Batch) -> list[list[Query]]:
        draws = range(FIRST_DRAW, FIRST_DRAW + self.noises * self._draws())
        return [[Query(self.timestep(model, key, d), draw=d) for d in draws] for key in batch.keys]

    def score(self, model, batch: Batch) -> torch.Tensor:
        if self._net is None:
            raise RuntimeError("attack proxy: score() before prepare() found an attacker")
        queries = self.queries(model, batch)
        maps = model.sample_loss_maps(batch, queries)
        if self._calibrated:  # the base model's map on the same noise and timestep
            maps = maps - model.reference.sample_loss_maps(batch, queries)
        k = self._draws()
        if k > 1:  # each score sees K draws together
            maps = maps.reshape(len(batch) * self.noises, k, *maps.shape[2:])
        with torch.no_grad():
            if getattr(self._net, "timestep", False):
                t = torch.tensor([[q.t for q in qs] for qs in queries], dtype=torch.float32)
                p = self._net.member_probability(maps.flatten(0, 1) if k == 1 else maps,
                                                 t.view(-1, k) / model.num_train_timesteps)
            else:
                p = self._net.member_probability(maps.flatten(0, 1) if k == 1 else maps)
        return p.view(len(batch), self.noises).mean(1)
