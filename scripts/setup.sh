#!/usr/bin/env bash
# Create .venv (if missing) and install the package with the extras named in $1 (e.g. "test").
# torch is pinned to the CPU wheel first, so that no dependency pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".${1:+[$1]}"
if [ "${1:-}" = test ]; then
  # The tutorials' real data: the MNI152 template inside the nilearn wheel (its own dependencies are not needed).
  python -m pip install -q --no-deps "nilearn>=0.10"
fi
