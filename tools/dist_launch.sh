# Sourced by dist_train.sh and dist_test.sh: torchrun_cmd NPROC SCRIPT ARGS...
# runs torchrun (as `$PYTHON -m torch.distributed.run`, so the interpreter
# that has mmcd is the one used). One node and no PORT: the standalone
# rendezvous on a free port; otherwise NNODES, NODE_RANK, MASTER_ADDR, PORT.
torchrun_cmd() {
  local nproc=$1
  shift
  local rdzv
  if [ "${NNODES:-1}" = 1 ] && [ -z "${PORT:-}" ]; then
    rdzv=(--standalone)
  else
    rdzv=(--nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}"
          --master_addr="${MASTER_ADDR:-127.0.0.1}"
          --master_port="${PORT:-29500}")
  fi
  "${PYTHON:-python3}" -m torch.distributed.run "${rdzv[@]}" \
    --nproc_per_node="$nproc" "$@"
}
