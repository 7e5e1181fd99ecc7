"""The demo and the benchmarks run (on small inputs) and print what they promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, env: dict[str, str] | None = None) -> str:
    full_env = {**os.environ, **(env or {})}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=full_env)
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


TUTORIAL_FIGURES = {
    "01_patch_training.py": ["01_sampled_centres.png", "01_label_frequencies.png", "01_training_loss.png"],
    "02_inference.py": ["02_overlap_modes.png", "02_time_memory.png"],
    "04_migrating.py": [],
    "05_distributed_inference.py": [],
}


@pytest.mark.parametrize("script", sorted(TUTORIAL_FIGURES))
def test_tutorial_runs_and_draws_its_figures(script, tmp_path):
    run(f"tutorials/{script}", env={"MPP_TUTORIAL_FAST": "1", "MPP_TUTORIAL_FIGURES": str(tmp_path)})
    for figure in TUTORIAL_FIGURES[script]:
        assert (tmp_path / figure).stat().st_size > 1000


def test_every_tutorial_is_tested():
    scripts = {p.name for p in (ROOT / "tutorials").glob("[0-9]*.py")}
    assert scripts == set(TUTORIAL_FIGURES)
