"""UniformSampler and the PatchSampler behaviour every sampler shares (keys, crops, metadata, errors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import box_slices
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor
from stats import assert_counts_follow

import monai_patchplug as mpp


def locations(patches) -> np.ndarray:
    return np.stack([p[mpp.LOCATION].numpy() for p in patches])


def test_every_valid_corner_reachable_and_uniform():
    """Each of the 4 x 3 x 2 valid corners (the last one included) has probability 1/24; 48,000 draws resolve a
    cell's frequency to about 13% of itself at a false-alarm rate of 1e-6 (see ``stats``)."""
    img = torch.zeros(1, 5, 4, 3)
    n = 48000
    patches = mpp.UniformSampler((2, 2, 2), num_samples=n).set_random_state(0)({"img": img})
    loc = locations(patches)
    assert (loc[:, 3:] - loc[:, :3] == 2).all()
    flat = np.ravel_multi_index(loc[:, :3].T, (4, 3, 2))  # raises on a corner outside the valid ones
    assert_counts_follow(np.bincount(flat, minlength=24), np.full(24, 1 / 24))


def test_patch_equal_to_image_and_copy_option(subject):
    view = mpp.UniformSampler((24, 20, 16))(subject)
    copied = mpp.UniformSampler((24, 20, 16), copy=True)(subject)
    for patch in (view, copied):
        assert patch[mpp.LOCATION].tolist() == [0, 0, 0, 24, 20, 16]
        assert torch.equal(patch["image"].as_tensor(), subject["image"].as_tensor())
    assert view["image"].data_ptr() == subject["image"].data_ptr()
    assert copied["image"].data_ptr() != subject["image"].data_ptr() and copied["image"].is_contiguous()


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=2, max_size=3),
    channels=st.integers(1, 3),
    frac=st.lists(st.floats(0.01, 1.0), min_size=3, max_size=3),
    seed=st.integers(0, 2**31 - 1),
    meta=st.booleans(),
)
def test_content_equals_slice_at_location(shape, channels, frac, seed, meta):
    size = [max(1, int(round(s * f))) for s, f in zip(shape, frac)]
    img = torch.rand(channels, *shape, generator=torch.Generator().manual_seed(seed))
    data = {"img": MetaTensor(img) if meta else img.numpy(), "two": torch.zeros(2, *shape, dtype=torch.int16)}
    patches = mpp.UniformSampler(size, num_samples=3).set_random_state(seed)(data)
    for patch in patches:
        loc = patch[mpp.LOCATION]
        assert loc.dtype == torch.int64 and loc.shape == (2 * len(shape),)
        assert (loc[: len(shape)] >= 0).all() and (loc[len(shape):] <= torch.tensor(shape)).all()
        assert torch.equal(torch.as_tensor(patch["img"]), img[box_slices(loc)])
        assert patch["two"].shape == (2, *size) and patch["two"].dtype == torch.int16


def test_determinism_under_seed(subject):
    def run(seed):
        return locations(mpp.UniformSampler(6, num_samples=8).set_random_state(seed)(subject))

    assert np.array_equal(run(3), run(3))
    assert not np.array_equal(run(3), run(4))


def test_single_patch_dict_and_other_entries(subject):
    patch = mpp.UniformSampler(8)(subject)
    assert isinstance(patch, dict)
    assert set(patch) == {"image", "label", "prob", "name", mpp.LOCATION}
    assert patch["name"] == "case_000"
    assert patch["label"].dtype == torch.uint8


def test_metadata_affine_and_crop_record(subject):
    patch = mpp.UniformSampler((6, 5, 4)).set_random_state(1)(subject)
    img = patch["image"]
    corner = patch[mpp.LOCATION][:3].double()
    world_corner = subject["image"].affine[:3, :3] @ corner + subject["image"].affine[:3, 3]
    assert torch.allclose(img.affine[:3, 3], world_corner)
    assert torch.equal(img.affine[:3, :3], subject["image"].affine[:3, :3])
    assert img.meta["patch_index"] == 0
    assert np.array_equal(img.meta["crop_center"], patch[mpp.LOCATION][:3].numpy() + np.array([3, 2, 2]))
    assert torch.equal(img.meta[mpp.LOCATION], patch[mpp.LOCATION])
    record = img.applied_operations[-1]
    assert record["class"] == "UniformSampler" and record["orig_size"] == (24, 20, 16)
    start, end = patch[mpp.LOCATION][:3].tolist(), patch[mpp.LOCATION][3:].tolist()
    assert record["extra_info"]["cropped"] == [v for s, e, o in zip(start, end, (24, 20, 16)) for v in (s, o - e)]


def test_input_never_mutated(subject):
    before = {k: (v.clone(), v.affine.clone(), len(v.applied_operations), dict(v.meta)) for k, v in subject.items()
              if isinstance(v, MetaTensor)}
    keys_before = list(subject)
    for sampler in (mpp.UniformSampler(8, num_samples=2, copy=True), mpp.WeightedSampler(8, "prob", num_samples=2),
                    mpp.LabelSampler(8, "label", {1: 1, 2: 1}, num_samples=2, copy=True)):
        for patch in sampler(subject):
            patch["image"].meta["affine"][0, 0] = 99.0
            patch["image"].meta["crop_center"][0] = -1
            if sampler.copy:
                patch["image"] += 1000
                patch["label"][:] = 7
    assert list(subject) == keys_before
    for key, (data, affine, n_ops, meta) in before.items():
        assert torch.equal(subject[key].as_tensor(), data.as_tensor())
        assert torch.equal(subject[key].affine, affine)
        assert len(subject[key].applied_operations) == n_ops
        assert set(subject[key].meta) == set(meta)


def test_2d_images_and_torchio_2d_patch_size():
    img = torch.arange(60.0).reshape(1, 10, 6)
    for size in (4, (4, 3), (4, 3, 1), np.array([4, 3]), torch.tensor([4, 3])):
        patch = mpp.UniformSampler(size).set_random_state(0)({"img": img})
        loc = patch[mpp.LOCATION]
        assert loc.shape == (4,)
        assert torch.equal(torch.as_tensor(patch["img"]), img[box_slices(loc)])


def test_explicit_keys_and_allow_missing(subject):
    patch = mpp.UniformSampler(8, keys=["image", "missing"], allow_missing_keys=True)(subject)
    assert patch["image"].shape == (1, 8, 8, 8)
    assert patch["label"].shape == (1, 24, 20, 16)
    with pytest.raises(KeyError, match="missing"):
        mpp.UniformSampler(8, keys=["image", "missing"])(subject)
    none_there = mpp.UniformSampler(8, keys=["missing"], allow_missing_keys=True, num_samples=3)(subject)
    assert len(none_there) == 3  # as MONAI: the data as it is, once per sample, nothing cropped
    for patch in none_there:
        assert patch.keys() == subject.keys() and all(patch[k] is subject[k] for k in ("image", "label"))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [({"patch_size": 0}, ValueError, "positive"), ({"patch_size": -2}, ValueError, "positive"),
     ({"patch_size": 2.5}, TypeError, "patch_size"), ({"patch_size": ()}, ValueError, "patch_size"),
     ({"patch_size": 4, "num_samples": 0}, ValueError, "num_samples"),
     ({"patch_size": 4, "num_samples": 1.5}, TypeError, "num_samples")],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        mpp.UniformSampler(**kwargs)


def test_bad_data(subject):
    with pytest.raises(ValueError, match=r"larger than the image.*\(24, 20, 16\)"):
        mpp.UniformSampler((25, 4, 4))(subject)
    with pytest.raises(ValueError, match="spatial shapes differ"):
        mpp.UniformSampler(4)({**subject, "other": torch.zeros(1, 5, 5, 5)})
    with pytest.raises(ValueError, match="no image"):
        mpp.UniformSampler(4)({"name": "x", "vector": torch.zeros(3)})
