#!/usr/bin/env bash
# Build the documentation into docs/_build/html with warnings as errors (-E: every page re-read, so no warning
# hides in an unchanged page). Needs no network.
# Uses .venv (bash scripts/setup.sh test installs Sphinx and the theme) or the python on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
"$python" -m sphinx -b html -E -W --keep-going -q -d docs/_build/doctrees docs docs/_build/html "$@"
echo "docs: $(pwd)/docs/_build/html/index.html"
