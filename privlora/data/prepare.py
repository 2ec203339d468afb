"""From a training config to validated membership splits (and their private manifest)."""
from __future__ import annotations

from pathlib import Path

from privlora.data.dataset import validate_images
from privlora.data.readers import read_examples
from privlora.data.splits import ROLES, Splits, auto_split, read_manifest, splits_from_dirs, validate, write_manifest
from privlora.io import write_text

MANIFEST_NAME = "splits.json"


def prepare_splits(cfg, out: Path, write: bool = True) -> Splits:
    """Read the data source, check every image, split into the five roles, and write ``splits.json``.

    Everything that can be wrong with the data is found here, before any training step and before the
    output folder gets anything but (for synthetic runs) the generated images.
    """
    if cfg.splits:
        splits = read_manifest(cfg.splits)
    elif cfg.splits_dir:
        splits = splits_from_dirs(cfg.splits_dir)
    else:
        source = cfg.train_data_dir or synthetic_source(cfg, out)
        examples = read_examples(source, caption_extension=cfg.caption_extension)
        examples, skipped = validate_images(examples, skip_bad=cfg.skip_bad_images)
        if skipped and write:
            write_text(out / "skipped_images.txt", "".join(f"{p}\t{why}\n" for p, why in skipped))
        splits = auto_split(examples, n_nonmember_aux=cfg.n_nonmember_aux, n_nonmember_test=cfg.n_nonmember_test,
                            n_member_aux=cfg.n_member_aux, n_member_test=cfg.n_member_test, seed=cfg.split_seed)
    if cfg.splits or cfg.splits_dir:
        everything = [e for _, role in splits.items() for e in role]
        validate_images(everything)
        validate(splits)
    if write:
        write_manifest(out / MANIFEST_NAME, splits)
    return splits


def synthetic_source(cfg, out: Path) -> Path:
    """Generate the configured private synthetic sprites once into ``<output_dir>/data``."""
    from privlora.data import synthetic

    folder = out / "data"
    marker = folder / f".complete-n{cfg.synthetic_images}-s{cfg.synthetic_seed}-r{cfg.resolution}"
    if not marker.exists():
        synthetic.write_folder(folder, cfg.synthetic_images, seed=cfg.synthetic_seed, namespace="private",
                               resolution=cfg.resolution, layout="flat")
        marker.touch()
    return folder


def role_sizes(splits: Splits) -> dict[str, int]:
    return {r: len(splits.role(r)) for r in ROLES}
