import json
from pathlib import Path

import pytest
from PIL import Image

from privlora.data.readers import (
    Example,
    parse_dataset_toml,
    read_dataset_toml,
    read_examples,
    read_imagefolder_jsonl,
    read_kohya_folder,
)
from privlora.errors import PrivloraError


def image(path: Path, color=(0, 0, 0), caption: str | None = None, caption_extension=".txt") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    if caption is not None:
        path.with_suffix(caption_extension).write_text(caption)
    return path


def one_line_error(call, name: str) -> str:
    with pytest.raises(PrivloraError) as excinfo:
        call()
    message = str(excinfo.value)
    assert "\n" not in message and name in message
    return message


# --- (a) kohya folders ---------------------------------------------------------------------------


def test_kohya_folder_with_repeats_and_caption_extension(tmp_path):
    a = image(tmp_path / "10_pikachu" / "a.png", caption="a pikachu", caption_extension=".caption")
    b = image(tmp_path / "3_eevee" / "b.jpg", caption="an  eevee\nsitting\n", caption_extension=".caption")
    top = image(tmp_path / "top.png", caption="top level", caption_extension=".caption")
    (tmp_path / "3_eevee" / "notes.md").write_text("ignored")
    (tmp_path / "3_eevee" / "._b.jpg").write_bytes(b"mac resource fork")
    (tmp_path / "logs").mkdir()
    examples = read_kohya_folder(tmp_path, caption_extension=".caption")
    assert examples == [  # sorted by path string: "10_..." < "3_..." < "top.png"
        Example(a, "a pikachu", 10),
        Example(b, "an eevee sitting", 3),
        Example(top, "top level", 1),
    ]
    assert read_examples(tmp_path, caption_extension="caption") == examples


def test_kohya_missing_caption_names_the_image_and_hints_other_extension(tmp_path):
    image(tmp_path / "1_x" / "lonely.png", caption="has a .caption file", caption_extension=".caption")
    message = one_line_error(lambda: read_kohya_folder(tmp_path), "lonely.png")
    assert "missing caption" in message and ".caption" in message


def test_kohya_empty_caption_is_an_error_unless_captions_optional(tmp_path):
    img = image(tmp_path / "1_x" / "blank.png", caption="  \n")
    one_line_error(lambda: read_kohya_folder(tmp_path), "blank.txt")
    image(tmp_path / "1_x" / "uncaptioned.png")
    examples = read_kohya_folder(tmp_path, require_captions=False)
    assert [(e.path.name, e.caption) for e in examples] == [("blank.png", ""), ("uncaptioned.png", "")]
    assert examples[0].path == img


def test_kohya_subfolder_without_repeat_count_is_rejected(tmp_path):
    image(tmp_path / "pikachu" / "a.png", caption="x")
    assert "repeats" in one_line_error(lambda: read_kohya_folder(tmp_path), "pikachu")


def test_kohya_zero_repeats_is_rejected(tmp_path):
    image(tmp_path / "0_zero" / "b.png", caption="x")
    one_line_error(lambda: read_kohya_folder(tmp_path), "0_zero")


def test_empty_folder_has_no_images(tmp_path):
    (tmp_path / "empty").mkdir()
    message = one_line_error(lambda: read_examples(tmp_path / "empty"), "empty")
    assert message.endswith("no images found")


def test_missing_source(tmp_path):
    one_line_error(lambda: read_examples(tmp_path / "nowhere"), "nowhere")


# --- (b) dataset TOML ----------------------------------------------------------------------------

TWO_SUBSETS = """
[general]
caption_extension = ".caption"

[[datasets]]
resolution = 512

  [[datasets.subsets]]
  image_dir = "set_a"
  num_repeats = 4

  [[datasets.subsets]]
  image_dir = "{abs_dir}"
  caption_extension = ".txt"
"""


def test_dataset_toml_with_two_subsets(tmp_path):
    a = image(tmp_path / "set_a" / "a.png", caption="from a", caption_extension=".caption")
    b = image(tmp_path / "elsewhere" / "b.png", caption="from b", caption_extension=".txt")
    config = tmp_path / "configs" / "data.toml"
    config.parent.mkdir()
    config.write_text(TWO_SUBSETS.replace("set_a", "../set_a").format(abs_dir=(tmp_path / "elsewhere").as_posix()))
    expected = [Example(b, "from b", 1), Example(a, "from a", 4)]
    assert read_dataset_toml(config) == expected
    assert read_examples(config) == expected
    assert parse_dataset_toml(config).resolution == 512


def test_dataset_toml_unknown_key_names_key_and_file(tmp_path):
    image(tmp_path / "imgs" / "a.png", caption="x")
    config = tmp_path / "data.toml"
    config.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "imgs"\nflip_aug = true\n')
    message = one_line_error(lambda: read_dataset_toml(config), "data.toml")
    assert "unknown key" in message and "flip_aug" in message


def test_dataset_toml_invalid_syntax_and_bad_values(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[[datasets]\n")
    one_line_error(lambda: read_dataset_toml(config), "bad.toml")
    image(tmp_path / "imgs" / "a.png", caption="x")
    config.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "imgs"\nnum_repeats = 0\n')
    assert "num_repeats" in one_line_error(lambda: read_dataset_toml(config), "bad.toml")


def test_dataset_toml_missing_caption_names_image(tmp_path):
    image(tmp_path / "imgs" / "nocap.png")
    config = tmp_path / "data.toml"
    config.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "imgs"\n')
    one_line_error(lambda: read_dataset_toml(config), "nocap.png")


# --- (c) imagefolder with metadata.jsonl ---------------------------------------------------------


def write_metadata(folder: Path, lines: list[str]) -> Path:
    path = folder / "metadata.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_imagefolder_jsonl(tmp_path):
    a = image(tmp_path / "a.png")
    b = image(tmp_path / "sub" / "b.webp")
    write_metadata(tmp_path, [json.dumps({"file_name": "sub/b.webp", "text": "bee"}), "", json.dumps(
        {"file_name": "a.png", "text": "ay", "extra": 1})])
    expected = [Example(a, "ay"), Example(b, "bee")]
    assert read_imagefolder_jsonl(tmp_path) == expected
    assert read_examples(tmp_path) == expected


def test_imagefolder_malformed_line_names_file_and_line(tmp_path):
    image(tmp_path / "a.png")
    write_metadata(tmp_path, [json.dumps({"file_name": "a.png", "text": "ok"}), "{not json"])
    message = one_line_error(lambda: read_examples(tmp_path), "metadata.jsonl")
    assert "line 2" in message


def test_imagefolder_listed_file_missing(tmp_path):
    image(tmp_path / "a.png")
    write_metadata(tmp_path, [json.dumps({"file_name": "a.png", "text": "ok"}),
                              json.dumps({"file_name": "gone.png", "text": "?"})])
    message = one_line_error(lambda: read_examples(tmp_path), "gone.png")
    assert "metadata.jsonl" in message and "line 2" in message


def test_imagefolder_unlisted_image_is_an_error(tmp_path):
    image(tmp_path / "a.png")
    image(tmp_path / "stray.png")
    write_metadata(tmp_path, [json.dumps({"file_name": "a.png", "text": "ok"})])
    one_line_error(lambda: read_examples(tmp_path), "stray.png")
    assert [e.caption for e in read_examples(tmp_path, require_captions=False)] == ["ok", ""]
