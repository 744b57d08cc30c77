#!/usr/bin/env bash
# Install the project and its test extra. Torch is installed only when missing: torch==2.13.0 is the CPU build
# these machines hold locally; any other torch already on the machine is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[test]"
