#!/usr/bin/env bash
# Install the project and its test extra, then build the C++ kernels (and the CUDA ones where a GPU is present)
# into torch's extension cache (TORCH_EXTENSIONS_DIR when set), so the first run does not pay for the compile.
# Torch is installed only when missing: torch==2.13.0 is the CPU build these machines hold locally; any other torch
# already on the machine is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[test]"
"$PY" -c "from kernels.build import cpu_extension, cuda_extension; cpu_extension(); cuda_extension()"
