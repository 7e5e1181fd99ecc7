"""The demo, the benchmarks and the tutorials run (on small inputs) and print what they promise."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from stats import assert_counts_follow

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"[-+]?\d*\.?\d+(?:e[-+]?\d+)?"


def run(*args: str, env: dict[str, str] | None = None) -> str:
    full_env = {**os.environ, **(env or {})}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=full_env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def printed(pattern: str, out: str) -> re.Match:
    """The first line of ``out`` that matches ``pattern``, which must be there."""
    match = re.search(pattern, out, re.MULTILINE)
    assert match, f"{pattern!r} not in the output:\n{out[-3000:]}"
    return match


def printed_array(pattern: str, out: str) -> np.ndarray:
    """The numbers in brackets after ``pattern`` (a printed numpy array)."""
    return np.asarray(printed(pattern + r"\s*\[([^\]]*)\]", out).group(1).split(), dtype=float)


def assert_rounded_frequencies_follow(frequencies, probabilities, n: int) -> None:
    """Printed frequencies (rounded to 3 decimals) of ``n`` draws within the Chernoff interval of ``stats``."""
    assert abs(sum(frequencies) - 1) < 0.002 * len(frequencies)
    assert_counts_follow(np.asarray(frequencies) * n, probabilities, rounding=0.0005)


def test_demo_prints_locations_and_frequencies():
    """Label 0 is requested with 0.1 / 1.9: 2,000 patches tell a frequency of 0.053 from 0 (or from 0.1) with a
    false-alarm rate of 1e-6."""
    n = 2000
    out = run("tutorials/demo_label_sampling.py", "--samples", str(n))
    assert f"{n} patches of shape (1, 32, 32, 32)" in out
    locations = re.findall(r"^\s+\[(\d+), (\d+), (\d+), (\d+), (\d+), (\d+)\]$", out, re.MULTILINE)
    assert len(locations) == 5
    for box in np.asarray(locations, dtype=int):
        assert (box[3:] - box[:3] == 32).all() and (box[:3] >= 0).all() and (box[3:] <= (96, 96, 64)).all()
    rows = re.findall(rf"^\s*(\d)\s+({NUMBER})\s+({NUMBER})$", out, re.MULTILINE)
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3]
    requested = np.asarray([0.1, 0.8, 0.4, 0.6]) / 1.9
    np.testing.assert_allclose([float(r[1]) for r in rows], requested, atol=0.0005)
    assert_rounded_frequencies_follow([float(r[2]) for r in rows], requested, n)
    assert "a batch of four image patches: (4, 1, 32, 32, 32)" in out


def markdown_tables(out: str) -> list[list[list[str]]]:
    """The markdown tables of ``out``: each a list of rows (header first, separator dropped) of stripped cells."""
    tables, current, separated = [], None, False
    for line in out.splitlines() + [""]:
        if line.startswith("|") and line.rstrip().endswith("|"):
            cells = [c.strip() for c in line.strip()[1:-1].split("|")]
            if current is None:
                current, separated = [cells], False
            elif not separated:
                assert all(re.fullmatch(r":?-{3,}:?", c) for c in cells), f"no separator under {current[0]}"
                assert len(cells) == len(current[0]), line
                separated = True
            else:
                current.append(cells)
        elif current is not None:
            tables.append(current)
            current = None
    return tables


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")))
def test_benchmark_quick_mode_prints_markdown_tables_of_timings(script):
    """Every table is well formed (header, separator, rows of the header's width) and every row holds a positive
    finite number (a time, a speed or a ratio)."""
    out = run(f"benchmarks/{script}", "--quick")
    tables = markdown_tables(out)
    assert tables, out[-3000:]
    for header, *rows in tables:
        assert rows, header
        for row in rows:
            assert len(row) == len(header), (header, row)
            numbers = [float(m) for cell in row for m in re.findall(NUMBER, cell)]
            assert any(np.isfinite(v) and v > 0 for v in numbers), (header, row)


def assert_tutorial_01(out: str) -> None:
    """Three samplers' first locations, LabelSampler's frequencies for 400 draws, a batch, a queue epoch, a loss."""
    for name in ("UniformSampler", "WeightedSampler (GM map)", "LabelSampler"):
        printed(rf"^{re.escape(name)}\s+first location \[\d+, \d+, \d+, \d+, \d+, \d+\]$", out)
    assert_rounded_frequencies_follow(printed_array("obtained:", out), [0.1, 0.2, 0.4, 0.3], 400)
    assert "batch image (8, 1, 16, 16, 16) locations (8, 6)" in out  # 2 volumes of 4 patches
    assert "32 patches per epoch; 32 delivered" in out
    first, last = map(float, printed(rf"loss: first ({NUMBER}), last ({NUMBER})", out).groups())
    assert last < first
    assert "saved unet_fast.pt" in out


def assert_tutorial_02(out: str) -> None:
    """MONAI's arguments give MONAI's output; a row per inferer in the timing table; a Dice per class."""
    assert "input (1, 1, 50, 59, 48)" in out
    assert float(printed(rf"max \|GridInferer - SlidingWindowInferer\| = ({NUMBER})", out).group(1)) < 1e-5
    ((header, *rows),) = markdown_tables(out)
    assert header == ["inferer", "time (s)", "peak above output (MiB)"]
    assert [r[0] for r in rows] == [
        "GridInferer hann",
        "GridInferer average",
        "SlidingWindowInferer gaussian",
        "SlidingWindowInferer constant",
    ]
    assert all(float(r[1]) > 0 and float(r[2]) >= 0 for r in rows)
    dice = printed(r"Dice per class: \{0: (\S+), 1: (\S+), 2: (\S+), 3: (\S+)\}", out).groups()
    assert all(0 <= float(d) <= 1 for d in dice)


def assert_tutorial_04(out: str) -> None:
    """MONAI's cropper and ours, one config: both follow the requested ratios (400 draws); the inferers agree."""
    requested = printed_array("requested:", out)
    np.testing.assert_allclose(requested, [0.1, 0.2, 0.4, 0.3])
    for who in ("MONAI", "ours"):
        assert_rounded_frequencies_follow(printed_array(rf"^\s*{who}: centre-label frequencies", out), requested, 400)
    assert float(printed(rf"max \|GridInferer - SlidingWindowInferer\| = ({NUMBER})", out).group(1)) < 1e-5


def assert_tutorial_05(out: str) -> None:
    """A group of one process runs every patch; sharded, single-process and ``dst`` outputs agree."""
    assert "rank 0 of 1" in out
    ran, total = map(int, printed(r"rank 0: ran (\d+) of (\d+) patches", out).groups())
    assert ran == total == 4 * 3 * 3  # 64 x 56 x 48 with 24^3 patches, overlap 8
    assert (
        float(
            printed(rf"sharded output \(1, 3, 64, 56, 48\), max \|sharded - single process\| = ({NUMBER})", out).group(
                1
            )
        )
        < 1e-5
    )
    assert float(printed(rf"rank 0: max \|dst output - single process\| = ({NUMBER})", out).group(1)) < 1e-5


def assert_tutorial_06(out: str) -> None:
    """One process, four Dask parts and a resumed job give the same labels; the resumed job runs fewer patches."""
    assert "4 parts on Dask ([0, 1, 2, 3]): equal to the single run: True" in out
    calls, total = map(
        int, printed(r"resumed: (\d+) network calls instead of (\d+); equal to the single run: True", out).groups()
    )
    assert 0 < calls < total


TUTORIALS = {
    "01_patch_training.py": (
        ["01_sampled_centres.png", "01_label_frequencies.png", "01_training_loss.png"],
        assert_tutorial_01,
    ),
    "02_inference.py": (["02_overlap_modes.png", "02_time_memory.png"], assert_tutorial_02),
    "04_migrating.py": ([], assert_tutorial_04),
    "05_distributed_inference.py": ([], assert_tutorial_05),
    "06_out_of_core.py": ([], assert_tutorial_06),
}


@pytest.mark.parametrize("script", sorted(TUTORIALS))
def test_tutorial_prints_what_it_promises_and_draws_its_figures(script, tmp_path):
    out = run(f"tutorials/{script}", env={"MPP_TUTORIAL_FAST": "1", "MPP_TUTORIAL_FIGURES": str(tmp_path)})
    figures, check = TUTORIALS[script]
    check(out)
    for figure in figures:
        assert (tmp_path / figure).stat().st_size > 1000


def test_every_tutorial_is_tested():
    scripts = {p.name for p in (ROOT / "tutorials").glob("[0-9]*.py")}
    assert scripts == set(TUTORIALS)
