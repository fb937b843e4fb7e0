#!/usr/bin/env bash
# Run the test suite: creates or reuses .venv, installs the requirements, runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_venv.sh
exec python -m pytest -q "$@" tests
