"""Volumes larger than memory: lazy inputs, parts that write their own rows, resume markers, coarse masks (issue 15)."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import monai_patchplug as mpp
from monai_patchplug.inference.parts import remaining_rows

MODES = ["crop", "average", "hann", "gaussian"]


def pointwise(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x * x, x * 3 - 1, -x], 1)


class CountingArray:
    """An array-like test double: reads are counted (total bytes, largest single read, first-axis rows)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape, self.dtype = array, array.shape, array.dtype
        self.bytes, self.largest, self.rows = 0, 0, []

    def __getitem__(self, index):
        block = self.array[index]
        self.bytes += block.nbytes
        self.largest = max(self.largest, block.nbytes)
        rows = index[2] if len(index) > 2 else slice(None)
        self.rows.append((rows.start, rows.stop))
        return block


@settings(max_examples=30, deadline=None)
@given(
    shape=st.tuples(st.integers(6, 30), st.integers(3, 14), st.integers(3, 12)),
    mode=st.sampled_from(MODES),
    padding=st.sampled_from([None, 0, 1.5, "reflect", "edge", "symmetric", "wrap"]),
    batch=st.integers(1, 7),
)
def test_a_lazy_input_gives_the_in_memory_result_reading_each_voxel_about_once(shape, mode, padding, batch):
    x = np.random.default_rng(0).random((2, 2, *shape), dtype=np.float32)
    counted = CountingArray(x)
    inferer = mpp.GridInferer(6, 2, mode, batch_size=batch, padding_mode=padding)
    got = inferer(counted, pointwise)
    torch.testing.assert_close(got, inferer(torch.from_numpy(x), pointwise))
    assert counted.bytes <= 1.1 * x.nbytes + 2 * 6 * x[0].nbytes / shape[0]  # reflect/wrap borders reread a few rows
    rows_per_read = 6 + 2 * 2  # a row of patches (6 rows) and what a batch spanning two rows adds
    assert counted.largest <= rows_per_read * x.nbytes / (2 * shape[0])


def test_lazy_inputs_read_row_by_row_in_grid_order():
    x = np.random.default_rng(1).random((1, 1, 60, 9, 8), dtype=np.float32)
    counted = CountingArray(x)
    mpp.GridInferer(8, 2, "hann", batch_size=2)(counted, pointwise)
    starts = [a for a, _ in counted.rows]
    assert starts == sorted(starts) and len(starts) >= 60 // 8  # forward only, a few rows at a time
    assert counted.bytes == x.nbytes  # no padding: each voxel read exactly once


def test_memmap_and_lazy_batch_inputs(tmp_path):
    x = np.random.default_rng(2).random((20, 14, 12), dtype=np.float32)
    expected = mpp.GridInferer(8, 2, "hann")(torch.from_numpy(x)[None, None], pointwise)
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=(1, 1, 20, 14, 12))
    mm[:] = x[None, None]
    torch.testing.assert_close(mpp.GridInferer(8, 2, "hann")(mm, pointwise), expected)
    torch.testing.assert_close(mpp.GridInferer(8, 2, "hann")(mpp.lazy_batch(x), pointwise), expected)
    last = np.stack([x, 2 * x], -1)  # (*spatial, C)
    both = mpp.GridInferer(8, 2, "hann")(torch.from_numpy(np.stack([x, 2 * x]))[None], pointwise)
    torch.testing.assert_close(mpp.GridInferer(8, 2, "hann")(mpp.lazy_batch(last, channel_dim=-1), pointwise), both)


def test_lazy_batch_refuses_what_is_no_array():
    with pytest.raises(TypeError, match=r"lazy_batch: array must have shape, dtype and slicing, got list"):
        mpp.lazy_batch([[1.0]])
    with pytest.raises(ValueError, match=r"lazy_batch: channel_dim 3 is outside the array's 3 axes"):
        mpp.lazy_batch(np.zeros((4, 4, 4)), channel_dim=3)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_parts_write_only_their_rows_and_together_equal_one_run(mode, n):
    x = np.random.default_rng(3).random((2, 1, 29, 10, 9), dtype=np.float32)
    expected = mpp.GridInferer(6, 2, mode, batch_size=3)(torch.from_numpy(x), pointwise)
    out = torch.full((2, 3, 29, 10, 9), float("nan"))
    for k in range(n):
        counted = CountingArray(x)
        before = out.clone()
        mpp.GridInferer(6, 2, mode, batch_size=3, output=out, part=(k, n))(counted, pointwise)
        a, b = k * 29 // n, (k + 1) * 29 // n
        changed = ~torch.isclose(out, before, equal_nan=True)
        assert not changed[:, :, :a].any() and not changed[:, :, b:].any()  # only its rows
        assert min(lo for lo, _ in counted.rows) >= max(a - 6, 0) and max(hi for _, hi in counted.rows) <= b + 6
    if mode == "crop":
        assert torch.equal(out, expected)
    torch.testing.assert_close(out, expected)


def _run_part(path: str, k: int, n: int) -> None:
    torch.set_num_threads(1)
    x = np.load(Path(path) / "x.npy")
    out = np.load(Path(path) / "out.npy", mmap_mode="r+")
    mpp.GridInferer(6, 2, "hann", output=out, part=(k, n))(torch.from_numpy(x), pointwise)
    out.flush()


def test_parts_in_separate_processes_fill_one_memmap(tmp_path):
    x = np.random.default_rng(4).random((1, 1, 26, 11, 9), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=np.float32, shape=(1, 3, 26, 11, 9))
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_run_part, args=(str(tmp_path), k, 2)) for k in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    expected = mpp.GridInferer(6, 2, "hann")(torch.from_numpy(x), pointwise)
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "out.npy")), expected)


class Killed(Exception):
    pass


def test_resume_runs_only_what_a_killed_run_left(tmp_path):
    x = torch.rand(1, 1, 40, 10, 9)
    expected = mpp.GridInferer(6, 2, "hann", batch_size=2)(x, pointwise)
    out = torch.zeros(1, 3, 40, 10, 9)
    calls = {"n": 0}

    def dies_after(limit: int):
        def net(p: torch.Tensor) -> torch.Tensor:
            calls["n"] += 1
            if calls["n"] > limit:
                raise Killed
            return pointwise(p)

        return net

    markers = tmp_path / "labels.done"
    total = -(-mpp.GridInferer(6, 2).geometry((40, 10, 9)).num_patches // 2)
    with pytest.raises(Killed):
        mpp.GridInferer(6, 2, "hann", batch_size=2, output=out, resume=str(markers))(x, dies_after(total // 2))
    done = sorted(json.loads(p.read_text())["rows"][0] for p in markers.glob("item0_rows*.json"))
    assert 0 < len(done) and max(done) < 40
    calls["n"] = 0
    mpp.GridInferer(6, 2, "hann", batch_size=2, output=out, resume=str(markers))(x, dies_after(10**6))
    assert 1 <= calls["n"] < total  # the probe and the unfinished slabs' patches only
    torch.testing.assert_close(out, expected)
    calls["n"] = 0
    mpp.GridInferer(6, 2, "hann", batch_size=2, output=out, resume=str(markers))(x, dies_after(10**6))
    assert calls["n"] == 1  # everything marked: only the probe that shapes the sinks
    with pytest.raises(ValueError, match=r"resume=.* holds markers of another job \(differs in overlap_mode\)"):
        mpp.GridInferer(6, 2, "average", batch_size=2, output=out, resume=str(markers))(x, pointwise)


def test_remaining_rows():
    assert remaining_rows((0, 10), [(2, 4), (6, 7)]) == [(0, 2), (4, 6), (7, 10)]
    assert remaining_rows((3, 8), [(0, 10)]) == []
    assert remaining_rows((3, 8), []) == [(3, 8)]


@pytest.mark.parametrize("factors", [(1, 1, 1), (2, 3, 1), (4, 4, 4)])
def test_a_coarse_mask_selects_the_patches_of_its_upsampled_mask(factors):
    rng = np.random.default_rng(5)
    coarse = rng.random((6, 4, 5)) > 0.85
    full = coarse.repeat(factors[0], 0).repeat(factors[1], 1).repeat(factors[2], 2)
    x = torch.rand(1, 1, *full.shape)
    seen: dict[str, int] = {}

    def counting(p: torch.Tensor) -> torch.Tensor:
        seen["n"] = seen.get("n", 0) + p.shape[0]
        return pointwise(p)

    got = mpp.GridInferer(5, 2, "hann", roi_mask=torch.from_numpy(coarse), fill_value=-2.0)(x, counting)
    coarse_calls, seen["n"] = seen["n"], 0
    expected = mpp.GridInferer(5, 2, "hann", roi_mask=torch.from_numpy(full), fill_value=-2.0)(x, counting)
    assert coarse_calls == seen["n"]
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            {"part": (2, 2), "output": torch.zeros(1, 3, 12, 12, 12)},
            ValueError,
            r"part \(2, 2\) must satisfy 0 <= k < n",
        ),
        ({"part": (0, 2)}, ValueError, r"part= and resume= write into a store: give output= too"),
        ({"part": "0/2", "output": torch.zeros(1, 3, 12, 12, 12)}, TypeError, r"part must be a pair of ints"),
        ({"roi_mask": torch.ones(5, 12, 12)}, ValueError, r"roi_mask of shape \(5, 12, 12\) does not fit"),
    ],
)
def test_bad_out_of_core_arguments_are_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        mpp.GridInferer(6, 2, **kwargs)(torch.rand(1, 1, 12, 12, 12), pointwise)


def test_an_object_without_shape_is_no_input():
    class Rows:
        def __getitem__(self, index):
            return np.zeros(3)

    with pytest.raises(TypeError, match=r"inputs must be a tensor, a numpy array or an array-like .* got Rows"):
        mpp.GridInferer(6, 2)(Rows(), pointwise)


def test_a_padding_mode_that_needs_the_whole_axis_is_refused_for_lazy_inputs():
    counted = CountingArray(np.zeros((1, 1, 12, 12, 12), np.float32))
    with pytest.raises(ValueError, match=r"padding_mode 'mean' needs the whole input"):
        mpp.GridInferer(6, 2, padding_mode="mean")(counted, pointwise)


def test_a_resumed_lazy_run_reads_the_rows_it_skips_to(tmp_path):
    """Resuming skips finished rows: the lazy reader jumps past its slab and must read from the new rows."""
    x = np.random.default_rng(6).random((1, 1, 64, 30, 28), dtype=np.float32)
    expected = mpp.GridInferer(16, 4, "hann", batch_size=4)(torch.from_numpy(x), pointwise)
    out = torch.zeros_like(expected)
    calls = {"n": 0}

    def dies(p: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > 7:
            raise Killed
        return pointwise(p)

    with pytest.raises(Killed):
        mpp.GridInferer(16, 4, "hann", batch_size=4, output=out, resume=str(tmp_path / "m"))(CountingArray(x), dies)
    counted = CountingArray(x)
    mpp.GridInferer(16, 4, "hann", batch_size=4, output=out, resume=str(tmp_path / "m"))(counted, pointwise)
    assert min(a for a, _ in counted.rows[1:]) > 0  # past the probe, it started beyond the first rows
    torch.testing.assert_close(out, expected)
