#!/usr/bin/env bash
# The paper's comparison as a table: at one total privacy budget (both DP stages together), DP
# fine-tuning after selective pre-training, after random pre-training of the same budget, and
# without pre-training, over several seeds, token budgets and model sizes.
#
#   bash scripts/reproduce_table.sh [--task lm|classification] [--target T] [--corpus C [C ...]]
#        [--text_column NAME] [--label_column NAME] [--preset demo|cpu|smoke|paper]
#        [--seeds "0 1 2"] [--num_tokens "0.2 0.4"] [--model_sizes "nano micro"] [--total_epsilon 4]
#        [--pretrain_tokens "1 4 16"] [--runs_dir DIR] [--output_dir results/TASK] [--non_private]
#        [--linear_probe] [--audit] [--privacy_unit example|sender] [--unit_column NAME] [--redo_changed] [--dry_run]
#
# One pipeline run (scripts/run_pipeline.sh) per model size, budget, pre-training length and seed, in
# RUNS_DIR/<size>_<budget>_seed<seed>, or with --pretrain_tokens RUNS_DIR/<size>_<budget>_<M>Mtok_seed<seed>
# (RUNS_DIR default runs/table_<preset>_<task>); stage 1 is shared by all of them. --num_tokens is stage 4's
# budget: a fraction of the corpus's words below 1, millions of words from 1; --pretrain_tokens the
# lengths of pre-training in millions of tokens seen (a learning curve; default: the preset's steps). A killed table
# resumes: every run skips its complete stages. Writes OUTPUT_DIR/table.md (mean ± std over
# seeds), table.csv, runs.csv (one row per run and variant) and accuracy_vs_tokens.png.
# --non_private adds, per variant, fine-tuning without noise (epsilon infinite): the cost of privacy.
# --linear_probe (classification) adds the non-private frozen-feature diagnostic of every pre-trained model.
# --audit audits both DP stages of every run (run_pipeline.sh --audit).
# --privacy_unit sender runs both DP stages per sender (run_pipeline.sh); RUNS_DIR then defaults to
# runs/table_<preset>_<task>_sender and OUTPUT_DIR to results/<task>_sender, beside the per-example table.
# --corpus, --target, --text_column and --label_column take your own data, as in run_pipeline.sh; the preset
# (scripts/presets/<name>.sh) gives every other hyper-parameter.
set -euo pipefail
source "$(dirname "$0")/shell_helpers.sh"
help_if_asked "$0" "$@"  # -h, --help: the header above
cd "$(dirname "$0")/.."

PRESET=demo TASK="" TARGET=() SEEDS="0 1 2" NUM_TOKENS="" MODEL_SIZES="" TOTAL_EPSILON=4 RUNS_DIR="" OUTPUT_DIR=""
PRETRAIN_TOKENS="" USER_CORPUS=() PRIVACY_UNIT=example
DRY_RUN=() EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) PRESET=$2; shift 2 ;;
    --task) TASK=$2; shift 2 ;;
    --target) TARGET=(--target "$2"); shift 2 ;;
    --corpus) shift  # one or more values, up to the next flag
      while [ $# -gt 0 ] && [[ "$1" != --* ]]; do USER_CORPUS+=("$1"); shift; done
      [ ${#USER_CORPUS[@]} -gt 0 ] || { echo "reproduce_table.sh: --corpus needs files, directories or corpus names" >&2; exit 2; } ;;
    --text_column|--label_column|--train_fraction|--unit_column) EXTRA+=("$1" "$2"); shift 2 ;;
    --privacy_unit) PRIVACY_UNIT=$2; EXTRA+=("$1" "$2"); shift 2 ;;
    --seeds) SEEDS=$2; shift 2 ;;
    --num_tokens) NUM_TOKENS=$2; shift 2 ;;
    --model_sizes) MODEL_SIZES=$2; shift 2 ;;
    --total_epsilon) TOTAL_EPSILON=$2; shift 2 ;;
    --pretrain_tokens) PRETRAIN_TOKENS=$2; shift 2 ;;
    --runs_dir) RUNS_DIR=$2; shift 2 ;;
    --output_dir) OUTPUT_DIR=$2; shift 2 ;;
    --dry_run) DRY_RUN=(--dry_run); shift ;;
    --non_private|--linear_probe|--audit|--redo_changed) EXTRA+=("$1"); shift ;;
    *) echo "reproduce_table.sh: unknown argument '$1' (see the header of $0)" >&2; exit 2 ;;
  esac
done
case "$PRESET" in ''|*[!a-z0-9_-]*) PRESET_FILE="" ;; *) PRESET_FILE="scripts/presets/$PRESET.sh" ;; esac
[ -n "$PRESET_FILE" ] && [ -f "$PRESET_FILE" ] || {
  echo "reproduce_table.sh: unknown preset '$PRESET' ($(cd scripts/presets && ls -- *.sh | sed 's/\.sh$//' | paste -sd, | sed 's/,/, /g'))" >&2; exit 2; }
source "$PRESET_FILE"  # its budget, model size, task and corpus, as run_pipeline.sh reads them
NUM_TOKENS=${NUM_TOKENS:-$PRESET_NUM_TOKENS} MODEL_SIZES=${MODEL_SIZES:-$PRESET_MODEL_SIZE} TASK=${TASK:-$DEFAULT_TASK}
# every run names the corpus, so that the shared stage 1 output is checked against it, never reused unseen
if [ ${#USER_CORPUS[@]} -gt 0 ]; then CORPUS=("${USER_CORPUS[@]}"); fi
for seed in $SEEDS; do
  case "$seed" in ''|*[!0-9]*) echo "reproduce_table.sh: --seeds takes integers, got '$seed'" >&2; exit 2 ;; esac
done
UNIT_SUFFIX="" && [ "$PRIVACY_UNIT" = example ] || UNIT_SUFFIX=_$PRIVACY_UNIT
RUNS_DIR=${RUNS_DIR:-runs/table_${PRESET}_$TASK$UNIT_SUFFIX} OUTPUT_DIR=${OUTPUT_DIR:-results/$TASK$UNIT_SUFFIX}

run_dirs=()
for size in $MODEL_SIZES; do
  for tokens in $NUM_TOKENS; do
    for pretrain_tokens in ${PRETRAIN_TOKENS:-preset}; do
      for seed in $SEEDS; do
        if [ "$pretrain_tokens" = preset ]; then
          run_dir=$RUNS_DIR/${size}_${tokens}_seed$seed LENGTH=() length="the preset's"
        else
          run_dir=$RUNS_DIR/${size}_${tokens}_${pretrain_tokens}Mtok_seed$seed LENGTH=(--pretrain_tokens "$pretrain_tokens")
          length="${pretrain_tokens}M tokens"
        fi
        echo "=== model $size, budget $tokens, pre-training $length, seed $seed -> $run_dir"
        bash scripts/run_pipeline.sh --preset "$PRESET" --task "$TASK" "${TARGET[@]}" --run_dir "$run_dir" \
          --seed "$seed" --num_tokens "$tokens" --model_size "$size" "${LENGTH[@]}" --total_epsilon "$TOTAL_EPSILON" \
          --sentences_dir "$RUNS_DIR/sentences" --corpus "${CORPUS[@]}" "${EXTRA[@]}" "${DRY_RUN[@]}"
        run_dirs+=("$run_dir")
      done
    done
  done
done
if [ ${#DRY_RUN[@]} = 0 ]; then
  source scripts/setup_venv.sh
  python scripts/summarize_runs.py "${run_dirs[@]}" --output_dir "$OUTPUT_DIR"
fi
