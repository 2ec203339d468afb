"""Every preset parses, and its data layout is accepted on a miniature folder tree of the same shape."""
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from privlora.objectives.adversarial import AdversarialSettings
from privlora.objectives.dp_lora import DPSettings
from privlora.config import build_config, read_toml
from privlora.data.prepare import prepare_splits
from privlora.data.splits import ROLES, Splits



def is_bench_file(path: Path) -> bool:
    """A ``privlora bench --runs`` file (bench/runs tables, or inheriting one), not a train preset."""
    data = tomllib.loads(path.read_text())
    if {"bench", "runs", "keep_runs"} & set(data):
        return True
    return "inherit" in data and is_bench_file(path.parent / data["inherit"])


ALL_TOML = set(Path("configs").rglob("*.toml")) | set(Path("configs/demo").glob("*.toml"))  # rglob skips links
BENCH_FILES = sorted(p for p in ALL_TOML if is_bench_file(p))
PRESETS = sorted(ALL_TOML - set(BENCH_FILES))
DATASET_PRESETS = [p for p in PRESETS if p.parent.name not in ("paper", "tiny")]
PAPER_PRESETS = [p for p in DATASET_PRESETS  # the paper's methods and settings (SDXL's are an extension)
                 if p.stem in ("lora", "mp_lora", "smp_lora") and p.parent.name != "sdxl"]
SDXL_PRESETS = sorted(Path("configs/sdxl").glob("*.toml"))


def role_sizes(splits: Splits) -> dict[str, int]:
    return {r: len(splits.role(r)) for r in ROLES}


def write_images(folder: Path, n: int, start: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(f"picture {i}")


def test_there_are_presets_for_every_paper_dataset_and_method():
    names = {(p.parent.name, p.stem) for p in PRESETS}
    for dataset in ("pokemon", "celeba_small", "celeba_large", "celeba_large_5x", "afhq_large_5x", "mscoco_large_5x",
                    "tiny"):
        for method in ("lora", "mp_lora", "smp_lora"):
            assert (dataset, method) in names


@pytest.mark.parametrize("preset", PRESETS, ids=str)
def test_preset_parses(preset):
    values = read_toml(preset)
    assert values  # every key known (read_toml rejects unknown ones)


# The defences of the complete table (configs/demo/complete.toml) that are options of plain LoRA, not methods: each
# has a tiny preset that trains with the setting the table measured.
OPTION_DEFENCES = {"cond_rand": "configs/tiny/cond_rand.toml", "lora_t300": "configs/tiny/timestep_shaping.toml",
                   "loss_floor": "configs/tiny/loss_floor.toml"}


@pytest.mark.parametrize("run", sorted(OPTION_DEFENCES))
def test_each_defence_option_has_a_tiny_preset_with_the_complete_tables_setting(run):
    from privlora.benchspec import read_bench_file

    measured = read_bench_file("configs/demo/complete.toml")["runs"][run]
    preset = read_toml(OPTION_DEFENCES[run])
    assert measured, run
    for key, value in measured.items():
        assert preset[key] == value, (OPTION_DEFENCES[run], key)


@pytest.mark.parametrize("bench_file", BENCH_FILES, ids=str)
def test_bench_file_reads_with_its_train_preset(bench_file):
    from privlora.benchspec import read_bench_file

    bench = read_bench_file(bench_file)
    assert bench["runs"] and read_toml(bench["preset"])


@pytest.mark.parametrize("preset", PAPER_PRESETS, ids=str)
def test_paper_presets_carry_the_reference_hyperparameters(preset):
    v = read_toml(preset)
    assert (v["network_dim"], v["network_alpha"], v["unet_lr"], v["text_encoder_lr"]) == (64, 32, 1e-4, 1e-5)
    assert (v["train_batch_size"], v["max_train_epochs"], v["clip_skip"], v["seed"]) == (1, 400, 2, 1337)
    assert (v["privacy_alpha"], v["privacy_beta"], v["k_steps"], v["attacker_lr"]) == (1.0, 1.0, 1, 1e-5)
    assert v["method"] == preset.stem and v["train_text_encoder"] is True and v["resolution"] == 512


@pytest.mark.parametrize("preset", DATASET_PRESETS, ids=str)
def test_preset_split_layout_on_a_miniature_tree(preset, tmp_path):
    v = read_toml(preset)
    if "train_data_dir" in v:  # one folder, the paper's automatic split (sizes from the preset)
        need = v["n_nonmember_aux"] + v["n_nonmember_test"] + v["n_member_aux"] + 33
        write_images(tmp_path / "data", need, 0)
        cfg = build_config(str(preset), {"train_data_dir": str(tmp_path / "data")})
        sizes = role_sizes(prepare_splits(cfg, tmp_path / "out")[0])
        assert sizes == {"train": 233, "member_aux": 200, "member_test": 33, "nonmember_aux": 200,
                         "nonmember_test": 200}
    else:  # five folders named as in the paper's release, kohya subfolders inside
        root = tmp_path / "data"
        write_images(root / "D_tr" / "1_a", 12, 0)
        write_images(root / "D_tr" / "2_b", 8, 12)
        for role, (src, idx) in {"D^m_aux": ("1_a", range(0, 5)), "D^m_te": ("2_b", range(12, 17))}.items():
            (root / role / src).mkdir(parents=True)
            for i in idx:
                for ext in (".png", ".txt"):
                    shutil.copy(root / "D_tr" / src / f"{i:05d}{ext}", root / role / src / f"{i:05d}{ext}")
        write_images(root / "D^nm_aux" / "1_c", 6, 100)
        write_images(root / "D^nm_te" / "1_c", 7, 200)
        cfg = build_config(str(preset), {"splits_dir": str(root)})
        splits, _ = prepare_splits(cfg, tmp_path / "out")
        assert role_sizes(splits) == {"train": 20, "member_aux": 5, "member_test": 5, "nonmember_aux": 6,
                                      "nonmember_test": 7}
        train_paths = {e.path for e in splits.train}
        assert all(e.path in train_paths for e in splits.member_aux + splits.member_test)
        assert {e.repeats for e in splits.train} == {1, 2}
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("preset", PAPER_PRESETS, ids=str)
def test_paper_presets_resolve_to_the_reference_method(preset):
    cfg = build_config(str(preset), {})
    assert (cfg.shuffle_caption, cfg.max_token_length) == (True, 225)
    assert (cfg.network_dim, cfg.network_alpha, cfg.unet_lr, cfg.text_encoder_lr) == (64, 32, 1e-4, 1e-5)
    assert (cfg.train_batch_size, cfg.max_train_epochs, cfg.clip_skip, cfg.seed, cfg.resolution) == \
        (1, 400, 2, 1337, 512)
    assert cfg.method == preset.stem and cfg.train_text_encoder and not cfg.caches_text
    if cfg.method == "lora":  # the reference preset's attacker keys are not plain LoRA's: they are dropped
        assert cfg.method_settings.values() == {}
        return
    s = cfg.settings(AdversarialSettings)
    assert (s.adv_step, s.attacker_dropout_in_adv) == ("reference", True)
    assert (s.privacy_alpha, s.privacy_beta, s.k_steps, s.attacker_lr, s.attacker_weight_decay) == \
        (1.0, 1.0, 1, 1e-5, 1e-4)
    assert (s.attacker_hidden, s.attacker_dropout, s.attacker_pool) == ([512, 256], 0.5, 64)


@pytest.mark.parametrize("preset", ["configs/tiny/dp_lora.toml", "configs/pokemon/dp_lora.toml",
                                    "configs/sdxl/dp_lora.toml"])
def test_dp_presets_keep_the_reference_settings_except_what_dp_sgd_forces(preset):
    cfg = build_config(preset, {})
    dp = cfg.settings(DPSettings)
    assert cfg.method == "dp_lora" and not cfg.train_text_encoder and dp.dp_target_epsilon == 8.0
    assert dp.dp_noise_multiplier is None and dp.dp_max_grad_norm == 1.0 and cfg.train_batch_size > 1
    if "pokemon" in preset:
        paper = build_config("configs/pokemon/lora.toml", {})
        assert (cfg.network_dim, cfg.max_train_epochs, cfg.resolution, cfg.clip_skip, cfg.seed) == \
            (paper.network_dim, paper.max_train_epochs, paper.resolution, paper.clip_skip, paper.seed)
        assert cfg.train_data_dir == paper.train_data_dir and cfg.split_seed == paper.split_seed


def test_there_is_an_sdxl_preset_for_every_method():
    from privlora.objectives import METHODS

    assert {p.stem for p in SDXL_PRESETS} == set(METHODS)


@pytest.mark.parametrize("preset", SDXL_PRESETS, ids=str)
def test_sdxl_presets_train_at_1024_with_the_papers_attacker_on_whole_latents(preset):
    cfg = build_config(str(preset), {})
    assert cfg.method == preset.stem and cfg.resolution == 1024 and cfg.train_data_dir
    assert (cfg.mixed_precision, cfg.gradient_checkpointing, cfg.cache_latents) == ("bf16", True, True)
    assert not cfg.train_text_encoder and cfg.clip_skip is None  # SDXL conditions on the penultimate layers
    assert (cfg.network_dim, cfg.network_alpha, cfg.unet_lr) == (32, 16, 5e-4 if cfg.method == "dp_lora" else 1e-4)
    assert cfg.caches_text  # both encoders' outputs, pooled and size ids: the encoders need not stay on the GPU
    if cfg.method in ("mp_lora", "smp_lora"):
        s, paper = cfg.settings(AdversarialSettings), build_config("configs/pokemon/smp_lora.toml", {})
        ref = paper.settings(AdversarialSettings)
        assert s.attacker_pool == 128 == cfg.resolution // 8  # the whole 1024² latent map, as 64 is at 512²
        keys = ("privacy_alpha", "k_steps", "attacker_lr", "attacker_weight_decay", "attacker_hidden",
                "attacker_dropout", "adv_step", "attacker_dropout_in_adv")
        assert [getattr(s, k) for k in keys] == [getattr(ref, k) for k in keys]
    else:
        assert "attacker_pool" not in cfg.flat()


def test_train_sh_launches_the_reference_step():
    """The launcher passes no --adv_step of its own, so a paper preset's reference step stands (the launch itself
    is compared with the preset in tests/test_launchers.py)."""
    text = Path("scripts/train.sh").read_text()
    assert "ADV_STEP=${ADV_STEP:-}" in text
    cfg = build_config("configs/pokemon/smp_lora.toml", {})
    assert cfg.settings(AdversarialSettings).adv_step == "reference"


@pytest.mark.parametrize("preset", PRESETS, ids=str)
def test_resolved_settings_read_back_to_the_same_config(preset, tmp_path):
    from privlora.config import RESOLVED_NAME, write_resolved_config

    cfg = build_config(str(preset), {"synthetic_images": 0, "train_data_dir": "/data/x", "splits_dir": None,
                                     "splits": None, "keep_tokens": 2, "attacker_hidden": "8,4"})
    again = build_config(str(write_resolved_config(cfg, tmp_path)), {})
    assert again == cfg and (tmp_path / RESOLVED_NAME).is_file()


def test_print_config_prints_every_key_after_inherit_and_flags(capsys):
    from privlora.cli import main
    from privlora.config import SHARED_KEYS
    from privlora.objectives.adversarial import AdversarialSettings

    assert main(["train", "--config", "configs/pokemon/smp_lora.toml", "--print_config", "--k_steps", "3"]) == 0
    out = capsys.readouterr().out
    printed = {line.lstrip("# ").split(" = ")[0] for line in out.splitlines()[1:] if " = " in line}
    assert printed == SHARED_KEYS | set(AdversarialSettings().values())
    assert "\n[smp_lora]" in out  # the method's own keys, under its name
    assert "k_steps = 3\n" in out and 'adv_step = "reference"\n' in out and "network_dim = 64\n" in out


def test_readme_documents_every_registered_method():
    from privlora.objectives import METHODS

    text = Path("README.md").read_text()
    for name in METHODS:
        assert f"| `{name}` |" in text, f"README's method table lacks {name}"
