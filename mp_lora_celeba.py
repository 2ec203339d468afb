"""MP-LORA on celeba_small: the paper's preset (configs/celeba_small/mp_lora.toml); extra flags override it.

    accelerate launch mp_lora_celeba.py --pretrained_model_name_or_path PATH --splits_dir DIR
"""
import sys
from pathlib import Path

from privlora.cli import main

preset = Path(__file__).resolve().parent / "configs" / "celeba_small" / "mp_lora.toml"
sys.exit(main(["train", "--config", str(preset), *sys.argv[1:]]))
