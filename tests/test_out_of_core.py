"""Volumes larger than memory: lazy inputs, parts that write their own rows, resume markers, coarse masks (issue 15)."""

from __future__ import annotations

import json
import mmap
import multiprocessing
import re
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import monai_patchplug as mpp
from monai_patchplug.inference import inputs
from monai_patchplug.inference.parts import remaining_rows

MODES = ["crop", "average", "hann", "gaussian"]


def pointwise(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x * x, x * 3 - 1, -x], 1)


def argmax_u8(slab: torch.Tensor) -> torch.Tensor:
    return slab.argmax(0, keepdim=True).to(torch.uint8)


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


class Pointwise(torch.nn.Module):
    """:func:`pointwise` as a module, so that a forward hook can be registered on it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise(x)


class ChunkedArray(CountingArray):
    """A :class:`CountingArray` that says it is stored in ``chunks`` (one entry per dim), as zarr does."""

    def __init__(self, array: np.ndarray, chunks: tuple[int, ...]) -> None:
        super().__init__(array)
        self.chunks = chunks


@st.composite
def lazy_cases(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(2, 13), min_size=ndim, max_size=ndim)))
    patch = tuple(draw(st.lists(st.integers(1, 7), min_size=ndim, max_size=ndim)))
    overlap = tuple(draw(st.integers(0, p - 1)) for p in patch)
    return (draw(st.integers(1, 2)), draw(st.integers(1, 3)), *shape), patch, overlap


@settings(max_examples=60, deadline=None)
@given(
    case=lazy_cases(),
    mode=st.sampled_from(["crop", "hann"]),
    padding=st.sampled_from(
        [None, 0, 1.5, "constant", "reflect", "edge", "replicate", "symmetric", "wrap", "circular"]
    ),
    batch=st.integers(1, 9),
    hooked=st.booleans(),
    chunks=st.none() | st.lists(st.integers(1, 5), min_size=3, max_size=3),
)
def test_a_lazy_input_gives_exactly_the_in_memory_result(case, mode, padding, batch, hooked, chunks):
    """The slab is overwritten in place as rows of patches advance: batches straddling rows, every padding mode, the
    reused batch buffer and fresh batches (a forward hook), reads cut into chunk-aligned pieces, must all see the
    patches an in-memory input gives."""
    shape, patch, overlap = case
    x = np.random.default_rng(7).random(shape, dtype=np.float32)
    network = Pointwise()
    if hooked:
        network.register_forward_hook(lambda module, args, out: None)
    inferer = mpp.GridInferer(patch, overlap, mode, batch_size=batch, padding_mode=padding)
    try:
        expected = inferer(torch.from_numpy(x), network)
    except ValueError as error:  # a reflect/circular pad wider than the axis
        with pytest.raises(ValueError, match=re.escape(str(error))):
            inferer(CountingArray(x), network)
        return
    counted = CountingArray(x) if chunks is None else ChunkedArray(x, (1, 1, *chunks[: len(shape) - 2]))
    with mock.patch.object(inputs, "PIECE_BYTES", 8 * x.itemsize * shape[1]):  # pieces of a few chunks
        assert torch.equal(inferer(counted, network), expected)
    plain = CountingArray(x)
    inferer(plain, network)
    assert counted.bytes == plain.bytes  # cut into pieces or not, the same voxels are read
    if chunks is not None:  # a read's rows lie in one chunk
        assert all(a // chunks[0] == (b - 1) // chunks[0] for a, b in counted.rows)
    assert torch.equal(inferer(mpp.lazy_batch(x[0, 0]), network), inferer(torch.from_numpy(x[:1, :1]), network))


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


def _tissue_score(x: torch.Tensor) -> torch.Tensor:
    """A 2-D "network" on uint8 RGB patches: one channel in [0, 200]."""
    return x.float().mean(1, keepdim=True) * (200 / 255)


def _labels(slab: torch.Tensor) -> torch.Tensor:
    return slab.round().clamp(0, 255).to(torch.uint8)


def test_a_whole_slide_image_on_disk_reads_only_the_rows_of_its_tissue(tmp_path):
    """A (1, 3, H, W) uint8 memmap, a tissue mask at 1/16 keeping 1/64 of the area, uint8 labels into a memmap."""
    h, w, patch, overlap, fill = 512, 384, 64, 16, 250.0
    rng = np.random.default_rng(8)
    image = np.lib.format.open_memmap(tmp_path / "slide.npy", mode="w+", dtype=np.uint8, shape=(1, 3, h, w))
    image[:] = rng.integers(0, 256, (1, 3, h, w), dtype=np.uint8)
    yy, xx = np.mgrid[: h // 16, : w // 16]
    mask = (yy - 20) ** 2 + (xx - 9) ** 2 <= 4  # a blob of 13 mask voxels: 13 / (32 * 24), about 1/64 of the area
    assert 1 / 80 < mask.mean() < 1 / 50
    kwargs = dict(batch_size=3, roi_mask=torch.from_numpy(mask), fill_value=fill, postprocess=_labels)
    labels = np.lib.format.open_memmap(tmp_path / "labels.npy", mode="w+", dtype=np.uint8, shape=(1, 1, h, w))
    labels[:] = 7
    counted = CountingArray(image)
    mpp.GridInferer(patch, overlap, output=labels, **kwargs)(counted, _tissue_score)
    expected = mpp.GridInferer(patch, overlap, **kwargs)(torch.from_numpy(np.array(image)), _tissue_score)
    assert np.array_equal(np.load(tmp_path / "labels.npy"), expected.numpy())
    again = np.zeros((1, 1, h, w), np.uint8)
    mpp.GridInferer(patch, overlap, output=again, **kwargs)(image, _tissue_score)  # the bare memmap
    assert np.array_equal(again, expected.numpy())
    geometry = mpp.GridInferer(patch, overlap).geometry((h, w))
    full = mask.repeat(16, 0).repeat(16, 1)
    covered, rows = np.zeros((h, w), bool), np.zeros(h, bool)
    for corner in geometry.corner_array():
        box = tuple(slice(c, c + patch) for c in corner)  # no padding: padded and input coordinates agree
        if full[box].any():
            covered[box] = rows[box[0]] = True
    assert np.all(labels[0, 0][~covered] == fill)  # where only skipped patches reach: the fill, postprocessed
    assert np.all(labels[0, 0][full] < fill)  # the tissue: the network's labels
    row_bytes = image[0, :, 0].nbytes
    assert counted.bytes <= 1.1 * rows.sum() * row_bytes  # the rows the kept patches need, about once
    assert counted.bytes < image.nbytes / 2 and min(a for a, _ in counted.rows) >= np.argmax(rows)


def test_a_chunked_input_is_read_in_chunk_aligned_pieces_of_bounded_size():
    class Store:  # the benchmark's input: 2 GiB of float32 in 16 MiB chunks
        shape, dtype, chunks = (1, 1, 1024, 1024, 512), np.float32, (1, 1, 64, 256, 256)

    source = inputs.LazySource(Store(), mpp.GridInferer(64, 16).geometry(Store.shape[2:]), "constant", {}, "test")
    assert source.row_edges.tolist() == list(range(0, 1025, 64))  # a read of rows stays in one chunk row
    sizes = {(one.stop - one.start, two.stop - two.start) for one, two in source.tiles}
    assert len(source.tiles) == 8 and sizes == {(256, 256)}  # one chunk each: a chunk of rows is over PIECE_BYTES

    class Slide:  # a whole-slide image: small chunks are grouped along the last axis
        shape, dtype, chunks = (1, 3, 40000, 40000), np.uint8, (1, 3, 512, 512)

    source = inputs.LazySource(Slide(), mpp.GridInferer(256, 32).geometry(Slide.shape[2:]), "constant", {}, "test")
    width = inputs.PIECE_BYTES // (3 * 256) // 512 * 512  # whole chunks: a tile of 256 rows within the budget
    assert [(t[0].start, t[0].stop) for t in source.tiles] == [
        (a, min(a + width, 40000)) for a in range(0, 40000, width)
    ]
    source = inputs.LazySource(np.zeros((1, 1, 30, 20)), mpp.GridInferer(8).geometry((30, 20)), "constant", {}, "t")
    assert source.row_edges.tolist() == [0, 30] and source.tiles == [(slice(0, 20),)]  # no chunks: rows read whole


def test_a_zarr_input_gives_exactly_the_in_memory_result(tmp_path):
    zarr = pytest.importorskip("zarr")
    x = np.random.default_rng(9).random((1, 2, 40, 30, 20), dtype=np.float32)
    store = zarr.open(str(tmp_path / "x.zarr"), mode="w", shape=x.shape, chunks=(1, 2, 8, 16, 10), dtype="f4")
    store[:] = x
    inferer = mpp.GridInferer(12, 4, "hann", batch_size=5, padding_mode="reflect")
    two_chunks = 2 * 4 * 8 * (16 * 10) * 2  # channels x itemsize x chunk rows x two chunks' voxels
    with mock.patch.object(inputs, "PIECE_BYTES", two_chunks):  # tiles of two chunks
        tiles = inputs.LazySource(store, inferer.geometry((40, 30, 20)), "reflect", {}, "test").tiles
        assert tiles == [(slice(0, 16), slice(0, 20)), (slice(16, 30), slice(0, 20))]
        got = inferer(store, pointwise)
    assert torch.equal(got, inferer(torch.from_numpy(x), pointwise))
    last = zarr.open(str(tmp_path / "last.zarr"), mode="w", shape=(40, 30, 20, 2), chunks=(8, 16, 10, 2), dtype="f4")
    last[:] = np.moveaxis(x[0], 0, -1)
    batch = mpp.lazy_batch(last, channel_dim=-1)
    assert batch.chunks == (1, 2, 8, 16, 10)
    labels = zarr.open(
        str(tmp_path / "y.zarr"), mode="w", shape=(1, 1, 40, 30, 20), chunks=(1, 1, 8, 30, 20), dtype="u1"
    )
    argmax = mpp.GridInferer(12, 4, "hann", batch_size=5, padding_mode="reflect", output=labels, postprocess=argmax_u8)
    with mock.patch.object(inputs, "PIECE_BYTES", two_chunks):
        argmax(batch, pointwise)
    assert np.array_equal(labels[:], argmax_u8(got[0]).numpy()[None])


@pytest.mark.parametrize("mode", ["crop", "hann"])
@pytest.mark.parametrize("padding", [None, "reflect"])
def test_a_whole_memmap_is_served_from_its_own_mapping_released_row_by_row(tmp_path, monkeypatch, mode, padding):
    """A whole memmap with unpadded rows is served as views of a mapping of its file (no slab): every item's rows
    are asked for in order and counted once, the rows a row of patches has passed are released before the next
    rows are served, and an item is released whole when the next begins; the result is the in-memory one. A view of
    a memmap, or rows padded along the other axes, take the slab path (through the caller's map)."""
    data = np.random.default_rng(5).random((2, 2, 23, 9, 7)).astype(np.float32)
    np.save(tmp_path / "x.npy", data)
    served, released, sources = [], [], []
    rows, release, init = inputs._MemmapFile.rows, inputs._MemmapFile.release, inputs.LazySource.__init__

    def spy_rows(self, item, r0, r1):
        served.append((item, r0, r1))
        return rows(self, item, r0, r1)

    def spy_release(self, item, below=None):
        released.append((item, below))
        return release(self, item, below)

    def spy_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        sources.append(self)

    monkeypatch.setattr(inputs._MemmapFile, "rows", spy_rows)
    monkeypatch.setattr(inputs._MemmapFile, "release", spy_release)
    monkeypatch.setattr(inputs.LazySource, "__init__", spy_init)
    inferer = mpp.GridInferer(6, 2, mode, batch_size=3, padding_mode=padding)
    expected = inferer(torch.from_numpy(data), pointwise)
    whole = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert torch.equal(inferer(whole, pointwise), expected)
    if padding is None:
        assert sources[-1].bytes_read == data.nbytes  # each row of each item once
        for item in (0, 1):
            spans = [(r0, r1) for k, r0, r1 in served if k == item]
            assert spans[0][0] == 0 and max(r1 for _, r1 in spans) == 23
            assert all(b[0] >= a[0] for a, b in zip(spans, spans[1:]))  # rows in grid order
        starts = sorted({(k, r0) for k, r0, _ in served})
        assert sorted({(k, r0) for k, r0 in released if r0 is not None}) == starts  # passed rows released first
        assert (0, None) in released  # item 0 released whole once item 1 began
    else:
        assert not served and sources[-1].bytes_read >= data.nbytes
    served.clear()
    assert torch.equal(inferer(whole[0:2], pointwise), expected) and not served  # a view of a memmap: the slab path


def test_memmap_rows_served_out_of_order_are_released_with_the_rest(tmp_path):
    """Rows asked for below those served before (a part's probe patch comes before its first rows) are released
    once a later row of patches has passed them, not left resident; consecutive releases leave no page out."""
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 80, 32, 32), np.float32))  # a row is 4 KiB
    mapped = inputs._MemmapFile.open(np.load(tmp_path / "x.npy", mmap_mode="r"))
    page, released = mmap.PAGESIZE, []

    class Recorder:
        def madvise(self, option, start, length):
            released.extend(range(start, start + length, page))

    def pages(r0, r1):  # the pages from the one row r0 starts in to the one row r1 starts in (excluded)
        lo, hi = mapped.start + r0 * mapped.row_bytes, mapped.start + r1 * mapped.row_bytes
        return list(range(lo // page * page, hi // page * page, page))

    mapped.mapping = Recorder()
    mapped.rows(0, 40, 50)
    mapped.rows(0, 10, 20)  # out of order
    assert released == []
    mapped.rows(0, 60, 70)
    assert released == pages(10, 60)
    mapped.release(0)
    assert sorted(set(released)) == pages(10, 80)


def test_a_copy_on_write_memmap_is_read_as_the_caller_sees_it(tmp_path):
    """A memmap opened copy-on-write (``mmap_mode="c"``) holds changes its file does not: it is read through the
    caller's map, so the changes count, as for the same array in memory."""
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 20, 9, 7), np.float32))
    changed = np.load(tmp_path / "x.npy", mmap_mode="c")
    changed[0, 0, 3:11] = 5.0
    inferer = mpp.GridInferer(6, 2, "hann", batch_size=3)
    assert inputs._MemmapFile.open(changed) is None
    assert torch.equal(inferer(changed, pointwise), inferer(torch.from_numpy(np.array(changed)), pointwise))
