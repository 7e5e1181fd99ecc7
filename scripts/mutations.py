"""Mutation testing of the sampling draws, the grid geometry and the blending windows.

Each mutant is one exact source snippet and its replacement, in the first of its candidate files that holds the
snippet. The repository is copied once to a temporary folder (without .venv, .git and caches); each mutant is
written into the copy, the relevant test files run there with ``pytest -x -q`` (the copy's package imported: the
copy is the working directory and PYTHONPATH, which is checked before any mutant runs), and the file is restored.
A mutant is KILLED when a test fails, SURVIVED when all pass, EQUIVALENT when it survives and is marked as
equivalent (with the reason), MISSING when its snippet is in none of its files (the code was refactored: update
the list), ERROR when pytest could not run the tests (e.g. a mutant that breaks the import). Exit status 1 if any
mutant survived or errored.

Run ``bash scripts/mutations.sh`` (all), ``bash scripts/mutations.sh NAME ...`` (some) or ``--list``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IGNORED = (".venv", ".git", "__pycache__", "*.egg-info", ".pytest_cache", ".hypothesis", ".ruff_cache", "build",
           "dist", "_build")
TIMEOUT_S = 900

UNIFORM = ("monai_patchplug/sampling/uniform.py",)
WEIGHTED = ("monai_patchplug/sampling/weighted.py",)
LABEL = ("monai_patchplug/sampling/label.py",)
BASE = ("monai_patchplug/sampling/base.py",)
GRID = ("monai_patchplug/grid.py", "monai_patchplug/sampling/grid.py")
WINDOWS = ("monai_patchplug/inference/windows.py",)
BLEND = ("monai_patchplug/inference/blend.py",)
INDEX = ("monai_patchplug/label_index.py",)
ENSEMBLE = ("monai_patchplug/inference/ensemble.py",)
DISTRIBUTED = ("monai_patchplug/inference/distributed.py",)
QUEUE = ("monai_patchplug/queue.py",)
INPUTS = ("monai_patchplug/inference/inputs.py",)

SAMPLING_TESTS = ("tests/test_label.py", "tests/test_weighted.py", "tests/test_uniform.py", "tests/test_monai_args.py")
GRID_TESTS = ("tests/test_grid.py", "tests/test_aggregator.py", "tests/test_inferer.py")
BLEND_TESTS = ("tests/test_aggregator.py", "tests/test_inferer.py")
INDEX_TESTS = ("tests/test_lazy_sampling.py",)
TTA_TESTS = ("tests/test_tta.py",)


@dataclass(frozen=True)
class Mutant:
    """``old`` replaced by ``new`` in the first of ``files`` that holds it; ``tests`` run in this order."""

    name: str
    files: tuple[str, ...]
    old: str
    new: str
    tests: tuple[str, ...]
    equivalent: str = ""  # why no test can kill it; empty for a mutant that must be killed


MUTANTS = [
    # -- the four deliberate bugs of issue 18, each for the tests of its contract ---------------------------------
    Mutant(
        "label: the probability of absent labels goes to the first present label",
        LABEL,
        "        probs = np.asarray([c.p for c in present], dtype=np.float64)\n",
        "        probs = np.asarray([c.p for c in present], dtype=np.float64)\n"
        "        probs[0] += sum(c.p for c in candidates if not c.present)\n",
        ("tests/test_label.py",),
    ),
    Mutant(
        "label/weighted: a row is drawn uniformly, not in proportion to its mass",
        WEIGHTED,
        "flat_rows = _inverse_cdf(rows.ravel(), n, rng)",
        "flat_rows = _inverse_cdf((rows.ravel() > 0).astype(np.float64), n, rng)",
        ("tests/test_label.py", "tests/test_weighted.py"),
    ),
    Mutant(
        "label: image_threshold also restricts the foreground in pos/neg mode",
        LABEL,
        '        if inside is None or name == "foreground":\n',
        "        if inside is None:\n",
        ("tests/test_monai_args.py",),
    ),
    Mutant(
        "windows: hann_window returns ones",
        WINDOWS,
        "    return torch.sin(n * (math.pi / (size + 1))).square_().to(dtype)",
        "    return torch.ones(size, dtype=dtype, device=device)",
        BLEND_TESTS,
    ),
    # -- sampling draws ---------------------------------------------------------------------------------------------
    Mutant(
        "uniform: the last valid corner is never drawn",
        UNIFORM,
        "self.R.randint(0, shape - size + 1, size=(n, len(spatial_shape)))",
        "self.R.randint(0, shape - size, size=(n, len(spatial_shape)))",
        SAMPLING_TESTS[2:],
    ),
    Mutant(
        "uniform: corners drawn for the wrong axes",
        UNIFORM,
        "self.R.randint(0, shape - size + 1, size=(n, len(spatial_shape)))",
        "self.R.randint(0, shape - size + 1, size=(n, len(spatial_shape)))[:, ::-1]",
        SAMPLING_TESTS[2:],
    ),
    Mutant(
        "uniform: random_center=False rounds the centre crop the other way",
        UNIFORM,
        "np.tile(shape // 2 - size // 2, (n, 1))",
        "np.tile((shape - size) // 2, (n, 1))",
        SAMPLING_TESTS[2:],
    ),
    Mutant(
        "weighted: the voxel within a row ignores the weights",
        WEIGHTED,
        "within = np.cumsum(np.divide(picked, picked.max(1, keepdims=True), dtype=np.float64), axis=1)",
        "within = np.cumsum(np.divide(picked > 0, 1.0, dtype=np.float64), axis=1)",
        SAMPLING_TESTS,
    ),
    Mutant(
        "weighted: rows unravelled with the axes reversed",
        WEIGHTED,
        "row_index = np.unravel_index(flat_rows, weights.shape[:-1])",
        "row_index = np.unravel_index(flat_rows, weights.shape[:-1][::-1])",
        SAMPLING_TESTS,
    ),
    Mutant(
        "valid centres: the last valid centre of an even patch is left out",
        BASE,
        "slice(p // 2, s - (p - 1) // 2)",
        "slice(p // 2, s - p // 2)",
        SAMPLING_TESTS,
    ),
    Mutant(
        "valid centres: corner and centre off by one for even patches",
        BASE,
        "slice(p // 2, s - (p - 1) // 2)",
        "slice((p - 1) // 2, s - (p - 1) // 2 - (p + 1) % 2)",
        SAMPLING_TESTS,
    ),
    Mutant(
        "label: the requested probabilities are ignored (classes equally likely)",
        LABEL,
        "chosen = self.R.choice(len(present), size=n, p=probs / probs.sum())",
        "chosen = self.R.choice(len(present), size=n)",
        SAMPLING_TESTS,
    ),
    Mutant(
        "label: a label's voxels include every higher label",
        LABEL,
        "labels[label] != 0 if one_hot else labels[0] == label",
        "labels[label] != 0 if one_hot else labels[0] >= label",
        SAMPLING_TESTS,
    ),
    Mutant(
        "label: default foreground misses label 1",
        LABEL,
        "foreground = (labels[1:] != 0).any(0) if one_hot else labels[0] > 0",
        "foreground = (labels[1:] != 0).any(0) if one_hot else labels[0] > 1",
        SAMPLING_TESTS,
    ),
    Mutant(
        "label: MONAI index lists lose their last valid centre",
        LABEL,
        "(corners <= np.asarray(spatial_shape) - np.asarray(patch_size))",
        "(corners < np.asarray(spatial_shape) - np.asarray(patch_size))",
        SAMPLING_TESTS,
    ),
    Mutant(
        "label: MONAI index lists centred off by one for even patches",
        LABEL,
        "corners = centres - np.asarray(patch_size) // 2",
        "corners = centres - (np.asarray(patch_size) - 1) // 2",
        SAMPLING_TESTS,
    ),
    # -- grid geometry ----------------------------------------------------------------------------------------------
    Mutant(
        "grid: last corner off by one",
        GRID,
        "    last = size - patch\n",
        "    last = size - patch - 1\n",
        GRID_TESTS,
    ),
    Mutant(
        "grid: step between corners one too long",
        GRID,
        "return (*range(0, last, patch - overlap), last)",
        "return (*range(0, last, patch - overlap + 1), last)",
        GRID_TESTS,
    ),
    Mutant(
        "grid: the last corner may repeat",
        GRID,
        "return (*range(0, last, patch - overlap), last)",
        "return (*range(0, last + 1, patch - overlap), last)",
        GRID_TESTS,
    ),
    Mutant(
        "grid: corners of the first axis used on every axis",
        GRID,
        "corners=tuple(axis_corners(s, p, o) for s, p, o in zip(padded, patch_size, patch_overlap)),",
        "corners=tuple(axis_corners(padded[0], patch_size[0], patch_overlap[0]) for _ in padded),",
        GRID_TESTS,
    ),
    Mutant(
        "grid: crop ownership passes to the farther patch",
        GRID,
        "return tuple((a + b + patch) // 2 for a, b in zip(corners[:-1], corners[1:]))",
        "return tuple((a + b + patch) // 2 + 1 for a, b in zip(corners[:-1], corners[1:]))",
        GRID_TESTS,
    ),
    Mutant(
        "grid: crop ownership boundary rounded up",
        GRID,
        "return tuple((a + b + patch) // 2 for a, b in zip(corners[:-1], corners[1:]))",
        "return tuple((a + b + patch + 1) // 2 for a, b in zip(corners[:-1], corners[1:]))",
        GRID_TESTS,
        equivalent="the boundary moves only when a + b + P is odd; the voxel it moves is then equally far from both "
        "patch centres, and the contract lets such ties go either way (crop stays exact: both patches hold it)",
    ),
    Mutant(
        "grid: border padding forgotten",
        GRID,
        "margin = o // 2 if pad_border else 0",
        "margin = 0",
        GRID_TESTS,
    ),
    # -- blending windows -------------------------------------------------------------------------------------------
    Mutant(
        "windows: hann sampled from 0, a zero weight at the first voxel",
        WINDOWS,
        "n = torch.arange(1, size + 1, dtype=torch.float64, device=device)",
        "n = torch.arange(0, size, dtype=torch.float64, device=device)",
        BLEND_TESTS,
    ),
    Mutant(
        "windows: hann period one voxel short",
        WINDOWS,
        "torch.sin(n * (math.pi / (size + 1)))",
        "torch.sin(n * (math.pi / size))",
        BLEND_TESTS,
    ),
    Mutant(
        "windows: gaussian centred half a voxel off",
        WINDOWS,
        "x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2",
        "x = torch.arange(size, dtype=torch.float64, device=device) - size / 2",
        BLEND_TESTS,
    ),
    Mutant(
        "windows: gaussian sigma from size - 1",
        WINDOWS,
        "w = torch.exp(-0.5 * (x / (sigma_scale * size)) ** 2)",
        "w = torch.exp(-0.5 * (x / (sigma_scale * (size - 1))) ** 2)",
        BLEND_TESTS,
    ),
    Mutant(
        "windows: gaussian floor absolute, not relative to the peak",
        WINDOWS,
        "w.clamp_(min=floor * float(w.max()))",
        "w.clamp_(min=floor)",
        BLEND_TESTS,
    ),
    Mutant(
        "windows: the normaliser drops the last patch",
        WINDOWS,
        "torch.as_tensor(list(starts), dtype=torch.int64, device=window.device)",
        "torch.as_tensor(list(starts)[:-1], dtype=torch.int64, device=window.device)",
        BLEND_TESTS,
    ),
    Mutant(
        "windows: the normaliser places each window reversed",
        WINDOWS,
        "index = index + torch.arange(q, device=window.device)",
        "index = index + torch.arange(q, device=window.device).flip(0)",
        BLEND_TESTS,
        equivalent="every window of the package (constant, hann, gaussian) is symmetric, so a reversed window is the "
        "same window (up to the last bit of sin/exp in float64, far below any tolerance)",
    ),
    Mutant(
        "windows: constant weights of 2",
        WINDOWS,
        "return torch.ones(size, dtype=dtype, device=device)",
        "return torch.full((size,), 2.0, dtype=dtype, device=device)",
        BLEND_TESTS,
    ),
    # -- the separable normalisation, and the half-precision path -----------------------------------------------
    Mutant(
        "blend: the normaliser of the other axes leaves out the last axis",
        BLEND,
        "self.inv_rows, self.inv_plane = inv[0], outer_window(inv[1:]) if len(inv) > 1 else None",
        "self.inv_rows, self.inv_plane = inv[0], outer_window(inv[1:-1] or inv[1:]) if len(inv) > 1 else None",
        BLEND_TESTS,
    ),
    Mutant(
        "blend: the normalisation's factors of a chunk start at the slab's first row",
        BLEND,
        "torch.mul(inv_rows[a:b].view(shape), plane, out=factor[: b - a])",
        "torch.mul(inv_rows[: b - a].view(shape), plane, out=factor[: b - a])",
        BLEND_TESTS,
    ),
    Mutant(
        "blend: a slab is normalised with the volume's first rows",
        BLEND,
        "inv_rows = self.inv_rows[base : base + rows].to(out.dtype)",
        "inv_rows = self.inv_rows[:rows].to(out.dtype)",
        BLEND_TESTS + ("tests/test_scale_out.py",),
    ),
    Mutant(
        "inferer: half-precision volumes are blended in half precision",
        ("monai_patchplug/inference/inferer.py",),
        'dtype = held if held.itemsize >= 4 or self.overlap_mode == "crop" else torch.float32',
        "dtype = held",
        ("tests/test_tta.py",),
    ),
    # -- the label index ---------------------------------------------------------------------------------------------
    Mutant(
        "label index: the draw picks a run uniformly, then a voxel in it (not every voxel alike)",
        INDEX,
        "    u = rng.randint(0, int(ends[-1]), size=k).astype(np.int64)\n"
        '    run = np.searchsorted(ends, u, side="right")\n',
        "    run = rng.randint(0, lengths.size, size=k)\n"
        "    u = ends[run] - lengths[run] + rng.randint(0, 1 << 30, size=k) % lengths[run]\n",
        INDEX_TESTS,
    ),
    Mutant(
        "label index: membership holds the voxel after a run's end",
        INDEX,
        "return (run >= 0) & (flat < starts[safe] + lengths[safe])",
        "return (run >= 0) & (flat <= starts[safe] + lengths[safe])",
        INDEX_TESTS,
    ),
    Mutant(
        "label index: a run clipped to the valid centres keeps its old start",
        INDEX,
        "return rows[keep] * width + first[keep], (last - first)[keep]",
        "return rows[keep] * width + cols[keep], (last - first)[keep]",
        INDEX_TESTS,
    ),
    Mutant(
        "label index: the builder lets a run cross a row",
        INDEX,
        "    change[:, 0] = True  # a run never crosses a row\n",
        "    change[:, 0] = True  # a run never crosses a row\n"
        "    change[1:, 0] = rows[1:, 0] != rows[:-1, -1]\n",
        INDEX_TESTS,
    ),
    Mutant(
        "label index: the slab-wise build forgets the slab's offset",
        INDEX,
        "parts.append((_narrow(starts + offset, size), _narrow(lengths, width), values))",
        "parts.append((_narrow(starts, size), _narrow(lengths, width), values))",
        INDEX_TESTS,
    ),
    Mutant(
        "label index: the cap keeps each label's first runs, not a random subset",
        INDEX,
        "keys = np.random.default_rng(_CAP_SEED).random(group.size)",
        "keys = np.zeros(group.size)",
        INDEX_TESTS,
    ),
    # -- mirroring, sharded gather, the queue of locations ------------------------------------------------------------
    Mutant(
        "mirroring: each result weighs as much as the whole mean (no 1/2^k)",
        ENSEMBLE,
        "scale = weight / len(self.flips)",
        "scale = weight",
        TTA_TESTS,
    ),
    Mutant(
        "mirroring: a patch's outputs are flipped back along the axis before the right one",
        ENSEMBLE,
        "patch_dims = [d - 1 for d in dims]",
        "patch_dims = [d - 2 for d in dims]",
        TTA_TESTS,
    ),
    Mutant(
        "sharded gather: a receiving rank puts every rank's rows where its own rows go",
        DISTRIBUTED,
        "part = volume[:, :, share(n_rows, k, world)] if receiving else volume",
        "part = volume[:, :, share(n_rows, me, world)] if receiving else volume",
        ("tests/test_scale_out.py",),
    ),
    Mutant(
        "memmap views: the rows a row of patches has passed are never released",
        INPUTS,
        "        self.release(item, r0)\n        self._low[item]",
        "        self._low[item]",
        ("tests/test_out_of_core.py",),
    ),
    Mutant(
        "memmap views: rows asked for out of order are not released later",
        INPUTS,
        "self._low[item] = min(self._low.get(item, r0), r0)",
        "self._low.setdefault(item, r0)",
        ("tests/test_out_of_core.py",),
    ),
    Mutant(
        "memmap views: rows served again are counted again",
        INPUTS,
        "        seen = self._viewed.get(item, r0)",
        "        seen = r0",
        ("tests/test_out_of_core.py",),
    ),
    Mutant(
        "queue: a patch of a volume on disk is read when drawn, not when yielded",
        QUEUE,
        "            if _deferrable(volume, drawn):",
        "            if False:",
        ("tests/test_queue.py",),
    ),
]


def copy_repository(into: Path) -> Path:
    """Copy the repository (without the virtual environment, git data and caches) to ``into / 'repo'``."""
    target = into / "repo"
    shutil.copytree(ROOT, target, ignore=shutil.ignore_patterns(*IGNORED), symlinks=True)
    return target


def environment(copy: Path) -> dict[str, str]:
    """The copy first on the path; no bytecode, so a mutant of the same size and second is never read stale."""
    return {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}


def check_imports_the_copy(copy: Path) -> None:
    """Exit unless ``import monai_patchplug`` in the copy, as pytest runs there, loads the copy's package."""
    done = subprocess.run(
        [sys.executable, "-c", "import monai_patchplug; print(monai_patchplug.__file__)"],
        cwd=copy, env=environment(copy), capture_output=True, text=True,
    )
    where = Path(done.stdout.strip() or "?").resolve()
    if done.returncode != 0 or copy.resolve() not in where.parents:
        sys.exit(f"mutations: the copy's package is not the one imported (got {where}): {done.stderr[-2000:]}")
    print(f"mutations: testing the copy in {copy} (imports {where})")


def run_tests(copy: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    """``(pytest exit status, output)`` of ``tests`` in the copy, stopping at the first failure; -1 on timeout."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--hypothesis-seed=0", *tests]
    try:
        done = subprocess.run(command, cwd=copy, env=environment(copy), capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {TIMEOUT_S} s"
    return done.returncode, done.stdout + done.stderr


def locate(copy: Path, mutant: Mutant) -> tuple[Path | None, int]:
    """The first candidate file holding the snippet, and how often it occurs there (0: in none)."""
    for name in mutant.files:
        path = copy / name
        if path.exists():
            count = path.read_text().count(mutant.old)
            if count:
                return path, count
    return None, 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="run only the mutants whose name contains one of these")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.names or any(n in m.name for n in args.names)]
    if args.list or not chosen:
        for m in MUTANTS:
            print(f"{m.name}{'  [equivalent]' if m.equivalent else ''}")
        return 0 if chosen else 2
    results: dict[str, list[str]] = {k: [] for k in ("KILLED", "SURVIVED", "EQUIVALENT", "MISSING", "ERROR")}
    with tempfile.TemporaryDirectory(prefix="mpp-mutations-") as tmp:
        copy = copy_repository(Path(tmp))
        check_imports_the_copy(copy)
        baseline = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        status, output = run_tests(copy, baseline)
        if status != 0:
            print(output[-4000:])
            sys.exit(f"mutations: the unmutated tests fail in the copy ({' '.join(baseline)}); fix them first")
        for index, mutant in enumerate(chosen, 1):
            path, count = locate(copy, mutant)
            head = f"[{index:2}/{len(chosen)}]"
            if path is None or count > 1:
                why = "snippet not found" if path is None else f"snippet found {count} times in {path.name}"
                results["MISSING" if path is None else "ERROR"].append(mutant.name)
                print(f"{head} {'MISSING' if path is None else 'ERROR':<10} {mutant.name} ({why})")
                continue
            original = path.read_text()
            path.write_text(original.replace(mutant.old, mutant.new))
            begin = time.perf_counter()
            try:
                status, output = run_tests(copy, mutant.tests)
            finally:
                path.write_text(original)
            seconds = time.perf_counter() - begin
            if status in (1, -1):
                failed = re.search(r"^FAILED (\S+)", output, re.MULTILINE)
                by = failed.group(1) if failed else output.strip().splitlines()[-1]
                verdict, detail = "KILLED", f"by {by}"
                if mutant.equivalent:
                    detail += " (marked equivalent: revisit the note)"
            elif status == 0:
                verdict = "EQUIVALENT" if mutant.equivalent else "SURVIVED"
                passed = re.search(r"(\d+) passed", output)
                detail = f"{passed.group(1) if passed else 'all'} tests of {' '.join(mutant.tests)} passed"
                detail += f"; equivalent: {mutant.equivalent}" if mutant.equivalent else ""
            else:
                verdict, detail = "ERROR", f"pytest exit status {status}: {output.strip().splitlines()[-1:]}"
            results[verdict].append(mutant.name)
            print(f"{head} {verdict:<10} {mutant.name} [{path.relative_to(copy)}, {seconds:.0f} s]: {detail}",
                  flush=True)
    print("\nsummary: " + ", ".join(f"{len(v)} {k.lower()}" for k, v in results.items()) + f" of {len(chosen)}")
    for verdict in ("SURVIVED", "MISSING", "ERROR"):
        for name in results[verdict]:
            print(f"  {verdict}: {name}")
    return 1 if results["SURVIVED"] or results["ERROR"] else 0


if __name__ == "__main__":
    sys.exit(main())
