"""The demo's protocol (``privlora demo``, i.e. ``privlora bench`` with configs/demo) with other sizes and seeds.

    python benchmarks/privacy_bench.py --out runs/bench [--quick] [--seed 1337] [--epochs 60] \
        [--n_member_test 200 --n_nonmember_test 200] [--smp_alpha 1 --smp_beta 1 --attacker_lr 1e-3 --k_steps 1]

Reference step vs fused step, same seed and budget (one protocol run per step, in <out>/<step>/, then a
side-by-side table of the MP-/SMP-LoRA rows in <out>/adv_steps.md):

    python benchmarks/privacy_bench.py --out runs/bench-steps --adv_steps reference fused [--attacker_dropout_in_adv]

Writes <out>/table.json (every number, settings, date, machine), table.md, frontier.png, curves.png and the
audit report under <out>/audit/. On your own data and model use ``privlora bench``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from privlora.benchtable import format_table
from privlora.io import write_text
from privlora.protocol import ProtocolSettings, quick_settings, run_protocol

TRAIN_FLAGS = {"epochs": "max_train_epochs", "n_member_test": "n_member_test", "n_nonmember_test": "n_nonmember_test",
               "n_member_aux": "n_member_aux", "n_nonmember_aux": "n_nonmember_aux"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seed", type=int, help="training and split seed")
    p.add_argument("--data_seed", type=int)
    p.add_argument("--epochs", type=int)
    for key in ("n_member_test", "n_nonmember_test", "n_member_aux", "n_nonmember_aux", "quality_samples"):
        p.add_argument(f"--{key}", type=int)
    p.add_argument("--budgets", type=float, nargs="+")
    p.add_argument("--attacks", nargs="+")
    p.add_argument("--jobs", type=int, default=1, help="trainings in parallel processes")
    for method in ("mp", "smp"):
        p.add_argument(f"--{method}_alpha", type=float)
    p.add_argument("--smp_beta", type=float)
    p.add_argument("--attacker_lr", type=float)
    p.add_argument("--k_steps", type=int)
    p.add_argument("--adv_step", choices=["fused", "reference"])
    p.add_argument("--adv_steps", nargs="+", choices=["fused", "reference"],
                   help="run the whole protocol once per step (same seed and budget) and compare")
    p.add_argument("--attacker_dropout_in_adv", action="store_true", help="L_adv with dropout active (the reference)")
    p.add_argument("--attacker_input", choices=["loss_map", "calibrated"])
    p.add_argument("--defences", nargs="+", help="a subset of the defence runs (default: all of them)")
    args = p.parse_args()
    from privlora.quiet import quiet_libraries

    quiet_libraries()

    if not args.adv_steps:
        print(format_table(run_protocol(settings(args, args.adv_step), Path(args.out))))
        return
    tables = {step: run_protocol(settings(args, step), Path(args.out) / step) for step in args.adv_steps}
    text = "\n\n".join(f"## adv_step = {step}\n\n{format_table(t)}" for step, t in tables.items())
    write_text(Path(args.out) / "adv_steps.md", f"# SMP-/MP-LoRA: adv_step compared, same seed and budget\n\n{text}\n")
    print(text)


def settings(args: argparse.Namespace, adv_step: str | None) -> ProtocolSettings:
    s = quick_settings() if args.quick else ProtocolSettings()
    if args.seed is not None:
        s.train.update(seed=args.seed, split_seed=args.seed)
    if args.data_seed is not None:
        s.data_seed = args.data_seed
    s.train.update({key: getattr(args, flag) for flag, key in TRAIN_FLAGS.items() if getattr(args, flag) is not None})
    given = {k: getattr(args, k) for k in ("quality_samples", "budgets", "attacks")}
    s.bench.update({k: v for k, v in given.items() if v is not None})
    s.bench["jobs"] = args.jobs
    own = {"mp_lora": {"privacy_alpha": args.mp_alpha},
           "smp_lora": {"privacy_alpha": args.smp_alpha, "privacy_beta": args.smp_beta}}
    for method in ("mp_lora", "smp_lora"):
        shared = {"attacker_lr": args.attacker_lr, "k_steps": args.k_steps, "adv_step": adv_step,
                  "attacker_input": args.attacker_input,
                  "attacker_dropout_in_adv": args.attacker_dropout_in_adv or None}
        s.method_overrides[method] = {k: v for k, v in {**own[method], **shared}.items() if v is not None}
    if args.defences:
        s.only_runs = args.defences
    return s


if __name__ == "__main__":
    main()
