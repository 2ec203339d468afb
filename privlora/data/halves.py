"""Disjoint, seeded parts of the train role: two halves (distill_lora's teachers each learn one) or k shards
(shard_merge trains one plain LoRA per shard).

An example's part depends only on its position in the train role (which is in file-path order), the part count and
the seed, so a teacher's (shard's) run and the main run, reading the same data with the same seed, agree on it.
Kohya repeats do not cross parts: a repeated image is one example, so all its copies fall in its part.

``train_subset`` names: ``all``; ``half_a`` / ``half_b`` (seeded by the run's ``split_seed``); and
``shard_<j>_of_<k>_seed_<s>`` (shard j of k, 1-based, seeded by s, which the name carries: shard_merge's shard seed is
published in its LoRA's metadata, which ``split_seed`` must never be — with the image pool it reproduces the split).
The halves are the shards of two: ``half_a`` is ``shard_1_of_2_seed_<split_seed>``.
"""
from __future__ import annotations

import re
from typing import TypeVar

import numpy as np

TRAIN_SUBSETS = ("all", "half_a", "half_b")  # and shard_<j>_of_<k>_seed_<s>
HALVES = ("half_a", "half_b")
SHARD_PATTERN = "shard_<j>_of_<k>_seed_<s>"
_SHARD = re.compile(r"shard_(\d+)_of_(\d+)_seed_(-?\d+)")

T = TypeVar("T")


def shard_assignment(n: int, k: int, seed: int) -> list[int]:
    """For each of ``n`` train-role examples, its shard in 0..k-1: a seeded permutation cut into k consecutive runs
    whose sizes differ by at most one (the first ``n % k`` shards get the extra ones)."""
    order = np.random.default_rng((seed, 1)).permutation(n)  # (seed, 1): a stream apart from auto_split's (seed)
    shard = [0] * n
    for j, part in enumerate(np.array_split(order, k)):
        for position in part:
            shard[int(position)] = j
    return shard


def half_assignment(n: int, seed: int) -> list[int]:
    """For each of ``n`` train-role examples, its half: 0 (half_a) or 1 (half_b); half_a gets the extra one."""
    return shard_assignment(n, 2, seed)


def shard_subset(j: int, k: int, seed: int) -> str:
    """The ``train_subset`` name of shard ``j`` (1-based) of ``k`` under ``seed``."""
    return f"shard_{j}_of_{k}_seed_{seed}"


def parse_shard(subset: str) -> tuple[int, int, int] | None:
    """``(j, k, seed)`` of a valid ``shard_<j>_of_<k>_seed_<s>`` name (k ≥ 2, 1 ≤ j ≤ k), else None."""
    m = _SHARD.fullmatch(subset)
    if m is None:
        return None
    j, k, seed = (int(g) for g in m.groups())
    return (j, k, seed) if k >= 2 and 1 <= j <= k else None


def valid_subset(subset: str) -> bool:
    return subset in TRAIN_SUBSETS or parse_shard(subset) is not None


def train_subset(examples: list[T], subset: str, seed: int) -> list[T]:
    """The examples a run trains on: all of them, one half (``seed``: the split seed) or one shard (its seed is in
    its name), in their original order."""
    if subset == "all":
        return list(examples)
    shard = parse_shard(subset)
    if shard is not None:
        j, k, shard_seed = shard
        return [e for e, s in zip(examples, shard_assignment(len(examples), k, shard_seed)) if s == j - 1]
    wanted = HALVES.index(subset)
    return [e for e, h in zip(examples, half_assignment(len(examples), seed)) if h == wanted]
