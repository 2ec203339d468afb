"""Reading images safely (any mode to RGB, one-line errors), tensor conversion, hashing, buckets."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from privlora.errors import PrivloraError
from privlora.files import file_error, sha256_file  # noqa: F401  (re-exported)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

_WHITE = (255, 255, 255)


def is_image_file(path: Path) -> bool:
    """True for visible regular files whose extension is an image extension."""
    # Dot-files are skipped: macOS '._name.png' resource forks are not images.
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()




def open_rgb(path: str | Path) -> Image.Image:
    """Open, fully decode and verify an image, returning it in RGB mode.

    Transparent pixels are composited on white; 16-bit images are scaled down to 8 bits;
    the EXIF orientation is applied. Any problem raises PrivloraError naming the file.
    """
    path = Path(path)
    _check_nonempty_file(path)
    try:
        with Image.open(path) as probe:
            probe.verify()  # catches PNG CRC errors that decoding alone would accept
        with Image.open(path) as img:
            img.load()
            return convert_to_rgb(ImageOps.exif_transpose(img))
    except Image.UnidentifiedImageError:
        raise file_error(path, "cannot read image (not a recognised image format)") from None
    except Image.DecompressionBombError:
        raise file_error(path, "cannot read image (too many pixels)") from None
    except Exception as e:  # noqa: BLE001 - PIL plugins raise many types for corrupt data
        raise file_error(path, f"cannot read image ({_describe(e)})") from None


def _check_nonempty_file(path: Path) -> None:
    try:
        size = os.stat(path).st_size
    except OSError as e:
        raise file_error(path, f"cannot read file ({e.strerror or e})") from None
    if not path.is_file():
        raise file_error(path, "not a regular file")
    if size == 0:
        raise file_error(path, "cannot read image (empty file, 0 bytes)")


def _describe(error: Exception) -> str:
    text = str(error).strip()
    return text if text else type(error).__name__


def convert_to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency on white and scaling high bit depths."""
    if img.mode == "RGB":
        return img.copy()
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        return _high_depth_to_rgb(img)
    if _has_transparency(img):
        return _composite_on_white(img)
    try:
        return img.convert("RGB")
    except ValueError:
        raise ValueError(f"unsupported image mode {img.mode}") from None


def _has_transparency(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def _composite_on_white(img: Image.Image) -> Image.Image:
    if img.mode == "La":
        img = img.convert("RGBa")  # Pillow cannot convert La to RGBA directly
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    values = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        # Float images are usually in [0, 1]; otherwise treat them as already 0..255.
        scale = 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else 1.0
        values = np.nan_to_num(values) * scale
    else:
        # 'I' is how Pillow has historically loaded 16-bit greyscale, so both use the 16-bit range.
        values = np.clip(values, 0, 65535) / 257.0
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def to_tensor(
    img: Image.Image,
    resolution: int | tuple[int, int],
    center_crop: bool = True,
    random_flip: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Resize (shorter side to ``resolution``), crop and flip an RGB image → float (3,H,W) in [-1, 1].

    ``resolution`` is a square side or a (width, height) bucket; the image is scaled to cover it.
    Random crop/flip draw from ``generator`` (or torch's global RNG, which DataLoader seeds per worker).
    """
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    img = _resize_to_cover(img.convert("RGB"), width, height)
    img = _crop(img, width, height, center_crop, generator)
    if random_flip and torch.rand((), generator=generator).item() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
    return pixels.float().div(127.5).sub(1.0)


def _resize_to_cover(img: Image.Image, width: int, height: int) -> Image.Image:
    scale = max(width / img.width, height / img.height)
    new_size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    if new_size == img.size:
        return img
    return img.resize(new_size, Image.Resampling.LANCZOS)


def _crop(img: Image.Image, width: int, height: int, center: bool, generator: torch.Generator | None) -> Image.Image:
    spare_x, spare_y = img.width - width, img.height - height
    if center:
        left, top = spare_x // 2, spare_y // 2
    else:
        left = int(torch.randint(spare_x + 1, (), generator=generator))
        top = int(torch.randint(spare_y + 1, (), generator=generator))
    return img.crop((left, top, left + width, top + height))


def bucket_resolutions(base_res: int, step: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) buckets, each side a multiple of ``step``, area at most ``base_res²``, sorted by width."""
    if base_res < step or step % 8 or max_aspect < 1:
        raise PrivloraError(f"bad bucket settings: base_res={base_res}, step={step}, max_aspect={max_aspect}")
    target_area = base_res * base_res
    buckets = set()
    for width in range(step, int(base_res * math.sqrt(max_aspect)) + 1, step):
        height = (target_area // width) // step * step
        if height >= step and max(width / height, height / width) <= max_aspect:
            buckets.add((width, height))
    return sorted(buckets)


def assign_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log space) to ``width/height``."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))
