#!/usr/bin/env bash
# MP-LORA on pokemon with the paper's hyperparameters. Set MODEL / DATA / NUM_GPUS … as in scripts/train.sh.
PRESET=configs/pokemon/mp_lora.toml DATA_FLAG=--train_data_dir DATA=${DATA:-data/pokemon} exec bash "$(dirname "$0")/train.sh" "$@"
