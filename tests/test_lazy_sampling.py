"""Samplers on array-likes: only patch boxes are read, and patches equal those of the same image in memory.

Also the persistent label index (exact runs, the sampled law of the in-memory LabelSampler, its size) and LoadLazyd
(metadata equal to LoadImaged + EnsureChannelFirstd).
"""

from __future__ import annotations

import math
import re

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor, list_data_collate
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from stats import assert_counts_follow

import monai_patchplug as mpp
import monai_patchplug.label_index as label_index_module
from monai_patchplug import LOCATION, LabelIndex, LazyVolume, LoadLazyd
from monai_patchplug._shapes import is_lazy
from monai_patchplug.label_index import clip_runs, in_runs, index_path


class CountingArray:
    """A ``(C, *spatial)`` array-like over a numpy array that records every box read (as (start, stop) per axis)."""

    def __init__(self, array: np.ndarray, meta: dict | None = None) -> None:
        self.array, self.shape, self.dtype, self.ndim = array, array.shape, array.dtype, array.ndim
        self.reads: list[tuple[tuple[int, int], ...]] = []
        if meta is not None:
            self.meta = meta

    def __getitem__(self, index: tuple) -> np.ndarray:
        assert isinstance(index, tuple) and all(isinstance(i, slice) for i in index), index
        box = tuple(i.indices(s)[:2] for i, s in zip(index, self.shape))
        self.reads.append(box)
        return self.array[index].copy()

    @property
    def voxels_read(self) -> int:
        return sum(math.prod(b - a for a, b in box) for box in self.reads)


def _patch_boxes(patches: list[dict], channels: int) -> list[tuple[tuple[int, int], ...]]:
    out = []
    for patch in patches:
        loc = [int(v) for v in patch[LOCATION]]
        n = len(loc) // 2
        out.append(((0, channels), *((loc[i], loc[n + i]) for i in range(n))))
    return out


def _affine(ndim: int) -> torch.Tensor:
    affine = torch.eye(ndim + 1, dtype=torch.float64) * 1.5
    affine[ndim, ndim] = 1.0
    affine[:ndim, ndim] = torch.arange(ndim, dtype=torch.float64) - 3
    return affine


def _case(shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.random((2, *shape)).astype(np.float32)
    label = np.zeros((1, *shape), dtype=np.uint8)
    label[(0, *(slice(s // 4, max(s // 4 + 1, s // 2)) for s in shape))] = 1
    label[(0, *(slice(s // 2, s // 2 + 1) for s in shape))] = 2
    prob = rng.random((1, *shape)).astype(np.float32)
    return image, label, prob


def _samplers(patch: tuple[int, ...]) -> list:
    return [
        mpp.UniformSampler(patch, keys=["image", "label"], num_samples=3),
        mpp.WeightedSampler(patch, "prob", keys=["image", "label"], num_samples=3),
        mpp.LabelSampler(patch, "label", {0: 1, 1: 2, 2: 3}, keys=["image", "label"], num_samples=3),
        mpp.LabelSampler(patch, "label", keys=["image", "label"], num_samples=3),
        mpp.GridSampler(patch, keys=["image", "label"]),
    ]


def _assert_same_patch(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    assert torch.equal(a[LOCATION], b[LOCATION])
    for key in ("image", "label"):
        x, y = a[key], b[key]
        assert isinstance(y, MetaTensor) and isinstance(x, MetaTensor)
        assert torch.equal(x.as_tensor(), y.as_tensor()) and x.dtype == y.dtype
        assert torch.equal(x.affine, y.affine)
        assert set(x.meta) == set(y.meta)
        for name in ("patch_index", "crop_center", LOCATION, "spatial_shape", "filename_or_obj"):
            if name in x.meta:
                assert np.array_equal(np.asarray(x.meta[name]), np.asarray(y.meta[name])), name
        ops_x = [{k: v for k, v in op.items() if k != "id"} for op in x.applied_operations]
        ops_y = [{k: v for k, v in op.items() if k != "id"} for op in y.applied_operations]
        assert ops_x == ops_y


@settings(max_examples=12, deadline=None)
@given(
    shape=st.lists(st.integers(6, 14), min_size=2, max_size=3).map(tuple),
    patch_fraction=st.floats(0.2, 0.9),
    seed=st.integers(0, 2**16),
)
def test_lazy_patches_equal_in_memory_patches_and_read_only_boxes(shape, patch_fraction, seed):
    image, label, prob = _case(shape, seed)
    patch = tuple(max(1, int(s * patch_fraction)) for s in shape)
    meta = {"affine": _affine(len(shape)), "filename_or_obj": "case.nii"}
    for make in range(len(_samplers(patch))):
        memory = {
            "image": MetaTensor(torch.from_numpy(image), meta=dict(meta)),
            "label": MetaTensor(torch.from_numpy(label), meta=dict(meta)),
            "prob": torch.from_numpy(prob),
        }
        lazy = {
            "image": CountingArray(image, dict(meta)),
            "label": CountingArray(label, dict(meta)),
            "prob": CountingArray(prob),
        }
        ours, ref = _samplers(patch)[make], _samplers(patch)[make]
        got = ours.set_random_state(seed)(lazy)
        want = ref.set_random_state(seed)(memory)
        assert len(got) == len(want)
        for a, b in zip(want, got):
            _assert_same_patch(a, b)
        assert lazy["image"].reads == _patch_boxes(got, 2)  # the image: its patch boxes, nothing else
        label_reads = lazy["label"].reads
        if isinstance(ours, mpp.LabelSampler):  # the draw reads the valid-centre region once (no index here)
            valid = ((0, 1), *((p // 2, s - (p - 1) // 2) for p, s in zip(patch, shape)))
            assert label_reads[0] == valid
            label_reads = label_reads[1:]
        assert label_reads == _patch_boxes(got, 1)
        weighted = isinstance(ours, mpp.WeightedSampler)  # the weight map: channel 0 whole, once, for the draw
        assert lazy["prob"].reads == ([((0, 1), *((0, s) for s in shape))] if weighted else [])


def test_lazy_patches_invert_and_collate_like_in_memory_ones():
    image, label, _ = _case((12, 10, 8))
    meta = {"affine": _affine(3)}
    lazy = {"image": LazyVolume(image[0], meta), "label": LazyVolume(label[0], meta)}
    memory = {"image": MetaTensor(torch.from_numpy(image[:1]), meta=dict(meta)),
              "label": MetaTensor(torch.from_numpy(label), meta=dict(meta))}  # fmt: skip
    sampler = mpp.LabelSampler(4, "label", {1: 1}, keys=["image", "label"], num_samples=2)
    got = sampler.set_random_state(3)(lazy)
    want = sampler.set_random_state(3)(memory)
    batch = list_data_collate(got)
    assert batch["image"].shape == (2, 1, 4, 4, 4) and batch[LOCATION].shape == (2, 6)
    for a, b in zip(got, want):
        back_lazy, back_memory = sampler.inverse(a)["image"], sampler.inverse(b)["image"]
        assert back_lazy.shape == (1, 12, 10, 8)
        assert torch.equal(back_lazy.as_tensor(), back_memory.as_tensor())
        assert torch.equal(back_lazy.affine, memory["image"].affine)


def test_grid_sampler_with_padding_reads_a_lazy_volume_once():
    image, _, _ = _case((6, 7, 5))
    lazy = CountingArray(image)
    patches = mpp.GridSampler(4, 2, padding_mode=0)({"image": lazy})
    want = mpp.GridSampler(4, 2, padding_mode=0)({"image": torch.from_numpy(image)})
    assert len(lazy.reads) == 1 and lazy.voxels_read == image.size
    for a, b in zip(patches, want):
        assert torch.equal(torch.as_tensor(a["image"]), torch.as_tensor(b["image"]))


def test_keys_none_finds_lazy_images_and_untracked_meta_gives_plain_tensors(tmp_path):
    from monai.data import set_track_meta

    image, label, _ = _case((10, 9, 8))
    data = {"image": CountingArray(image), "label": CountingArray(label), "name": "x"}
    patch = mpp.UniformSampler(4).set_random_state(0)(data)
    assert patch["image"].shape == (2, 4, 4, 4) and patch["label"].shape == (1, 4, 4, 4) and patch["name"] == "x"
    assert patch["image"].affine.shape == (4, 4)
    set_track_meta(False)
    try:
        patch = mpp.UniformSampler(4).set_random_state(0)(data)
        assert type(patch["image"]) is torch.Tensor
    finally:
        set_track_meta(True)
    np.save(tmp_path / "image.npy", image)
    mapped = np.load(tmp_path / "image.npy", mmap_mode="r")
    assert is_lazy(mapped) and not is_lazy(image) and not is_lazy(torch.zeros(1))
    patch = mpp.UniformSampler(4).set_random_state(0)({"image": mapped})
    assert torch.equal(patch["image"].as_tensor(), mpp.UniformSampler(4).set_random_state(0)({"image": image})["image"])
    assert not isinstance(patch["image"].as_tensor().numpy(), np.memmap)


# -- LazyVolume and LoadLazyd ------------------------------------------------------------------------------------
def test_lazy_volume_indexes_like_the_channel_first_array():
    raw = np.arange(4 * 5 * 6 * 3, dtype=np.int16).reshape(4, 5, 6, 3)
    view = LazyVolume(raw, channel_dim=-1, dtype=np.float32)
    full = np.moveaxis(raw, -1, 0).astype(np.float32)
    assert view.shape == full.shape and view.dtype == np.float32
    for index in [(slice(None), slice(1, 3), slice(0, 5), slice(2, 6)), (1, slice(None)), (slice(0, 2), 2, 3),
                  (Ellipsis, slice(1, 2)), (slice(None),)]:  # fmt: skip
        assert np.array_equal(view[index], full[index]), index
    plain = LazyVolume(raw[..., 0])
    assert plain.shape == (1, 4, 5, 6) and np.array_equal(plain[0, 1:3], raw[1:3, ..., 0])
    with pytest.raises(TypeError, match="LazyVolume"):
        LazyVolume([1, 2, 3])
    with pytest.raises(ValueError, match="channel_dim 4"):
        LazyVolume(raw, channel_dim=4)


@pytest.mark.parametrize("suffix", [".nii", ".npy", ".nii.gz", "_4d.nii"])
def test_load_lazyd_gives_load_imaged_metadata_and_voxels(tmp_path, suffix):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 100, (9, 8, 7, 2) if "4d" in suffix else (9, 8, 7)).astype(np.int16)
    affine = np.diag([1.5, 2.0, 2.5, 1.0])
    affine[:3, 3] = [4, -5, 6]
    path = tmp_path / f"case{suffix}"
    if suffix == ".npy":
        np.save(path, data)
    else:
        nib.save(nib.Nifti1Image(data, affine), path)
    ref = Compose([LoadImaged("x", image_only=True), EnsureChannelFirstd("x")])({"x": str(path)})["x"]
    if suffix.endswith(".gz"):
        with pytest.warns(UserWarning, match="PatchStore"):
            lazy = LoadLazyd("x")({"x": str(path)})["x"]
    else:
        lazy = LoadLazyd("x")({"x": str(path)})["x"]
    assert isinstance(lazy, LazyVolume) and lazy.shape == tuple(ref.shape) and lazy.dtype == np.float32
    assert np.array_equal(lazy[:], ref.numpy())
    assert set(lazy.meta) | {"affine"} == set(ref.meta) | {"affine"}
    assert torch.equal(lazy.affine, ref.affine)
    assert lazy.meta["filename_or_obj"] == ref.meta["filename_or_obj"]
    assert np.array_equal(lazy.meta["spatial_shape"], ref.meta["spatial_shape"])
    sampler = mpp.UniformSampler(4, num_samples=2)
    for a, b in zip(sampler.set_random_state(1)({"x": lazy}), sampler.set_random_state(1)({"x": ref})):
        assert torch.equal(a["x"].as_tensor(), b["x"].as_tensor()) and torch.equal(a["x"].affine, b["x"].affine)


def test_load_lazyd_names_a_missing_or_corrupt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.nii"):
        LoadLazyd("x")({"x": str(tmp_path / "nothere.nii")})
    bad = tmp_path / "broken.nii"
    bad.write_bytes(b"not a nifti file at all" * 20)
    with pytest.raises(ValueError, match="broken.nii"):
        LoadLazyd("x")({"x": str(bad)})
    with pytest.raises(ValueError, match="cannot open"):
        (tmp_path / "a.txt").write_text("x")
        LoadLazyd("x")({"x": str(tmp_path / "a.txt")})


# -- the label index -----------------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple),
    seed=st.integers(0, 2**16),
    labels=st.integers(1, 4),
)
def test_label_index_runs_rebuild_the_map_and_clip_to_valid_centres(shape, seed, labels):
    rng = np.random.default_rng(seed)
    label = (rng.integers(0, labels + 1, shape) * (rng.random(shape) < 0.5)).astype(np.int8)
    label[label == 3] = -1  # a negative label too
    index = LabelIndex.build(label)
    rebuilt = np.zeros(label.size, dtype=np.int8)
    for value in index.labels:
        for start, length in zip(*index.runs(value)):
            rebuilt[start : start + length] = value
    assert np.array_equal(rebuilt.reshape(shape), label)
    assert index.counts() == {int(v): int((label == v).sum()) for v in np.unique(label) if v != 0}
    patch = tuple(int(rng.integers(1, s + 1)) for s in shape)
    valid = np.zeros(shape, dtype=bool)
    valid[tuple(slice(p // 2, s - (p - 1) // 2) for p, s in zip(patch, shape))] = True
    for value in index.labels:
        clipped = np.zeros(label.size, dtype=bool)
        for start, length in zip(*clip_runs(*index.runs(value), shape, patch)):
            assert length > 0 and not clipped[start : start + length].any()
            clipped[start : start + length] = True
        assert np.array_equal(clipped.reshape(shape), (label == value) & valid)
    flat = np.arange(label.size)
    assert np.array_equal(in_runs(flat, *index.union(False)), label.ravel() != 0)
    assert np.array_equal(in_runs(flat, *index.union(True)), label.ravel() > 0)


def test_label_index_file_is_data_and_loads_back(tmp_path):
    label = np.zeros((1, 30, 20, 10), dtype=np.uint8)
    label[0, 5:9, 3:8, 2:7] = 4
    index = LabelIndex.build(torch.from_numpy(label), channel_first=True)
    path = index.save(tmp_path / "seg.nii.index.npz")
    assert path == index_path(tmp_path / "seg.nii") and not list(tmp_path.glob("*.tmp*"))
    back = LabelIndex.load(path)
    assert back.counts() == {4: 100} and back.shape == (30, 20, 10) and back.starts.dtype == np.uint16
    np.savez(tmp_path / "evil.npz", format=np.array([object()], dtype=object))
    with pytest.raises(ValueError, match="evil.npz"):
        LabelIndex.load(tmp_path / "evil.npz")
    with pytest.raises(ValueError, match="single-channel"):
        LabelIndex.build(np.zeros((2, 4, 4), dtype=np.uint8), channel_first=True)


def test_label_index_is_a_small_fraction_of_the_label_map():
    """A typical sparse case: 1x256x256x192 uint8 map, two organs (ellipsoids) covering ~3% of the voxels."""
    shape = (256, 256, 192)
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    label = np.zeros(shape, dtype=np.uint8)
    for value, centre, radii in ((1, (100, 120, 90), (50, 45, 35)), (2, (190, 120, 100), (30, 30, 20))):
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1
        label[inside] = value
    index = LabelIndex.build(label)
    fraction = index.nbytes / label.nbytes
    assert 0.02 < (label > 0).mean() < 0.05
    assert fraction < 0.01, fraction  # measured 0.39% (49 kB); a per-voxel uint32 index: 12.9%


def _indexed_subject(label: np.ndarray, image: np.ndarray) -> dict:
    view = LazyVolume(label, label_index=LabelIndex.build(label))
    return {"image": CountingArray(image[None]), "label": view}


@pytest.mark.parametrize(
    "kwargs",
    [{"label_probabilities": {0: 1, 1: 2, 2: 3, 5: 4}}, {"label_probabilities": None}, {"pos": 2, "neg": 1}],
)
def test_indexed_label_sampler_follows_the_in_memory_law(kwargs):
    """Centre labels and centre voxels drawn from the index follow the exact law of the in-memory sampler."""
    shape, patch = (9, 8, 7), (3, 4, 3)
    rng = np.random.default_rng(1)
    label = np.where(rng.random(shape) < 0.25, rng.integers(1, 3, shape), 0).astype(np.uint8)
    label[0] = 2  # label 2 also outside the valid centres: never a centre there
    image = rng.random(shape).astype(np.float32)
    n = 6000
    sampler = mpp.LabelSampler(patch, "label", keys=["image"], num_samples=n, **kwargs).set_random_state(0)
    data = _indexed_subject(label, image)
    patches = sampler(data)
    assert data["image"].reads == _patch_boxes(patches, 1)  # the image: patch boxes only; the label map: nothing
    centres = np.stack([p[LOCATION][:3].numpy() for p in patches]) + np.asarray(patch) // 2
    flat = np.ravel_multi_index(tuple(centres.T), shape)
    # the exact law: class probabilities over the classes present on valid centres, voxels equal within a class
    valid = np.zeros(shape, dtype=bool)
    valid[tuple(slice(p // 2, s - (p - 1) // 2) for p, s in zip(patch, shape))] = True
    if kwargs.get("label_probabilities"):
        classes = [(p, label == value) for value, p in kwargs["label_probabilities"].items()]
    elif "pos" in kwargs:
        classes = [(kwargs["pos"], label > 0), (kwargs["neg"], label == 0)]
    else:
        classes = [(1.0, label > 0)]
    law = np.zeros(label.size)
    present = [(p, (mask & valid).ravel()) for p, mask in classes if (mask & valid).any()]
    total = sum(p for p, _ in present)
    for p, mask in present:
        law[mask] += p / total / mask.sum()
    counts = np.bincount(flat, minlength=label.size)
    assert counts[law == 0].sum() == 0
    assert_counts_follow(counts[law > 0], law[law > 0])
    in_memory = mpp.LabelSampler(patch, "label", keys=["image"], num_samples=n, **kwargs).set_random_state(0)
    memory_centres = [p["image"].meta["crop_center"] for p in in_memory({"image": image[None], "label": label[None]})]
    counts_memory = np.bincount(np.ravel_multi_index(tuple(np.stack(memory_centres).T), shape), minlength=label.size)
    assert_counts_follow(counts_memory[law > 0], law[law > 0])


def test_indexed_label_sampler_checks_the_index_shape_and_skips_with_image_key():
    label = np.zeros((8, 8, 8), dtype=np.uint8)
    label[2:5, 2:5, 2:5] = 1
    view = LazyVolume(label, label_index=LabelIndex.build(np.zeros((8, 8, 9), dtype=np.uint8)))
    with pytest.raises(ValueError, match="label index has shape"):
        mpp.LabelSampler(4, "label", {1: 1})({"label": view})
    counting = CountingArray(label[None])
    counting.label_index = LabelIndex.build(label)
    image = CountingArray(np.ones((1, 8, 8, 8), dtype=np.float32))
    mpp.LabelSampler(4, "label", pos=1, neg=1, image_key="image")({"label": counting, "image": image})
    assert counting.reads[0] == ((0, 1), (2, 7), (2, 7), (2, 7))  # image_key: the map's valid region is read


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(2, 10), min_size=1, max_size=3).map(tuple),
    seed=st.integers(0, 2**16),
    probabilities=st.dictionaries(st.integers(0, 3), st.sampled_from([0.0, 1.0, 2.5]), min_size=1, max_size=4),
)
def test_indexed_label_sampler_draws_valid_centres_of_the_wanted_labels(shape, seed, probabilities):
    """On any map: centres are valid and carry a wanted label present there; when none is, both samplers raise."""
    if not any(probabilities.values()):
        probabilities = {**probabilities, 0: 1.0}
    rng = np.random.default_rng(seed)
    label = np.where(rng.random(shape) < 0.3, rng.integers(1, 4, shape), 0).astype(np.uint8)
    patch = tuple(int(rng.integers(1, s + 1)) for s in shape)
    data = _indexed_subject(label, label.astype(np.float32))
    indexed = mpp.LabelSampler(patch, "label", probabilities, keys=["image"], num_samples=40).set_random_state(seed)
    in_memory = mpp.LabelSampler(patch, "label", probabilities, keys=["image"], num_samples=40)
    try:
        in_memory({"image": label[None].astype(np.float32), "label": label[None]})
    except ValueError:
        with pytest.raises(ValueError, match="LabelSampler"):
            indexed(data)
        return
    patches = indexed(data)
    wanted = {value for value, p in probabilities.items() if p > 0}
    for p in patches:
        corner = p[LOCATION][: len(shape)].numpy()
        assert ((corner >= 0) & (corner <= np.asarray(shape) - np.asarray(patch))).all()
        centre = tuple(corner + np.asarray(patch) // 2)
        assert int(label[centre]) in wanted
        assert float(p["image"][(0, *(q // 2 for q in patch))]) == float(label[centre])


# -- the label index, built slab by slab and capped ---------------------------------------------------------------
def _reference_runs(label: np.ndarray) -> dict[int, list[tuple[int, int]]]:
    """The non-zero runs of the whole map, row by row of its last axis: ``{value: [(flat start, length), ...]}``."""
    width = label.shape[-1]
    runs: dict[int, list[tuple[int, int]]] = {}
    for r, row in enumerate(label.reshape(-1, width).astype(np.int64)):
        bounds = [0, *(np.flatnonzero(np.diff(row)) + 1).tolist(), width]
        for a, b in zip(bounds[:-1], bounds[1:]):
            if row[a] != 0:
                runs.setdefault(int(row[a]), []).append((r * width + a, b - a))
    return runs


def _assert_index_is(index: LabelIndex, runs: dict[int, list[tuple[int, int]]], shape: tuple[int, ...]) -> None:
    """``index`` holds exactly ``runs``, by label then start, in the narrowest unsigned types of the map's size."""
    assert index.shape == shape
    assert index.labels.tolist() == sorted(runs) and index.labels.dtype == np.int64
    assert index.offsets.tolist() == [0, *np.cumsum([len(runs[v]) for v in sorted(runs)], dtype=int).tolist()]
    assert index.starts.dtype == np.min_scalar_type(math.prod(shape))
    assert index.lengths.dtype == np.min_scalar_type(shape[-1])
    for value in sorted(runs):
        starts, lengths = index.runs(value)
        assert list(zip(starts.tolist(), lengths.tolist())) == runs[value]


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple),
    seed=st.integers(0, 2**16),
    slab=st.integers(1, 40),
    form=st.sampled_from(["numpy", "tensor", "channel_first", "float", "array-like"]),
)
def test_slab_wise_build_equals_the_runs_of_the_whole_map(shape, seed, slab, form):
    """Slabs of a few voxels (a row longer than a slab is read whole) give the runs of the whole map, any input."""
    rng = np.random.default_rng(seed)
    values = rng.integers(-1, 4, size=3)  # few values, 0 among them or not: long runs, many cross a row's end
    label = values[rng.choice(3, size=shape, p=rng.dirichlet(np.ones(3)))].astype(np.int16)
    given_map = {
        "numpy": label,
        "tensor": torch.from_numpy(label),
        "channel_first": torch.from_numpy(label[None]),
        "float": label.astype(np.float32),
        "array-like": CountingArray(label[None]),
    }[form]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(label_index_module, "SLAB_VOXELS", slab)
        index = LabelIndex.build(given_map, channel_first=form in ("channel_first", "array-like"))
    _assert_index_is(index, _reference_runs(label), shape)


@pytest.mark.parametrize(
    "shape, slab", [((7, 5, 6, 4), 50), ((9, 8), 20), ((3, 100), 10), ((13,), 4), ((4, 3, 5), 1000), ((5, 6), 1)]
)
def test_build_reads_whole_row_slabs_of_bounded_size_each_voxel_once(shape, slab, monkeypatch):
    label = np.random.default_rng(0).integers(0, 3, (1, *shape)).astype(np.uint8)
    counting = CountingArray(label)
    monkeypatch.setattr(label_index_module, "SLAB_VOXELS", slab)
    _assert_index_is(LabelIndex.build(counting, channel_first=True), _reference_runs(label[0]), shape)
    seen = np.zeros(shape, dtype=np.int64)
    for box in counting.reads:
        assert box[0] == (0, 1) and box[-1] == (0, shape[-1])  # the one channel, whole rows
        assert math.prod(b - a for a, b in box) <= max(slab, shape[-1])  # a slab's worth (a row at least)
        seen[tuple(slice(a, b) for a, b in box[1:])] += 1
    assert (seen == 1).all()  # every voxel read once
    assert len(counting.reads) <= 3 * math.ceil(label.size / max(slab, shape[-1]))  # not voxel by voxel


def test_build_reads_zarr_and_memmaps_and_keeps_its_input_checks(tmp_path, monkeypatch):
    zarr = pytest.importorskip("zarr")
    label = np.zeros((1, 6, 5, 7), dtype=np.uint16)
    label[0, 1:4, 2:5, 1:6] = 300
    label[0, 5, 0, :] = 2
    array = zarr.create_array(str(tmp_path / "l.zarr"), shape=label.shape, chunks=(1, 2, 5, 7), dtype=label.dtype)
    array[...] = label
    np.save(tmp_path / "l.npy", label[0])
    monkeypatch.setattr(label_index_module, "SLAB_VOXELS", 35)
    runs = _reference_runs(label[0])
    _assert_index_is(LabelIndex.build(array, channel_first=True), runs, label.shape[1:])
    _assert_index_is(LabelIndex.build(np.load(tmp_path / "l.npy", mmap_mode="r")), runs, label.shape[1:])
    _assert_index_is(LabelIndex.build(label[0].tolist()), runs, label.shape[1:])
    for bad in (0.5, np.nan, np.inf):
        values = label[0].astype(np.float32)
        values[5, 4, 6] = bad  # in the last slab
        with pytest.raises(ValueError, match="whole numbers"):
            LabelIndex.build(values)
    for multi in (np.zeros((2, 4, 4), np.uint8), torch.zeros(2, 4, 4), np.zeros(3, np.uint8)):
        with pytest.raises(ValueError, match="single-channel"):
            LabelIndex.build(multi, channel_first=True)
    with pytest.raises(ValueError, match="single-channel"):
        LabelIndex.build(np.asarray(["a", "b"]))


def test_capped_index_keeps_a_seeded_uniform_subset_of_each_labels_runs():
    rng = np.random.default_rng(3)
    label = rng.integers(0, 3, (200, 60)).astype(np.uint8)  # ~2700 runs of labels 1 and 2 each
    label[0, :3], label[7, 10] = 3, 3  # label 3: 2 runs, fewer than the cap
    exact, cap = LabelIndex.build(label), 300
    capped = LabelIndex.build(label, max_runs_per_label=cap)
    again = LabelIndex.build(torch.from_numpy(label.copy()), max_runs_per_label=cap)
    for name in ("labels", "offsets", "starts", "lengths"):
        assert np.array_equal(getattr(capped, name), getattr(again, name))  # the same map and cap: the same index
        assert getattr(capped, name).dtype == getattr(exact, name).dtype
    _assert_index_is(LabelIndex.build(label, max_runs_per_label=None), _reference_runs(label), label.shape)
    assert capped.labels.tolist() == [1, 2, 3] and np.diff(capped.offsets).tolist() == [cap, cap, 2]
    for value in capped.labels:
        all_starts, all_lengths = exact.runs(value)
        starts, lengths = capped.runs(value)
        assert len(starts) == min(cap, len(all_starts)) and np.all(np.diff(starts) > 0)  # sorted
        rank = np.searchsorted(all_starts, starts)  # each kept run is one of the map's runs
        assert np.array_equal(all_starts[rank], starts) and np.array_equal(all_lengths[rank], lengths)
        assert capped.counts()[int(value)] == int(lengths.sum())
        if len(all_starts) > cap:  # uniform over the runs: as many kept in each tenth of them as its share
            tenth = np.arange(len(all_starts)) * 10 // len(all_starts)
            assert_counts_follow(np.bincount(tenth[rank], minlength=10), np.bincount(tenth) / len(all_starts))


@pytest.mark.parametrize("cap", [None, 1, 300])
def test_a_saved_index_says_whether_it_was_capped(tmp_path, cap):
    """The cap is saved with the runs, so a loaded index tells an approximate draw from the exact one; an index file
    written before the cap was saved loads as uncapped."""
    label = np.random.default_rng(4).integers(0, 3, (40, 30)).astype(np.uint8)
    index = LabelIndex.build(label, max_runs_per_label=cap)
    loaded = LabelIndex.load(index.save(tmp_path / "label.npy.index.npz"))
    assert index.max_runs_per_label == loaded.max_runs_per_label == cap
    assert np.array_equal(loaded.starts, index.starts) and loaded.counts() == index.counts()
    with np.load(tmp_path / "label.npy.index.npz") as f:
        older = {k: f[k] for k in f.files if k != "max_runs_per_label"}
    np.savez(tmp_path / "older.npz", **older)
    assert LabelIndex.load(tmp_path / "older.npz").max_runs_per_label is None


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-3, ValueError), (2.0, TypeError), ("5", TypeError),
                                        (True, TypeError)])  # fmt: skip
def test_a_bad_cap_is_named_with_its_value(bad, error):
    with pytest.raises(error, match=f"max_runs_per_label .*{re.escape(repr(bad))}"):
        LabelIndex.build(np.ones((2, 3), np.uint8), max_runs_per_label=bad)


def _sampled_law(patches: list[dict], shape: tuple[int, ...], patch: tuple[int, ...]) -> np.ndarray:
    """How often each voxel of ``shape`` is a patch centre."""
    centres = np.stack([p[LOCATION][: len(shape)].numpy() for p in patches]) + np.asarray(patch) // 2
    return np.bincount(np.ravel_multi_index(tuple(centres.T), shape), minlength=math.prod(shape))


def test_sampling_from_a_capped_index_draws_the_kept_runs_each_kept_voxel_alike():
    shape, patch, probabilities = (12, 10, 30), (3, 3, 4), {1: 1.0, 2: 3.0}
    rng = np.random.default_rng(5)
    label = np.where(rng.random(shape) < 0.4, rng.integers(1, 3, shape), 0).astype(np.uint8)
    index = LabelIndex.build(label, max_runs_per_label=40)
    sampler = mpp.LabelSampler(patch, "label", probabilities, keys=["image"], num_samples=4000).set_random_state(0)
    data = {"image": CountingArray(label[None].astype(np.float32)), "label": LazyVolume(label, label_index=index)}
    counts = _sampled_law(sampler(data), shape, patch)
    valid = np.zeros(shape, dtype=bool)
    valid[tuple(slice(p // 2, s - (p - 1) // 2) for p, s in zip(patch, shape))] = True
    law = np.zeros(label.size)
    for value, p in probabilities.items():
        kept = np.zeros(label.size, dtype=bool)
        for start, length in zip(*index.runs(value)):
            kept[start : start + length] = True
        kept &= valid.ravel()
        assert kept.sum() < ((label == value) & valid).sum()  # the cap left voxels of the label out
        law[kept] = p / sum(probabilities.values()) / kept.sum()
    assert counts[law == 0].sum() == 0  # only centres inside kept runs
    assert_counts_follow(counts[law > 0], law[law > 0])


def test_indexed_draw_makes_every_voxel_of_a_label_equally_likely_not_every_run():
    """A run of 18 voxels and a lone voxel of label 1: each of the 19 is drawn with probability 1/19 (a draw that
    picked a run first, then a voxel, would give the lone one 1/2)."""
    shape, patch = (7, 7, 24), (3, 3, 5)
    label = np.zeros(shape, dtype=np.uint8)
    label[3, 3, 3:21] = 1
    label[4, 2, 10] = 1
    data = {"image": CountingArray(label[None]), "label": LazyVolume(label, label_index=LabelIndex.build(label))}
    sampler = mpp.LabelSampler(patch, "label", {1: 1}, keys=["image"], num_samples=3800).set_random_state(0)
    counts = _sampled_law(sampler(data), shape, patch)
    cells = np.flatnonzero(label.ravel())
    assert counts.sum() == counts[cells].sum()
    assert_counts_follow(counts[cells], np.full(19, 1 / 19))
