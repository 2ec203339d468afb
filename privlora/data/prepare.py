"""From a training config to validated membership splits (and their private manifest)."""
from __future__ import annotations

from pathlib import Path

from privlora.data.dataset import validate_images
from privlora.data.readers import read_examples
from privlora.data.splits import Splits, auto_split, read_manifest, splits_from_dirs, validate, write_manifest
from privlora.io import write_text
from privlora.rundir import RunDir

MANIFEST_NAME = RunDir.SPLITS
SKIPPED_NAME = "skipped_images.txt"


def prepare_splits(cfg, out: Path) -> tuple[Splits, list[tuple[Path, str]]]:
    """Read the data source, check every image and split it into the five roles.

    Everything that can be wrong with the data is found here, before any training step; nothing is written
    (but for synthetic runs, the generated images) — ``write_run_files`` does that once the model loaded too.
    Returns the splits and the images skipped as unreadable (``skip_bad_images``).
    """
    skipped: list[tuple[Path, str]] = []
    if cfg.splits:
        splits = read_manifest(cfg.splits)
    elif cfg.splits_dir:
        splits = splits_from_dirs(cfg.splits_dir)
    else:
        source = cfg.train_data_dir or synthetic_source(cfg, out)
        examples = read_examples(source, caption_extension=cfg.caption_extension)
        examples, skipped = validate_images(examples, skip_bad=cfg.skip_bad_images)
        if skipped:
            print(f"skipping {len(skipped)} unreadable images (listed in {out / SKIPPED_NAME})")
        splits = auto_split(examples, n_nonmember_aux=cfg.n_nonmember_aux, n_nonmember_test=cfg.n_nonmember_test,
                            n_member_aux=cfg.n_member_aux, n_member_test=cfg.n_member_test, seed=cfg.split_seed)
    if cfg.splits or cfg.splits_dir:
        everything = [e for _, role in splits.items() for e in role]
        validate_images(everything)
        validate(splits)
    return splits, skipped


def write_run_files(out: Path, splits: Splits, skipped: list[tuple[Path, str]]) -> None:
    """The private split manifest (and the list of skipped images) into the run folder."""
    write_manifest(out / MANIFEST_NAME, splits)
    if skipped:
        write_text(out / SKIPPED_NAME, "".join(f"{p}\t{why}\n" for p, why in skipped))


def synthetic_source(cfg, out: Path) -> Path:
    """Generate the configured private synthetic sprites once into ``<output_dir>/data``."""
    from privlora.data import synthetic

    folder = out / "data"
    marker = folder / f".complete-n{cfg.synthetic_images}-s{cfg.synthetic_seed}-r{cfg.resolution}-{cfg.synthetic_style}"
    if not marker.exists():
        synthetic.write_folder(folder, cfg.synthetic_images, seed=cfg.synthetic_seed, namespace="private",
                               resolution=cfg.resolution, layout="flat", style=cfg.synthetic_style)
        marker.touch()
    return folder
