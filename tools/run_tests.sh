#!/usr/bin/env bash
# Set up the environment (idempotent, see tools/setup_env.sh) and run the test
# suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
exec "${PYTHON:-python3}" -m pytest "$@"
