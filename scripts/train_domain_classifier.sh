#!/usr/bin/env bash
# Stage 3: train the domain classifier with DP, then score every public sentence.
#   bash scripts/train_domain_classifier.sh NOISE_MULTIPLIER CLIP PER_DEVICE_BATCH ACCUMULATION LR [extra flags]
#   bash scripts/train_domain_classifier.sh 1.4 1 64 32 1e-3
# Environment: RUN_DIR (default runs/demo; reads RUN_DIR/classifier_data and RUN_DIR/sentences),
# BACKBONE (hashed | transformer), MODEL (transformer backbone: minilm | bert-base-uncased | path),
# EPOCHS (3), NUM_PROCESSES (1; more runs under accelerate launch).
set -euo pipefail
source "$(dirname "$0")/shell_helpers.sh"
help_if_asked "$0" "$@"  # -h, --help: the header above
cd "$(dirname "$0")/.."
if [ $# -lt 5 ]; then
  echo "usage: $0 NOISE_MULTIPLIER CLIP PER_DEVICE_BATCH ACCUMULATION LR [extra flags]" >&2
  exit 2
fi
source scripts/setup_venv.sh
RUN_DIR=${RUN_DIR:-runs/demo}
NUM_PROCESSES=${NUM_PROCESSES:-1}
set_launcher "$NUM_PROCESSES"
"${LAUNCHER[@]}" data_selection/train_domain_classifier.py \
  --data_dir "$RUN_DIR/classifier_data" --sentences_dir "$RUN_DIR/sentences" \
  --output_dir "$RUN_DIR/domain_classifier" --backbone "${BACKBONE:-hashed}" --model_name_or_path "${MODEL:-minilm}" \
  --noise_multiplier "$1" --max_grad_norm "$2" --per_device_train_batch_size "$3" \
  --gradient_accumulation_steps "$4" --learning_rate "$5" --num_train_epochs "${EPOCHS:-3}" "${@:6}"
