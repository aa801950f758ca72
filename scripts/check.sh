#!/usr/bin/env bash
# Format check, lint, types and tests in one go (after scripts/bootstrap.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/lint.sh
.venv/bin/python -m pytest "$@"
