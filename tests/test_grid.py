"""GridSampler and the grid geometry: corners, coverage, crop ownership, padding, patches and their metadata."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import box_slices
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor
from monai.transforms.croppad.functional import pad_nd

import monai_patchplug as mpp
from monai_patchplug.grid import axis_corners, crop_boundaries, make_grid, resolve_overlap


@st.composite
def axis_cases(draw) -> tuple[int, int, int]:
    patch = draw(st.integers(1, 40))
    overlap = draw(st.integers(0, patch - 1))
    size = draw(st.integers(patch, 120))
    return size, patch, overlap


@settings(max_examples=60, deadline=None)
@given(axis_cases())
def test_axis_corners_cover_every_voxel_with_the_last_patch_shifted_inside(case):
    size, patch, overlap = case
    corners = axis_corners(size, patch, overlap)
    assert corners[0] == 0 and corners[-1] == size - patch
    steps = np.diff(corners)
    assert (steps > 0).all() and (steps <= patch - overlap).all()
    assert list(corners[:-1]) == list(range(0, size - patch, patch - overlap))
    covered = np.zeros(size, dtype=int)
    for c in corners:
        covered[c : c + patch] += 1
    assert covered.min() >= 1


@settings(max_examples=60, deadline=None)
@given(axis_cases())
def test_crop_boundaries_give_each_voxel_to_the_patch_with_the_nearest_centre(case):
    size, patch, overlap = case
    corners = axis_corners(size, patch, overlap)
    cuts = [0, *crop_boundaries(corners, patch), size]
    owner = np.concatenate([np.full(hi - lo, j) for j, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:]))])
    assert len(owner) == size
    centres = np.asarray(corners) + patch / 2
    distance = np.abs(np.arange(size)[:, None] + 0.5 - centres[None])
    assert (distance[np.arange(size), owner] == distance.min(1)).all()  # nearest (ties either way)
    starts = np.asarray(corners)[owner]
    assert ((np.arange(size) >= starts) & (np.arange(size) < starts + patch)).all()  # inside the owner


def test_make_grid_pads_the_border_and_small_axes():
    g = make_grid((30, 10), (16, 16), (6, 5), pad_border=True)
    assert g.pad_before == (3, 3) and g.pad_after == (3, 3)  # 10 + 2*2 = 14 < 16: 2 more, split evenly
    assert g.padded_shape == (36, 16)
    assert g.corners == ((0, 10, 20), (0,))
    assert g.num_patches == 3 and g.grid_shape == (3, 1)
    g = make_grid((30, 10), (16, 16), (6, 5), pad_border=False)
    assert g.pad_before == (0, 3) and g.pad_after == (0, 3) and g.corners[0] == (0, 10, 14)


@pytest.mark.parametrize(("overlap", "patch"), [(8, 8), (9, 8), (-1, 8), ((2, 8, 2), 8), ((2, 2), (8, 8, 8))])
def test_bad_overlap_is_an_error_naming_the_values(overlap, patch):
    with pytest.raises(ValueError, match="patch_overlap"):
        mpp.GridSampler(patch, overlap)


def test_resolve_overlap_accepts_torchio_2d_convention():
    assert resolve_overlap((4, 4, 0), (16, 16)) == (4, 4)
    with pytest.raises(TypeError, match=r"patch_overlap must hold integers, got 2\.5"):
        resolve_overlap(2.5, (16, 16))


def test_patch_larger_than_image_needs_a_padding_mode():
    image = torch.rand(1, 10, 12, 9)
    with pytest.raises(ValueError, match=r"patch_size \(16, 16, 16\).*\(10, 12, 9\)"):
        mpp.GridSampler(16)({"image": image})
    patches = mpp.GridSampler(16, padding_mode=0)({"image": image})
    assert len(patches) == 1 and patches[0]["image"].shape == (1, 16, 16, 16)


def test_bad_padding_mode_is_an_error():
    with pytest.raises(ValueError, match="bogus"):
        mpp.GridSampler(8, padding_mode="bogus")
    with pytest.raises(ValueError, match=r"'reflect' cannot pad axis 2 of size 3 by \(2, 3\)"):
        mpp.GridSampler(8, 2, padding_mode="reflect")({"image": torch.rand(1, 9, 9, 3)})


def test_num_patches_before_a_call_is_an_error():
    with pytest.raises(RuntimeError, match="num_patches"):
        _ = mpp.GridSampler(8).num_patches


@pytest.mark.parametrize("padding_mode", [None, "reflect", "edge", 5.0])
def test_patches_are_the_padded_image_at_their_location(subject, padding_mode):
    sampler = mpp.GridSampler((12, 10, 8), (4, 3, 2), padding_mode=padding_mode)
    patches = sampler(subject)
    g = sampler.geometry
    assert sampler.num_patches == len(patches) == g.num_patches
    if padding_mode is None:
        assert g.padded_shape == (24, 20, 16)
    else:
        assert g.pad_before == (2, 1, 1)
    mode, kwargs = ("constant", {"value": 5.0}) if isinstance(padding_mode, float) else (padding_mode, {})
    to_pad = [(0, 0), *zip(g.pad_before, g.pad_after)]
    padded = {k: pad_nd(subject[k].as_tensor(), to_pad, mode or "constant", **kwargs) for k in ("image", "label")}
    seen = set()
    for index, patch in enumerate(patches):
        loc = patch[mpp.LOCATION]
        assert loc.dtype == torch.int64 and loc.shape == (6,)
        seen.add(tuple(loc.tolist()))
        for key in ("image", "label"):
            assert patch[key].shape == (1, 12, 10, 8)
            assert torch.equal(patch[key].as_tensor(), padded[key][box_slices(loc)])
            assert patch[key].meta["patch_index"] == index
        assert patch["name"] == "case_000"
    assert len(seen) == len(patches)
    untouched = torch.arange(24 * 20 * 16, dtype=torch.float32).reshape(1, 24, 20, 16)
    assert torch.equal(subject["image"].as_tensor(), untouched)


def test_grid_method_and_2d_numpy_input():
    image = np.arange(30 * 22, dtype=np.float32).reshape(1, 30, 22)
    sampler = mpp.GridSampler((8, 8, 1), (2, 3, 0))
    patches = sampler.grid({"img": image})
    assert sampler.geometry.corners == ((0, 6, 12, 18, 22), (0, 5, 10, 14))
    assert len(patches) == 20 and all(p[mpp.LOCATION].shape == (4,) for p in patches)
    for p in patches:
        assert np.array_equal(np.asarray(p["img"]), image[box_slices(p[mpp.LOCATION])])


def test_patch_affine_moves_to_the_patch_origin_and_inverse_restores_the_image(subject):
    sampler = mpp.GridSampler(8, 2, keys=["image"], padding_mode="constant")
    patches = sampler(subject)
    affine = subject["image"].affine
    for patch in patches[:5]:
        corner = patch[mpp.LOCATION][:3].double() - 1  # the padding shifts the grid by overlap // 2 = 1
        expected = affine[:3, :3] @ corner + affine[:3, 3]
        assert torch.allclose(patch["image"].affine[:3, 3], expected)
        restored = sampler.inverse(patch)["image"]
        assert isinstance(restored, MetaTensor) and restored.shape == subject["image"].shape
        assert torch.allclose(restored.affine, affine)
        loc = patch[mpp.LOCATION] - torch.tensor([1, 1, 1, 1, 1, 1])
        lo, hi = loc[:3].clamp(min=0), torch.minimum(loc[3:], torch.tensor([24, 20, 16]))
        box = (slice(None), *(slice(int(a), int(b)) for a, b in zip(lo, hi)))
        assert torch.equal(restored.as_tensor()[box], subject["image"].as_tensor()[box])
        assert restored.as_tensor().sum() == subject["image"].as_tensor()[box].sum()
