"""The demo and the benchmarks run (on small inputs) and print what they promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_demo_prints_locations_and_frequencies():
    out = run("tutorials/demo_label_sampling.py", "--samples", "300")
    assert "300 patches of shape (1, 32, 32, 32)" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and len(line.split()) == 3]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3]
    for _, requested, obtained in rows:
        assert abs(float(requested) - float(obtained)) < 0.1


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")))
def test_benchmark_quick_mode(script):
    out = run(f"benchmarks/{script}", "--quick")
    assert "|" in out
