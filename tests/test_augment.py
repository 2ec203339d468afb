"""Augmentation of training batches (flip, random resized crop, colour jitter) and the other regularisers
(LoRA dropout, weight decay): what each does, seeded by batch position, resume-exact, validated."""
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from privlora.config import TrainConfig, build_config
from privlora.data.augment import FLIPPED, Augment, crop_boxes, flip, jitter, position_generator, resized_crop
from privlora.data.readers import Example
from privlora.errors import PrivloraError
from privlora.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(synthetic_images=24, n_member_aux=3, n_nonmember_aux=3, n_nonmember_test=4, resolution=32,
             train_batch_size=4, eval_samples=4, network_dim=4, network_alpha=4, unet_lr=1e-3)
ALL_ON = dict(random_flip=True, random_crop_scale=0.5, color_jitter=0.4)


def images(n=4, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_flip_mirrors_exactly_the_chosen_images():
    x = images()
    out = flip(x, torch.tensor([True, False, True, False]))
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[2], x[2].flip(-1))
    assert torch.equal(out[1], x[1]) and torch.equal(out[3], x[3])


def test_crop_boxes_lie_inside_with_the_asked_area_and_aspect():
    boxes = crop_boxes(200, 64, 64, 0.3, torch.Generator().manual_seed(1))
    for top, left, h, w in boxes:
        assert 0 <= top <= 64 - h and 0 <= left <= 64 - w
        assert 0.3 * 0.9 <= h * w / 64 ** 2 <= 1.0
        if h < 64 and w < 64:  # a side at the full image is clamped there, which bends the aspect ratio
            assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
    assert len(set(boxes)) > 150


def test_random_resized_crop_is_a_resized_sub_window_at_full_size():
    x = images(2, 32)
    aug = Augment(5, crop_scale=0.4)
    out = aug({"pixel_values": x}, 3, 1)["pixel_values"]
    assert out.shape == x.shape and not torch.equal(out, x)
    boxes = crop_boxes(2, 32, 32, 0.4, position_generator(5, 3, 1))
    for img, res, (top, left, h, w) in zip(x, out, boxes):
        assert (h, w) != (32, 32)
        window = img[None, :, top:top + h, left:left + w]
        expected = F.interpolate(window, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)[0]
        assert torch.allclose(res, expected, atol=1e-6)
    assert torch.equal(resized_crop(x, [(0, 0, 32, 32)] * 2), x)  # the whole image: unchanged


def test_jitter_is_identity_at_one_and_stays_in_range():
    x = images()
    assert torch.allclose(jitter(x, torch.ones(4, 3)), x, atol=1e-6)
    darker = jitter(x, torch.tensor([[0.5, 1.0, 1.0]] * 4))
    assert torch.allclose(darker, (x + 1) / 2 * 0.5 * 2 - 1, atol=1e-6)
    grey = jitter(x, torch.tensor([[1.0, 1.0, 0.0]] * 4))  # saturation 0: every channel equal
    assert torch.allclose(grey[:, 0], grey[:, 1], atol=1e-6) and torch.allclose(grey[:, 1], grey[:, 2], atol=1e-6)
    flat = jitter(x, torch.tensor([[1.0, 0.0, 1.0]] * 4))  # contrast 0: one grey level per image
    assert torch.allclose(flat, flat.mean(dim=(1, 2, 3), keepdim=True).expand_as(flat), atol=1e-6)
    out = Augment(0, color_jitter=1.0)({"pixel_values": x * 3}, 0, 1)["pixel_values"]
    assert out.min() >= -1 and out.max() <= 1 and not torch.equal(out, x)


def test_same_seed_and_position_same_augmentation_else_different():
    x = images(4, 32)
    aug = Augment(7, **{"random_flip": True, "crop_scale": 0.5, "color_jitter": 0.4})
    a = aug({"pixel_values": x, "index": torch.arange(4)}, 2, 5)
    assert torch.equal(a["pixel_values"], aug({"pixel_values": x.clone()}, 2, 5)["pixel_values"])
    assert torch.equal(a["index"], torch.arange(4))
    assert not torch.equal(a["pixel_values"], aug({"pixel_values": x}, 2, 6)["pixel_values"])
    assert not torch.equal(a["pixel_values"], aug({"pixel_values": x}, 3, 5)["pixel_values"])
    assert not torch.equal(a["pixel_values"], Augment(8, True, 0.5, 0.4)({"pixel_values": x}, 2, 5)["pixel_values"])


def test_everything_off_leaves_the_batch_object_untouched():
    batch = {"pixel_values": images()}
    assert Augment(0)(batch, 0, 1) is batch
    assert Augment.from_config(TrainConfig())(batch, 0, 1) is batch
    assert not Augment.from_config(TrainConfig()).active
    assert Augment(0, color_jitter=0.1).needs_pixels and not Augment(0, random_flip=True).needs_pixels


def test_flip_with_cached_latents_picks_the_mirrored_images_latents():
    z, zf = torch.randn(8, 4, 2, 2), torch.randn(8, 4, 2, 2)
    out = Augment(3, random_flip=True)({"latents": z, FLIPPED: zf}, 0, 1)
    assert FLIPPED not in out
    chosen = [torch.equal(o, b) for o, b in zip(out["latents"], zf)]
    kept = [torch.equal(o, a) for o, a in zip(out["latents"], z)]
    assert all(c != k for c, k in zip(chosen, kept)) and 0 < sum(chosen) < 8


def test_the_training_role_is_cached_per_augmentation(tmp_path):
    from privlora.models.cache import Cache, encode_latents
    from privlora.models.loading import load_base

    paths = []
    for i, colour in enumerate(("red", "blue")):
        img = Image.new("RGB", (32, 32), colour)
        img.paste((255, 255, 0), (0, 0, 10, 32))  # a bar on the left: the mirror differs
        img.save(tmp_path / f"{i}.png")
        paths.append(Example(tmp_path / f"{i}.png", colour, 1))
    base = load_base("tiny-sd")
    cache = Cache(base, TrainConfig(resolution=32, max_train_steps=1, synthetic_images=9), "cpu")
    flipped = cache.role(paths, augment=Augment(0, random_flip=True))
    item = flipped[0]
    assert "latents" in item and "pixel_values" not in item and not torch.equal(item["latents"], item[FLIPPED])
    mirrored = encode_latents(base, paths[:1], 32, True, "cpu", flipped=True)[0]
    assert torch.allclose(item[FLIPPED], mirrored, atol=1e-5)  # batch of 2 vs 1: float summation order
    assert "pixel_values" in cache.role(paths, augment=Augment(0, crop_scale=0.5))[0]
    assert FLIPPED not in cache.role(paths)[0]  # the other roles: one orientation, cached


@pytest.mark.parametrize("key, value", [("random_crop_scale", 0.0), ("random_crop_scale", 1.5),
                                        ("color_jitter", -0.1), ("color_jitter", 2.0), ("network_dropout", 1.0),
                                        ("weight_decay", -1.0)])
def test_bad_values_are_one_line_errors_naming_the_setting(key, value):
    with pytest.raises(PrivloraError, match=key) as e:
        build_config(None, {"synthetic_images": 9, "max_train_steps": 1, key: value})
    assert "\n" not in str(e.value)


def test_network_dropout_reaches_the_lora_layers_and_weight_decay_the_optimizer():
    from privlora.models.loading import load_base
    from privlora.train_setup import inject_lora, make_optimizer

    outputs = {}
    for p in (0.0, 0.5):
        base = load_base("tiny-sd")
        cfg = TrainConfig(network_dropout=p, weight_decay=0.03, max_train_steps=1, synthetic_images=9)
        trainable, groups = inject_lora(cfg, base, "cpu")
        assert all(g["weight_decay"] == 0.03 for g in make_optimizer(cfg, groups).param_groups)
        with torch.no_grad():
            for t in trainable:
                t.fill_(0.1)  # B is zero at init, which would hide the dropout on A's input
        gen = torch.Generator().manual_seed(0)
        z, c = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, base.unet.config.cross_attention_dim,
                                                                    generator=gen)
        base.unet.train()
        with torch.no_grad():
            outputs[p] = [base.unet(z, 10, c).sample for _ in range(2)]
            base.unet.eval()
            outputs[p] += [base.unet(z, 10, c).sample for _ in range(2)]
    assert torch.equal(outputs[0.0][0], outputs[0.0][1])
    assert not torch.equal(outputs[0.5][0], outputs[0.5][1])  # train mode: fresh masks
    assert torch.equal(outputs[0.5][2], outputs[0.5][3])  # eval mode: no dropout


def run(model, out, **kw):
    return train(build_config(None, {**SMALL, "pretrained_model_name_or_path": model, "output_dir": str(out), **kw}))


@pytest.mark.slow
@pytest.mark.parametrize("settings", [ALL_ON, dict(random_flip=True)], ids=["pixels", "cached_flip"])
def test_resume_mid_epoch_with_augmentation_is_bit_identical(model, tmp_path, settings):
    # 17 training images in batches of 4: 5 batches per epoch, so the step-7 state is mid-epoch (epoch 2, batch 2)
    straight = run(model, tmp_path / "a", max_train_steps=9, save_state=True, save_every_n_steps=7, **settings)
    resumed = run(model, tmp_path / "b", max_train_steps=9, resume=str(tmp_path / "a" / "state-step000007"),
                  **settings)
    plain = run(model, tmp_path / "c", max_train_steps=9)
    a, b, c = load_file(straight), load_file(resumed), load_file(plain)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the augmentation did change the training
