"""``privlora demo``: ``privlora bench`` on generated private sprites with the demo's bench files.

Every training setting of the demo lives in ``configs/demo/`` (the package's ``assets/demo``): ``full.toml``
and ``quick.toml`` are bench files (their runs and the comparison's settings) whose ``preset`` is
``train.toml`` / ``quick_train.toml`` (the shared training settings). Only the generated data (seed and style)
is set here. ``benchmarks/privacy_bench.py`` varies the same protocol through ``ProtocolSettings``' overrides.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from privlora.bench import run_bench
from privlora.benchspec import BenchSpec, read_bench_file
from privlora.benchtable import (FRONTIER_MARGIN, format_extras, format_table, frontier_auc,  # noqa: F401 (re-exported)
                                 frontier_verdict, model_row)

DEMO_DIR = Path(__file__).parent / "assets" / "demo"


@dataclass
class ProtocolSettings:
    bench_file: Path = DEMO_DIR / "full.toml"
    data_seed: int = 1
    data_style: str = "framed"  # a style tiny-sd was not pretrained on, so fine-tuning has utility to gain
    train: dict = field(default_factory=dict)  # training settings over every run (like train flags to bench)
    method_overrides: dict = field(default_factory=dict)  # run name → settings merged over the bench file's run
    bench: dict = field(default_factory=dict)  # [bench] settings over the bench file's
    only_runs: list[str] | None = None  # a subset of the runs (the baseline is always kept)
    label: str = "full"


def quick_settings() -> ProtocolSettings:
    return ProtocolSettings(bench_file=DEMO_DIR / "quick.toml", label="quick")


def bench_spec(s: ProtocolSettings, out: Path) -> BenchSpec:
    """The demo as a bench: the bench file's preset, [bench] and runs, with the settings' overrides on top."""
    file = read_bench_file(s.bench_file)
    runs = {name: {**settings, **s.method_overrides.get(name, {})} for name, settings in file["runs"].items()}
    unknown = set(s.method_overrides) - set(runs)
    if unknown:
        raise ValueError(f"no run {sorted(unknown)[0]!r} in {s.bench_file}")
    if s.only_runs is not None:
        if set(s.only_runs) - set(runs):
            raise ValueError(f"no run {sorted(set(s.only_runs) - set(runs))[0]!r} in {s.bench_file}")
        runs = {n: r for n, r in runs.items() if n == "lora" or n in s.only_runs}
    return BenchSpec(out=out, runs=runs, data={"train_data_dir": str(out / "data")}, preset=file["preset"],
                     train_overrides=dict(s.train), label=f"demo, {s.label} variant", **{**file["bench"], **s.bench})


def data_size(spec: BenchSpec) -> tuple[int, int]:
    """(images, resolution) the generated dataset needs: the four roles of the preset's split."""
    from privlora.config import build_config

    cfg = build_config(spec.preset, {**spec.train_overrides, "synthetic_images": 1})
    if cfg.n_member_test is None:
        raise ValueError(f"{spec.preset}: the demo needs n_member_test")
    return cfg.n_member_test + cfg.n_nonmember_test + cfg.n_member_aux + cfg.n_nonmember_aux, cfg.resolution


def run_protocol(s: ProtocolSettings, out: Path, log=print) -> dict:
    from privlora.data import synthetic

    spec = bench_spec(s, out)
    data = out / "data"
    if not (data / ".complete").exists():
        n, resolution = data_size(spec)
        synthetic.write_folder(data, n, seed=s.data_seed, namespace="private", resolution=resolution,
                               style=s.data_style)
        (data / ".complete").touch()
    return run_bench(spec, log)
