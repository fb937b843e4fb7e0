#!/usr/bin/env bash
# GPU readiness in one run, a few minutes on one GPU (docs/engine.md, "GPU check"):
#   1. the engine's exactness on the device in float32 and under bf16 and fp16 autocast, against brute force
#      (GPT-2 124M: the LM head with tied weights on padded messages, and sequence classification);
#   2. a DP step of the engine against a non-private step, and Opacus if installed, in the same process, at the
#      paper's width (GPT-2 124M, batch 32, T = 128 and 256; minimum and median of 7 repeats).
#
#   bash scripts/gpu_check.sh          # on a machine with a GPU
#   bash scripts/gpu_check.sh --tiny   # a tiny configuration on the CPU: what the tests run
#
# It needs torch and transformers only: .venv's Python if there is one, else python3 (a GPU image's own).
# Exit status 1 if an exactness figure is above its tolerance.
set -euo pipefail
source "$(dirname "$0")/shell_helpers.sh"
help_if_asked "$0" "$@"  # -h, --help: the header above
cd "$(dirname "$0")/.."

DEVICE=cuda
EXACTNESS=() BENCHMARK=(--seq_lens 128 256 --repeats 7 --width 768 --layers 12 --vocab_size 50257 --batch_size 32)
case "${1:-}" in
  --tiny) DEVICE=cpu
    EXACTNESS=(--width 32 --layers 2 --heads 2 --vocab_size 97 --seq_len 12 --batch_size 4)
    BENCHMARK=(--seq_lens 16 --repeats 2 --width 32 --layers 1 --vocab_size 97 --batch_size 4) ;;
  "") ;;
  *) echo "gpu_check.sh: unknown argument '$1' (--tiny, or none)" >&2; exit 2 ;;
esac
PYTHON=python3
if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
echo "## 1. Exactness"
"$PYTHON" scripts/gpu_check.py --device "$DEVICE" "${EXACTNESS[@]}"
echo
echo "## 2. A DP step against a non-private step"
"$PYTHON" scripts/benchmark_engine.py --device "$DEVICE" "${BENCHMARK[@]}"
