"""MP-LORA on pokemon: the paper's preset (configs/pokemon/mp_lora.toml); extra flags override it.

    accelerate launch mp_lora_pokemon.py --pretrained_model_name_or_path PATH --train_data_dir DIR
"""
import sys
from pathlib import Path

from privlora.cli import main

preset = Path(__file__).resolve().parent / "configs" / "pokemon" / "mp_lora.toml"
sys.exit(main(["train", "--config", str(preset), *sys.argv[1:]]))
