"""The ``privlora`` command: train, audit, sample, quality, demo."""
from __future__ import annotations

import argparse
import sys

from privlora.errors import Interrupted, PrivloraError
from privlora.offline import allow_network, offline_by_default


def _train(args: argparse.Namespace, overrides: dict) -> int:
    from privlora.config import build_config
    from privlora.train import train

    cfg = build_config(args.config, overrides)
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
                   prediction_type=args.prediction_type, device=args.device, overwrite=args.overwrite)
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


def quiet_libraries() -> None:
    """Our own progress bars and messages only: hide the libraries' per-load bars and chatter."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


def _audit(args: argparse.Namespace, overrides: dict) -> int:
    from privlora.audit import AuditConfig, run_audit

    cfg = AuditConfig(splits=args.splits, out=args.out,
                      pretrained_model_name_or_path=args.pretrained_model_name_or_path,
                      loras=args.lora, attacks=args.attacks, include_base=args.include_base, seed=args.seed,
                      resolution=args.resolution, batch_size=args.batch_size, max_samples=args.max_samples,
                      n_bootstrap=args.n_bootstrap, config_dir=args.config_dir, clip_skip=args.clip_skip,
                      device=args.device)
    run_audit(cfg)
    return 0


def _add_audit_parser(sub) -> None:
    from privlora.attacks import DEFAULT_ATTACKS

    audit = sub.add_parser("audit", help="membership-inference audit of a base model and/or LoRA files")
    audit.add_argument("--pretrained_model_name_or_path", default="tiny-sd", help="base model (default: tiny-sd)")
    audit.add_argument("--lora", nargs="*", default=[], metavar="FILE",
                       help="LoRA .safetensors file(s) to audit and compare; none: audit the base model")
    audit.add_argument("--splits", required=True, help="split manifest (splits.json of the training run)")
    audit.add_argument("--out", required=True, help="folder for report.json, report.md, roc.png, scores.png")
    audit.add_argument("--attacks", default=",".join(DEFAULT_ATTACKS), help="comma-separated (default: all)")
    audit.add_argument("--include_base", action="store_true", help="with --lora: also audit the base model")
    audit.add_argument("--seed", type=int, default=0, help="seeds every noise draw, fit and bootstrap")
    audit.add_argument("--resolution", type=int, default=None, help="default: the base model's native resolution")
    audit.add_argument("--batch_size", type=int, default=64, help="UNet rows per forward pass")
    audit.add_argument("--max_samples", type=int, default=None, help="per role, a seeded subset")
    audit.add_argument("--n_bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    audit.add_argument("--config_dir", default=None, help="configs/tokenizer folder for a single-file base model")
    audit.add_argument("--clip_skip", type=int, default=None, help="as used in training")
    audit.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    audit.set_defaults(handler=_audit)


def _demo(args: argparse.Namespace, overrides: dict) -> int:
    from pathlib import Path

    from privlora.protocol import ProtocolSettings, format_table, quick_settings, run_protocol

    settings = quick_settings() if args.quick else ProtocolSettings()
    if args.seed is not None:
        settings.seed = args.seed
    out = Path(args.out or f"runs/demo-{settings.label}")
    print(f"privlora demo ({settings.label} variant): plain LoRA vs {', '.join(settings.defences)} on tiny-sd, "
          f"outputs in {out}")
    table = run_protocol(settings, out)
    print(f"\n{settings.label} variant — {table['date']}, {table['machine']}")
    print(format_table(table))
    print(f"\naudit report: {out / 'audit' / 'report.md'}; plots: {out / 'frontier.png'}, {out / 'curves.png'}")
    return 0


def _add_demo_parser(sub) -> None:
    demo = sub.add_parser("demo", help="the whole claim on the embedded tiny-sd: train LoRA / MP-LoRA / SMP-LoRA, "
                                       "audit them all, measure utility, print one table")
    demo.add_argument("--out", default=None, help="output folder (default: runs/demo-full or runs/demo-quick)")
    demo.add_argument("--quick", action="store_true", help="fewer epochs and samples (a few minutes)")
    demo.add_argument("--seed", type=int, default=None)
    demo.set_defaults(handler=_demo)


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
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--allow_network" in argv:
        allow_network()
    else:
        offline_by_default()
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
