#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs every check: ruff, mypy --strict, the whole pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
echo "== ruff"
.venv/bin/ruff check src tests benchmarks demo
echo "== mypy --strict src"
.venv/bin/mypy --strict src
echo "== pytest"
.venv/bin/pytest "$@"
