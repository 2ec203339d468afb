"""Where membership leaks along the noise schedule: the loss attack's AUC at one timestep at a time.

    OMP_NUM_THREADS=1 python benchmarks/timestep_leakage.py --lora RUN/lora.safetensors --splits RUN/splits.json \
        [--timesteps 25,100,200,300,400,500,600,700,800,900,975] [--noises 4] [--out leakage.json]

For each timestep t the audit's ``loss`` attack scores member_test against nonmember_test with the loss at t alone
(``--noises`` seeded noise draws per image), giving an AUC with its bootstrap interval, for the LoRA and for the base
model (the control). A LoRA trained with ``--min_timestep`` / ``--max_timestep`` (kohya's timestep range) avoids the
noise levels where this curve is high; min-SNR weighting (``--min_snr_gamma``) is the known baseline that down-weights
the low-noise end.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora", required=True)
    p.add_argument("--splits", required=True)
    p.add_argument("--model", default="tiny-sd")
    p.add_argument("--timesteps", default="25,100,200,300,400,500,600,700,800,900,975")
    p.add_argument("--noises", type=int, default=4)
    p.add_argument("--n_bootstrap", type=int, default=200)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from privlora.audit import AuditConfig, run_audit

    rows = []
    for t in [int(x) for x in args.timesteps.split(",")]:
        cfg = AuditConfig(splits=args.splits, out=tempfile.mkdtemp(), pretrained_model_name_or_path=args.model,
                          loras=[args.lora], attacks=["loss"], include_base=True, n_bootstrap=args.n_bootstrap,
                          attack_params={"loss": {"timesteps": [t], "noises_per_timestep": args.noises}})
        report = run_audit(cfg, log=lambda _: None)
        by_model = {m["kind"]: m["results"]["loss"] for m in report["models"]}
        row = {"timestep": t, **{f"{k}_auc": r["auc"] for k, r in by_model.items()},
               **{f"{k}_ci95": r.get("ci95", {}).get("auc") for k, r in by_model.items()}}
        rows.append(row)
        print(f"t = {t:4d}: LoRA loss AUC {row['lora_auc']:.3f} {_ci(row['lora_ci95'])}, "
              f"base {row['base_auc']:.3f} {_ci(row['base_ci95'])}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"lora": args.lora, "noises": args.noises, "rows": rows}, indent=2))


def _ci(ci) -> str:
    return "" if not ci else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


if __name__ == "__main__":
    main()
