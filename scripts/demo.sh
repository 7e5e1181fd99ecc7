#!/usr/bin/env bash
# Set up and run the label-sampling demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python tutorials/demo_label_sampling.py
