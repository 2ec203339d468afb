"""A torch Dataset of (image, caption) examples, and the up-front image check run before training."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from privlora.data.images import open_rgb, to_tensor
from privlora.data.readers import Example
from privlora.errors import PrivloraError


class ImageCaptionDataset(Dataset):
    """Each example appears ``repeats`` times; images are opened lazily in ``__getitem__``.

    Items are dicts: ``pixel_values`` (3,H,W) float in [-1,1], ``caption``, and ``index`` — the example's
    position in ``examples`` (not in the repeat-expanded order), so losses can be traced to images.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        resolution: int | tuple[int, int],
        center_crop: bool = True,
        random_flip: bool = False,
    ):
        self.examples = list(examples)
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self._example_index = [i for i, e in enumerate(self.examples) for _ in range(e.repeats)]

    def __len__(self) -> int:
        return len(self._example_index)

    def __getitem__(self, item: int) -> dict[str, Any]:
        index = self._example_index[item]
        example = self.examples[index]
        pixels = to_tensor(open_rgb(example.path), self.resolution, self.center_crop, self.random_flip)
        return {"pixel_values": pixels, "caption": example.caption, "index": index}


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
