#!/usr/bin/env bash
# Run the test suite: creates or reuses .venv, installs the requirements, runs pytest.
#   bash scripts/test.sh          # everything (what CI runs)
#   bash scripts/test.sh --fast   # without the whole pipelines and multi-process runs (marked slow)
set -euo pipefail
for arg in "$@"; do  # -h, --help: the header above
  case "$arg" in -h|--help) sed -n '2,/^set -euo pipefail/{/^set -euo pipefail/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;; esac
done
cd "$(dirname "$0")/.."
source scripts/setup_venv.sh
if [ "${1:-}" = --fast ]; then
  shift
  exec python -m pytest -q -m "not slow" "$@" tests
fi
exec python -m pytest -q "$@" tests
