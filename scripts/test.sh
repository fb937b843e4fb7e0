#!/usr/bin/env bash
# Run the test suite: creates or reuses .venv, installs the requirements, runs pytest.
#   bash scripts/test.sh          # everything (what CI runs), then the 20 slowest tests
#   bash scripts/test.sh --fast   # without the whole pipelines and multi-process runs (marked slow)
set -euo pipefail
source "$(dirname "$0")/shell_helpers.sh"
help_if_asked "$0" "$@"  # -h, --help: the header above
cd "$(dirname "$0")/.."
source scripts/setup_venv.sh
if [ "${1:-}" = --fast ]; then
  shift
  exec python -m pytest -q -m "not slow" "$@" tests
fi
exec python -m pytest -q --durations=20 "$@" tests
