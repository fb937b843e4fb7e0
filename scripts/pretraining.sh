#!/usr/bin/env bash
# Stage 5: pre-train GPT-2 from scratch on selected sentences.
#   bash scripts/pretraining.sh DATA SIZE LR STEPS PER_GPU_BATCH GPUS ACCUMULATION [extra flags]
#   bash scripts/pretraining.sh pretraining_data_40m.ds tiny 3e-4 1000000 32 8 1
# Environment: OUTPUT_DIR (default: DATA's directory/pretrained_SIZE), MIXED_PRECISION (no | fp16 | bf16).
set -euo pipefail
source "$(dirname "$0")/shell_helpers.sh"
help_if_asked "$0" "$@"  # -h, --help: the header above
cd "$(dirname "$0")/.."
if [ $# -lt 7 ]; then
  echo "usage: $0 DATA SIZE LR STEPS PER_GPU_BATCH GPUS ACCUMULATION [extra flags]" >&2
  exit 2
fi
source scripts/setup_venv.sh
data=$1 size=$2
output=${OUTPUT_DIR:-$(dirname "$data")/pretrained_$size}
set_launcher "$6" "${MIXED_PRECISION:-no}"
"${LAUNCHER[@]}" pretraining/pretrain_gpt2.py --dataset_path "$data" --model_size "$size" --learning_rate "$3" \
  --max_train_steps "$4" --per_device_train_batch_size "$5" --gradient_accumulation_steps "$7" \
  --mixed_precision "${MIXED_PRECISION:-no}" --output_dir "$output" --checkpointing_steps 1000 \
  --resume_from_checkpoint latest "${@:8}"
