#!/usr/bin/env bash
# Create .venv with the CPU build of torch and semdiff (editable) with its test/train/emoji extras.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check"
# Pin torch first: an unpinned torch would pull a multi-GB CUDA build; 2.13.0 has a CPU wheel here.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    $PIP install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
$PIP install -q -e ".[test,emoji,train]"
