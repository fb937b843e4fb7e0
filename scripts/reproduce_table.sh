#!/usr/bin/env bash
# The paper's comparison as a table: at one total privacy budget (both DP stages together), DP
# fine-tuning after selective pre-training, after random pre-training of the same budget, and
# without pre-training, over several seeds, token budgets and model sizes.
#
#   bash scripts/reproduce_table.sh [--task lm|classification] [--target T] [--preset demo|cpu|smoke|paper]
#        [--seeds "0 1 2"] [--num_tokens "0.2 0.4"] [--model_sizes "nano micro"] [--total_epsilon 4]
#        [--pretrain_tokens "1 4 16"] [--runs_dir DIR] [--output_dir results/TASK] [--non_private]
#        [--linear_probe] [--redo_changed] [--dry_run]
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
set -euo pipefail
for arg in "$@"; do  # -h, --help: the header above
  case "$arg" in -h|--help) sed -n '2,/^set -euo pipefail/{/^set -euo pipefail/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;; esac
done
cd "$(dirname "$0")/.."

PRESET=demo TASK="" TARGET=() SEEDS="0 1 2" NUM_TOKENS="" MODEL_SIZES="" TOTAL_EPSILON=4 RUNS_DIR="" OUTPUT_DIR=""
PRETRAIN_TOKENS=""
DRY_RUN=() EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) PRESET=$2; shift 2 ;;
    --task) TASK=$2; shift 2 ;;
    --target) TARGET=(--target "$2"); shift 2 ;;
    --seeds) SEEDS=$2; shift 2 ;;
    --num_tokens) NUM_TOKENS=$2; shift 2 ;;
    --model_sizes) MODEL_SIZES=$2; shift 2 ;;
    --total_epsilon) TOTAL_EPSILON=$2; shift 2 ;;
    --pretrain_tokens) PRETRAIN_TOKENS=$2; shift 2 ;;
    --runs_dir) RUNS_DIR=$2; shift 2 ;;
    --output_dir) OUTPUT_DIR=$2; shift 2 ;;
    --dry_run) DRY_RUN=(--dry_run); shift ;;
    --non_private|--linear_probe|--redo_changed) EXTRA+=("$1"); shift ;;
    *) echo "reproduce_table.sh: unknown argument '$1' (see the header of $0)" >&2; exit 2 ;;
  esac
done
case "$PRESET" in  # the presets' own budget and model size (scripts/run_pipeline.sh)
  smoke) NUM_TOKENS=${NUM_TOKENS:-0.2} MODEL_SIZES=${MODEL_SIZES:-nano} ;;
  demo|cpu) NUM_TOKENS=${NUM_TOKENS:-0.1} MODEL_SIZES=${MODEL_SIZES:-micro} ;;
  paper) NUM_TOKENS=${NUM_TOKENS:-40} MODEL_SIZES=${MODEL_SIZES:-tiny} ;;
  *) echo "reproduce_table.sh: unknown preset '$PRESET' (smoke, demo, cpu, paper)" >&2; exit 2 ;;
esac
if [ -z "$TASK" ]; then  # as run_pipeline.sh: the cpu preset is for classification
  if [ "$PRESET" = cpu ]; then TASK=classification; else TASK=lm; fi
fi
for seed in $SEEDS; do
  case "$seed" in ''|*[!0-9]*) echo "reproduce_table.sh: --seeds takes integers, got '$seed'" >&2; exit 2 ;; esac
done
RUNS_DIR=${RUNS_DIR:-runs/table_${PRESET}_$TASK} OUTPUT_DIR=${OUTPUT_DIR:-results/$TASK}

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
          --sentences_dir "$RUNS_DIR/sentences" "${EXTRA[@]}" "${DRY_RUN[@]}"
        run_dirs+=("$run_dir")
      done
    done
  done
done
if [ ${#DRY_RUN[@]} = 0 ]; then
  source scripts/setup_venv.sh
  python scripts/summarize_runs.py "${run_dirs[@]}" --output_dir "$OUTPUT_DIR"
fi
