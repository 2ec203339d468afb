#!/usr/bin/env bash
# Launch privlora training through accelerate. Edit the variables, then: bash scripts/train.sh
# (the per-dataset scripts set PRESET and DATA and call this one).
set -euo pipefail

PRESET=${PRESET:-configs/pokemon/smp_lora.toml}
MODEL=${MODEL:-models/v1-5-pruned.safetensors}     # diffusers folder or single .safetensors
CONFIG_DIR=${CONFIG_DIR:-models/stable-diffusion-v1-5}  # local diffusers folder (configs+tokenizer) for a single file
DATA_FLAG=${DATA_FLAG:---train_data_dir}            # --train_data_dir (one folder, auto split) or --splits_dir (five folders)
DATA=${DATA:-data/pokemon}
OUTPUT_DIR=${OUTPUT_DIR:-runs/$(basename "$(dirname "$PRESET")")-$(basename "$PRESET" .toml)}
RANK=${RANK:-64}
NETWORK_ALPHA=${NETWORK_ALPHA:-32}
UNET_LR=${UNET_LR:-1e-4}
TEXT_ENCODER_LR=${TEXT_ENCODER_LR:-1e-5}
EPOCHS=${EPOCHS:-400}
ALPHA=${ALPHA:-1.0}          # privacy weight α
BETA=${BETA:-1.0}            # SMP-LoRA's β
K_STEPS=${K_STEPS:-1}        # attacker steps per LoRA step
ADV_STEP=${ADV_STEP:-reference}  # reference (the paper) | fused (faster, not the paper: docs/fidelity.md)
NUM_GPUS=${NUM_GPUS:-1}      # >1: multi-GPU data parallel
MIXED_PRECISION=${MIXED_PRECISION:-fp16}

launch=(accelerate launch --num_processes "$NUM_GPUS" --mixed_precision "$MIXED_PRECISION")
[ "$NUM_GPUS" -gt 1 ] && launch+=(--multi_gpu)

"${launch[@]}" -m privlora train --config "$PRESET" \
  --pretrained_model_name_or_path "$MODEL" --config_dir "$CONFIG_DIR" "$DATA_FLAG" "$DATA" \
  --output_dir "$OUTPUT_DIR" --network_dim "$RANK" --network_alpha "$NETWORK_ALPHA" \
  --unet_lr "$UNET_LR" --text_encoder_lr "$TEXT_ENCODER_LR" --max_train_epochs "$EPOCHS" \
  --privacy_alpha "$ALPHA" --privacy_beta "$BETA" --k_steps "$K_STEPS" --adv_step "$ADV_STEP" \
  --mixed_precision "$MIXED_PRECISION" "$@"
