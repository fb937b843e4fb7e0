#!/usr/bin/env bash
# The whole pipeline, stages 1 to 6: DP fine-tuning after selective pre-training, after random
# pre-training of the same budget, and without pre-training, at one total privacy budget.
#
#   bash scripts/run_pipeline.sh [--task lm|classification] [--target T] [--preset smoke|demo|cpu|paper]
#                                [--run_dir DIR] [--seed N] [--total_epsilon E] [--num_tokens M]
#                                [--model_size S] [--pretrain_tokens M] [--sentences_dir DIR] [--until STAGE]
#                                [--non_private] [--linear_probe] [--force] [--redo_changed] [--dry_run]
#
# Tasks: lm (default: next-word prediction on private messages, target 'chat' offline) and
# classification (sentiment, target 'demo' offline, 'glue/sst2' for the paper preset); --target
# overrides the task's target (local files work for both). Presets: demo (default; the offline demo
# data, about 12 minutes on 2 CPU cores), cpu (classification by default: the demo data with 16M tokens of
# pre-training per variant, the learning curve's largest length; each pre-training about 30 minutes on 2 cores, about
# 75 minutes per seed in all), smoke
# (a few minutes; what the tests run), paper (the reference hyper-parameters on hub data, for GPUs; with
# --task lm it needs --target).
# A stage whose complete output exists is skipped, so a killed run resumes where it stopped;
# --force deletes the run directory's outputs first (its privacy ledgers stay: what was released stays recorded). A stage whose output was made with other settings or
# inputs stops the run with one line naming them; --redo_changed redoes it and what depends on it.
# --non_private also fine-tunes every variant without noise (clipping only, epsilon infinite), into
# <variant>/non_private/finetune with a ledger of its own: the ceiling that shows the cost of privacy (for
# classification in the demo and cpu presets, every parameter trained in batches of 32, where DP trains the head
# alone). --num_tokens (stage 4's budget: a fraction of the corpus's words below 1, millions of words from 1),
# --model_size and --pretrain_tokens (stage 5's length in millions of tokens seen) override the preset;
# --linear_probe (classification) adds a non-private diagnostic of each pre-trained model's frozen features
# (dp_finetuning/linear_probe.py); --sentences_dir reads (or writes) stage 1's output
# there instead of in the run directory, so that several runs share it. Layout of the run directory:
#   sentences/ classifier_data/ domain_classifier/ selected/ pretrained/ finetune/   (selective; its
#   privacy_ledger.json holds the domain classifier and the fine-tuning)
#   baselines/random/{selected,pretrained,finetune}/ and baselines/scratch/finetune/ (their own ledgers; the
#   no-pre-training baseline takes the random selection's tokenizer and config, learnt from public data only)
set -euo pipefail
for arg in "$@"; do  # -h, --help: the header above
  case "$arg" in -h|--help) sed -n '2,/^set -euo pipefail/{/^set -euo pipefail/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;; esac
done
cd "$(dirname "$0")/.."

PRESET=demo TASK="" TARGET="" RUN_DIR="" SEED=0 FORCE=0 DRY_RUN=0 TOTAL_EPSILON="" UNTIL=6 NUM_TOKENS="" MODEL_SIZE=""
SENTENCES="" NON_PRIVATE=0 REDO=() PRETRAIN_TOKENS="" LINEAR_PROBE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) PRESET=$2; shift 2 ;;
    --task) TASK=$2; shift 2 ;;
    --target) TARGET=$2; shift 2 ;;
    --run_dir) RUN_DIR=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --total_epsilon) TOTAL_EPSILON=$2; shift 2 ;;
    --num_tokens) NUM_TOKENS=$2; shift 2 ;;
    --model_size) MODEL_SIZE=$2; shift 2 ;;
    --pretrain_tokens) PRETRAIN_TOKENS=$2; shift 2 ;;
    --linear_probe) LINEAR_PROBE=1; shift ;;
    --sentences_dir) SENTENCES=$2; shift 2 ;;
    --until) UNTIL=$2; shift 2 ;;
    --force) FORCE=1; shift ;;
    --redo_changed) REDO=(--redo_changed); shift ;;
    --non_private) NON_PRIVATE=1; shift ;;
    --dry_run) DRY_RUN=1; shift ;;
    *) echo "run_pipeline.sh: unknown argument '$1' (see the header of $0)" >&2; exit 2 ;;
  esac
done

NUM_PROCESSES=${NUM_PROCESSES:-1}
if [ -z "$TASK" ]; then
  if [ "$PRESET" = cpu ]; then TASK=classification; else TASK=lm; fi
fi
case "$TASK" in
  lm|classification) ;;
  *) echo "run_pipeline.sh: unknown task '$TASK' (lm, classification)" >&2; exit 2 ;;
esac
# The presets: stage 1 corpus, stage 2 classifier data, stage 3 classifier, stage 4 budget, stage 5 pre-training,
# stage 6 fine-tuning (FINETUNE_LM or FINETUNE_CLASSIFICATION by --task; --non_private adds CEILING_CLASSIFICATION's
# flags, which override those, to the noiseless classification runs).
CEILING_CLASSIFICATION=()
case "$PRESET" in
  smoke)
    CORPUS=(--corpus demo-small --max_documents 800)
    CLASSIFIER_DATA_LM=(--num_negatives 3000 --od_data_size 1 --train_fraction 0.013 --max_eval_samples 500)
    CLASSIFIER_DATA_CLASSIFICATION=(--num_negatives 3000 --od_data_size 1 --train_fraction 0.28 --max_eval_samples 500)
    CLASSIFIER=(--target_epsilon 1 --per_device_train_batch_size 512 --gradient_accumulation_steps 2
                --learning_rate 0.1 --num_train_epochs 2)
    BUDGET=(--num_tokens "${NUM_TOKENS:-0.2}" --document_weight 0.7)
    PRETRAIN=(--model_size "${MODEL_SIZE:-nano}" --vocab_size 2000 --block_size 64 --per_device_train_batch_size 16
              --learning_rate 1e-3 --max_train_steps 20 --logging_steps 2 --checkpointing_steps 10)
    FINETUNE_CLASSIFICATION=(--per_device_train_batch_size 256 --gradient_accumulation_steps 2 --learning_rate 3e-3
                             --num_train_epochs 1 --max_length 48 --freeze embeddings --train_fraction 0.2)
    FINETUNE_LM=(--per_device_train_batch_size 256 --gradient_accumulation_steps 2 --learning_rate 3e-3
                 --num_train_epochs 1 --max_length 32 --train_fraction 0.009 --max_eval_samples 200)
    TARGETS=(chat demo) DEFAULT_EPSILON=4 ;;
  demo|cpu)  # cpu: the demo with 16M tokens of pre-training (the learning curve's largest length)
    CORPUS=(--corpus demo)
    # stage 2: a fixed number of public negatives (never derived from the private count); about 5 per positive
    CLASSIFIER_DATA_LM=(--num_negatives 100000 --train_fraction 0.09 --max_eval_samples 2000)
    CLASSIFIER_DATA_CLASSIFICATION=(--num_negatives 50000 --max_eval_samples 2000)
    CLASSIFIER=(--target_epsilon 1 --per_device_train_batch_size 512 --gradient_accumulation_steps 16
                --learning_rate 0.1 --num_train_epochs 6)
    BUDGET=(--num_tokens "${NUM_TOKENS:-0.1}" --document_weight 0.7)
    PRETRAIN=(--model_size "${MODEL_SIZE:-micro}" --vocab_size 4096 --block_size 128 --per_device_train_batch_size 32
              --learning_rate 1e-3 --max_train_steps 300 --checkpointing_steps 100)
    if [ "$PRESET" = cpu ]; then PRETRAIN_TOKENS=${PRETRAIN_TOKENS:-16}; fi
    # DP: only the head (and final LayerNorm), on the mean-pooled features: the README's recipe search. The
    # non-private ceiling trains every parameter on the last token in batches of 32 (about 1,000 steps), the best
    # of the recipes tried without noise (results/classification_tuning/tuning_ceiling_random16M_seed0.md).
    FINETUNE_CLASSIFICATION=(--per_device_train_batch_size 256 --gradient_accumulation_steps 4 --learning_rate 1e-1
                             --num_train_epochs 10 --max_length 64 --freeze body --pooling mean)
    CEILING_CLASSIFICATION=(--freeze none --pooling last --per_device_train_batch_size 32 --gradient_accumulation_steps 1
                            --learning_rate 3e-4 --num_train_epochs 3)
    FINETUNE_LM=(--per_device_train_batch_size 256 --gradient_accumulation_steps 4 --learning_rate 3e-3
                 --num_train_epochs 3 --max_length 48 --train_fraction 0.05 --max_eval_samples 2000)
    TARGETS=(chat demo) DEFAULT_EPSILON=4 ;;
  paper)
    CORPUS=(--corpus wikipedia bookcorpus)
    CLASSIFIER_DATA_LM=(--num_negatives 336745) CLASSIFIER_DATA_CLASSIFICATION=(--num_negatives 336745)  # 5 x 67,349
    CLASSIFIER=(--backbone transformer --model_name_or_path bert-base-uncased --noise_multiplier 1.4
                --per_device_train_batch_size 64 --gradient_accumulation_steps 32 --learning_rate 1e-3
                --num_train_epochs 3)
    BUDGET=(--num_tokens "${NUM_TOKENS:-40}")
    PRETRAIN=(--model_size "${MODEL_SIZE:-tiny}" --block_size 128 --per_device_train_batch_size 32 --learning_rate 3e-4
              --max_train_steps 1000000 --checkpointing_steps 10000)
    FINETUNE_CLASSIFICATION=(--per_device_train_batch_size 32 --gradient_accumulation_steps 64 --learning_rate 1e-3
                             --num_train_epochs 30)
    FINETUNE_LM=(--per_device_train_batch_size 32 --gradient_accumulation_steps 64 --learning_rate 1e-3
                 --num_train_epochs 30 --max_length 128)
    TARGETS=("" glue/sst2) DEFAULT_EPSILON=4 ;;
  *) echo "run_pipeline.sh: unknown preset '$PRESET' (smoke, demo, cpu, paper)" >&2; exit 2 ;;
esac
if [ "$TASK" = lm ]; then
  TARGET=${TARGET:-${TARGETS[0]}} FINETUNE=(--task lm "${FINETUNE_LM[@]}") CEILING=()
  CLASSIFIER_DATA=("${CLASSIFIER_DATA_LM[@]}")
else
  TARGET=${TARGET:-${TARGETS[1]}} FINETUNE=("${FINETUNE_CLASSIFICATION[@]}") CEILING=("${CEILING_CLASSIFICATION[@]}")
  CLASSIFIER_DATA=("${CLASSIFIER_DATA_CLASSIFICATION[@]}")
fi
if [ -z "$TARGET" ]; then
  echo "run_pipeline.sh: --preset $PRESET --task $TASK needs --target (a hub dataset or local files of messages)" >&2
  exit 2
fi
RUN_DIR=${RUN_DIR:-runs/${PRESET}_$TASK}
case "$UNTIL" in [1-6]) ;; *) echo "run_pipeline.sh: --until takes a stage number from 1 to 6, got '$UNTIL'" >&2; exit 2 ;; esac
TOTAL_EPSILON=${TOTAL_EPSILON:-$DEFAULT_EPSILON}

# What can be checked before any work: numbers, and a total budget the classifier leaves room in.
positive() { awk -v x="$1" 'BEGIN { exit !(x ~ /^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$/ && x + 0 > 0) }'; }
positive "$TOTAL_EPSILON" || { echo "run_pipeline.sh: --total_epsilon must be a positive number, got '$TOTAL_EPSILON'" >&2; exit 2; }
positive "${NUM_TOKENS:-1}" || { echo "run_pipeline.sh: --num_tokens must be a positive number, got '$NUM_TOKENS'" >&2; exit 2; }
if [ -n "$PRETRAIN_TOKENS" ]; then
  positive "$PRETRAIN_TOKENS" || { echo "run_pipeline.sh: --pretrain_tokens must be a positive number, got '$PRETRAIN_TOKENS'" >&2; exit 2; }
  PRETRAIN+=(--max_train_tokens "$PRETRAIN_TOKENS")
fi
if [ "$LINEAR_PROBE" = 1 ] && [ "$TASK" != classification ]; then
  echo "run_pipeline.sh: --linear_probe needs --task classification (it fits the target's labels)" >&2; exit 2
fi
case "$SEED" in ''|*[!0-9]*) echo "run_pipeline.sh: --seed takes a non-negative integer, got '$SEED'" >&2; exit 2 ;; esac
case "$TARGET" in  # the offline and hub targets by name; anything else is a local file or directory
  demo|chat|glue/sst2) ;;
  *) [ -e "$TARGET" ] || { echo "run_pipeline.sh: --target $TARGET: no such file or directory (nor 'demo', 'chat', 'glue/sst2')" >&2; exit 2; } ;;
esac
if [ -n "$SENTENCES" ] && [ -e "$SENTENCES" ] && [ ! -d "$SENTENCES" ]; then
  echo "run_pipeline.sh: --sentences_dir $SENTENCES: not a directory" >&2; exit 2
fi
for i in "${!CLASSIFIER[@]}"; do
  if [ "${CLASSIFIER[$i]}" = --target_epsilon ] && ! awk -v t="$TOTAL_EPSILON" -v c="${CLASSIFIER[$((i + 1))]}" 'BEGIN { exit !(t > c) }'; then
    echo "run_pipeline.sh: --total_epsilon $TOTAL_EPSILON leaves nothing for fine-tuning: the domain classifier alone spends ${CLASSIFIER[$((i + 1))]}" >&2
    exit 2
  fi
done

run() {
  echo "+ $*"
  if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}
stage() {  # stage N TITLE: announce stage N, or stop after --until
  if [ "$1" -gt "$UNTIL" ]; then echo "stopping after stage $UNTIL (--until)"; exit 0; fi
  echo "== stage $1: $2"
}
launch() {  # several processes for the stages that use them
  if [ "$NUM_PROCESSES" -gt 1 ]; then run accelerate launch --num_processes "$NUM_PROCESSES" "$@"; else run python "$@"; fi
}

if [ "$DRY_RUN" = 0 ]; then
  source scripts/setup_venv.sh
  if [ "$FORCE" = 1 ] && [ -d "$RUN_DIR" ]; then
    # everything but the privacy ledgers: their releases stay in the history (as superseded once deleted)
    find "$RUN_DIR" -mindepth 1 ! -type d ! -name privacy_ledger.json ! -name privacy_ledger.json.lock -delete
    find "$RUN_DIR" -mindepth 1 -depth -type d -empty -delete
  fi
  mkdir -p "$RUN_DIR"
fi
start=$(date +%s)
R=$RUN_DIR B=$RUN_DIR/baselines S=${SENTENCES:-$RUN_DIR/sentences}

stage 1 "sentences"
run python data_selection/split_sentences.py "${CORPUS[@]}" --output_dir "$S" "${REDO[@]}"
stage 2 "domain-classifier data"
run python data_selection/build_classifier_data.py --sentences_dir "$S" --target "$TARGET" \
  "${CLASSIFIER_DATA[@]}" --output_dir "$R/classifier_data" --seed "$SEED" "${REDO[@]}"
stage 3 "DP domain classifier and scores"
launch data_selection/train_domain_classifier.py --data_dir "$R/classifier_data" --sentences_dir "$S" \
  "${CLASSIFIER[@]}" --output_dir "$R/domain_classifier" --resume_from_checkpoint latest --seed "$SEED" "${REDO[@]}"
stage 4 "selection (top-scored and random, same budget)"
run python data_selection/sampling_with_logits.py --sentences_dir "$S" \
  --scores_dir "$R/domain_classifier/scores" "${BUDGET[@]}" --output_dir "$R/selected" --seed "$SEED" "${REDO[@]}"
run python data_selection/sampling_with_logits.py --sentences_dir "$S" --random "${BUDGET[@]}" \
  --output_dir "$B/random/selected" --seed "$SEED" "${REDO[@]}"
stage 5 "pre-training"
for variant in "$R" "$B/random"; do
  launch pretraining/pretrain_gpt2.py --dataset_path "$variant/selected" "${PRETRAIN[@]}" --eval_target "$TARGET" \
    --output_dir "$variant/pretrained" --resume_from_checkpoint latest --seed "$SEED" "${REDO[@]}"
done
if [ "$LINEAR_PROBE" = 1 ]; then
  echo "== stage 5 diagnostic, not private: logistic regression on frozen features (--linear_probe)"
  PROBE=(--target "$TARGET" --seed "$SEED" "${REDO[@]}")
  run python dp_finetuning/linear_probe.py --model_name_or_path "$R/pretrained" "${PROBE[@]}" --output_dir "$R/linear_probe"
  run python dp_finetuning/linear_probe.py --model_name_or_path "$B/random/pretrained" "${PROBE[@]}" \
    --output_dir "$B/random/linear_probe"
  run python dp_finetuning/linear_probe.py --model_name_or_path "$B/random/pretrained" --random_init "${PROBE[@]}" \
    --output_dir "$B/scratch/linear_probe"
fi
stage 6 "DP fine-tuning ($TASK) at a total epsilon of $TOTAL_EPSILON"
FINETUNE+=(--target "$TARGET" --resume_from_checkpoint latest --seed "$SEED" "${REDO[@]}")
DP=(--target_epsilon "$TOTAL_EPSILON")
launch dp_finetuning/dp_finetune.py --model_name_or_path "$R/pretrained" "${FINETUNE[@]}" "${DP[@]}" \
  --target_epsilon_scope run --output_dir "$R/finetune"
launch dp_finetuning/dp_finetune.py --model_name_or_path "$B/random/pretrained" "${FINETUNE[@]}" "${DP[@]}" \
  --output_dir "$B/random/finetune"
launch dp_finetuning/dp_finetune.py --model_name_or_path "$B/random/pretrained" --random_init "${FINETUNE[@]}" \
  "${DP[@]}" --output_dir "$B/scratch/finetune"
if [ "$NON_PRIVATE" = 1 ]; then
  echo "== stage 6 without noise (--non_private: clipping only, epsilon infinite; each in a ledger of its own)"
  NOISELESS=(--noise_multiplier 0 "${CEILING[@]}")
  launch dp_finetuning/dp_finetune.py --model_name_or_path "$R/pretrained" "${FINETUNE[@]}" "${NOISELESS[@]}" \
    --output_dir "$R/non_private/finetune"
  launch dp_finetuning/dp_finetune.py --model_name_or_path "$B/random/pretrained" "${FINETUNE[@]}" "${NOISELESS[@]}" \
    --output_dir "$B/random/non_private/finetune"
  launch dp_finetuning/dp_finetune.py --model_name_or_path "$B/random/pretrained" --random_init "${FINETUNE[@]}" \
    "${NOISELESS[@]}" --output_dir "$B/scratch/non_private/finetune"
fi

if [ "$DRY_RUN" = 0 ]; then
  python scripts/summarize_runs.py "$RUN_DIR"
  echo "pipeline finished in $(( $(date +%s) - start )) s"
fi
