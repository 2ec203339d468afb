"""The ``privlora`` command: train, audit, sample, quality, demo."""
from __future__ import annotations

import argparse
import os
import sys

from privlora.errors import PrivloraError


def _train(args: argparse.Namespace, overrides: dict) -> int:
    from privlora.config import build_config
    from privlora.train import train

    cfg = build_config(args.config, overrides)
    path = train(cfg)
    print(f"saved {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from privlora.config import add_config_flags

    parser = argparse.ArgumentParser(prog="privlora", description=__doc__)
    parser.add_argument("--allow_network", action="store_true",
                        help="let Hugging Face libraries use the network (off by default: nothing is downloaded)")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a LoRA (plain, MP-LoRA or SMP-LoRA) from a TOML preset and flags",
                           argument_default=argparse.SUPPRESS)
    train.add_argument("--config", default=None, help="TOML preset; flags override its keys")
    add_config_flags(train)
    train.set_defaults(handler=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--allow_network" in argv:
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
            os.environ[var] = "0"
    parser = build_parser()
    args = parser.parse_args(argv)
    reserved = {"command", "handler", "config", "allow_network"}
    overrides = {k: v for k, v in vars(args).items() if k not in reserved}
    try:
        return args.handler(args, overrides)
    except PrivloraError as e:
        print(f"privlora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("privlora: interrupted", file=sys.stderr)
        return 130
