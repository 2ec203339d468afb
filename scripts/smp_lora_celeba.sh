#!/usr/bin/env bash
# SMP-LORA on celeba_small with the paper's hyperparameters. Set MODEL / DATA / NUM_GPUS … as in scripts/train.sh.
PRESET=configs/celeba_small/smp_lora.toml DATA_FLAG=--splits_dir DATA=${DATA:-data/CelebA_Small} exec bash "$(dirname "$0")/train.sh" "$@"
