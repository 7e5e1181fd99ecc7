"""ChunkReader: decoding a zarr array's chunk files directly gives exactly zarr's result; other layouts fall back."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_queue import CountsLivePatches, live, peaks

import monai_patchplug as mpp
from monai_patchplug import LazyVolume, LoadLazyd, PatchStore
from monai_patchplug.chunks import ChunkReader

zarr = pytest.importorskip("zarr")

COMPRESSORS = {
    "blosc-lz4": lambda: zarr.codecs.BloscCodec(cname="lz4", clevel=3, shuffle="shuffle"),
    "zstd": lambda: zarr.codecs.ZstdCodec(level=1),
    "none": lambda: None,
}


def _array(path, data: np.ndarray, chunks: tuple[int, ...], compressor: str, fill_value=0) -> zarr.Array:
    codec = COMPRESSORS[compressor]()
    out = zarr.create_array(
        str(path), shape=data.shape, chunks=chunks, dtype=data.dtype, compressors=codec, fill_value=fill_value
    )
    out[...] = data
    return out


@st.composite
def arrays_and_boxes(draw):
    """An array (1-4 axes), its chunks, a dtype and compressor, and an index of ints and step-1 slices (stops may
    pass the edge, starts and ints may be negative)."""
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    chunks = tuple(draw(st.integers(1, s + 2)) for s in shape)
    dtype = draw(st.sampled_from(["float32", "uint8", "int16", "float64", "bool"]))
    compressor = draw(st.sampled_from(sorted(COMPRESSORS)))
    index = []
    for size in shape[: draw(st.integers(0, ndim))]:
        if draw(st.booleans()):
            index.append(draw(st.integers(-size, size - 1)))
        else:
            start = draw(st.integers(-size - 1, size))
            index.append(slice(start, draw(st.integers(-size, size + 4)), draw(st.sampled_from([None, 1]))))
    return shape, chunks, np.dtype(dtype), compressor, tuple(index)


@settings(max_examples=60, deadline=None)
@given(case=arrays_and_boxes(), seed=st.integers(0, 2**16))
def test_random_boxes_read_exactly_what_zarr_reads(tmp_path_factory, case, seed):
    shape, chunks, dtype, compressor, index = case
    data = (np.random.default_rng(seed).random(shape) * 200).astype(dtype)
    path = tmp_path_factory.mktemp("z") / "a.zarr"
    array = _array(path, data, chunks, compressor)
    reader = ChunkReader.open(path)
    assert reader is not None and reader.shape == shape and reader.dtype == dtype
    expected = np.asarray(array[index])
    got = reader[index]
    assert got.dtype == dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(reader.read(index, np.float64), expected.astype(np.float64))


def test_chunks_never_written_read_as_the_fill_value(tmp_path):
    array = zarr.create_array(str(tmp_path / "a.zarr"), shape=(6, 6), chunks=(3, 3), dtype="int16", fill_value=7)
    array[0:3, 0:3] = np.arange(9, dtype=np.int16).reshape(3, 3)
    reader = ChunkReader.open(tmp_path / "a.zarr")
    np.testing.assert_array_equal(reader[1:5, 2:6], array[1:5, 2:6])
    assert (reader[3:6, 3:6] == 7).all()


def test_other_layouts_are_not_read_directly_and_other_indexes_go_through_zarr(tmp_path):
    zarr.create_array(str(tmp_path / "v2.zarr"), shape=(4, 4), chunks=(2, 2), dtype="f4", zarr_format=2)
    sharded = zarr.create_array(str(tmp_path / "s.zarr"), shape=(4, 4), chunks=(2, 2), shards=(4, 4), dtype="f4")
    sharded[...] = 1
    (tmp_path / "empty.zarr").mkdir()
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    assert ChunkReader.open(tmp_path / "g.zarr") is None
    assert ChunkReader.open(tmp_path / "v2.zarr") is None
    assert ChunkReader.open(tmp_path / "s.zarr") is None
    assert ChunkReader.open(tmp_path / "empty.zarr") is None
    assert ChunkReader.open(tmp_path / "missing.zarr") is None
    with pytest.raises(ValueError, match="not a zarr v3 array"):
        ChunkReader(tmp_path / "s.zarr")
    data = np.arange(30, dtype=np.float32).reshape(5, 6)
    _array(tmp_path / "a.zarr", data, (2, 4), "blosc-lz4")
    reader = ChunkReader.open(tmp_path / "a.zarr")
    np.testing.assert_array_equal(reader[::2, 1:5:3], data[::2, 1:5:3])  # steps: read by zarr
    np.testing.assert_array_equal(reader[..., 1], data[..., 1])
    with pytest.raises(IndexError, match="out of bounds"):
        reader[5]
    with pytest.raises(IndexError, match="3 indexes"):
        reader[0, 0, 0]


def test_a_big_endian_array_falls_back_to_zarr(tmp_path):
    zarr.create_array(str(tmp_path / "a.zarr"), shape=(4,), chunks=(2,), dtype="i4")
    assert ChunkReader.open(tmp_path / "a.zarr") is not None
    meta = json.loads((tmp_path / "a.zarr" / "zarr.json").read_text())
    meta["codecs"][0]["configuration"]["endian"] = "big" if sys.byteorder == "little" else "little"
    (tmp_path / "a.zarr" / "zarr.json").write_text(json.dumps(meta))
    assert ChunkReader.open(tmp_path / "a.zarr") is None


def _store(tmp_path, n: int = 2) -> list[dict]:
    files = []
    for i in range(n):
        label = np.zeros((20, 18, 16), dtype=np.uint8)
        label[5 + i : 12, 4:10, 6:14] = 1
        image = np.random.default_rng(i).random((20, 18, 16)).astype(np.float32)
        item = {}
        for key, array in (("image", image), ("label", label)):
            np.save(tmp_path / f"{key}{i}.npy", array)
            item[key] = str(tmp_path / f"{key}{i}.npy")
        files.append(item)
    return PatchStore(tmp_path / "store", chunks=6, workers=1, progress=False)(files, ["image", "label"], "label")


def test_load_lazyd_reads_a_prepared_store_directly_as_zarr_would(tmp_path):
    item = LoadLazyd(["image", "label"], dtype=None)(_store(tmp_path, 1)[0])
    for key in ("image", "label"):
        volume = item[key]
        assert isinstance(volume, LazyVolume) and isinstance(volume.array, ChunkReader)
        reference = zarr.open_array(str(volume.array.path), mode="r")
        box = (slice(0, 1), slice(3, 17), slice(-9, None), 5)
        np.testing.assert_array_equal(volume[box], reference[box])
        assert volume[box].dtype == reference.dtype and volume[box].flags.writeable
    assert item["image"].meta["filename_or_obj"].endswith("image0.npy")
    assert LoadLazyd("label")(item | {"label": str(item["label"].array.path)})["label"][0, 6, 5, 7].dtype == np.float32


def test_without_numcodecs_a_compressed_read_says_what_to_install(tmp_path, monkeypatch):
    volume = LoadLazyd("image")(_store(tmp_path, 1)[0])["image"]
    monkeypatch.setitem(sys.modules, "numcodecs", None)
    with pytest.raises(ImportError, match="numcodecs"):
        volume[0, 0:2, 0:2, 0:2]


class CountingLabelSampler(CountsLivePatches, mpp.LabelSampler):
    pass


def test_a_queue_on_the_store_holds_one_read_patch_at_a_time(tmp_path):
    """The buffer of a queue on a store holds locations: a patch is read when yielded and freed once the caller
    drops it, so at most one read patch is alive whatever ``max_length`` (5 here)."""
    peaks.clear()
    sampler = CountingLabelSampler(6, "label", {0: 1, 1: 2}, keys=["image", "label"])
    queue = mpp.PatchQueue(_store(tmp_path, 3), 5, 4, sampler, transform=LoadLazyd(["image", "label"]), seed=0)
    delivered = 0
    for patch in queue:
        assert len(live) <= 1 and isinstance(patch["image"], torch.Tensor)
        delivered += 1
        del patch
    assert delivered == len(queue) == 12
    assert max(peaks) == 1 and len(live) == 0
