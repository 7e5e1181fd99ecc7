"""PatchQueue: exact epochs, rank partition, mixing, determinism, workers, bounded memory, caching, errors."""

from __future__ import annotations

import copy
import gc
import json
import pickle
import weakref
from collections import Counter

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import box_slices, make_label_map
from monai.bundle import ConfigParser
from monai.data import CacheDataset, DataLoader, MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, MapTransform, RandFlipd
from test_lazy_sampling import CountingArray, _assert_same_patch, _patch_boxes

import monai_patchplug as mpp
from monai_patchplug.queue import DEFAULT_META_KEYS

SHAPE = (12, 10, 8)


def volumes(n: int, counts: dict[int, int] | None = None) -> list[dict]:
    """``n`` in-memory volumes; each voxel of volume ``i`` holds ``1000 * i`` + its flat index."""
    out = []
    for i in range(n):
        image = torch.arange(int(np.prod(SHAPE)), dtype=torch.float32).reshape(1, *SHAPE) + 1000 * i
        item = {"image": image, "label": make_label_map(SHAPE), "id": i}
        if counts and i in counts:
            item["num_samples"] = counts[i]
        out.append(item)
    return out


def queue(data, max_length: int = 8, samples: int = 3, **kwargs) -> mpp.PatchQueue:
    return mpp.PatchQueue(data, max_length, samples, mpp.UniformSampler(4, keys=["image", "label"]), **kwargs)


def ids(patches) -> list[int]:
    return [int(p["id"]) for p in patches]


def signature(patches) -> list[tuple[int, tuple[int, ...]]]:
    return [(int(p["id"]), tuple(p[mpp.LOCATION].tolist())) for p in patches]


@pytest.fixture(scope="module")
def nifti_files(tmp_path_factory) -> list[dict[str, str]]:
    root = tmp_path_factory.mktemp("queue")
    files = []
    for i in range(4):
        image = np.random.RandomState(i).rand(*SHAPE).astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / f"img{i}.nii.gz")
        nib.save(nib.Nifti1Image(make_label_map(SHAPE)[0].numpy(), np.eye(4)), root / f"seg{i}.nii.gz")
        files.append({"image": str(root / f"img{i}.nii.gz"), "label": str(root / f"seg{i}.nii.gz")})
    return files


def loading() -> Compose:
    return Compose([LoadImaged(["image", "label"], image_only=True), EnsureChannelFirstd(["image", "label"])])


def test_epoch_yields_exact_counts_and_every_volume_once():
    data = volumes(5, counts={2: 5, 4: 0})
    q = queue(data, max_length=4, samples=3, seed=0)
    assert len(q) == 3 + 3 + 5 + 3 + 0
    for epoch in range(3):
        q.set_epoch(epoch)
        patches = list(q)
        assert Counter(ids(patches)) == {0: 3, 1: 3, 2: 5, 3: 3}
        for patch in patches:
            source = data[int(patch["id"])]["image"]
            assert torch.equal(patch["image"], source[box_slices(patch[mpp.LOCATION])])
    ordered = list(queue(data, max_length=4, samples=3, shuffle=False))
    assert ids(ordered) == [0] * 3 + [1] * 3 + [2] * 5 + [3] * 3


def test_patch_indices_count_on_across_chunks_and_the_count_key_stays_behind():
    """A volume with more patches than ``max_length`` is sampled in chunks; its patches are still numbered 0..n-1
    (SaveImaged names files by them), and its ``num_samples`` entry, read already, must not reach the patches: a
    batch mixing volumes with and without it would not collate."""
    data = volumes(3, counts={0: 5})
    for item in data:
        item["image"] = MetaTensor(item["image"])
    q = queue(data, max_length=2, samples=2, seed=0)
    patches = list(q)
    assert not any("num_samples" in p for p in patches)
    assert sorted(int(p["image"].meta["patch_index"]) for p in patches if p["id"] == 0) == [0, 1, 2, 3, 4]
    for epoch in range(4):
        q.set_epoch(epoch)
        assert sum(len(batch["id"]) for batch in DataLoader(q, batch_size=3)) == 9


def test_trimming_meta_leaves_the_callers_entries_and_takes_one_key_as_a_string():
    data = volumes(2)
    for item in data:
        item["image"] = MetaTensor(item["image"], meta={"custom": 1})
        item["weights"] = MetaTensor(torch.ones(1, *SHAPE), meta={"custom": 1})  # not cropped: the caller's own
    patches = list(queue(data, meta_keys="affine"))
    for patch in patches:
        assert set(patch["image"].meta) == {"affine"}
        assert patch["image"].affine[:3, 3].tolist() == patch[mpp.LOCATION][:3].tolist()
        assert patch["weights"] is data[int(patch["id"])]["weights"]
    assert all(item["weights"].meta["custom"] == 1 and item["image"].meta["custom"] == 1 for item in data)


def test_a_copied_queue_still_hears_set_epoch_in_persistent_workers():
    copied = copy.deepcopy(queue(volumes(2), seed=0))
    loader = DataLoader(copied, batch_size=6, num_workers=1, persistent_workers=True)
    epochs = []
    for epoch in range(2):
        copied.set_epoch(epoch)
        epochs.append([tuple(loc) for loc in next(iter(loader))[mpp.LOCATION].tolist()])
    assert epochs[0] != epochs[1]
    assert pickle.loads(pickle.dumps(copied))._epoch.is_shared()


@pytest.mark.parametrize("even_divisible", [False, True])
def test_two_ranks_partition_the_volumes(even_divisible):
    data = volumes(7)
    ranks = [queue(data, seed=1, rank=r, world_size=2, even_divisible=even_divisible) for r in range(2)]
    for epoch in range(2):
        for q in ranks:
            q.set_epoch(epoch)
        counts = [Counter(ids(q)) for q in ranks]
        for q, count in zip(ranks, counts):
            assert set(count.values()) == {3} and len(q) == sum(count.values())  # each of its volumes once
        assert set(counts[0]) | set(counts[1]) == set(range(7))
        overlap = set(counts[0]) & set(counts[1])
        if even_divisible:
            assert len(ranks[0]) == len(ranks[1]) == 12 and len(overlap) == 1  # one volume repeated to pad
        else:
            assert not overlap and sorted(len(q) for q in ranks) == [9, 12]
        assert np.array_equal(ranks[0].epoch_order(), ranks[1].epoch_order())
    assert not np.array_equal(ranks[0].epoch_order(0), ranks[0].epoch_order(1))


def test_batches_mix_volumes_and_shuffle_false_keeps_them_apart():
    data = volumes(6)
    mixed = DataLoader(queue(data, max_length=24, samples=4, seed=0), batch_size=4)
    distinct = [len(set(batch["id"].tolist())) for batch in mixed]
    assert len(distinct) == 6 and sum(d > 1 for d in distinct) >= 4
    ordered = DataLoader(queue(data, max_length=24, samples=4, shuffle=False), batch_size=4)
    assert [batch["id"].tolist() for batch in ordered] == [[i] * 4 for i in range(6)]


def test_seed_and_epoch_make_runs_reproducible():
    data = volumes(5)

    def run(seed, epoch):
        q = queue(data, seed=seed, transform=RandFlipd(["image", "label"], prob=0.5, spatial_axis=0))
        q.set_epoch(epoch)
        patches = list(q)
        return signature(patches), [float(p["image"].sum()) for p in patches]

    assert run(0, 0) == run(0, 0)
    assert run(0, 1) == run(0, 1)
    assert run(0, 0) != run(0, 1) and run(0, 0) != run(1, 0)
    unseeded = [list(queue(data)) for _ in range(2)]  # seed=None: fresh patches, still every volume once
    assert signature(unseeded[0]) != signature(unseeded[1])
    assert all(Counter(ids(patches)) == {i: 3 for i in range(5)} for patches in unseeded)


def test_two_persistent_workers_give_the_patches_of_one_process(nifti_files):
    sampler = mpp.LabelSampler(4, "label", {0: 1, 3: 1})
    q = mpp.PatchQueue(nifti_files, 6, 3, sampler, transform=loading(), seed=3)
    loader = DataLoader(q, batch_size=3, num_workers=2, persistent_workers=True)
    reference = mpp.PatchQueue(nifti_files, 6, 3, sampler, transform=loading(), seed=3)
    runs = []
    for epoch in range(2):
        q.set_epoch(epoch)
        reference.set_epoch(epoch)
        got = []
        for batch in loader:
            assert batch["image"].shape[1:] == (1, 4, 4, 4) and set(batch["label"][:, 0, 2, 2, 2].tolist()) <= {0, 3}
            names = batch["image"].meta["filename_or_obj"]
            got += [(name, tuple(loc)) for name, loc in zip(names, batch[mpp.LOCATION].tolist())]
        expected = [(p["image"].meta["filename_or_obj"], tuple(p[mpp.LOCATION].tolist())) for p in reference]
        assert len(got) == len(q) == 12 and sorted(got) == sorted(expected)
        runs.append(sorted(got))
    assert runs[0] != runs[1]  # set_epoch reached the persistent workers


live: weakref.WeakSet = weakref.WeakSet()
peaks: list[int] = []


class CountsLivePatches:
    """Mixed into a sampler: records in ``peaks`` how many patches are alive (anywhere in the process, ``live``) each
    time it has cropped or read new ones."""

    def crop_patches(self, *args, **kwargs):
        patches = super().crop_patches(*args, **kwargs)
        live.update(p["image"] for p in patches)
        peaks.append(len(live))
        return patches


class CountingSampler(CountsLivePatches, mpp.UniformSampler):
    pass


@pytest.mark.parametrize(("max_length", "samples"), [(7, 3), (5, 12)])
def test_buffer_never_holds_more_than_max_length(max_length, samples):
    peaks.clear()
    q = mpp.PatchQueue(volumes(6), max_length, samples, CountingSampler(4, keys=["image", "label"]), seed=0)
    delivered = 0
    for patch in q:
        assert len(live) <= max_length
        delivered += 1
        del patch
    assert delivered == len(q) == 6 * samples
    assert max(peaks) == max_length and len(live) == 0


def record_freeze_count(item: dict) -> dict:
    """Adds how many objects the garbage collector has frozen in this process (a DataLoader worker, or this one)."""
    return {**item, "frozen": gc.get_freeze_count()}


def test_a_worker_freezes_the_objects_it_inherits_and_the_main_process_does_not():
    before = gc.get_freeze_count()
    sampler = mpp.UniformSampler(4, keys=["image", "label"])
    in_process = mpp.PatchQueue(volumes(2), 4, 2, sampler, transform=record_freeze_count, seed=0)
    assert [int(b["frozen"][0]) for b in DataLoader(in_process, batch_size=4, num_workers=0)] == [before]
    assert gc.get_freeze_count() == before
    in_worker = mpp.PatchQueue(volumes(2), 4, 2, sampler, transform=record_freeze_count, seed=0)
    frozen = [int(b["frozen"][0]) for b in DataLoader(in_worker, batch_size=4, num_workers=1)]
    assert len(frozen) == 1 and frozen[0] > before  # the parent's objects, frozen before the worker's first volume


class CountCalls(MapTransform):
    calls = 0

    def __call__(self, data):
        CountCalls.calls += 1
        return dict(data)


def test_cache_runs_the_deterministic_prefix_once(nifti_files):
    CountCalls.calls = 0
    transform = Compose([*loading().transforms, CountCalls(["image"]), RandFlipd(["image", "label"], prob=0.5)])
    q = mpp.PatchQueue(nifti_files, 6, 2, mpp.UniformSampler(4), transform=transform, cache=True, seed=0)
    assert CountCalls.calls == 4
    for epoch in range(2):
        q.set_epoch(epoch)
        assert Counter(p["image"].meta["filename_or_obj"] for p in q) == {f["image"]: 2 for f in nifti_files}
    assert CountCalls.calls == 4
    cached = CacheDataset(nifti_files, loading(), progress=False)
    flip = RandFlipd(["image", "label"], prob=1.0, spatial_axis=0)
    patches = list(mpp.PatchQueue(cached, 6, 2, mpp.UniformSampler(4), transform=[flip], seed=0))
    assert len(patches) == 8 and all(p["image"].applied_operations[-2]["class"] == "RandFlipd" for p in patches)


def test_patches_keep_the_default_meta_keys_or_all(nifti_files):
    trimmed = next(iter(mpp.PatchQueue(nifti_files, 4, 2, mpp.UniformSampler(4), transform=loading())))
    assert set(trimmed["image"].meta) <= set(DEFAULT_META_KEYS) and mpp.LOCATION in trimmed["image"].meta
    assert trimmed["image"].affine[:3, 3].tolist() == trimmed[mpp.LOCATION][:3].tolist()  # moved to the patch
    full = next(iter(mpp.PatchQueue(nifti_files, 4, 2, mpp.UniformSampler(4), transform=loading(), meta_keys=None)))
    assert "pixdim" in full["image"].meta and "pixdim" not in trimmed["image"].meta


def test_a_failing_volume_names_its_file(nifti_files):
    data = [*nifti_files[:2], {"image": "/nowhere/missing.nii.gz", "label": nifti_files[0]["label"]}]
    q = mpp.PatchQueue(data, 4, 2, mpp.UniformSampler(4), transform=loading(), shuffle=False)
    with pytest.raises(RuntimeError, match=r"volume 2 \(image=/nowhere/missing.nii.gz") as raised:
        list(q)
    assert raised.value.__cause__ is not None
    with pytest.raises(RuntimeError, match="missing.nii.gz"):
        list(DataLoader(q, batch_size=2, num_workers=1))
    sampler = mpp.LabelSampler(4, "label", {7: 1})
    volume = {"image": MetaTensor(torch.zeros(1, *SHAPE)), "label": make_label_map(SHAPE)}
    with pytest.raises(RuntimeError, match=r"sampling volume 0 \(item 0 of the data\).*none of the labels \[7\]"):
        list(mpp.PatchQueue([volume], 4, 2, sampler))


def test_invalid_arguments_raise_clear_errors():
    data = volumes(2)
    sampler = mpp.UniformSampler(4)
    with pytest.raises(ValueError, match="data is empty"):
        mpp.PatchQueue([], 4, 2, sampler)
    with pytest.raises(ValueError, match="samples_per_volume must be an int >= 1"):
        mpp.PatchQueue(data, 4, 0, sampler)
    with pytest.raises(ValueError, match="max_length must be an int >= 1"):
        mpp.PatchQueue(data, 2.5, 2, sampler)
    with pytest.raises(TypeError, match="random PatchSampler"):
        mpp.PatchQueue(data, 4, 2, mpp.GridSampler(4))
    with pytest.raises(ValueError, match="both rank and world_size"):
        mpp.PatchQueue(data, 4, 2, sampler, rank=1)
    with pytest.raises(ValueError, match="rank must be in"):
        mpp.PatchQueue(data, 4, 2, sampler, rank=2, world_size=2)
    with pytest.raises(ValueError, match="cache=True needs a sequence"):
        mpp.PatchQueue(CacheDataset(data, progress=False), 4, 2, sampler, cache=True)
    with pytest.raises(ValueError, match=r"'num_samples' must be an int >= 0.*volume 1"):
        mpp.PatchQueue(volumes(2, counts={1: -1}), 4, 2, sampler)


def test_rank_and_world_size_come_from_torch_distributed(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        q = queue(volumes(3))
        assert (q.rank, q.world_size) == (0, 1) and len(q) == 9
    finally:
        dist.destroy_process_group()


def test_bundle_config_builds_the_queue(nifti_files):
    config = json.loads(
        json.dumps(
            {
                "files": nifti_files,
                "queue": {
                    "_target_": "monai_patchplug.PatchQueue",
                    "data": "@files",
                    "max_length": 8,
                    "samples_per_volume": 2,
                    "sampler": {
                        "_target_": "monai_patchplug.LabelSampler",
                        "patch_size": 4,
                        "label_name": "label",
                        "label_probabilities": {"0": 1, "3": 1},
                    },
                    "transform": {
                        "_target_": "Compose",
                        "transforms": [
                            {"_target_": "LoadImaged", "keys": ["image", "label"], "image_only": True},
                            {"_target_": "EnsureChannelFirstd", "keys": ["image", "label"]},
                        ],
                    },
                    "seed": 0,
                },
            }
        )
    )
    parser = ConfigParser(config)
    q = parser.get_parsed_content("queue")
    batches = list(DataLoader(q, batch_size=4))
    assert len(q) == 8 and [len(b["image"]) for b in batches] == [4, 4]


# -- volumes on disk: the buffer holds patch locations, each patch is read when yielded -----------------------------
AFFINE = torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0], dtype=torch.float64))


def on_disk(item: dict, name: str, indexed: bool = False) -> dict:
    """``item``'s image and label as counting array-likes (what ``LoadLazyd`` opens), with its other entries; with
    ``indexed``, the label carries a ``LabelIndex`` (so ``LabelSampler`` draws without reading the map)."""
    meta = {"affine": AFFINE, "filename_or_obj": name}
    label = CountingArray(item["label"].numpy(), dict(meta))
    if indexed:
        label.label_index = mpp.LabelIndex.build(item["label"][0].numpy())
    return {**item, "image": CountingArray(item["image"].numpy(), dict(meta)), "label": label}


def in_memory(item: dict, name: str) -> dict:
    """``item``'s image and label as MetaTensors with the metadata :func:`on_disk` gives."""
    meta = {"affine": AFFINE, "filename_or_obj": name}
    return {
        **item,
        "image": MetaTensor(item["image"], meta=dict(meta)),
        "label": MetaTensor(item["label"], meta=dict(meta)),
    }


@pytest.mark.parametrize(
    "sampler",
    [
        mpp.UniformSampler(4, keys=["image", "label"]),
        mpp.LabelSampler(4, "label", {0: 1, 3: 2}, keys=["image", "label"]),
    ],
    ids=["uniform", "label-indexed"],
)
def test_patches_of_volumes_on_disk_are_read_one_at_a_time_when_yielded(sampler):
    """The buffer of 16 holds locations: after k patches exactly k boxes per key have been read (the label index
    draws without reading the map), each the box of a patch yielded. Reading every patch at its draw reads 12 boxes
    per key before the first patch."""
    data = [on_disk(item, f"case{i}", indexed=True) for i, item in enumerate(volumes(4))]
    arrays = {key: [item[key] for item in data] for key in ("image", "label")}
    q = mpp.PatchQueue(data, 16, 6, sampler, seed=0)
    patches = []
    for patch in q:
        patches.append(patch)
        for key, opened in arrays.items():
            assert sum(len(array.reads) for array in opened) == len(patches), key
        assert patch[mpp.LOCATION].tolist() == patch["image"].meta[mpp.LOCATION].tolist()
    assert len(patches) == len(q) == 24
    for i, (image, label) in enumerate(zip(arrays["image"], arrays["label"])):
        own = [p for p in patches if p["id"] == i]
        assert sorted(image.reads) == sorted(label.reads) == sorted(_patch_boxes(own, 1))
        assert sorted(int(p["image"].meta["patch_index"]) for p in own) == list(range(6))


@pytest.mark.parametrize(
    "sampler",
    [mpp.UniformSampler(4, keys=["image", "label"]), mpp.LabelSampler(4, "label", {0: 1, 1: 1, 3: 2})],
    ids=["uniform", "label"],
)
@pytest.mark.parametrize("meta_keys", [DEFAULT_META_KEYS, None])
def test_volumes_on_disk_give_the_patches_of_the_same_volumes_in_memory(sampler, meta_keys):
    """Same seed: the same patches (voxels, location, metadata, crop record) in the same order, shuffled and sampled
    in chunks (7 patches per volume, a buffer of 3), whether read when yielded or at once."""
    data = volumes(4, counts={1: 2, 2: 0})
    lazy = [on_disk(item, f"case{i}") for i, item in enumerate(data)]  # no label index: the same draws as in memory
    memory = [in_memory(item, f"case{i}") for i, item in enumerate(data)]
    for epoch in range(2):
        runs = []
        for items in (lazy, memory):
            q = mpp.PatchQueue(items, 3, 7, sampler, seed=5, meta_keys=meta_keys)
            q.set_epoch(epoch)
            runs.append(list(q))
        got, want = runs
        assert len(got) == len(want) == 7 + 2 + 7
        assert signature(got) == signature(want)
        for a, b in zip(want, got):
            _assert_same_patch(a, b)
            assert meta_keys is None or set(a["image"].meta) <= set(DEFAULT_META_KEYS)
            for key in ("image", "label"):
                for name, value in a[key].meta.items():
                    assert np.array_equal(np.asarray(value), np.asarray(b[key].meta[name])), (key, name)
    assert sum(len(item["image"].reads) for item in lazy) == 2 * 16  # read only the patches, each once


class VanishedArray(CountingArray):
    """An array-like whose chunk files have gone: opening works, reading a box fails."""

    def __getitem__(self, index: tuple) -> np.ndarray:
        raise OSError("chunk file image/0.0.0 not found")


def open_case(item: dict) -> dict:
    """A ``LoadLazyd`` stand-in: opens ``item``'s volume as array-likes; the case named ``broken`` cannot be read."""
    kind = VanishedArray if "broken" in item["image"] else CountingArray
    shape = (1, *SHAPE)
    return {"image": kind(np.zeros(shape, np.float32)), "label": CountingArray(np.zeros(shape, np.uint8))}


def test_a_patch_on_disk_that_fails_to_read_names_its_volume_when_yielded():
    data = [{"image": "/data/good.zarr"}, {"image": "/data/broken.zarr"}]
    q = mpp.PatchQueue(data, 8, 3, mpp.UniformSampler(4), transform=open_case, shuffle=False)
    delivered = []
    with pytest.raises(
        RuntimeError, match=r"sampling volume 1 \(image=/data/broken.zarr\) failed: OSError: chunk"
    ) as raised:
        for patch in q:
            delivered.append(patch)
    assert isinstance(raised.value.__cause__, OSError)
    assert len(delivered) == 3  # the good volume's patches came first: the broken one was drawn, then read
