"""parse_spatial_shape, get_batch_images_and_size and the patch-size rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import list_data_collate

import monai_patchplug as mpp
from monai_patchplug._shapes import resolve_patch_size


def test_parse_spatial_shape_int_and_sequences():
    assert mpp.parse_spatial_shape(4) == (4, 4, 4)
    out = mpp.parse_spatial_shape([np.int64(2), 3, torch.tensor(5).item()])
    assert out == (2, 3, 5) and all(type(v) is int for v in out)
    assert mpp.parse_spatial_shape(torch.tensor([1, 2, 3])) == (1, 2, 3)


@pytest.mark.parametrize(
    "bad, error",
    [(0, ValueError), (-3, ValueError), ((1, 2), ValueError), ((1, 2, 0), ValueError), (2.5, TypeError),
     ((1, 2.0, 3), TypeError), ("64", TypeError), (True, TypeError), (None, TypeError)],
)
def test_parse_spatial_shape_rejects(bad, error):
    with pytest.raises(error, match="shape"):
        mpp.parse_spatial_shape(bad)


def test_resolve_patch_size_2d_convention():
    assert resolve_patch_size(8, 2) == (8, 8)
    assert resolve_patch_size((8, 6, 1), 2) == (8, 6)
    assert resolve_patch_size((8, 6), 2) == (8, 6)
    with pytest.raises(ValueError, match="does not fit"):
        resolve_patch_size((8, 6, 2), 2)
    with pytest.raises(ValueError, match="does not fit"):
        resolve_patch_size((8, 6), 3)


def test_get_batch_images_and_size(subject):
    patches = mpp.UniformSampler(8, num_samples=3)(subject)
    batch = list_data_collate(patches)
    names, size = mpp.get_batch_images_and_size(batch)
    assert names == ["image", "label", "prob"] and size == 3
    with pytest.raises(ValueError, match="no image"):
        mpp.get_batch_images_and_size({"location": batch["location"], "name": batch["name"]})
    with pytest.raises(TypeError, match="batch must be a dict of batched tensors, got list"):
        mpp.get_batch_images_and_size([batch])
