"""Shadow LoRAs for the shadow-model attacks (``lira``, ``lira_offline``): K LoRAs trained with the audited run's own
settings, each on a random half of a candidate pool, so that every example is IN some shadows and OUT of the others.

The pool is the audit's manifest: its query roles (member_test, nonmember_test) and its aux roles (member_aux,
nonmember_aux), one entry per distinct image. The design is balanced: each example is IN exactly ⌊K/2⌋ or ⌈K/2⌉
shadows (alternating), chosen at random per example from ``seed``. A shadow's manifest lists its IN examples as its
training set and nothing else is trained on: an example marked OUT for a shadow is never in its training data.

Shadows are trained for the audited LoRA's own number of steps (its ``ss_steps``), so a checkpoint stopped early
gets shadows stopped at the same point. They are cached under ``shadow_dir`` by a key of everything that shapes
them (the run's settings, the steps, the pool, K, the seed, the method), trained in worker processes on a CPU
(one torch thread each), and reused by any later audit with the same key — "reusing K shadows" in its log.
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
# settings of a run that do not shape what a shadow learns (where it writes, how often it saves or evaluates)
UNSHAPING = ("output_dir", "output_name", "overwrite", "resume", "train_data_dir", "splits_dir", "splits",
             "synthetic_images", "save_every_n_epochs", "save_every_n_steps", "save_at_fractions", "save_state",
             "state_every_n_epochs", "sample_every_n_epochs", "sample_prompts", "canaries", "max_train_epochs",
             "max_train_steps", "logging_dir")


@dataclass
class ShadowSet:
    """K trained shadows and which pool example each one trained on."""

    folder: Path
    files: list[Path]
    keys: list[str]  # pool examples' sha256, in mask column order
    masks: np.ndarray  # (K, N) bool
    trained: int = 0  # shadows trained by this audit (the rest were reused)
    wall_seconds: float = 0.0
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
        return {"folder": str(self.folder), "shadows": len(self.files), "trained_now": self.trained,
                "reused": len(self.files) - self.trained, "wall_seconds": round(self.wall_seconds, 1)}


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


def shadow_key(settings: dict, steps: int, pool: list[dict], k: int, seed: int, method: str | None) -> str:
    shaping = {key: value for key, value in sorted(settings.items()) if key not in UNSHAPING}
    text = json.dumps({"settings": shaping, "steps": steps, "pool": [e["sha256"] for e in pool], "k": k,
                       "seed": seed, "method": method}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ensure_shadows(lora: Path, splits_file: Path, k: int, seed: int, shadow_dir: Path, method: str | None,
                   jobs: int, threads: int | None, log: Callable[[str], None]) -> ShadowSet:
    """The K shadows of this LoRA's settings and steps on this pool: reused from ``shadow_dir`` or trained now."""
    from privlora.captions import read_lora_metadata
    from privlora.data.splits import _load_manifest, _manifest_root

    resolved, settings = run_settings(lora)
    steps_text = read_lora_metadata(lora).get("ss_steps", "")
    if not steps_text.isdigit():
        raise file_error(lora, "has no ss_steps in its metadata: the shadows cannot match its training length")
    steps = int(steps_text)
    manifest = _load_manifest(splits_file)
    root = _manifest_root(splits_file, manifest).resolve()
    pool = pool_entries(manifest)
    folder = shadow_dir / shadow_key(settings, steps, pool, k, seed, method)
    masks = balanced_masks(len(pool), k, seed)
    files = [folder / f"{SHADOW_NAME}_{i:02d}" / f"{SHADOW_NAME}.safetensors" for i in range(k)]
    shadow_set = ShadowSet(folder, files, [e["sha256"] for e in pool], masks)
    todo = [i for i, f in enumerate(files) if not f.is_file()]
    if not todo:
        log(f"reusing {k} shadows from {folder}")
        return shadow_set
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "masks.json", {"pool": shadow_set.keys, "masks": masks.astype(int).tolist(), "seed": seed,
                                       "settings": str(resolved), "steps": steps, "method": method})
    configs = []
    for i in todo:
        inside = [e for e, m in zip(pool, masks[i]) if m]
        outside = [e for e, m in zip(pool, masks[i]) if not m]
        splits = shadow_manifest(root, inside, outside, files[i].parent / "shadow_splits.json")
        overrides: dict[str, Any] = dict.fromkeys(
            ("train_data_dir", "splits_dir", "save_every_n_epochs", "save_every_n_steps", "save_at_fractions",
             "state_every_n_epochs", "sample_every_n_epochs", "resume", "max_train_epochs"))
        overrides.update(splits=str(splits), synthetic_images=0, output_dir=str(files[i].parent),
                         output_name=SHADOW_NAME, overwrite=True, save_state=False, canaries=0,
                         max_train_steps=steps, seed=seed + 1000 + i, **({"method": method} if method else {}))
        configs.append((str(resolved), overrides))
    started = time.time()
    log(f"training {len(todo)} of {k} shadow LoRAs ({steps} steps each) into {folder}")
    train_shadows(configs, jobs, threads)
    shadow_set.trained, shadow_set.wall_seconds = len(todo), time.time() - started
    log(f"trained {len(todo)} shadows in {shadow_set.wall_seconds:.0f} s")
    return shadow_set


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
