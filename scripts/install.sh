#!/usr/bin/env bash
# Install personabot into .venv (created if missing). Usage: scripts/install.sh [dev]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first: on CPU machines the 2.13.0 CPU wheel; a bare `torch` would pull GBs of CUDA packages.
# On a GPU host set PERSONABOT_TORCH="torch" (or a CUDA build) before running this.
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "${PERSONABOT_TORCH:-torch==2.13.0}"
fi
if [ "${1:-}" = "dev" ]; then
  python -m pip install -q -e '.[dev]'
else
  python -m pip install -q -e .
fi
