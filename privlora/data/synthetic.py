"""Procedural captioned sprites: the synthetic data tiny-sd is pretrained on and experiments fine-tune on.

Every image is a function of ``(namespace, seed, index)`` only. The "public" namespace is reserved for
pretraining tiny-sd; "private" is what membership-inference experiments train and audit on. The namespace id is
part of the RNG seed, so the two splits never share an image even with equal seeds and indices.

Each image has a coloured background (plain, striped or checkered), one or two shapes of a named colour, size
and position, and a per-image random texture (pixel noise, a soft brightness gradient, colour jitter) that makes
it unique, i.e. something a model can memorise.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from privlora.errors import PrivloraError

NAMESPACES = {"public": 0x7075626C, "private": 0x70726976, "canary": 0x63616E61}
LAYOUTS = ("flat", "kohya", "jsonl")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 140, 25),
    "yellow": (240, 220, 40),
    "green": (45, 165, 60),
    "blue": (40, 80, 220),
    "purple": (135, 55, 185),
    "pink": (245, 145, 195),
    "brown": (125, 75, 35),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "cyan": (40, 200, 215),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "hexagon")
SIZES = {"small": 0.13, "medium": 0.2, "large": 0.29}  # half-extent as a fraction of the image side
# 3x3 grid cell (column, row) -> caption phrase
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "at the top left",
    (1, 0): "at the top",
    (2, 0): "at the top right",
    (0, 1): "on the left",
    (1, 1): "in the center",
    (2, 1): "on the right",
    (0, 2): "at the bottom left",
    (1, 2): "at the bottom",
    (2, 2): "at the bottom right",
}
PATTERNS = ("plain", "striped", "checkered")

_FIXED_WORDS = ("a", "and", "on", "background")


def _caption_words() -> tuple[str, ...]:
    words: list[str] = list(_FIXED_WORDS)
    for group in (SIZES, COLORS, SHAPES, PATTERNS[1:]):  # "plain" is never written out
        words.extend(group)
    for phrase in POSITIONS.values():
        words.extend(phrase.split())
    return tuple(dict.fromkeys(words))


CAPTION_WORDS: tuple[str, ...] = _caption_words()

_SUPERSAMPLE = 4
_MIN_CONTRAST = 110.0  # min RGB distance between a shape colour and the background colour


def _rng(namespace: str, seed: int, index: int) -> np.random.Generator:
    if namespace not in NAMESPACES:
        raise PrivloraError(f"unknown sprite namespace {namespace!r} (use one of {sorted(NAMESPACES)})")
    if seed < 0 or index < 0:
        raise PrivloraError(f"sprite seed and index must be non-negative (got seed={seed}, index={index})")
    return np.random.default_rng([NAMESPACES[namespace], int(seed), int(index)])


def _pick(rng: np.random.Generator, options) -> str:
    options = list(options)
    return options[int(rng.integers(len(options)))]


def _contrasting_color(rng: np.random.Generator, background: str) -> str:
    bg = np.array(COLORS[background], dtype=float)
    ok = [c for c, v in COLORS.items() if np.linalg.norm(np.array(v) - bg) >= _MIN_CONTRAST]
    return _pick(rng, ok)


def _polygon(n: int, radius: float, start_deg: float, inner: float | None = None) -> np.ndarray:
    """Unit-centred polygon (or star when ``inner`` is set) as an (k, 2) array of xy offsets."""
    k = 2 * n if inner else n
    ang = np.deg2rad(start_deg) + np.arange(k) * 2 * np.pi / k
    r = np.full(k, radius)
    if inner:
        r[1::2] = radius * inner
    return np.stack([r * np.cos(ang), r * np.sin(ang)], axis=1)


def _cross(radius: float) -> np.ndarray:
    a, w = radius, radius * 0.36
    pts = [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)]
    return np.array(pts, dtype=float)


def _outline(shape: str, r: float, rot: float) -> np.ndarray | None:
    """Vertices of a polygonal shape, rotated by ``rot`` degrees; None for round shapes."""
    if shape == "square":
        pts = _polygon(4, r * 1.25, 45)
    elif shape == "diamond":
        pts = _polygon(4, r * 1.15, 90)
    elif shape == "triangle":
        pts = _polygon(3, r * 1.2, -90) + np.array([0.0, r * 0.2])
    elif shape == "star":
        pts = _polygon(5, r * 1.2, -90, inner=0.45)
    elif shape == "hexagon":
        pts = _polygon(6, r * 1.05, 0)
    elif shape == "cross":
        pts = _cross(r * 1.1)
    else:
        return None
    c, s = np.cos(np.deg2rad(rot)), np.sin(np.deg2rad(rot))
    return pts @ np.array([[c, s], [-s, c]])


def _shape_mask(shape: str, cx: float, cy: float, r: float, rot: float, res: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] at ``res``, drawn at a supersampled resolution and box-downsampled."""
    ss = res * _SUPERSAMPLE
    cx, cy, r = cx * ss, cy * ss, r * ss
    canvas = Image.new("L", (ss, ss), 0)
    draw = ImageDraw.Draw(canvas)
    pts = _outline(shape, r, rot)
    if pts is not None:
        draw.polygon([(cx + x, cy + y) for x, y in pts], fill=255)
    else:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if shape == "ring":
            q = r * 0.55
            draw.ellipse([cx - q, cy - q, cx + q, cy + q], fill=0)
    small = canvas.resize((res, res), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _jitter(rng: np.random.Generator, color: str, amount: float) -> np.ndarray:
    return np.array(COLORS[color], dtype=np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32)


def _pattern(rng: np.random.Generator, kind: str, res: int) -> np.ndarray:
    """Brightness offset field (res, res) for the background pattern, in 0-255 units."""
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32) / res
    if kind == "striped":
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(0.2, 0.4)
        phase = rng.uniform(0, 2 * np.pi)
        u = xx * np.cos(angle) + yy * np.sin(angle)
        return rng.uniform(14, 24) * np.sign(np.sin(2 * np.pi * u / period + phase))
    if kind == "checkered":
        cell = rng.uniform(0.2, 0.33)
        ox, oy = rng.uniform(0, cell, 2)
        parity = (np.floor((xx + ox) / cell) + np.floor((yy + oy) / cell)) % 2
        return rng.uniform(14, 24) * (2 * parity - 1)
    return np.zeros((res, res), dtype=np.float32)


def _texture(rng: np.random.Generator, res: int) -> np.ndarray:
    """Per-image random texture (res, res, 3): pixel noise plus a soft linear gradient."""
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32) / res - 0.5
    gx, gy = rng.uniform(-14, 14, 2)
    grad = (gx * xx + gy * yy)[..., None]
    noise = rng.normal(0.0, rng.uniform(3, 8), (res, res, 3))
    return grad + noise


def _layout_shapes(rng: np.random.Generator, background: str, res: int) -> list[dict]:
    count = 2 if rng.random() < 0.4 else 1
    cells = list(POSITIONS)
    order = rng.permutation(len(cells))[:count]
    shapes = []
    for i in order:
        col, row = cells[int(i)]
        size = _pick(rng, SIZES)
        r = SIZES[size]
        # keep the shape inside the image; the cell fixes the centre up to a small jitter
        lo, hi = r * 1.05, 1 - r * 1.05
        cx = np.clip((col + 0.5) / 3 + rng.uniform(-0.05, 0.05), lo, hi)
        cy = np.clip((row + 0.5) / 3 + rng.uniform(-0.05, 0.05), lo, hi)
        shapes.append(
            dict(shape=_pick(rng, SHAPES), color=_contrasting_color(rng, background), size=size,
                 where=POSITIONS[(col, row)], cx=cx, cy=cy, r=r, rot=rng.uniform(-12, 12))
        )
    return shapes


def _caption(shapes: list[dict], background: str, pattern: str) -> str:
    parts = [f"a {s['size']} {s['color']} {s['shape']} {s['where']}" for s in shapes]
    bg = background if pattern == "plain" else f"{pattern} {background}"
    return " and ".join(parts) + f" on a {bg} background"


STYLES = ("plain", "framed")
FRAME_COLORS = ("black", "brown", "purple", "white")


def _frame(rng: np.random.Generator, img: np.ndarray) -> str:
    """A border of a frame colour: the private "style" tiny-sd never saw, so fine-tuning has something to learn."""
    color = _pick(rng, FRAME_COLORS)
    width = max(2, img.shape[0] // 10)
    mask = np.ones(img.shape[:2], dtype=bool)
    mask[width:-width, width:-width] = False
    img[mask] = _jitter(rng, color, 10)
    return color


def make_sprite(index: int, seed: int = 0, namespace: str = "private", resolution: int = 32,
                style: str = "plain") -> tuple[Image.Image, str]:
    """The sprite ``index`` of split ``(namespace, seed)``: an RGB image and its caption.

    ``style="framed"`` draws the same sprite inside a coloured frame (a domain shift from the public split).
    """
    if style not in STYLES:
        raise PrivloraError(f"unknown sprite style {style!r} (use one of {', '.join(STYLES)})")
    if resolution < 8:
        raise PrivloraError(f"sprite resolution must be at least 8 (got {resolution})")
    rng = _rng(namespace, seed, index)
    background = _pick(rng, COLORS)
    pattern = _pick(rng, PATTERNS)
    img = np.broadcast_to(_jitter(rng, background, 18), (resolution, resolution, 3)).copy()
    img += _pattern(rng, pattern, resolution)[..., None]
    shapes = _layout_shapes(rng, background, resolution)
    for s in shapes:
        alpha = _shape_mask(s["shape"], s["cx"], s["cy"], s["r"], s["rot"], resolution)[..., None]
        img = img * (1 - alpha) + _jitter(rng, s["color"], 18) * alpha
    texture = _texture(rng, resolution)
    caption = _caption(shapes, background, pattern)
    if style == "framed":
        caption += f" in a {_frame(rng, img)} frame"
    pixels = np.clip(np.rint(img + texture), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB"), caption


def generate(
    n: int, seed: int = 0, namespace: str = "private", resolution: int = 32, start: int = 0, style: str = "plain"
) -> list[tuple[Image.Image, str]]:
    """Sprites ``start .. start+n-1`` of split ``(namespace, seed)``."""
    return [make_sprite(i, seed, namespace, resolution, style) for i in range(start, start + n)]


def _image_dir(out_dir: Path, layout: str, repeats: int) -> Path:
    if layout == "kohya":
        # kohya-ss reads "<repeats>_<concept>" subfolders of the train_data_dir
        return out_dir / f"{repeats}_sprites"
    return out_dir


def write_folder(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    namespace: str = "private",
    resolution: int = 32,
    layout: str = "flat",
    repeats: int = 1,
    style: str = "plain",
) -> Path:
    """Write ``n`` sprites as PNGs with their captions; returns ``out_dir`` (the dataset root).

    ``flat``: ``img_00000.png`` + ``img_00000.txt``; ``kohya``: the same inside ``<repeats>_sprites/``;
    ``jsonl``: the PNGs + ``metadata.jsonl`` lines ``{"file_name", "text"}`` (Hugging Face imagefolder).
    """
    if layout not in LAYOUTS:
        raise PrivloraError(f"unknown dataset layout {layout!r} (use one of {', '.join(LAYOUTS)})")
    if repeats < 1:
        raise PrivloraError(f"repeats must be at least 1 (got {repeats})")
    out_dir = Path(out_dir)
    img_dir = _image_dir(out_dir, layout, repeats)
    img_dir.mkdir(parents=True, exist_ok=True)
    digits = max(5, len(str(max(n - 1, 0))))
    records = []
    for i in range(n):
        image, caption = make_sprite(i, seed, namespace, resolution, style)
        stem = f"img_{i:0{digits}d}"
        image.save(img_dir / f"{stem}.png")
        if layout == "jsonl":
            records.append(json.dumps({"file_name": f"{stem}.png", "text": caption}))
        else:
            (img_dir / f"{stem}.txt").write_text(caption, encoding="utf-8")
    if layout == "jsonl":
        from privlora.io import write_text

        write_text(out_dir / "metadata.jsonl", "".join(r + "\n" for r in records))
    return out_dir


def to_array(images: list[Image.Image]) -> np.ndarray:
    """Stack PIL images into a float32 (N, 3, H, W) array in [-1, 1], the range SD's VAE expects."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return arr.transpose(0, 3, 1, 2) / 127.5 - 1.0
