#!/usr/bin/env bash
# The main job on the embedded default: the whole inference-efficiency study (see README).
# Extra arguments go to experiments.study (e.g. `--config=configs/study/stdlib.py:tiny`).
set -eo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
exec python -m experiments.study --config=configs/study/stdlib.py --workdir=runs/study "$@"
