#!/usr/bin/env bash
# Stage 6: DP fine-tuning on the target task.
#   bash scripts/train_sst2.sh CHECKPOINT NOISE_MULTIPLIER CLIP PER_GPU_BATCH ACCUMULATION LR EPOCHS SEED [extra flags]
#   bash scripts/train_sst2.sh runs/demo/pretrained_selected 1.4 1 32 64 1e-3 30 0
# NOISE_MULTIPLIER "auto" calibrates the noise to --target_epsilon (give it among the extra flags).
# Environment: TARGET (demo | glue/sst2 | files; default demo), OUTPUT_DIR (default CHECKPOINT/../finetune_seedSEED),
# NUM_PROCESSES (1; more runs under accelerate launch).
set -euo pipefail
source "$(dirname "$0")/shell_helpers.sh"
help_if_asked "$0" "$@"  # -h, --help: the header above
cd "$(dirname "$0")/.."
if [ $# -lt 8 ]; then
  echo "usage: $0 CHECKPOINT NOISE_MULTIPLIER CLIP PER_GPU_BATCH ACCUMULATION LR EPOCHS SEED [extra flags]" >&2
  exit 2
fi
source scripts/setup_venv.sh
noise=()
[ "$2" != "auto" ] && noise=(--noise_multiplier "$2")
NUM_PROCESSES=${NUM_PROCESSES:-1}
set_launcher "$NUM_PROCESSES"
"${LAUNCHER[@]}" dp_finetuning/dp_finetune.py --model_name_or_path "$1" --target "${TARGET:-demo}" \
  --output_dir "${OUTPUT_DIR:-$(dirname "$1")/finetune_seed$8}" "${noise[@]}" --max_grad_norm "$3" \
  --per_device_train_batch_size "$4" --gradient_accumulation_steps "$5" --learning_rate "$6" \
  --num_train_epochs "$7" --seed "$8" "${@:9}"
