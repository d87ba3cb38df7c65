#!/usr/bin/env bash
# Runs the whole test suite on CPU, installing what it needs into .venv first.
# Extra arguments go to pytest (e.g. `bash scripts/run_tests.sh tests/test_lm.py -x`).
set -eo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
exec python -m pytest -q "$@"
