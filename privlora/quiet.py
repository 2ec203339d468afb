"""Our own progress bars and messages only: the libraries' per-load bars and chatter are hidden in every
privlora process (the CLI and its worker processes)."""
from __future__ import annotations


def quiet_libraries() -> None:
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
