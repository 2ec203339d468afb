"""The powered comparison of a finished bench folder, recomputed with a chosen set of attacks (e.g. the
single-model attacks alone, or the shadow attacks alone), from its audits' saved scores: nothing is trained or
audited again.

    python benchmarks/power_by_attacks.py runs/power --attacks loss,ref_loss,mlp,secmi,pia,clid

Prints the markdown table of ``privlora bench`` (means and 95 % intervals over seeds × images, paired distance from
each seed's train-less frontier, verdict) for those attacks.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from privlora.benchpower import Replicate, power_table, replicate_from_report, restrict
from privlora.benchtable import power_rows


def seed_replicates(out: Path) -> tuple[list[Replicate], list[str], int]:
    """Each seed's replicate as the bench built it, the defences, and the bench's first seed."""
    table = json.loads((out / "table.json").read_text())
    seeds = table["settings"].get("seeds") or [None]
    base = table["frontier"][-1]
    runs = list(table["settings"]["runs"])
    reps = []
    for i, seed in enumerate(seeds):
        report = json.loads((out / ("audit" if i == 0 else f"audit-seed{seed}") / "report.json").read_text())
        prefix = base if i == 0 else f"{base}-seed{seed}"
        budgets = [m for m in report["models"] if m["name"].startswith((f"{prefix}-e", f"{prefix}-step"))]
        budgets.sort(key=lambda m: int((m.get("lora_metadata") or {}).get("ss_steps") or 0))
        frontier = ["base", *(m["name"] for m in budgets), prefix]
        names = {run: ((table["power"].get(run) or {}).get("models") or
                       [r if k == 0 else f"{r}-seed{s}" for k, s in enumerate(seeds) for r in [run]])[i]
                 for run in runs}
        reps.append(replicate_from_report(seed if seed is not None else 0, report, frontier, names))
    return reps, [r for r in runs if r != base], seeds[0] if seeds[0] is not None else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="a finished bench folder (table.json and its audit folders)")
    parser.add_argument("--attacks", required=True, help="comma-separated attacks to keep")
    parser.add_argument("--n_bootstrap", type=int, default=None, help="default: the bench's")
    args = parser.parse_args()
    reps, defences, seed = seed_replicates(args.out)
    table = json.loads((args.out / "table.json").read_text())
    n_boot = args.n_bootstrap if args.n_bootstrap is not None else table["settings"]["n_bootstrap"]
    kept = [a.strip() for a in args.attacks.split(",") if a.strip()]
    print(power_rows(power_table([restrict(r, kept) for r in reps], defences, n_boot, seed)))


if __name__ == "__main__":
    main()
