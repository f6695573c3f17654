#!/usr/bin/env bash
# The README's first command: set up the environment (idempotent), then run
# the end-to-end demo on the embedded toy COCO set (see tools/demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
exec "${PYTHON:-python3}" tools/demo.py "$@"
