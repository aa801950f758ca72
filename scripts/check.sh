#!/usr/bin/env bash
# Format check, lint, types and tests in one go (after scripts/bootstrap.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/pip install -q ruff mypy
.venv/bin/ruff format --check octavcal tests benchmarks sample_models examples
.venv/bin/ruff check octavcal tests benchmarks sample_models examples
.venv/bin/mypy octavcal --ignore-missing-imports
.venv/bin/python -m pytest "$@"
