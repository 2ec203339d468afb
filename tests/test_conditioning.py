"""Conditioning randomisation (issue 26, Somepalli et al. 2023): caption swap within the batch, tag dropout and
Gaussian noise on cached text embeddings — seeded by batch position (a resumed run draws the same), off by default,
and independent of the image transforms' draws."""
import pytest
import torch

from privlora.config import build_config
from privlora.data.augment import Augment, drop_tags, position_generator
from privlora.errors import PrivloraError

DATA = {"synthetic_images": 9, "max_train_steps": 1}


def cached_batch(n=8):
    return {"index": torch.arange(n), "latents": torch.randn(n, 4, 4, 4, generator=torch.Generator().manual_seed(0)),
            "text_emb": torch.arange(n, dtype=torch.float32).view(n, 1, 1).expand(n, 3, 2).clone()}


def test_caption_swap_gives_some_images_another_images_caption_and_is_repeatable():
    batch = cached_batch()
    out = Augment(3, caption_swap=0.5)(batch, 2, 7)
    rows = out["text_emb"][:, 0, 0].long().tolist()
    swapped = [i for i, r in enumerate(rows) if r != i]
    assert 0 < len(swapped) < 8 and all(0 <= r < 8 for r in rows)  # some, not all; each from the batch
    assert torch.equal(out["latents"], batch["latents"])  # images untouched
    again = Augment(3, caption_swap=0.5)(cached_batch(), 2, 7)
    assert torch.equal(again["text_emb"], out["text_emb"])  # a resumed run at the same position draws the same
    other = Augment(3, caption_swap=0.5)(cached_batch(), 2, 8)
    assert not torch.equal(other["text_emb"], out["text_emb"])


def test_uncached_captions_swap_and_lose_tags():
    batch = {"index": torch.arange(4), "pixel_values": torch.zeros(4, 3, 8, 8),
             "caption": [f"img{i}, red, round, small" for i in range(4)]}
    out = Augment(1, caption_swap=0.5, word_dropout=0.5)(batch, 0, 1)
    assert out["caption"] != batch["caption"] and all(c for c in out["caption"])
    assert all(set(c.split(", ")) <= {f"img{i}" for i in range(4)} | {"red", "round", "small"} for c in out["caption"])
    assert drop_tags("a, b, c", 0.0, position_generator(0)) == "a, b, c"
    assert drop_tags("a, b, c", 0.999, position_generator(0)) == "a"  # at least one tag stays


def test_text_noise_has_the_requested_scale_and_leaves_the_image_draws_alone():
    batch = cached_batch(64)
    out = Augment(5, text_noise=0.2)(batch, 1, 1)
    assert (out["text_emb"] - batch["text_emb"]).std().item() == pytest.approx(0.2, rel=0.15)
    pixels = {"pixel_values": torch.rand(4, 3, 8, 8) * 2 - 1, "text_emb": torch.zeros(4, 3, 2)}
    plain = Augment(5, random_flip=True, crop_scale=0.5)(pixels, 1, 1)
    noisy = Augment(5, random_flip=True, crop_scale=0.5, text_noise=0.2)(pixels, 1, 1)
    assert torch.equal(plain["pixel_values"], noisy["pixel_values"])  # its own generator


def test_off_by_default_and_checked_against_the_text_cache():
    batch = cached_batch()
    assert Augment(0)(batch, 0, 1) is batch
    cfg = build_config(None, {**DATA, "caption_swap_rate": 0.3, "text_noise_scale": 0.1})
    assert Augment.from_config(cfg).conditions
    with pytest.raises(PrivloraError, match="caption_word_dropout changes the caption text"):
        build_config(None, {**DATA, "caption_word_dropout": 0.2})
    build_config(None, {**DATA, "caption_word_dropout": 0.2, "cache_text_encoder_outputs": False})
    with pytest.raises(PrivloraError, match="text_noise_scale adds noise to cached"):
        build_config(None, {**DATA, "text_noise_scale": 0.1, "shuffle_caption": True})
    with pytest.raises(PrivloraError, match="caption_swap_rate 1.0 is not in"):
        build_config(None, {**DATA, "caption_swap_rate": 1.0})
