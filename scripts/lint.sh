#!/usr/bin/env bash
# Format check, lint and types, with pinned tool versions (after scripts/bootstrap.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/pip install -q "ruff==0.17.6" "mypy==2.4.1"
.venv/bin/ruff format --check octavcal tests benchmarks sample_models examples
.venv/bin/ruff check octavcal tests benchmarks sample_models examples
.venv/bin/mypy octavcal --ignore-missing-imports
