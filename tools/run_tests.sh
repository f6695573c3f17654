#!/usr/bin/env bash
# Set up the environment (idempotent, see tools/setup_env.sh) and run the test
# suite. Extra arguments go to pytest.
#
# Two pytest-xdist workers of one thread each (PYTEST_WORKERS, OMP_NUM_THREADS
# override): much of a test's time is single-threaded (process start-up and
# imports, data loading, evaluation), so two workers keep both cores busy; one
# thread each keeps them from oversubscribing the cores. Measured on 2 cores:
# 7 min 13 s against 12 min 28 s for one worker with two threads. --dist
# loadfile keeps a file's tests, and its module-scoped fixtures, on one worker.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "${PYTHON:-python3}" -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
