#!/usr/bin/env bash
# The whole pipeline, stages 1 to 6: DP fine-tuning after selective pre-training, after random
# pre-training of the same budget, and without pre-training, at one total privacy budget.
#
#   bash scripts/run_pipeline.sh [--task lm|classification] [--target T] [--corpus C [C ...]]
#                                [--text_column NAME] [--label_column NAME] [--preset smoke|demo|cpu|paper]
#                                [--run_dir DIR] [--seed N] [--total_epsilon E] [--num_tokens M]
#                                [--model_size S] [--pretrain_tokens M] [--train_fraction F]
#                                [--sentences_dir DIR] [--until STAGE] [--privacy_unit example|sender]
#                                [--unit_column NAME]
#                                [--non_private] [--linear_probe] [--audit] [--force] [--redo_changed] [--dry_run]
#
# Tasks: lm (default: next-word prediction on private messages, target 'chat' offline) and
# classification (sentiment, target 'demo' offline, 'glue/sst2' for the paper preset); --target
# overrides the task's target, --corpus the preset's public corpus: your own data, local files or
# directories (docs/own_data.md). --text_column names the text column of both (default 'text', else
# 'sentence'), --label_column the target's 0/1 labels (classification; default 'label'); your data is
# checked before stage 1 (scripts/check_data.py). Presets, every stage's hyper-parameters in one file each
# (scripts/presets/<name>.sh): demo (default; the offline demo data, about 15 minutes on 2 CPU cores), cpu
# (classification by default: the demo data with 16M tokens of pre-training per variant, the learning
# curve's largest length; about 75 minutes per seed on 2 cores), smoke (a few minutes; what the tests
# run), paper (the reference hyper-parameters on hub data, for GPUs; with --task lm it needs --target).
# A stage whose complete output exists is skipped, so a killed run resumes where it stopped;
# --force deletes the run directory's outputs first (its privacy ledgers stay: what was released stays
# recorded). A stage whose output was made with other settings or inputs stops the run with one line
# naming them; --redo_changed redoes it and what depends on it.
# --non_private also fine-tunes every variant without noise (clipping only, epsilon infinite), into
# <variant>/non_private/finetune with a ledger of its own: the ceiling that shows the cost of privacy (for
# classification in the demo and cpu presets, every parameter trained in batches of 32, where DP trains the head
# alone). --num_tokens (stage 4's budget: a fraction of the corpus's words below 1, millions of words from 1),
# --model_size and --pretrain_tokens (stage 5's length in millions of tokens seen) override the preset, and
# --train_fraction the share of the target's training examples that stages 2 and 6 use (the presets subsample
# chat and demo to CPU scale; another target is used whole by default);
# --audit audits both DP stages (the preset's AUDIT_CANARIES white-box canaries each): audit.json beside each
# privacy.json, an empirical lower bound on epsilon, and a line per stage in the summary (docs/privacy.md).
# --privacy_unit sender protects each sender with all of their messages instead of each message, in both DP stages
# (the preset's SENDER_* flags: batches of senders, at most --max_examples_per_unit messages each per step; the
# target split by sender); --unit_column names the target's sender column (default 'sender', the chat target's).
# The run directory defaults to runs/<preset>_<task>_sender (docs/privacy.md, "Sender-level privacy").
# --linear_probe (classification) adds a non-private diagnostic of each pre-trained model's frozen features
# (dp_finetuning/linear_probe.py). --sentences_dir reads (or writes) stage 1's output there instead of in
# the run directory, so that several runs share it; given without --corpus, a complete stage 1 output there
# is used as it is (split_sentences.py run by hand on your corpus), with --corpus it is checked against it.
# Layout of the run directory:
#   sentences/ classifier_data/ domain_classifier/ selected/ pretrained/ finetune/   (selective; its
#   ledger.json holds the domain classifier and the fine-tuning)
#   baselines/random/{selected,pretrained,finetune}/ and baselines/scratch/finetune/ (their own ledgers; the
#   no-pre-training baseline takes the random selection's tokenizer and config, learnt from public data only)
set -euo pipefail
source "$(dirname "$0")/shell_helpers.sh"
help_if_asked "$0" "$@"  # -h, --help: the header above
cd "$(dirname "$0")/.."

PRESET=demo TASK="" TARGET="" RUN_DIR="" SEED=0 FORCE=0 DRY_RUN=0 TOTAL_EPSILON="" UNTIL=6 NUM_TOKENS="" MODEL_SIZE=""
SENTENCES="" NON_PRIVATE=0 REDO=() PRETRAIN_TOKENS="" LINEAR_PROBE=0 USER_CORPUS=() TEXT=() LABEL=() AUDIT=()
TRAIN_FRACTION="" PRIVACY_UNIT=example UNIT=()
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) PRESET=$2; shift 2 ;;
    --corpus) shift  # one or more values, up to the next flag
      while [ $# -gt 0 ] && [[ "$1" != --* ]]; do USER_CORPUS+=("$1"); shift; done
      [ ${#USER_CORPUS[@]} -gt 0 ] || { echo "run_pipeline.sh: --corpus needs files, directories or corpus names" >&2; exit 2; } ;;
    --text_column) TEXT=(--text_column "$2"); shift 2 ;;
    --train_fraction) TRAIN_FRACTION=$2; shift 2 ;;
    --privacy_unit) PRIVACY_UNIT=$2; shift 2 ;;
    --unit_column) UNIT=(--unit_column "$2"); shift 2 ;;
    --label_column) LABEL=(--label_column "$2"); shift 2 ;;
    --task) TASK=$2; shift 2 ;;
    --target) TARGET=$2; shift 2 ;;
    --run_dir) RUN_DIR=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --total_epsilon) TOTAL_EPSILON=$2; shift 2 ;;
    --num_tokens) NUM_TOKENS=$2; shift 2 ;;
    --model_size) MODEL_SIZE=$2; shift 2 ;;
    --pretrain_tokens) PRETRAIN_TOKENS=$2; shift 2 ;;
    --linear_probe) LINEAR_PROBE=1; shift ;;
    --audit) AUDIT=(audit); shift ;;
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
# The preset: every stage's hyper-parameters (scripts/presets/<preset>.sh; --non_private adds
# CEILING_CLASSIFICATION's flags, which override FINETUNE_CLASSIFICATION's, to the noiseless classification runs).
case "$PRESET" in ''|*[!a-z0-9_-]*) PRESET_FILE="" ;; *) PRESET_FILE="scripts/presets/$PRESET.sh" ;; esac
[ -n "$PRESET_FILE" ] && [ -f "$PRESET_FILE" ] || {
  echo "run_pipeline.sh: unknown preset '$PRESET' ($(cd scripts/presets && ls -- *.sh | sed 's/\.sh$//' | paste -sd, | sed 's/,/, /g'))" >&2; exit 2; }
PRESET_PRETRAIN_TOKENS=""
source "$PRESET_FILE"
TASK=${TASK:-$DEFAULT_TASK} PRETRAIN_TOKENS=${PRETRAIN_TOKENS:-$PRESET_PRETRAIN_TOKENS}
case "$TASK" in
  lm|classification) ;;
  *) echo "run_pipeline.sh: unknown task '$TASK' (lm, classification)" >&2; exit 2 ;;
esac
BUDGET=(--num_tokens "${NUM_TOKENS:-$PRESET_NUM_TOKENS}" "${BUDGET[@]}")
PRETRAIN=(--model_size "${MODEL_SIZE:-$PRESET_MODEL_SIZE}" "${PRETRAIN[@]}")
if [ "$TASK" = lm ]; then
  TARGET=${TARGET:-${TARGETS[0]}} FINETUNE=(--task lm "${FINETUNE_LM[@]}" "${TEXT[@]}") CEILING=()
  CLASSIFIER_DATA=("${CLASSIFIER_DATA_LM[@]}")
else
  TARGET=${TARGET:-${TARGETS[1]}} FINETUNE=("${FINETUNE_CLASSIFICATION[@]}" "${TEXT[@]}" "${LABEL[@]}") CEILING=("${CEILING_CLASSIFICATION[@]}")
  CLASSIFIER_DATA=("${CLASSIFIER_DATA_CLASSIFICATION[@]}")
fi
if [ -z "$TARGET" ]; then
  echo "run_pipeline.sh: --preset $PRESET --task $TASK needs --target (a hub dataset or local files of messages)" >&2
  exit 2
fi
without_train_fraction() {  # ARRAY_NAME: the array less its --train_fraction F
  local -n flags=$1
  local kept=() i=0
  while [ $i -lt ${#flags[@]} ]; do
    if [ "${flags[$i]}" = --train_fraction ]; then i=$((i + 2)); else kept+=("${flags[$i]}"); i=$((i + 1)); fi
  done
  flags=("${kept[@]}")
}
# The presets' --train_fraction subsamples their own targets (chat, demo) to CPU scale: another target is used
# whole, unless --train_fraction says otherwise (stages 2 and 6 alike).
OWN_TARGET=1
for name in "${TARGETS[@]}"; do if [ "$name" = "$TARGET" ]; then OWN_TARGET=0; fi; done
case "$PRIVACY_UNIT" in
  example) [ ${#UNIT[@]} = 0 ] || { echo "run_pipeline.sh: --unit_column needs --privacy_unit sender" >&2; exit 2; } ;;
  sender) ;;
  *) echo "run_pipeline.sh: --privacy_unit takes 'example' or 'sender', got '$PRIVACY_UNIT'" >&2; exit 2 ;;
esac
if [ -n "$TRAIN_FRACTION" ] || [ "$OWN_TARGET" = 1 ] || [ "$PRIVACY_UNIT" = sender ]; then
  without_train_fraction CLASSIFIER_DATA
  without_train_fraction FINETUNE
fi
EVAL_UNIT=()
if [ "$PRIVACY_UNIT" = sender ]; then  # the preset's sender-level flags override its per-example ones
  # stage 5 evaluates on the target's validation senders, split as the DP stages split it
  EVAL_UNIT=(--target_unit_column "${UNIT[1]:-sender}")
  CLASSIFIER_DATA+=(--privacy_unit sender "${UNIT[@]}" "${SENDER_CLASSIFIER_DATA[@]}")
  CLASSIFIER+=(--privacy_unit sender "${SENDER_CLASSIFIER[@]}")
  FINETUNE+=(--privacy_unit sender "${UNIT[@]}" "${SENDER_FINETUNE[@]}")
  if [ "$OWN_TARGET" = 1 ] || [ -n "$TRAIN_FRACTION" ]; then
    without_train_fraction CLASSIFIER_DATA
    without_train_fraction FINETUNE
  fi
fi
if [ -n "$TRAIN_FRACTION" ]; then
  awk -v x="$TRAIN_FRACTION" 'BEGIN { exit !(x ~ /^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$/ && x + 0 > 0 && x + 0 <= 1) }' || {
    echo "run_pipeline.sh: --train_fraction takes a number in (0, 1], got '$TRAIN_FRACTION'" >&2; exit 2; }
  CLASSIFIER_DATA+=(--train_fraction "$TRAIN_FRACTION") FINETUNE+=(--train_fraction "$TRAIN_FRACTION")
fi
UNIT_SUFFIX="" && [ "$PRIVACY_UNIT" = example ] || UNIT_SUFFIX=_$PRIVACY_UNIT
RUN_DIR=${RUN_DIR:-runs/${PRESET}_$TASK$UNIT_SUFFIX}
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
for spec in "${USER_CORPUS[@]}"; do
  case "$spec" in demo|demo-small|wikipedia|bookcorpus) ;;
    *) [ -e "$spec" ] || { echo "run_pipeline.sh: --corpus $spec: no such file or directory (nor 'demo', 'demo-small', 'wikipedia', 'bookcorpus')" >&2; exit 2; } ;;
  esac
done
# stage 1's output given without --corpus: reused as it is, whatever corpus it was made from
REUSE_SENTENCES=0
if [ -n "$SENTENCES" ] && [ ${#USER_CORPUS[@]} = 0 ] && [ -f "$SENTENCES/stats.json" ]; then REUSE_SENTENCES=1; fi
if [ ${#USER_CORPUS[@]} -gt 0 ]; then CORPUS=("${USER_CORPUS[@]}"); fi
CORPUS=(--corpus "${CORPUS[@]}" "${CORPUS_FLAGS[@]}" "${TEXT[@]}")
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
set_launcher "$NUM_PROCESSES"
launch() {  # several processes for the stages that use them
  run "${LAUNCHER[@]}" "$@"
}

if [ "$DRY_RUN" = 0 ]; then
  source scripts/setup_venv.sh
  # your own data: its columns, labels and splits, before any stage runs
  python scripts/check_data.py --task "$TASK" --target "$TARGET" --corpus "${USER_CORPUS[@]}" "${TEXT[@]}" "${LABEL[@]}" \
    ${EVAL_UNIT[@]+--unit_column "${EVAL_UNIT[1]}"}
  if [ "$FORCE" = 1 ] && [ -d "$RUN_DIR" ]; then
    # everything but the privacy ledgers: their releases stay in the history (as superseded once deleted)
    find "$RUN_DIR" -mindepth 1 ! -type d ! -name ledger.json ! -name ledger.json.lock -delete
    find "$RUN_DIR" -mindepth 1 -depth -type d -empty -delete
  fi
  mkdir -p "$RUN_DIR"
fi
start=$(date +%s)
R=$RUN_DIR B=$RUN_DIR/baselines S=${SENTENCES:-$RUN_DIR/sentences}

stage 1 "sentences"
if [ "$REUSE_SENTENCES" = 1 ]; then
  echo "reusing $S, stage 1's output as it is (made from: $(tr -d ' \n' < "$S/stage_signature.json" 2>/dev/null | grep -o '"corpus":\[[^]]*\]' || echo 'unrecorded'); --corpus checks it against one)"
else
  run python data_selection/split_sentences.py "${CORPUS[@]}" --output_dir "$S" "${REDO[@]}"
fi
stage 2 "domain-classifier data"
run python data_selection/build_classifier_data.py --sentences_dir "$S" --target "$TARGET" "${TEXT[@]}" \
  "${CLASSIFIER_DATA[@]}" --output_dir "$R/classifier_data" --seed "$SEED" "${REDO[@]}"
stage 3 "DP domain classifier and scores"
launch data_selection/train_domain_classifier.py --data_dir "$R/classifier_data" --sentences_dir "$S" \
  "${CLASSIFIER[@]}" ${AUDIT[@]+--audit_canaries "$AUDIT_CANARIES"} --output_dir "$R/domain_classifier" \
  --resume_from_checkpoint latest --seed "$SEED" "${REDO[@]}"
stage 4 "selection (top-scored and random, same budget)"
run python data_selection/sampling_with_logits.py --sentences_dir "$S" \
  --scores_dir "$R/domain_classifier/scores" "${BUDGET[@]}" --output_dir "$R/selected" --seed "$SEED" "${REDO[@]}"
run python data_selection/sampling_with_logits.py --sentences_dir "$S" --random "${BUDGET[@]}" \
  --output_dir "$B/random/selected" --seed "$SEED" "${REDO[@]}"
stage 5 "pre-training"
for variant in "$R" "$B/random"; do
  launch pretraining/pretrain_gpt2.py --dataset_path "$variant/selected" "${PRETRAIN[@]}" --eval_target "$TARGET" \
    ${TEXT[@]+--target_text_column "${TEXT[1]}"} ${EVAL_UNIT[@]+"${EVAL_UNIT[@]}"} \
    --output_dir "$variant/pretrained" --resume_from_checkpoint latest --seed "$SEED" "${REDO[@]}"
done
if [ "$LINEAR_PROBE" = 1 ]; then
  echo "== stage 5 diagnostic, not private: logistic regression on frozen features (--linear_probe)"
  PROBE=(--target "$TARGET" "${TEXT[@]}" "${LABEL[@]}" --seed "$SEED" "${REDO[@]}")
  run python dp_finetuning/linear_probe.py --model_name_or_path "$R/pretrained" "${PROBE[@]}" --output_dir "$R/linear_probe"
  run python dp_finetuning/linear_probe.py --model_name_or_path "$B/random/pretrained" "${PROBE[@]}" \
    --output_dir "$B/random/linear_probe"
  run python dp_finetuning/linear_probe.py --model_name_or_path "$B/random/pretrained" --random_init "${PROBE[@]}" \
    --output_dir "$B/scratch/linear_probe"
fi
stage 6 "DP fine-tuning ($TASK) at a total epsilon of $TOTAL_EPSILON"
FINETUNE+=(--target "$TARGET" --resume_from_checkpoint latest --seed "$SEED" "${REDO[@]}")
DP=(--target_epsilon "$TOTAL_EPSILON" ${AUDIT[@]+--audit_canaries "$AUDIT_CANARIES"})
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
