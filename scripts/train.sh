#!/usr/bin/env bash
# Launch privlora training through accelerate: PRESET=configs/pokemon/smp_lora.toml bash scripts/train.sh [--flag value …]
# (the per-dataset scripts set PRESET, DATA_FLAG and DATA and call this one).
# Every variable below is empty unless you set it, and an empty one passes no flag: the preset's value stands.
# Set one (e.g. UNET_LR=5e-5 bash scripts/train.sh) to override the preset; extra arguments are passed on too.
set -euo pipefail

PRESET=${PRESET:-configs/pokemon/smp_lora.toml}
MODEL=${MODEL:-}                 # --pretrained_model_name_or_path: diffusers folder or single .safetensors
CONFIG_DIR=${CONFIG_DIR:-}       # --config_dir: local diffusers folder (configs+tokenizer) for a single file
DATA_FLAG=${DATA_FLAG:---train_data_dir}  # --train_data_dir (one folder, auto split) or --splits_dir (five folders)
DATA=${DATA:-}                   # the data folder for DATA_FLAG
OUTPUT_DIR=${OUTPUT_DIR:-}
RANK=${RANK:-}                   # --network_dim
NETWORK_ALPHA=${NETWORK_ALPHA:-}
UNET_LR=${UNET_LR:-}
TEXT_ENCODER_LR=${TEXT_ENCODER_LR:-}
EPOCHS=${EPOCHS:-}               # --max_train_epochs
ALPHA=${ALPHA:-}                 # privacy weight α
BETA=${BETA:-}                   # SMP-LoRA's β
K_STEPS=${K_STEPS:-}             # attacker steps per LoRA step
ADV_STEP=${ADV_STEP:-}           # reference (the paper) | fused (faster, not the paper: docs/fidelity.md)
MIXED_PRECISION=${MIXED_PRECISION:-}  # no | fp16 | bf16 (default: the preset's)
NUM_GPUS=${NUM_GPUS:-1}          # processes to launch; >1: multi-GPU data parallel

launch=(accelerate launch --num_processes "$NUM_GPUS")
[ "$NUM_GPUS" -gt 1 ] && launch+=(--multi_gpu)
[ -n "$MIXED_PRECISION" ] && launch+=(--mixed_precision "$MIXED_PRECISION")

args=(--config "$PRESET")
add() { [ -n "$2" ] && args+=("$1" "$2"); return 0; }
add --pretrained_model_name_or_path "$MODEL"
add --config_dir "$CONFIG_DIR"
add "$DATA_FLAG" "$DATA"
add --output_dir "$OUTPUT_DIR"
add --network_dim "$RANK"
add --network_alpha "$NETWORK_ALPHA"
add --unet_lr "$UNET_LR"
add --text_encoder_lr "$TEXT_ENCODER_LR"
add --max_train_epochs "$EPOCHS"
add --privacy_alpha "$ALPHA"
add --privacy_beta "$BETA"
add --k_steps "$K_STEPS"
add --adv_step "$ADV_STEP"
add --mixed_precision "$MIXED_PRECISION"

"${launch[@]}" -m privlora train "${args[@]}" "$@"
