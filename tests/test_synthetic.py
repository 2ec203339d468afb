import hashlib
import json

import numpy as np
import pytest

from privlora.data import synthetic
from privlora.errors import PrivloraError


def _digest(image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


def test_same_key_same_sprite():
    a, cap_a = synthetic.make_sprite(7, seed=3)
    b, cap_b = synthetic.make_sprite(7, seed=3)
    assert cap_a == cap_b
    assert a.tobytes() == b.tobytes()


def test_generate_matches_make_sprite_and_start():
    batch = synthetic.generate(4, seed=1, start=10)
    for k, (image, caption) in enumerate(batch):
        ref, ref_cap = synthetic.make_sprite(10 + k, seed=1)
        assert caption == ref_cap and image.tobytes() == ref.tobytes()


def test_500_sprites_are_unique():
    hashes = {_digest(im) for im, _ in synthetic.generate(500)}
    assert len(hashes) == 500


def test_seed_changes_sprite():
    assert synthetic.make_sprite(0, seed=0)[0].tobytes() != synthetic.make_sprite(0, seed=1)[0].tobytes()


def test_public_and_private_never_coincide():
    public = {_digest(im) for im, _ in synthetic.generate(200, namespace="public")}
    private = {_digest(im) for im, _ in synthetic.generate(200, namespace="private")}
    assert not public & private


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_resolutions(resolution):
    image, caption = synthetic.make_sprite(3, resolution=resolution)
    assert image.size == (resolution, resolution) and image.mode == "RGB"
    assert caption == synthetic.make_sprite(3)[1]  # the scene does not depend on the resolution


def test_caption_vocabulary_is_closed_and_used():
    used = set()
    for _, caption in synthetic.generate(400):
        words = caption.split()
        assert set(words) <= set(synthetic.CAPTION_WORDS), caption
        assert caption.endswith("background")
        used.update(words)
    assert used == set(synthetic.CAPTION_WORDS)
    # the framed style adds one word tiny-sd's vocabulary does not have (it tokenises into characters)
    for _, caption in synthetic.generate(20, style="framed"):
        assert set(caption.split()) <= set(synthetic.CAPTION_WORDS) | {"frame"}, caption


def test_shape_is_visible_where_the_caption_says():
    # a single large shape "at the top left" changes the top-left corner, not the bottom-right
    for image, caption in synthetic.generate(300):
        if " and " not in caption and "large" in caption and "at the top left" in caption:
            arr = np.asarray(image, dtype=float)
            corner, far = arr[4:12, 4:12].mean((0, 1)), arr[22:30, 22:30].mean((0, 1))
            assert np.abs(corner - far).max() > 30
            return
    pytest.fail("no single large top-left sprite in the first 300")


def test_framed_style_is_the_plain_scene_in_a_frame():
    plain, plain_cap = synthetic.make_sprite(4)
    framed, framed_cap = synthetic.make_sprite(4, style="framed")
    assert framed_cap.startswith(plain_cap + " in a ") and framed_cap.endswith(" frame")
    a, b = np.asarray(plain, dtype=int), np.asarray(framed, dtype=int)
    assert (a[8:-8, 8:-8] == b[8:-8, 8:-8]).all() and (a[:2] != b[:2]).any()


def test_bad_arguments():
    with pytest.raises(PrivloraError):
        synthetic.make_sprite(0, namespace="secret")
    with pytest.raises(PrivloraError):
        synthetic.make_sprite(-1)
    with pytest.raises(PrivloraError):
        synthetic.write_folder("unused", 1, layout="csv")


def _check_pairs(folder, n):
    pngs = sorted(folder.glob("*.png"))
    assert [p.stem for p in pngs] == [f"img_{i:05d}" for i in range(n)]
    for i, png in enumerate(pngs):
        assert png.with_suffix(".txt").read_text() == synthetic.make_sprite(i)[1]


def test_write_flat(tmp_path):
    root = synthetic.write_folder(tmp_path / "flat", 3)
    assert root == tmp_path / "flat"
    _check_pairs(root, 3)


def test_write_kohya(tmp_path):
    root = synthetic.write_folder(tmp_path / "k", 2, layout="kohya", repeats=5)
    assert [p.name for p in root.iterdir()] == ["5_sprites"]
    _check_pairs(root / "5_sprites", 2)


def test_write_jsonl(tmp_path):
    from PIL import Image

    root = synthetic.write_folder(tmp_path / "j", 3, layout="jsonl", namespace="public", seed=2)
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == ["img_00000.png", "img_00001.png", "img_00002.png"]
    assert not list(root.glob("*.txt"))
    for i, row in enumerate(rows):
        image, caption = synthetic.make_sprite(i, seed=2, namespace="public")
        assert row["text"] == caption
        assert Image.open(root / row["file_name"]).tobytes() == image.tobytes()
