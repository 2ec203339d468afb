"""Shadow LoRAs for the shadow-model attacks (``lira``, ``lira_offline``): K LoRAs trained with the audited run's own
settings, each on a random half of a candidate pool, so that every example is IN some shadows and OUT of the others.

The pool is the audit's manifest: its query roles (member_test, nonmember_test) and its aux roles (member_aux,
nonmember_aux), one entry per distinct image. The design is balanced: each example is IN exactly ⌊K/2⌋ or ⌈K/2⌉
shadows (alternating), chosen at random per example from ``seed``. A shadow's manifest lists its IN examples as its
training set and nothing else is trained on: an example marked OUT for a shadow is never in its training data.

Shadows run as long as the audited LoRA's whole run (its final LoRA's ``ss_steps``) and save the audited checkpoint's
step (its own ``ss_steps``), so a checkpoint stopped early is compared with shadows at the same point of the same
learning-rate schedule, and all checkpoints of one run share one family of K trainings. A family saves every
checkpoint step of the run, not only the audited ones: a later audit of another checkpoint (the bench's seeds choose
their own) then reuses it instead of training it again. A family is cached under
``shadow_dir`` by a key of everything that shapes it (the run's settings, the run's length, the pool, K, the mask
seed, the method) — not the run's own seed or split seed, which a shadow replaces by its own — trained in worker
processes on a CPU (one torch thread each), and reused by any later audit with the same key ("reusing K shadows"
in its log). The pool is ordered by content hash, so splits that re-assign the same images share their shadows.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np

from privlora.errors import PrivloraError
from privlora.files import file_error
from privlora.io import write_json
from privlora.rundir import RunDir

POOL_ROLES = ("member_test", "nonmember_test", "member_aux", "nonmember_aux")
SHADOW_NAME = "shadow"
# a shadow is evaluated once, at its end: its per-epoch held-out probes (about a sixth of a quick demo run's compute)
# are read by nobody, and evaluating draws nothing from a training's random streams (tests/test_contract.py)
SKIP_EVALS = 10**6
# settings of a run that do not shape what a shadow learns (where it writes, how often it saves or evaluates)
UNSHAPING = ("output_dir", "output_name", "overwrite", "resume", "train_data_dir", "splits_dir", "splits",
             "synthetic_images", "save_every_n_epochs", "save_every_n_steps", "save_at_fractions", "save_state",
             "state_every_n_epochs", "sample_every_n_epochs", "sample_prompts", "canaries", "max_train_epochs",
             "max_train_steps", "logging_dir", "seed", "split_seed")


@dataclass
class ShadowSet:
    """K trained shadows and which pool example each one trained on."""

    folder: Path
    files: list[Path]
    keys: list[str]  # pool examples' sha256, in mask column order
    masks: np.ndarray  # (K, N) bool
    trained: int = 0  # shadows of its family trained by this audit (the rest were reused)
    wall_seconds: float = 0.0  # the family's training time in this audit (shared by every step of it)
    steps: int | None = None  # the audited checkpoint's step, which these files are of
    targets: list = field(default_factory=list)  # attached by the audit: one Target per shadow

    def inside(self, keys: list[str]) -> np.ndarray:
        """(K, B): whether each shadow trained on each of these examples (an unknown example: in none)."""
        index = {k: i for i, k in enumerate(self.keys)}
        cols = [index.get(k) for k in keys]
        out = np.zeros((len(self.files), len(keys)), dtype=bool)
        for j, c in enumerate(cols):
            if c is not None:
                out[:, j] = self.masks[:, c]
        return out

    def cost(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "shadows": len(self.files), "steps": self.steps,
                "trained_now": self.trained, "reused": len(self.files) - self.trained,
                "wall_seconds": round(self.wall_seconds, 1)}


def balanced_masks(n: int, k: int, seed: int) -> np.ndarray:
    """(K, N): each example IN ⌊K/2⌋ or ⌈K/2⌉ shadows (alternating over examples), the shadows drawn per example."""
    if k < 2:
        raise PrivloraError(f"--shadows {k}: LiRA needs at least 2 shadows (some IN and some OUT of each example)")
    rng = np.random.default_rng(seed)
    masks = np.zeros((k, n), dtype=bool)
    for j in range(n):
        size = k // 2 + (k % 2) * (j % 2)
        masks[rng.permutation(k)[:size], j] = True
    return masks


def pool_entries(manifest: dict) -> list[dict]:
    """The pool: the entries of the query and aux roles, one per distinct image (by sha256), in role order."""
    seen: dict[str, dict] = {}
    for role in POOL_ROLES:
        for entry in manifest["roles"].get(role) or []:
            seen.setdefault(entry["sha256"], entry)
    return list(seen.values())


def shadow_manifest(root: Path, inside: list[dict], outside: list[dict], out_file: Path) -> Path:
    """A manifest whose training set is exactly ``inside``; its member roles are IN examples and its non-member
    roles OUT ones (the trainer's probes need all five roles; they do not change what it trains on)."""
    from privlora.data.splits import write_role_entries

    if len(inside) < 4 or len(outside) < 4:
        raise PrivloraError(f"a shadow needs at least 4 IN and 4 OUT pool images (got {len(inside)} and "
                            f"{len(outside)})")
    half_in, half_out = len(inside) // 2, len(outside) // 2
    roles = {"train": inside, "member_aux": inside[:half_in], "member_test": inside[half_in:],
             "nonmember_aux": outside[:half_out], "nonmember_test": outside[half_out:]}
    return write_role_entries(out_file, root, roles)


def run_settings(lora: Path) -> tuple[Path, dict]:
    from privlora.config import read_toml

    resolved = RunDir(lora.parent).resolved
    if not resolved.is_file():
        raise file_error(lora, f"the shadow attacks train with the LoRA's own run settings, but {RunDir.RESOLVED} is "
                               "not beside it")
    return resolved, read_toml(resolved)


def lora_steps(lora: Path) -> int | None:
    from privlora.captions import read_lora_metadata

    text = read_lora_metadata(lora).get("ss_steps", "")
    return int(text) if text.isdigit() else None


def run_length(lora: Path, settings: dict, steps: int) -> int:
    """The steps of the whole run a checkpoint belongs to: its run's final LoRA's ss_steps, or the checkpoint's own
    when the run has no final LoRA (an interrupted run) or the file stands alone."""
    final = RunDir(lora.parent, str(settings.get("output_name") or "lora")).lora()
    total = lora_steps(final) if final.is_file() else None
    return total if total is not None and total >= steps else steps


def run_checkpoint_steps(lora: Path, settings: dict, total: int) -> set[int]:
    """The steps of every checkpoint beside ``lora`` of its run (same output name), up to the run's length."""
    run = RunDir(lora.parent, str(settings.get("output_name") or "lora"))
    steps = (lora_steps(path) for path in run.checkpoints())
    return {s for s in steps if s is not None and s <= total}


def shadow_key(settings: dict, steps: int, pool: list[dict], k: int, seed: int, method: str | None,
               *, legacy: bool = False) -> str:
    """The family's cache key. Settings at their default are left out, so a key privlora adds later (absent from
    older runs' resolved configs, present at its default in newer ones) does not give the same run two families;
    ``legacy`` is the key of families cached before that rule (every setting in), still looked up."""
    shaping = {key: value for key, value in sorted(settings.items()) if key not in UNSHAPING}
    if not legacy:
        from privlora.config import method_defaults

        defaults = method_defaults(str(method or settings.get("method") or "lora"))
        shaping = {key: value for key, value in shaping.items()
                   if key == "method" or defaults.get(key) is None or value != defaults[key]}
    text = json.dumps({"settings": shaping, "steps": steps, "pool": [e["sha256"] for e in pool], "k": k,
                       "seed": seed, "method": method}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def family_folder(shadow_dir: Path, settings: dict, steps: int, pool: list[dict], k: int, seed: int,
                  method: str | None) -> Path:
    """The family's folder under ``shadow_dir``: its key's, or a folder cached under its legacy key."""
    folder = shadow_dir / shadow_key(settings, steps, pool, k, seed, method)
    legacy = shadow_dir / shadow_key(settings, steps, pool, k, seed, method, legacy=True)
    return legacy if legacy.is_dir() and not folder.is_dir() else folder


@dataclass
class _Family:
    """The K shadows of one run's settings and length on one pool, and the checkpoint steps wanted of them."""

    folder: Path
    resolved: Path
    total: int
    steps: set[int] = field(default_factory=set)  # wanted by this audit: a shadow lacking one is trained again
    saved: set[int] = field(default_factory=set)  # saved when trained: the wanted steps and the run's checkpoints'

    def file(self, shadow: int, step: int) -> Path:
        return RunDir(self.folder / f"{SHADOW_NAME}_{shadow:02d}", SHADOW_NAME).lora(
            step=None if step == self.total else step)


def ensure_shadows(loras: list[Path], splits_file: Path, k: int, seed: int, shadow_dir: Path, method: str | None,
                   jobs: int, threads: int | None, log: Callable[[str], None]) -> dict[Path, ShadowSet]:
    """Each LoRA's K shadows: reused from ``shadow_dir`` or trained now.

    The shadows of a checkpoint are the same point of shadow runs as long as its whole run (same settings, same
    learning-rate schedule): every checkpoint of one run — the bench's budgets, select's candidates — shares one
    family of K trainings that saves each wanted step. The pool is ordered by content hash and the masks drawn from
    ``seed`` alone, so splits that re-assign the same images (the bench's seeds) share the shadows too."""
    from privlora.data.splits import _load_manifest

    manifest = _load_manifest(splits_file)
    pool = sorted(pool_entries(manifest), key=lambda e: e["sha256"])
    keys = [e["sha256"] for e in pool]
    masks = balanced_masks(len(pool), k, seed)
    families: dict[str, _Family] = {}
    wanted: dict[Path, tuple[_Family, int]] = {}
    for lora in loras:
        resolved, settings = run_settings(lora)
        steps = lora_steps(lora)
        if steps is None:
            raise file_error(lora, "has no ss_steps in its metadata: the shadows cannot match its training length")
        total = run_length(lora, settings, steps)
        folder = family_folder(shadow_dir, settings, total, pool, k, seed, method)
        family = families.setdefault(folder.name, _Family(folder, resolved, total))
        family.steps.add(steps)
        family.saved |= {steps, *run_checkpoint_steps(lora, settings, total)}
        wanted[lora] = (family, steps)
    trained: dict[Path, tuple[int, float]] = {}
    for family in families.values():
        trained[family.folder] = _ensure_family(family, manifest, splits_file, pool, masks, k, seed, method, jobs,
                                                threads, log)
    sets = {}
    for lora, (family, steps) in wanted.items():
        count, seconds = trained[family.folder]
        sets[lora] = ShadowSet(family.folder, [family.file(i, steps) for i in range(k)], keys, masks, count, seconds,
                               steps=steps)
    return sets


def _ensure_family(family: _Family, manifest: dict, splits_file: Path, pool: list[dict], masks: np.ndarray, k: int,
                   seed: int, method: str | None, jobs: int, threads: int | None,
                   log: Callable[[str], None]) -> tuple[int, float]:
    """Train the family's shadows that lack a wanted step (all its wanted steps, in one run each); (trained, s)."""
    from privlora.data.splits import _manifest_root

    todo = [i for i in range(k) if not all(family.file(i, s).is_file() for s in family.steps)]
    if not todo:
        log(f"reusing {k} shadows from {family.folder} (steps {', '.join(str(s) for s in sorted(family.steps))})")
        return 0, 0.0
    steps_text = ", ".join(str(s) for s in sorted(family.saved))
    root = _manifest_root(splits_file, manifest).resolve()
    family.folder.mkdir(parents=True, exist_ok=True)
    write_json(family.folder / "masks.json", {"pool": [e["sha256"] for e in pool], "masks": masks.astype(int).tolist(),
                                              "seed": seed, "settings": str(family.resolved),
                                              "total_steps": family.total, "method": method})
    fractions = sorted(s / family.total for s in family.saved if s < family.total)
    configs = []
    for i in todo:
        inside = [e for e, m in zip(pool, masks[i]) if m]
        outside = [e for e, m in zip(pool, masks[i]) if not m]
        folder = family.file(i, family.total).parent
        splits = shadow_manifest(root, inside, outside, folder / "shadow_splits.json")
        overrides: dict[str, Any] = dict.fromkeys(
            ("train_data_dir", "splits_dir", "save_every_n_epochs", "save_every_n_steps", "state_every_n_epochs",
             "sample_every_n_epochs", "resume", "max_train_epochs"))
        overrides.update(splits=str(splits), synthetic_images=0, output_dir=str(folder), output_name=SHADOW_NAME,
                         overwrite=True, save_state=False, canaries=0, max_train_steps=family.total,
                         save_at_fractions=fractions or None, seed=seed + 1000 + i, eval_every_n_epochs=SKIP_EVALS,
                         **({"method": method} if method else {}))
        configs.append((str(family.resolved), overrides))
    started = time.time()
    log(f"training {len(todo)} of {k} shadow LoRAs ({family.total} steps each, saved at steps {steps_text}) into "
        f"{family.folder}")
    train_shadows(configs, jobs, threads)
    seconds = time.time() - started
    log(f"trained {len(todo)} shadows in {seconds:.0f} s")
    return len(todo), seconds


def train_shadows(configs: list[tuple[str, dict]], jobs: int, threads: int | None) -> None:
    from tqdm.auto import tqdm

    from privlora.processes import on_cpu, threads_for, worker_pool

    with tqdm(total=len(configs), desc="shadows", unit="LoRA", dynamic_ncols=True) as bar:
        if jobs == 1 or not on_cpu():
            for preset, overrides in configs:
                _train_one(preset, overrides)
                bar.update(1)
            return
        with worker_pool(jobs, threads_for(jobs, threads or 1)) as pool:
            for future in [pool.submit(_train_one, preset, overrides) for preset, overrides in configs]:
                future.result()
                bar.update(1)


def _train_one(preset: str, overrides: dict) -> str:
    from privlora.config import build_config
    from privlora.train import train

    return str(train(build_config(preset, overrides)))
