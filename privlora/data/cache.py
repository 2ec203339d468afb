"""Per-role training data: latents and text embeddings cached in memory, or images encoded every step.

The encoding itself (kohya's ``cache_latents`` / ``cache_text_encoder_outputs``) needs the models and lives in
``privlora.models.cache``; this module only holds the data.
"""
from __future__ import annotations


import torch
from torch.utils.data import DataLoader, Dataset

from privlora.data.augment import FLIPPED
from privlora.data.images import open_rgb, to_tensor
from privlora.data.readers import Example


class RoleData(Dataset):
    """One role's examples. Items: ``index`` and ``latents`` or ``pixel_values``, ``text_emb`` or ``caption``;
    ``latents_flipped`` too when the mirrored images' latents are cached (random_flip, ``privlora.data.augment``).

    Items are never augmented here: the training loop augments whole batches (``privlora.data.augment``).
    """

    def __init__(self, examples: list[Example], *, resolution: int, latents: torch.Tensor | None = None,
                 text_emb: torch.Tensor | None = None, center_crop: bool = True, expand_repeats: bool = False,
                 latents_flipped: torch.Tensor | None = None):
        self.examples = examples
        self.resolution, self.center_crop = resolution, center_crop
        self.latents, self.text_emb, self.latents_flipped = latents, text_emb, latents_flipped
        self.order = [i for i, ex in enumerate(examples) for _ in range(ex.repeats if expand_repeats else 1)]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict:
        j = self.order[i]
        item: dict = {"index": j}
        if self.latents is not None:
            item["latents"] = self.latents[j]
            if self.latents_flipped is not None:
                item[FLIPPED] = self.latents_flipped[j]
        else:
            img = open_rgb(self.examples[j].path)
            item["pixel_values"] = to_tensor(img, self.resolution, center_crop=self.center_crop)
        if self.text_emb is not None:
            item["text_emb"] = self.text_emb[j]
        else:
            item["caption"] = self.examples[j].caption
        return item

    def subset(self, n: int, generator: torch.Generator) -> RoleData:
        """n examples drawn at random (without replacement) with ``generator``: a seeded random subset, not
        the first n (roles come in file-path order)."""
        picked = torch.randperm(len(self.examples), generator=generator)[:n].tolist()
        sub = RoleData([self.examples[i] for i in picked], resolution=self.resolution, center_crop=self.center_crop)
        sub.latents = None if self.latents is None else self.latents[picked]
        sub.text_emb = None if self.text_emb is None else self.text_emb[picked]
        return sub


class CountingIterator:
    """Endless shuffled batches of one role, counting what it served so a resumed run can fast-forward."""

    def __init__(self, data: RoleData, batch_size: int, seed: int):
        self.loader = DataLoader(data, batch_size=min(batch_size, len(data)), shuffle=True, drop_last=True,
                                 generator=torch.Generator().manual_seed(seed))
        self.served = 0
        self._it = self._endless()

    def _endless(self):
        while True:
            yield from self.loader

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        self.served += 1
        return next(self._it)

    def fast_forward(self, n: int) -> None:
        for _ in range(n - self.served):
            next(self)
