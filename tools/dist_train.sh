#!/usr/bin/env bash
# Multi-process training with torchrun:
#   bash tools/dist_train.sh CONFIG NPROC [train.py options]
# On one node without PORT, torchrun's standalone rendezvous picks a free
# port (two jobs on one machine do not collide). NNODES, NODE_RANK, PORT and
# MASTER_ADDR select a fixed port or a multi-node run. Without CUDA the
# processes use gloo (see mmcd/utils/runner_setup.py).
set -euo pipefail
CONFIG=$1
NPROC=$2
source "$(dirname "$0")/dist_launch.sh"
torchrun_cmd "$NPROC" "$(dirname "$0")/train.py" "$CONFIG" \
  --launcher pytorch "${@:3}"
