#!/usr/bin/env bash
# Mutation testing of the sampling draws, the grid geometry and the blending windows: each mutant in
# scripts/mutations.py is applied to a temporary copy of the repository and the relevant tests run there.
# Prints KILLED/SURVIVED/EQUIVALENT/MISSING/ERROR per mutant and a summary; exits 1 if a mutant survived.
# Usage: bash scripts/mutations.sh [--list] [NAME ...]   (a few minutes; not part of CI; PYTHON=... picks the
# interpreter, .venv/bin/python by default)
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" scripts/mutations.py "$@"
