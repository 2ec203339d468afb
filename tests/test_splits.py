import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from privlora.data.images import sha256_file
from privlora.data.readers import Example
from privlora.data.splits import (
    MANIFEST_WARNING,
    PAPER_NAMES,
    ROLES,
    Splits,
    auto_split,
    read_manifest,
    splits_from_dirs,
    validate,
    write_manifest,
)
from privlora.errors import PrivloraError


def distinct_files(folder: Path, count: int, suffix=".png") -> list[Example]:
    """Files with distinct content; splitting only hashes them, so they need not be real images."""
    folder.mkdir(parents=True, exist_ok=True)
    examples = []
    for i in range(count):
        path = folder / f"img_{i:04d}{suffix}"
        path.write_bytes(f"image number {i}".encode())
        examples.append(Example(path, f"caption {i}"))
    return examples


def real_image(path: Path, shade: int, caption: str | None = "a caption") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade, 255 - shade, 7)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def paths(examples: list[Example]) -> set[Path]:
    return {e.path for e in examples}


def one_line_error(call, *names: str) -> str:
    with pytest.raises(PrivloraError) as excinfo:
        call()
    message = str(excinfo.value)
    assert "\n" not in message
    for name in names:
        assert name in message
    return message


SMALL = dict(n_nonmember_aux=10, n_nonmember_test=10, n_member_aux=10)


# --- auto_split ----------------------------------------------------------------------------------


def test_auto_split_sizes_and_membership_rules(tmp_path):
    splits = auto_split(distinct_files(tmp_path, 50), **SMALL, seed=0)
    sizes = {role: len(splits.role(role)) for role in ROLES}
    assert sizes == {"train": 30, "member_aux": 10, "member_test": 20, "nonmember_aux": 10, "nonmember_test": 10}
    train = paths(splits.train)
    assert paths(splits.member_aux) <= train and paths(splits.member_test) <= train
    assert not paths(splits.member_aux) & paths(splits.member_test)
    nonmembers = paths(splits.nonmember_aux) | paths(splits.nonmember_test)
    assert len(nonmembers) == 20 and not nonmembers & train
    assert splits.seed == 0


def test_auto_split_paper_defaults_on_833_images(tmp_path):
    splits = auto_split(distinct_files(tmp_path, 833), seed=42)
    assert [len(splits.role(r)) for r in ROLES] == [433, 200, 233, 200, 200]


def test_auto_split_member_test_count(tmp_path):
    splits = auto_split(distinct_files(tmp_path, 50), **SMALL, n_member_test=5, seed=0)
    assert len(splits.train) == 30 and len(splits.member_test) == 5


def test_auto_split_is_deterministic_and_seeded(tmp_path):
    examples = distinct_files(tmp_path, 50)
    first = auto_split(examples, **SMALL, seed=7)
    again = auto_split(list(reversed(examples)), **SMALL, seed=7)
    other = auto_split(examples, **SMALL, seed=8)
    assert all(first.role(r) == again.role(r) for r in ROLES)
    assert any(first.role(r) != other.role(r) for r in ROLES)


def test_auto_split_too_few_images(tmp_path):
    message = one_line_error(lambda: auto_split(distinct_files(tmp_path, 30), **SMALL, seed=0), "need at least 31")
    assert "found 30" in message


def test_auto_split_rejects_duplicate_content(tmp_path):
    examples = distinct_files(tmp_path, 40)
    shutil.copy(examples[3].path, tmp_path / "copy_of_3.png")
    examples.append(Example(tmp_path / "copy_of_3.png", "dup"))
    one_line_error(lambda: auto_split(examples, **SMALL, seed=0), "copy_of_3.png", "img_0003.png")


# --- validate ------------------------------------------------------------------------------------


def test_validate_rejects_nonmember_that_duplicates_a_training_image(tmp_path):
    splits = auto_split(distinct_files(tmp_path / "all", 50), **SMALL, seed=0)
    trained = splits.train[0].path
    leaked = tmp_path / "leaked.png"
    shutil.copy(trained, leaked)
    splits.nonmember_test = splits.nonmember_test + [Example(leaked, "x")]
    message = one_line_error(lambda: validate(splits), "leaked.png", trained.name)
    assert "is also in the training set" in message


def test_validate_rejects_member_overlap_duplicates_and_empty_roles(tmp_path):
    splits = auto_split(distinct_files(tmp_path, 50), **SMALL, seed=0)
    overlap = Splits(**{r: list(splits.role(r)) for r in ROLES})
    overlap.member_test = overlap.member_test + [overlap.member_aux[0]]
    one_line_error(lambda: validate(overlap), overlap.member_aux[0].path.name, "member_aux", "member_test")

    twice = Splits(**{r: list(splits.role(r)) for r in ROLES})
    twice.nonmember_aux = twice.nonmember_aux + [twice.nonmember_aux[0]]
    one_line_error(lambda: validate(twice), twice.nonmember_aux[0].path.name, "listed twice")

    empty = Splits(**{r: list(splits.role(r)) for r in ROLES})
    empty.member_aux = []
    one_line_error(lambda: validate(empty), "member_aux", "empty")


def test_validate_rejects_member_not_in_training_set(tmp_path):
    splits = auto_split(distinct_files(tmp_path / "all", 50), **SMALL, seed=0)
    outsider = Example(tmp_path / "outsider.png", "never trained on")
    outsider.path.write_bytes(b"unique content")
    splits.member_aux = splits.member_aux + [outsider]
    one_line_error(lambda: validate(splits), outsider.path.name, "not in the training set")


# --- five explicit folders -----------------------------------------------------------------------


def make_five_dirs(root: Path, names: dict[str, str]) -> None:
    for i in range(6):
        real_image(root / names["train"] / f"train_{i}.png", i * 10, caption=f"train {i}")
    for i in (0, 1):  # member copies carry no caption files; captions come from the training image
        shutil.copy(root / names["train"] / f"train_{i}.png", root / names["member_aux"] / f"m_aux_{i}.png")
    (root / names["member_aux"]).mkdir(exist_ok=True)
    (root / names["member_test"]).mkdir()
    shutil.copy(root / names["train"] / "train_2.png", root / names["member_test"] / "m_te.png")
    real_image(root / names["nonmember_aux"] / "nm_aux.png", 200)
    real_image(root / names["nonmember_test"] / "nm_te.png", 210)


def test_splits_from_dirs_with_paper_folder_names(tmp_path):
    (tmp_path / "D^m_aux").mkdir()
    make_five_dirs(tmp_path, PAPER_NAMES)
    splits = splits_from_dirs(tmp_path)
    assert len(splits.train) == 6
    assert [e.path.name for e in splits.member_aux] == ["train_0.png", "train_1.png"]
    assert [e.caption for e in splits.member_aux] == ["train 0", "train 1"]
    assert [e.path.name for e in splits.member_test] == ["train_2.png"]
    assert [e.path.name for e in splits.nonmember_test] == ["nm_te.png"]


def test_splits_from_dirs_with_role_names_and_mapping(tmp_path):
    names = {r: r for r in ROLES}
    (tmp_path / "member_aux").mkdir()
    make_five_dirs(tmp_path, names)
    by_root = splits_from_dirs(tmp_path)
    by_mapping = splits_from_dirs({PAPER_NAMES[r] if r == "train" else r: tmp_path / r for r in ROLES})
    assert all(by_root.role(r) == by_mapping.role(r) for r in ROLES)


def test_splits_from_dirs_member_not_in_train(tmp_path):
    (tmp_path / "D^m_aux").mkdir()
    make_five_dirs(tmp_path, PAPER_NAMES)
    real_image(tmp_path / "D^m_te" / "stranger.png", 99, caption=None)
    one_line_error(lambda: splits_from_dirs(tmp_path), "stranger.png", "not in the training set")


def test_splits_from_dirs_nonmember_copied_from_train(tmp_path):
    (tmp_path / "D^m_aux").mkdir()
    make_five_dirs(tmp_path, PAPER_NAMES)
    shutil.copy(tmp_path / "D_tr" / "train_5.png", tmp_path / "D^nm_aux" / "sneaky.png")
    (tmp_path / "D^nm_aux" / "sneaky.txt").write_text("sneaky")
    message = one_line_error(lambda: splits_from_dirs(tmp_path), "sneaky.png", "train_5.png")
    assert "is also in the training set" in message


def test_splits_from_dirs_missing_folder(tmp_path):
    (tmp_path / "D_tr").mkdir()
    one_line_error(lambda: splits_from_dirs(tmp_path), "D^m_aux", "member_aux")


# --- manifest ------------------------------------------------------------------------------------


def test_manifest_round_trip(tmp_path):
    data = tmp_path / "project" / "data"
    splits = auto_split(distinct_files(data, 50), **SMALL, seed=3)
    manifest = write_manifest(tmp_path / "project" / "split.json", splits, root=tmp_path / "project")
    stored = json.loads(manifest.read_text())
    assert stored["warning"] == MANIFEST_WARNING and stored["version"] == 1 and stored["seed"] == 3
    assert stored["root"] == str((tmp_path / "project").resolve())
    entry = stored["roles"]["train"][0]
    assert entry["path"].startswith("data/") and entry["sha256"] == sha256_file(data / Path(entry["path"]).name)
    back = read_manifest(manifest)
    assert all([e.path.resolve() for e in back.role(r)] == [e.path.resolve() for e in splits.role(r)] for r in ROLES)
    assert all([e.caption for e in back.role(r)] == [e.caption for e in splits.role(r)] for r in ROLES)
    assert back.seed == 3


def test_manifest_detects_modified_and_missing_files(tmp_path):
    splits = auto_split(distinct_files(tmp_path / "data", 50), **SMALL, seed=3)
    manifest = write_manifest(tmp_path / "split.json", splits, root=tmp_path)
    changed = splits.nonmember_aux[0].path
    changed.write_bytes(b"tampered")
    message = one_line_error(lambda: read_manifest(manifest), "split.json", changed.name)
    assert "content hash does not match the manifest" in message
    read_manifest(manifest, verify_hashes=False)
    changed.unlink()
    one_line_error(lambda: read_manifest(manifest, verify_hashes=False), "split.json", changed.name, "missing")


def test_manifest_survives_moving_the_project(tmp_path):
    splits = auto_split(distinct_files(tmp_path / "old" / "data", 50), **SMALL, seed=3)
    write_manifest(tmp_path / "old" / "split.json", splits, root=tmp_path / "old")
    (tmp_path / "old").rename(tmp_path / "new")
    back = read_manifest(tmp_path / "new" / "split.json")
    assert all(e.path.is_file() for e in back.train)
