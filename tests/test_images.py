import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from privlora.data.cache import RoleData
from privlora.data.dataset import validate_images
from privlora.data.images import (
    assign_bucket,
    bucket_resolutions,
    convert_to_rgb,
    open_rgb,
    sha256_file,
    to_tensor,
)
from privlora.data.readers import Example
from privlora.errors import PrivloraError


def save(img: Image.Image, path: Path, fmt: str | None = None) -> Path:
    img.save(path, fmt)
    return path


def png_bytes(size=(16, 16), color=(200, 30, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def assert_one_line_error(excinfo, name: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message and "\r" not in message
    assert name in message


# --- conversions to RGB --------------------------------------------------------------------------


def test_rgb_png_round_trips(tmp_path):
    img = open_rgb(save(Image.new("RGB", (8, 6), (10, 20, 30)), tmp_path / "a.png"))
    assert img.mode == "RGB" and img.size == (8, 6) and img.getpixel((0, 0)) == (10, 20, 30)


def test_rgba_is_composited_on_white(tmp_path):
    img = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    img.putpixel((1, 0), (0, 0, 255, 255))
    rgb = open_rgb(save(img, tmp_path / "a.png"))
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 0)) == (0, 0, 255)


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    img = Image.new("P", (2, 1), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * (254 * 3))
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 0
    rgb = open_rgb(save(img, tmp_path / "p.png"))
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 0)) == (0, 255, 0)


def test_grey_alpha_is_composited_on_white(tmp_path):
    img = Image.new("LA", (2, 1), (0, 0))
    img.putpixel((1, 0), (50, 255))
    rgb = open_rgb(save(img, tmp_path / "la.png"))
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 0)) == (50, 50, 50)


@pytest.mark.parametrize("mode, fmt, suffix", [("L", "PNG", ".png"), ("1", "PNG", ".png"), ("CMYK", "JPEG", ".jpg")])
def test_other_modes_become_rgb(tmp_path, mode, fmt, suffix):
    rgb = open_rgb(save(Image.new(mode, (5, 4)), tmp_path / f"x{suffix}", fmt))
    assert rgb.mode == "RGB" and rgb.size == (5, 4)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    rgb = open_rgb(save(Image.fromarray(values), tmp_path / "deep.png"))
    assert [rgb.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_32_bit_int_and_float_modes_convert(tmp_path):
    deep = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert deep.mode == "I"
    rgb = open_rgb(save(deep, tmp_path / "deep.tiff"))
    assert rgb.getpixel((1, 0)) == (255, 255, 255)
    floats = convert_to_rgb(Image.fromarray(np.array([[0.0, 1.0]], dtype=np.float32)))
    assert floats.getpixel((1, 0)) == (255, 255, 255)


# --- bad files -----------------------------------------------------------------------------------


def test_truncated_png(tmp_path):
    path = tmp_path / "truncated.png"
    path.write_bytes(png_bytes((64, 64))[:-30])
    with pytest.raises(PrivloraError) as excinfo:
        open_rgb(path)
    assert_one_line_error(excinfo, "truncated.png")


def test_truncated_jpeg(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(PrivloraError) as excinfo:
        open_rgb(path)
    assert_one_line_error(excinfo, "cut.jpg")


def test_zero_size_file(tmp_path):
    (tmp_path / "empty.png").touch()
    with pytest.raises(PrivloraError, match="empty file") as excinfo:
        open_rgb(tmp_path / "empty.png")
    assert_one_line_error(excinfo, "empty.png")


def test_text_file_with_image_extension(tmp_path):
    (tmp_path / "notes.png").write_text("not an image\nat all\n")
    with pytest.raises(PrivloraError, match="not a recognised image format") as excinfo:
        open_rgb(tmp_path / "notes.png")
    assert_one_line_error(excinfo, "notes.png")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(PrivloraError) as excinfo:
        open_rgb(tmp_path / "ghost.png")
    assert_one_line_error(excinfo, "ghost.png")
    with pytest.raises(PrivloraError, match="not a regular file"):
        open_rgb(tmp_path)


# --- tensors, hashes, buckets --------------------------------------------------------------------


def test_to_tensor_resizes_shorter_side_and_center_crops():
    img = Image.new("RGB", (32, 16), (0, 0, 0))
    img.paste((255, 255, 255), (16, 0, 32, 16))  # right half white
    pixels = to_tensor(img, 8)
    assert pixels.shape == (3, 8, 8) and pixels.dtype == torch.float32
    assert pixels.min() == -1.0 and pixels.max() == 1.0
    assert torch.all(pixels[:, :, 0] == -1.0) and torch.all(pixels[:, :, -1] == 1.0)


def test_to_tensor_random_crop_and_flip_follow_the_generator():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 40, 3), dtype=np.uint8))
    first = to_tensor(img, 8, center_crop=False, random_flip=True, generator=torch.Generator().manual_seed(3))
    again = to_tensor(img, 8, center_crop=False, random_flip=True, generator=torch.Generator().manual_seed(3))
    assert first.shape == (3, 8, 8) and torch.equal(first, again)
    assert first.min() >= -1.0 and first.max() <= 1.0


def test_to_tensor_bucket_resolution_is_width_height():
    assert to_tensor(Image.new("RGB", (30, 10)), (24, 8)).shape == (3, 8, 24)


def test_sha256_file(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"abc")
    assert sha256_file(tmp_path / "f.bin") == hashlib.sha256(b"abc").hexdigest()


def test_bucket_resolutions_and_assignment():
    buckets = bucket_resolutions(512, step=64, max_aspect=2.0)
    assert (512, 512) in buckets
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0
        assert width * height <= 512 * 512 and max(width / height, height / width) <= 2.0
    assert assign_bucket(300, 300, buckets) == (512, 512)
    wide_w, wide_h = assign_bucket(1000, 500, buckets)
    assert wide_w > wide_h
    assert all(w % 8 == 0 and h % 8 == 0 for w, h in bucket_resolutions(64, step=8))


# --- dataset and up-front validation -------------------------------------------------------------


def test_dataset_expands_repeats_and_reports_example_index(tmp_path):
    a = save(Image.new("RGB", (16, 12), (255, 0, 0)), tmp_path / "a.png")
    b = save(Image.new("L", (12, 16), 0), tmp_path / "b.png")
    dataset = RoleData([Example(a, "red", 2), Example(b, "black", 1)], resolution=8, expand_repeats=True)
    assert len(dataset) == 3
    items = [dataset[i] for i in range(3)]
    assert [item["index"] for item in items] == [0, 0, 1]
    assert [item["caption"] for item in items] == ["red", "red", "black"]
    assert items[2]["pixel_values"].shape == (3, 8, 8)
    assert torch.all(items[2]["pixel_values"] == -1.0)


def test_validate_images_raises_first_error_or_skips(tmp_path):
    good = save(Image.new("RGB", (8, 8)), tmp_path / "good.png")
    (tmp_path / "bad.png").write_text("nope")
    examples = [Example(good, "g"), Example(tmp_path / "bad.png", "b")]
    with pytest.raises(PrivloraError) as excinfo:
        validate_images(examples)
    assert_one_line_error(excinfo, "bad.png")
    kept, bad = validate_images(examples, skip_bad=True)
    assert kept == [examples[0]]
    assert len(bad) == 1 and bad[0][0] == tmp_path / "bad.png" and "bad.png" in bad[0][1]


# --- never anything but RGB or PrivloraError -----------------------------------------------------

MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]
FORMATS = [("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp"), ("BMP", ".bmp"), ("TIFF", ".tif")]
fuzz = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,  # same examples every run: the suite stays deterministic
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def assert_rgb_or_privlora_error(path: Path) -> None:
    try:
        img = open_rgb(path)
    except PrivloraError as e:
        assert "\n" not in str(e) and path.name in str(e)
        return
    assert img.mode == "RGB"


@fuzz
@given(data=st.binary(max_size=2000), png_header=st.booleans())
def test_random_bytes_never_escape_as_other_errors(tmp_path, data, png_header):
    path = tmp_path / "fuzz.png"
    path.write_bytes((b"\x89PNG\r\n\x1a\n" if png_header else b"") + data)
    assert_rgb_or_privlora_error(path)


@fuzz
@given(position=st.integers(0, 10_000), byte=st.integers(0, 255), cut=st.booleans())
def test_corrupted_png_never_escapes_as_other_errors(tmp_path, position, byte, cut):
    data = bytearray(png_bytes((12, 9)))
    position %= len(data)
    data[position] = byte
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data[:position]) if cut else bytes(data))
    assert_rgb_or_privlora_error(path)


@fuzz
@given(
    mode=st.sampled_from(MODES),
    fmt=st.sampled_from(FORMATS),
    width=st.integers(1, 24),
    height=st.integers(1, 24),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_small_images_open_as_rgb(tmp_path, mode, fmt, width, height, seed):
    rgb = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))
    img = rgb.convert(mode) if mode not in ("I;16", "I", "F") else rgb.convert("L").convert(mode)
    path = tmp_path / f"img{fmt[1]}"
    try:
        img.save(path, fmt[0])
    except (OSError, ValueError, KeyError):
        return  # this format cannot store this mode; nothing to read back
    opened = open_rgb(path)
    assert opened.mode == "RGB" and opened.size == (width, height)
