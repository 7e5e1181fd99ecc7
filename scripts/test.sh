#!/usr/bin/env bash
# Set up and run the linter and the test suite (the README's test command; CI runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff check monai_patchplug tests benchmarks tutorials
.venv/bin/python -m pytest -q "$@"
