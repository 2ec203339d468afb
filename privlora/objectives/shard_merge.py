"""Shard-and-merge: k plain LoRAs, each trained on one of k seeded disjoint shards of the train role, merged into the
one published LoRA (sharded training as in SISA, Bourtoule et al., "Machine Unlearning", IEEE S&P 2021; disjoint
teachers as in PATE, Papernot et al., ICLR 2017; merging fine-tuned weights by averaging as in model soups, Wortsman
et al., ICML 2022, and task arithmetic, Ilharco et al., ICLR 2023). It is distill_lora's cheap cousin: the same
disjoint-data idea without a student, so its cost is about one plain run.

The shard runs are the method's prerequisites (``<output_dir>/shards/shard_<j>_of_<k>_seed_<s>``: plain LoRA, the
run's settings, ``train_subset`` = that shard). ``from_config`` merges their files into the run's LoRA parameters and
the method declares ``built_not_trained``: the loop takes no step on the merge (training it further on every image
would give each image back its full weight, undoing the defence); it is evaluated once and saved as an ordinary LoRA
file of the run's layout, so every loader and attack reads it unchanged.

Merge rules, per LoRA layer with scale s = alpha / rank (the same in every shard file and in the output):

``delta_svd`` (default): the mean of the shards' weight deltas, D = (1/k) Σ_j s·B_j A_j, re-factorised to the rank
by truncated SVD — the best rank-r approximation of D in Frobenius (and spectral) norm (Eckart–Young), exact when D's
rank is ≤ r. D has rank ≤ k·r, so the SVD is taken of a (k·r)×(k·r) core after QR of the stacked factors (cheap and
exact, no out×in matrix); the factors are split as B = U·√(Σ/s), A = √(Σ/s)·Vᵀ, so s·B·A = UΣVᵀ with the file's
alpha unchanged. Conv LoRA layers are 2-D matrices (out, in·kh·kw) for this and reshaped back.

``factors``: A = mean A_j, B = mean B_j. Cheaper, but s·B·A is *not* the mean of the deltas (it adds the cross terms
B_i A_j); it relies on the shards starting from one initialisation (they share the run's seed, so their A_j start
equal and their B_j at zero), the model-soup condition.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from privlora.data.halves import shard_subset
from privlora.errors import PrivloraError
from privlora.models.lora import ADAPTER, lora_layers, read_kohya_weights
from privlora.objectives.base import BuildContext, Objective
from privlora.settings import MethodSettings, one_process_refusal

if TYPE_CHECKING:
    from privlora.settings import TrainConfig

MERGE_RULES = ("delta_svd", "factors")


@dataclass
class ShardMergeSettings(MethodSettings):
    """shard_merge's keys."""

    shard_count: int = field(default=4, metadata={
        "help": "k: plain LoRAs, each on one of k seeded disjoint shards of the training images (k ≥ 2)"})
    shard_merge: str = field(default="delta_svd", metadata={
        "help": "delta_svd: the mean of the shards' deltas B·A, re-factorised to the rank by truncated SVD (its best "
                "rank-r approximation); factors: mean A and mean B (cheaper; not the mean delta)"})
    shard_epochs: int | None = field(default=None, metadata={
        "help": "each shard run's max_train_epochs; default: the run's epochs (or its max_train_steps / k), so each "
                "image is seen as often as in a plain run and the k runs together cost about one"})
    shard_seed: int | None = field(default=None, metadata={
        "help": "seed of the shard assignment (recorded in the LoRA); default: the run's seed"})

    def check(self, cfg: TrainConfig) -> str | None:
        if cfg.train_text_encoder:
            return "shard_merge trains and merges the UNet LoRA only; set train_text_encoder = false"
        if self.shard_count < 2:
            return f"shard_count {self.shard_count} must be ≥ 2"
        if self.shard_merge not in MERGE_RULES:
            return f"shard_merge {self.shard_merge!r} is not one of {', '.join(MERGE_RULES)}"
        if self.shard_epochs is not None and self.shard_epochs < 1:
            return f"shard_epochs {self.shard_epochs} must be ≥ 1"
        if cfg.train_subset != "all":
            return "shard_merge shards the whole train role itself; set train_subset = \"all\""
        if cfg.canaries:
            return "shard_merge does not support canaries (each shard run would flip its own canary coins, which " \
                   "the run's canaries.json would not record); set canaries = 0"
        return one_process_refusal("shard_merge", "shard runs")

    def seed_of(self, cfg: TrainConfig) -> int:
        return cfg.seed if self.shard_seed is None else self.shard_seed


def shard_config(cfg: TrainConfig, j: int) -> TrainConfig:
    """The plain-LoRA run on shard ``j`` (1-based): the run's settings and seed (one initialisation for every shard),
    its own folder, no intermediate saves; each image seen as often as in the run itself."""
    s = cfg.settings(ShardMergeSettings)
    k = s.shard_count
    epochs, steps = cfg.max_train_epochs, cfg.max_train_steps
    if s.shard_epochs:
        epochs, steps = s.shard_epochs, None
    elif steps:
        steps = math.ceil(steps / k)  # a 1/k shard: 1/k of the steps is the run's number of passes over it
    subset = shard_subset(j, k, s.seed_of(cfg))
    shard = dataclasses.replace(
        cfg, method="lora", method_settings=MethodSettings(), train_subset=subset,
        output_dir=str(Path(cfg.output_dir) / "shards" / subset), output_name=f"shard_{j}", save_format="kohya",
        save_every_n_epochs=None, save_every_n_steps=None, save_at_fractions=None, state_every_n_epochs=None,
        save_state=False, resume=None, overwrite=False, sample_prompts=None, sample_every_n_epochs=None,
        hessian_every_n_steps=0, max_train_epochs=epochs, max_train_steps=steps)
    return shard.validate(f"shard {j} of {k} of {cfg.output_dir}")


def shard_file(shard: TrainConfig) -> Path:
    return Path(shard.output_dir) / f"{shard.output_name}.safetensors"


# ---------------------------------------------------------------- the merge


def as_matrices(down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A LoRA layer's factors as matrices, A (r, in·kh·kw) and B (out, r): linear and conv layers alike."""
    rank = down.shape[0]
    return down.reshape(rank, -1), up.reshape(up.shape[0], rank)


def delta(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """The layer's weight change s·B·A, as an (out, in·kh·kw) matrix."""
    a, b = as_matrices(down.double(), up.double())
    return scale * b @ a


def merge_layer(downs: list[torch.Tensor], ups: list[torch.Tensor], scale: float,
                rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's merged factors (shapes and dtype of the shards'), by ``rule`` (see the module's docstring)."""
    if rule == "factors":
        return torch.stack(downs).mean(0), torch.stack(ups).mean(0)
    if rule != "delta_svd":
        raise PrivloraError(f"shard_merge {rule!r} is not one of {', '.join(MERGE_RULES)}")
    rank, k = downs[0].shape[0], len(downs)
    pairs = [as_matrices(d.double(), u.double()) for d, u in zip(downs, ups)]
    a_all = torch.cat([a for a, _ in pairs])  # (k·r, in)
    b_all = torch.cat([b for _, b in pairs], dim=1)  # (out, k·r)
    # mean delta D = (s/k)·b_all·a_all = Qb·(s/k·Rb·Raᵀ)·Qaᵀ; its SVD is the small core's, rotated back
    qb, rb = torch.linalg.qr(b_all)
    qa, ra = torch.linalg.qr(a_all.T)
    u, sigma, vh = torch.linalg.svd((scale / k) * rb @ ra.T, full_matrices=False)
    u, sigma, vh = qb @ u[:, :rank], sigma[:rank], vh[:rank] @ qa.T
    root = (sigma / scale).sqrt()
    down = torch.zeros(rank, a_all.shape[1], dtype=torch.float64)
    up = torch.zeros(b_all.shape[0], rank, dtype=torch.float64)
    n = root.shape[0]  # < rank only when the layer is narrower than the rank: the rest stays zero
    down[:n], up[:, :n] = root[:, None] * vh, u * root
    return down.reshape(downs[0].shape).to(downs[0].dtype), up.reshape(ups[0].shape).to(ups[0].dtype)


def merge_files(model: torch.nn.Module, files: list[Path], rule: str) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """``model``'s LoRA parameters, each paired with its merged value from the shard ``files`` (kohya files of this
    model's LoRA layout; ``read_kohya_weights`` checks each)."""
    shards = [{id(p): v for p, v in read_kohya_weights(f, model)} for f in files]
    merged: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    for layer in lora_layers(model).values():
        # peft's ModuleDict entries are typed loosely
        down = cast(torch.nn.Parameter, layer.lora_A[ADAPTER].weight)
        up = cast(torch.nn.Parameter, layer.lora_B[ADAPTER].weight)
        new_down, new_up = merge_layer([s[id(down)] for s in shards], [s[id(up)] for s in shards],
                                       layer.scaling[ADAPTER], rule)
        merged += [(down, new_down), (up, new_up)]
    return merged


def shard_totals(files: list[Path]) -> dict[str, str]:
    """What the shard runs took together, as the metadata a plain run carries about itself: ``ss_steps`` (their
    optimizer steps, summed: the audit's shadows train that many), ``ss_epoch`` (the most epochs of one) and
    ``privlora_train_seconds``."""
    from privlora.captions import read_lora_metadata

    metas = [read_lora_metadata(f) for f in files]
    steps = [int(m.get("ss_steps", "0") or 0) for m in metas]
    return {"ss_steps": str(sum(steps)), "ss_epoch": str(max(int(m.get("ss_epoch", "0") or 0) for m in metas)),
            "privlora_train_seconds": f"{sum(float(m.get('privlora_train_seconds', '0') or 0) for m in metas):.1f}",
            "privlora_shard_steps": json.dumps(steps)}


class ShardMergeObjective(Objective):
    name = "shard_merge"
    summary = "shard-and-merge: k plain LoRAs on disjoint shards of the training images, their deltas merged"
    settings_cls = ShardMergeSettings
    built_not_trained = ("the published LoRA is the merge of the shard runs; further training on every image would "
                         "undo the defence")

    def __init__(self, meta: dict[str, str]):
        self.meta = meta

    @classmethod
    def prerequisites(cls, cfg: TrainConfig) -> list[TrainConfig]:
        return [shard_config(cfg, j) for j in range(1, cfg.settings(ShardMergeSettings).shard_count + 1)]

    @classmethod
    def from_config(cls, cfg: TrainConfig, ctx: BuildContext) -> ShardMergeObjective:
        if ctx.num_processes > 1:
            raise PrivloraError("shard_merge runs in one process; launch it without torchrun/accelerate")
        if ctx.base is None:
            raise PrivloraError("shard_merge needs the base model to merge its shard runs into")
        s = cfg.settings(ShardMergeSettings)
        files = [shard_file(c) for c in cls.prerequisites(cfg)]
        with torch.no_grad():
            for param, value in merge_files(ctx.base.unet, files, s.shard_merge):
                param.copy_(value)
        meta = {"privlora_shard_count": str(s.shard_count), "privlora_shard_merge": s.shard_merge,
                "privlora_shard_seed": str(s.seed_of(cfg)),
                "privlora_shard_runs": f"{s.shard_count} plain LoRAs, one per disjoint shard of the training images, "
                                       "merged into this file (they are private and not in it)",
                **shard_totals(files)}
        return cls(meta)

    def metadata(self) -> dict[str, str]:
        return dict(self.meta)
