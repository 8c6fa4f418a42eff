#!/usr/bin/env bash
# Set up (if needed) and run the offline demo on the bundled model; writes demo.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 exec .venv/bin/python examples/demo.py "$@"
