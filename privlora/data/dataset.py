"""The up-front image check run before training (the training Dataset is ``privlora.data.cache.RoleData``)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


from privlora.data.images import open_rgb
from privlora.data.readers import Example
from privlora.errors import PrivloraError


def validate_images(
    examples: Sequence[Example], *, skip_bad: bool = False
) -> tuple[list[Example], list[tuple[Path, str]]]:
    """Open and fully decode every image once, before training starts.

    By default the first bad image raises its PrivloraError. With ``skip_bad`` the bad ones are dropped
    and returned as ``(path, one-line reason)``; if every image is bad that is still an error.
    """
    problems: dict[Path, str] = {}
    for path in dict.fromkeys(e.path for e in examples):
        try:
            open_rgb(path)
        except PrivloraError as e:
            if not skip_bad:
                raise
            problems[path] = str(e)
    good = [e for e in examples if e.path not in problems]
    if examples and not good:
        raise PrivloraError(f"none of the {len(problems)} images can be read; first: {next(iter(problems.values()))}")
    return good, list(problems.items())
