#!/usr/bin/env bash
# Create .venv and install octavcal with its test and report extras. Idempotent and quick when done.
# Torch: OCTAVCAL_TORCH overrides what is installed when torch is missing (default: the CPU build
# 2.13.0 that CI uses; GPU users install their own CUDA build first and keep it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "${OCTAVCAL_TORCH:-torch==2.13.0}"
fi
stamp=.venv/.octavcal-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q -e '.[test,report]'
  touch "$stamp"
fi
