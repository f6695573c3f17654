#!/usr/bin/env bash
# Multi-process evaluation with torchrun:
#   bash tools/dist_test.sh CONFIG CHECKPOINT NPROC [test.py options]
# Port and node selection as in dist_train.sh.
set -euo pipefail
CONFIG=$1
CHECKPOINT=$2
NPROC=$3
source "$(dirname "$0")/dist_launch.sh"
torchrun_cmd "$NPROC" "$(dirname "$0")/test.py" "$CONFIG" "$CHECKPOINT" \
  --launcher pytorch "${@:4}"
