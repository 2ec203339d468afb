"""Hugging Face offline mode: privlora downloads nothing at run time unless the user opts in (``--allow_network``).

Importing privlora changes nothing; the CLI entry point decides (``privlora.cli.main``), and the library entry
points that load models (``load_base``) switch offline mode on unless the caller already chose.
"""
from __future__ import annotations

import os

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def offline_by_default() -> None:
    """Offline unless the environment already says otherwise."""
    for var in OFFLINE_VARS:
        os.environ.setdefault(var, "1")


def allow_network() -> None:
    for var in OFFLINE_VARS:
        os.environ[var] = "0"
