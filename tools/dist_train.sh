#!/usr/bin/env bash
# Multi-process training with torchrun:
#   bash tools/dist_train.sh CONFIG NPROC [train.py options]
# NNODES, NODE_RANK, PORT and MASTER_ADDR select a multi-node run. Without CUDA
# the processes use gloo (see mmcd/engine/runner_setup.py).
set -euo pipefail
CONFIG=$1
NPROC=$2
torchrun --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${PORT:-29500}" \
  --nproc_per_node="$NPROC" "$(dirname "$0")/train.py" "$CONFIG" \
  --launcher pytorch "${@:3}"
