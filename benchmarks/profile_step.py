"""Where one training step and one audit pass spend their time, on the embedded tiny-sd (CPU).

    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --steps 40 [--method lora] [--out profile.json]

Builds the demo's quick training run (its preset, generated data) with the real ``setup``, warms up, then times
``--steps`` optimizer steps twice: under ``cProfile`` (Python functions, cumulative: the overhead around the
kernels) and under ``torch.profiler`` (operators, self time). Then the same for one pass of the ``loss`` attack's
UNet queries over the member_test role. Prints the top entries of each and writes them as JSON.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--method", default="lora")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", default=None)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="training settings, e.g. channels_last=true")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

    import torch
    from torch.profiler import ProfilerActivity, profile

    from privlora.config import build_config
    from privlora.train import train_step
    from privlora.train_setup import setup

    folder = tempfile.mkdtemp()
    cfg = build_config("configs/demo/quick_train.toml", {"synthetic_images": 264, "output_dir": folder,
                                                         "method": args.method, "max_train_steps": 10_000,
                                                         **dict(kv.split("=", 1) for kv in args.set)})
    run = setup(cfg)
    batches = iter(run.loader)

    def steps(n: int) -> float:
        nonlocal batches
        started = time.perf_counter()
        for i in range(n):
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(run.loader)
                batch = next(batches)
            train_step(run, run.augment(batch, 0, i + 1), i)
        return time.perf_counter() - started

    steps(5)  # warm-up
    plain = steps(args.steps)
    profiler = cProfile.Profile()
    profiler.enable()
    steps(args.steps)
    profiler.disable()
    python = _pstats(profiler, args.top)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        steps(args.steps)
    ops = _ops(prof, args.top)

    from privlora.train_probes import FixedNoiseProbe

    role = run.probe.roles["member_test"]
    probe = FixedNoiseProbe({"member_test": role}, seed=0)
    started = time.perf_counter()
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as audit_prof:
        probe.maps(run.denoiser)
    audit_seconds = time.perf_counter() - started
    result = {"method": args.method, "settings": args.set, "steps": args.steps, "seconds_per_step": plain / args.steps,
              "steps_per_second": args.steps / plain, "train_python_cumulative": python, "train_ops_self": ops,
              "query_pass": {"images": len(role), "seconds": audit_seconds, "ops_self": _ops(audit_prof, args.top)},
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    print(f"{args.method}: {result['steps_per_second']:.2f} steps/s ({1000 * result['seconds_per_step']:.1f} ms/step, "
          f"{torch.get_num_threads()} thread(s)); one query pass over {len(role)} images: {audit_seconds:.2f} s")
    for title, rows in (("python, cumulative", python), ("operators, self", ops),
                        ("query pass operators, self", result["query_pass"]["ops_self"])):
        print(f"\n{title}:")
        for r in rows:
            print(f"  {r['share']:6.1%}  {r['seconds']:8.3f} s  {r['name']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


def _pstats(profiler: cProfile.Profile, top: int) -> list[dict]:
    stats = pstats.Stats(profiler, stream=io.StringIO())
    total = max(stats.total_tt, 1e-9)  # type: ignore[attr-defined]  # pstats keeps it as an attribute
    rows = []
    for (file, line, name), (_, _, _, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"name": f"{name} ({Path(file).name}:{line})", "seconds": cumulative, "share": cumulative / total})
    return sorted(rows, key=lambda r: -r["seconds"])[:top]


def _ops(prof, top: int) -> list[dict]:
    events = prof.key_averages()
    total = max(sum(e.self_cpu_time_total for e in events), 1e-9)
    rows = [{"name": e.key, "seconds": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total}
            for e in events]
    return sorted(rows, key=lambda r: -r["seconds"])[:top]


if __name__ == "__main__":
    main()
