"""Two disjoint, seeded halves of the train role (distill_lora's teachers each learn one).

An example's half depends only on its position in the train role (which is in file-path order) and the seed,
so a teacher's run and the student's run, reading the same data with the same ``split_seed``, agree on it.
Kohya repeats do not cross halves: a repeated image is one example, so all its copies fall in its half.
"""
from __future__ import annotations

from typing import TypeVar

import numpy as np

TRAIN_SUBSETS = ("all", "half_a", "half_b")
HALVES = ("half_a", "half_b")

T = TypeVar("T")


def half_assignment(n: int, seed: int) -> list[int]:
    """For each of ``n`` train-role examples, its half: 0 (half_a) or 1 (half_b); half_a gets the extra one."""
    order = np.random.default_rng((seed, 1)).permutation(n)  # (seed, 1): a stream apart from auto_split's (seed)
    half = [0] * n
    for position in order[(n + 1) // 2:]:
        half[int(position)] = 1
    return half


def train_subset(examples: list[T], subset: str, seed: int) -> list[T]:
    """The examples a run trains on: all of them, or one half (in their original order)."""
    if subset == "all":
        return list(examples)
    wanted = HALVES.index(subset)
    return [e for e, h in zip(examples, half_assignment(len(examples), seed)) if h == wanted]
