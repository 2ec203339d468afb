"""The ``privlora`` command: train, audit, sample, quality, demo, bench, select, dataset."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privlora.errors import Interrupted, PrivloraError
from privlora.offline import allow_network, offline_by_default

if TYPE_CHECKING:
    from privlora.benchspec import BenchSpec


def _train(args: argparse.Namespace, overrides: dict) -> int:
    from privlora.config import build_config
    from privlora.train import train

    cfg = build_config(args.config, overrides, foreign_flags="error")
    if getattr(args, "print_config", False):
        from privlora.config import resolved_toml

        print(resolved_toml(cfg), end="")
        return 0
    path = train(cfg)
    print(f"saved {path}")
    return 0


def _sample(args: argparse.Namespace, overrides: dict) -> int:
    from privlora.sample import sample

    paths = sample(args.pretrained_model_name_or_path, args.out, prompt=args.prompt, prompts_file=args.prompts,
                   n=args.n, steps=args.steps, guidance=args.guidance, sampler=args.sampler, seed=args.seed,
                   lora=args.lora, lora_scale=args.lora_scale, width=args.width, height=args.height,
                   negative_prompt=args.negative_prompt, config_dir=args.config_dir,
                   prediction_type=args.prediction_type, device=args.device, overwrite=args.overwrite,
                   clip_skip=args.clip_skip, max_token_length=args.max_token_length)
    print(f"saved {len(paths)} images, grid.png and settings.json in {args.out}")
    return 0


def _quality(args: argparse.Namespace, overrides: dict) -> int:
    import json

    from privlora.io import write_json
    from privlora.quality import score

    result = score(args.real, args.fake, args.metrics, args.feature_extractor,
                   inception_weights=args.inception_weights, feature_model=args.feature_model,
                   kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size, seed=args.seed)
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


def _add_sample_parser(sub) -> None:
    from privlora.sample import SAMPLERS

    p = sub.add_parser("sample", help="generate images with a base model and an optional LoRA (diffusers pipeline)")
    p.add_argument("--pretrained_model_name_or_path", default="tiny-sd",
                   help="tiny-sd, a diffusers folder or a .safetensors checkpoint")
    p.add_argument("--config_dir", default=None,
                   help="local diffusers folder with configs/tokenizer for a single-file checkpoint")
    p.add_argument("--prediction_type", default=None, choices=("epsilon", "v_prediction"))
    p.add_argument("--lora", default=None, help="LoRA .safetensors (kohya or diffusers keys), loaded by diffusers")
    p.add_argument("--lora_scale", type=float, default=1.0)
    p.add_argument("--clip_skip", type=int, default=None,
                   help="as used in training (default: from the LoRA's metadata, else none)")
    p.add_argument("--max_token_length", type=int, default=None,
                   help="75 | 150 | 225, kohya's long prompts as used in training (default: from the LoRA's "
                        "metadata, else one 75-token window)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompts", default=None, help="prompts file: one per line, options --n --w --h --d --s --l")
    which.add_argument("--prompt", default=None)
    p.add_argument("--negative_prompt", default="")
    p.add_argument("--n", type=int, default=None, help="number of images (default: one per prompt)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--sampler", default="ddim", choices=SAMPLERS)
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--width", type=int, default=None, help="default: the model's native size")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", required=True, help="output folder (00000.png ..., grid.png, settings.json)")
    p.add_argument("--overwrite", action="store_true", help="replace samples already in --out")
    p.set_defaults(handler=_sample)


def _add_quality_parser(sub) -> None:
    from privlora.quality import FEATURE_EXTRACTORS, INCEPTION_WEIGHTS_NAME

    p = sub.add_parser("quality", help="FID / KID between a real and a generated image folder")
    p.add_argument("--real", required=True, help="folder of real images")
    p.add_argument("--fake", required=True, help="folder of generated images")
    p.add_argument("--metrics", default="fid,kid", help="comma-separated: fid, kid")
    p.add_argument("--feature_extractor", default="inception", choices=FEATURE_EXTRACTORS,
                   help="inception (standard, needs --inception_weights) or tiny (proxy for the tiny model)")
    p.add_argument("--inception_weights", default=None, help=f"local {INCEPTION_WEIGHTS_NAME} (torch-fidelity's)")
    p.add_argument("--feature_model", default="tiny-sd", help="diffusers folder whose VAE the tiny proxy uses")
    p.add_argument("--kid_subsets", type=int, default=100)
    p.add_argument("--kid_subset_size", type=int, default=1000, help="capped at the smaller image set")
    p.add_argument("--seed", type=int, default=0, help="seed of the KID subsets")
    p.add_argument("--out", default=None, help="also write the result to this JSON file")
    p.set_defaults(handler=_quality)




def _audit(args: argparse.Namespace, overrides: dict) -> int:
    from privlora.audit import AuditConfig, run_audit

    cfg = AuditConfig(splits=args.splits, out=args.out,
                      pretrained_model_name_or_path=args.pretrained_model_name_or_path,
                      loras=args.lora, attacks=args.attacks, include_base=args.include_base, seed=args.seed,
                      resolution=args.resolution, batch_size=args.batch_size, max_samples=args.max_samples,
                      n_bootstrap=args.n_bootstrap, config_dir=args.config_dir, clip_skip=args.clip_skip,
                      max_token_length=args.max_token_length, device=args.device,
                      attack_params={"proxy": {"attacker": args.proxy_attacker}}, jobs=args.jobs,
                      threads_per_job=args.threads_per_job, canaries=args.canaries,
                      canary_attack=args.canary_attack, shadows=args.shadows, shadow_dir=args.shadow_dir,
                      shadow_method=args.shadow_method, shadow_seed=args.shadow_seed, model_cache=args.model_cache)
    run_audit(cfg)
    return 0


def _add_audit_parser(sub) -> None:
    from privlora.attacks import ATTACKS, DEFAULT_ATTACKS

    audit = sub.add_parser("audit", help="membership-inference audit of a base model and/or LoRA files")
    audit.add_argument("--pretrained_model_name_or_path", default="tiny-sd", help="base model (default: tiny-sd)")
    audit.add_argument("--lora", nargs="*", default=[], metavar="FILE",
                       help="LoRA .safetensors file(s) to audit and compare; none: audit the base model")
    audit.add_argument("--splits", required=True, help="split manifest (splits.json of the training run)")
    audit.add_argument("--out", required=True, help="folder for report.json, report.md, roc.png, scores.png")
    audit.add_argument("--attacks", default=",".join(DEFAULT_ATTACKS),
                       help=f"comma-separated, from {', '.join(ATTACKS)} (default: all but proxy)")
    audit.add_argument("--proxy_attacker", default="final", choices=("final", "best"),
                       help="proxy attack: the co-trained attacker saved at the end of training (<name>.attacker) "
                            "or the one with the best test accuracy (<name>.attacker_best)")
    audit.add_argument("--include_base", action="store_true", help="with --lora: also audit the base model")
    audit.add_argument("--seed", type=int, default=0, help="seeds every noise draw, fit and bootstrap")
    audit.add_argument("--resolution", type=int, default=None, help="default: the base model's native resolution")
    audit.add_argument("--batch_size", type=int, default=64, help="UNet rows per forward pass")
    audit.add_argument("--max_samples", type=int, default=None, help="per role, a seeded subset")
    audit.add_argument("--n_bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    audit.add_argument("--config_dir", default=None, help="configs/tokenizer folder for a single-file base model")
    audit.add_argument("--clip_skip", type=int, default=None,
                       help="as used in training (default: from each LoRA's metadata, else none)")
    audit.add_argument("--max_token_length", type=int, default=None,
                       help="75 | 150 | 225, kohya's long captions as used in training (default: from each LoRA's "
                            "metadata, else one 75-token window)")
    audit.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    audit.add_argument("--shadows", type=int, default=0, metavar="K",
                       help="lira / lira_offline: K shadow LoRAs with each audited run's own settings, each on a "
                            "random half of the queries and aux images (trained once, cached, reused)")
    audit.add_argument("--shadow_dir", default=None, help="where shadows are cached (default: OUT/shadows); give the "
                                                          "same folder to reuse them across audits")
    audit.add_argument("--shadow_method", default=None, help="train the shadows with this method (e.g. lora) "
                                                             "instead of the audited run's own")
    audit.add_argument("--shadow_seed", type=int, default=None,
                       help="draws the shadows' IN/OUT halves and seeds (default: --seed); audits of re-drawn splits "
                            "of the same images with one shadow seed share their shadows")
    audit.add_argument("--canaries", default=None, metavar="CANARIES_JSON",
                       help="the training run's canaries.json (train --canaries M): a sound one-run ε lower bound "
                            "per LoRA (Steinke, Nasr & Jagielski 2023); 'auto': each LoRA's own run folder's file")
    audit.add_argument("--canary_attack", default="ref_loss",
                       help="the single-model attack that scores the canaries (loss, ref_loss, secmi, pia)")
    audit.add_argument("--model_cache", default=None, metavar="DIR",
                       help="keep each model's results in DIR and reuse them in a later audit while everything they "
                            "depend on is unchanged (the model file, base model, samples, settings); give the same "
                            "DIR to audit only the models added since")
    _add_jobs_flags(audit, "on a CPU, the models split between this many worker processes (same numbers)")
    audit.set_defaults(handler=_audit)


def _demo(args: argparse.Namespace, overrides: dict) -> int:
    from pathlib import Path

    from privlora.protocol import ProtocolSettings, quick_settings, run_protocol

    settings = quick_settings() if args.quick else ProtocolSettings()
    if args.seed is not None:
        settings.train.update(seed=args.seed, split_seed=args.seed)
    settings.bench["jobs"] = args.jobs or default_demo_jobs()
    out = Path(args.out or f"runs/demo-{settings.label}")
    print(f"privlora demo ({settings.label} variant): privlora bench with {settings.bench_file} on generated "
          f"private sprites, outputs in {out}")
    table = run_protocol(settings, out)
    _print_bench(table, out)
    return 0


def default_demo_jobs() -> int:
    import os

    import torch

    return 1 if torch.cuda.is_available() else max(1, os.cpu_count() or 1)


def _print_bench(table: dict, out) -> None:
    from privlora.benchtable import format_extras, format_table

    print(f"\n{table['date']}, {table['machine']}")
    print(format_table(table))
    print("\n" + format_extras(table))
    print(f"\ntable: {out / 'table.md'}; audit report: {out / 'audit' / 'report.md'}; "
          f"plots: {out / 'frontier.png'}, {out / 'curves.png'}")


def _add_demo_parser(sub) -> None:
    demo = sub.add_parser("demo", help="the whole claim on the embedded tiny-sd: privlora bench with configs/demo "
                                       "on generated private sprites (LoRA, MP-, SMP-, DP-LoRA, audit, one table)")
    demo.add_argument("--out", default=None, help="output folder (default: runs/demo-full or runs/demo-quick)")
    demo.add_argument("--quick", action="store_true", help="fewer epochs and samples (a few minutes)")
    demo.add_argument("--seed", type=int, default=None, help="training and split seed (default: the presets')")
    demo.add_argument("--jobs", type=int, default=None,
                      help="processes for the trainings, audit and sampling, one torch thread each (default: one "
                           "per CPU core, so the table does not depend on the core count; 1 with a GPU)")
    demo.set_defaults(handler=_demo)


def _bench(args: argparse.Namespace, overrides: dict) -> int:
    from pathlib import Path

    from privlora.bench import run_bench

    spec = bench_spec_from_args(vars(args))
    print(f"privlora bench: {', '.join(spec.runs)}; outputs in {spec.out}")
    table = run_bench(spec)
    _print_bench(table, Path(spec.out))
    return 0


def _add_bench_parser(sub) -> None:
    from privlora.config import add_config_flags

    p = sub.add_parser("bench", argument_default=argparse.SUPPRESS,
                       help="privacy–utility comparison of methods on your data and model (the demo's protocol)")
    p.add_argument("--out", required=True, help="output folder (re-running it reuses what is finished)")
    p.add_argument("--preset", help="train preset (TOML) with the settings every run shares")
    p.add_argument("--dataset", choices=("openmoji",),
                   help="build (or reuse) a benchmark dataset in <out>/<name>_<resolution> and train on it "
                        "(instead of --train_data_dir, --splits_dir or --splits)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--methods", help="comma-separated runs: method[:key=value...], e.g. "
                                         "lora,smp_lora,smp_lora:privacy_alpha=5")
    which.add_argument("--runs", help="bench file (TOML): preset = ..., [bench] settings, [runs.NAME] tables")
    p.add_argument("--budgets", help="plain LoRA checkpoints as fractions of its epochs, e.g. 0.1,0.25,0.5; "
                                     "'none' for no train-less points but the base model")
    p.add_argument("--attacks", help="comma-separated audit attacks (default: all six)")
    p.add_argument("--seeds", help="comma-separated training seeds: each run is trained with each; the first "
                                   "makes the table, all make the intervals and the paired verdicts")
    p.add_argument("--resplit", action="store_true",
                   help="with --seeds on your own --train_data_dir: each further seed re-draws the split (on by "
                        "default for generated data and --dataset)")
    p.add_argument("--jobs", type=int, help="trainings in parallel processes (one torch thread per core share)")
    p.add_argument("--threads_per_job", type=int, help="torch threads of each parallel training (default: cores "
                                                       "// jobs); a serial run matches it at the same thread count")
    p.add_argument("--max_auc", type=float, help="recommendation bound on the best-attack AUC (default 0.6)")
    p.add_argument("--max_tpr_at_1fpr", type=float, help="recommendation bound on TPR@1%%FPR (default 0.05)")
    p.add_argument("--select_attacks", help="attacks of the aux-only checkpoint selection (default loss,ref_loss)")
    p.add_argument("--shadows", type=int, help="with lira / lira_offline in --attacks: K shadow LoRAs per audited "
                                               "run's settings and length (cached in OUT/shadows)")
    p.add_argument("--n_bootstrap", type=int, help="bootstrap resamples of the audit (default 500)")
    p.add_argument("--quality_samples", type=int, help="images per model for the proxy FID (default 200; 0: none)")
    p.add_argument("--quality_steps", type=int, help="sampler steps of those images (default 20)")
    p.add_argument("--guidance", type=float, help="guidance scale of those images (default 3)")
    add_config_flags(p.add_argument_group("training settings, over every run (as in privlora train)"))
    p.set_defaults(handler=_bench)


def _select(args: argparse.Namespace, overrides: dict) -> int:
    from privlora.select import SelectConfig, format_selection, select

    result = select(SelectConfig(args.run_dir, args.max_auc, args.max_tpr_at_1fpr, args.attacks.split(","),
                                 args.seed, args.n_bootstrap, not args.no_base, args.out, args.jobs,
                                 args.threads_per_job))
    print(format_selection(result))
    return 0


def _add_select_parser(sub) -> None:
    p = sub.add_parser("select", help="privacy-aware checkpoint selection: the most useful checkpoint of a run "
                                      "whose leakage, estimated on the aux roles only, is under a bound")
    p.add_argument("run_dir", help="a training run's output folder (its -eNNNN/-stepNNNNNN and final LoRA files)")
    p.add_argument("--max_auc", type=float, default=0.6, help="bound on the estimated best-attack AUC")
    p.add_argument("--max_tpr_at_1fpr", type=float, default=1.0, help="bound on the estimated TPR@1%%FPR")
    p.add_argument("--attacks", default="loss,ref_loss", help="comma-separated; loss is always added (utility)")
    p.add_argument("--seed", type=int, default=0, help="seeds the aux halves, noise draws and fits")
    p.add_argument("--n_bootstrap", type=int, default=200)
    p.add_argument("--no_base", action="store_true", help="do not offer the base model as a candidate")
    p.add_argument("--out", default=None, help="where to write the choice (default: RUN_DIR/select.json)")
    _add_jobs_flags(p, "on a CPU, the checkpoints split between this many worker processes (same numbers)")
    p.set_defaults(handler=_select)


def _add_jobs_flags(p, what: str) -> None:
    p.add_argument("--jobs", type=int, default=1, help=what)
    p.add_argument("--threads_per_job", type=int, default=None,
                   help="torch threads of each worker process (default: cores // jobs)")


def _dataset(args: argparse.Namespace, overrides: dict) -> int:
    from privlora.data.openmoji import build_openmoji

    summary = build_openmoji(args.out, args.resolution, n_images=args.n_images, seed=args.seed)
    print(f"{summary['counts']['written']} images with captions in {args.out} (summary: {args.out}/dataset.json); "
          f"train with --train_data_dir {args.out}")
    return 0


def _add_dataset_parser(sub) -> None:
    p = sub.add_parser("dataset", help="build a benchmark dataset folder (openmoji: real emoji images, "
                                       "pip install 'privlora[openmoji]')")
    p.add_argument("name", choices=("openmoji",))
    p.add_argument("--out", required=True, help="folder to write (reused when built earlier with these settings)")
    p.add_argument("--resolution", type=int, required=True, help="image side in pixels, e.g. 32 for tiny-sd")
    p.add_argument("--n_images", type=int, default=None, help="a seeded subset of this many (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --n_images subset")
    p.set_defaults(handler=_dataset)


def build_parser() -> argparse.ArgumentParser:
    from privlora.config import add_config_flags

    parser = argparse.ArgumentParser(prog="privlora", description=__doc__)
    parser.add_argument("--allow_network", action="store_true",
                        help="let Hugging Face libraries use the network (off by default: nothing is downloaded)")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a LoRA (plain, MP-LoRA or SMP-LoRA) from a TOML preset and flags",
                           argument_default=argparse.SUPPRESS)
    train.add_argument("--config", default=None, help="TOML preset; flags override its keys")
    train.add_argument("--print_config", action="store_true",
                       help="print every resolved setting (after inherit and flags) as TOML and exit")
    add_config_flags(train)
    train.set_defaults(handler=_train)
    _add_audit_parser(sub)
    _add_sample_parser(sub)
    _add_quality_parser(sub)
    _add_demo_parser(sub)
    _add_bench_parser(sub)
    _add_select_parser(sub)
    _add_dataset_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--allow_network" in argv:
        allow_network()
    else:
        offline_by_default()
    from privlora.quiet import quiet_libraries

    quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    reserved = {"command", "handler", "config", "allow_network", "print_config"}
    overrides = {k: v for k, v in vars(args).items() if k not in reserved}
    try:
        return args.handler(args, overrides)
    except PrivloraError as e:
        print(f"privlora: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"privlora: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("privlora: interrupted", file=sys.stderr)
        return 130


# --- privlora bench's flags -------------------------------------------------------------------------------

def bench_spec_from_args(args: dict[str, Any]) -> BenchSpec:
    """``privlora bench`` flags → a spec: bench file values first, then the bench's own flags; every other
    flag is a training setting over every run."""
    from privlora.benchspec import DATA_KEYS, BenchSpec, parse_methods, read_bench_file
    from privlora.config import all_keys

    args = {k: v for k, v in args.items() if k not in ("command", "handler", "allow_network")}
    file = read_bench_file(args.pop("runs")) if "runs" in args else {"preset": None, "bench": {}, "runs": {}}
    runs = parse_methods(args.pop("methods")) if "methods" in args else file["runs"]
    if not runs:
        raise PrivloraError("--runs: the bench file has no [runs.NAME] table")
    bench = dict(file["bench"])
    for key in ("budgets", "attacks", "seeds", "select_attacks"):
        if key in args:
            bench[key] = _list_flag(key, args.pop(key))
    for key in ("n_bootstrap", "quality_samples", "quality_steps", "guidance", "max_auc", "max_tpr_at_1fpr", "jobs",
                "threads_per_job", "shadows", "resplit"):
        if key in args:
            bench[key] = args.pop(key)
    preset = args.pop("preset", None) or file["preset"]
    out = Path(args.pop("out"))
    data = {k: args.pop(k) for k in DATA_KEYS if k in args}
    dataset = args.pop("dataset", None)
    given = [*data, *(["dataset"] if dataset else [])]
    if len(given) > 1:
        raise PrivloraError(f"give one data source, not {' and '.join('--' + k for k in given)}")
    unknown = set(args) - all_keys()
    if unknown:
        raise PrivloraError(f"command line: unknown option --{sorted(unknown)[0]}")
    return BenchSpec(out=out, runs=runs, data=data, dataset=dataset, preset=preset, train_overrides=args, **bench)


def _list_flag(key: str, text: str) -> list:
    if key == "budgets" and text.strip().lower() == "none":
        return []
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        if key == "budgets":
            return [float(t) for t in items]
        if key == "seeds":
            return [int(t) for t in items]
    except ValueError:
        raise PrivloraError(f"--{key}: {text!r} is not a comma-separated list of numbers") from None
    return items
