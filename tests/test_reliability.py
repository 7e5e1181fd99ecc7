"""Issue 13, "Reliability": one test per finding on the samplers and the queue, each failing without its fix.

Statistical checks use a fixed seed (so they are deterministic) and bounds of 5 binomial standard deviations per cell:
under the normal approximation a correct sampler fails one cell with probability < 6e-7, so the false-alarm rate of a
whole test is below 2e-5 (17 cells at most).
"""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from monai.data import DataLoader, MetaTensor

import monai_patchplug as mpp

SHAPE = (24, 24, 24)


def image() -> torch.Tensor:
    return torch.rand(1, *SHAPE, generator=torch.Generator().manual_seed(0))


def within_binomial_bounds(counts: dict[int, int], probabilities: dict[int, float], n: int) -> bool:
    """Every cell's count within 5 binomial standard deviations of ``n * p``, and no count outside the cells."""
    if set(counts) - set(probabilities):
        return False
    return all(
        abs(counts.get(cell, 0) - n * p) <= 5 * np.sqrt(n * p * (1 - p)) for cell, p in probabilities.items()
    )


@pytest.mark.parametrize("value", [1e306, 1e308])
def test_item01_float64_huge_weights_stay_uniform(value):
    """A constant float64 map of huge finite values: corners uniform over 0..16 on every axis (the running sum used
    to overflow to inf and pin every draw to one corner)."""
    prob = torch.full((1, *SHAPE), value, dtype=torch.float64)
    n = 500
    patches = mpp.WeightedSampler(8, "p", num_samples=n).set_random_state(0)({"image": image(), "p": prob})
    uniform = dict.fromkeys(range(17), 1 / 17)
    for axis in range(3):
        counts = Counter(int(p[mpp.LOCATION][axis]) for p in patches)
        assert within_binomial_bounds(counts, uniform, n), (axis, sorted(counts.items()))


def test_item02_int64_weights_do_not_wrap():
    """Four voxels of weight 2**62 in one row and one in another: 800:200 over 1000 draws (int64 row sums wrapped)."""
    weights = torch.zeros(1, *SHAPE, dtype=torch.int64)
    weights[0, 8, 8, 8:12] = 2**62
    weights[0, 16, 16, 12] = 2**62
    n = 1000
    patches = mpp.WeightedSampler(8, "q", num_samples=n).set_random_state(0)({"image": image(), "q": weights})
    counts = Counter(int(p[mpp.LOCATION][0]) for p in patches)  # corner = centre - 4
    assert within_binomial_bounds(counts, {4: 0.8, 12: 0.2}, n), counts


@pytest.mark.parametrize("data", ["abc", {"image": "a.nii"}])
def test_item03_string_or_dict_as_queue_data_is_a_type_error(data):
    with pytest.raises(TypeError, match=rf"PatchQueue: data must be a sequence.*got {type(data).__name__}"):
        mpp.PatchQueue(data, 4, 2, mpp.UniformSampler(8))


def test_item04_float_index_lists_are_rejected():
    pos_neg = mpp.LabelSampler(spatial_size=8, label_key="label", fg_indices_key="fg", bg_indices_key="bg")
    with pytest.raises(ValueError, match=r"fg_indices_key 'fg'.*integer.*float64.*5000\.7"):
        pos_neg({"image": image(), "fg": np.array([5000.7]), "bg": np.array([100])})
    classes = mpp.LabelSampler(spatial_size=8, label_key="label", indices_key="idx", num_classes=2)
    with pytest.raises(ValueError, match=r"indices_key 'idx'\[1\].*integer"):
        classes({"image": image(), "idx": [np.array([100]), torch.tensor([200.0])]})
    patches = classes({"image": image(), "idx": [np.array([4 * 24 * 24 + 4 * 24 + 4]), np.array([], float)]})
    assert patches[0][mpp.LOCATION].tolist() == [0, 0, 0, 8, 8, 8]  # integer lists (and empty ones) still work


@pytest.mark.parametrize(
    "label_value, pos, neg, missing, centre_label",
    [(0, 1, 0, "foreground", 0), (1, 0, 1, "background", 1)],
)
def test_item05_pos_neg_falls_back_to_the_class_present(label_value, pos, neg, missing, centre_label):
    """As MONAI: the wanted class is absent and the present one has probability 0: warn, then draw the present one."""
    label = torch.full((1, *SHAPE), label_value, dtype=torch.uint8)
    sampler = mpp.LabelSampler(spatial_size=8, label_key="label", pos=pos, neg=neg, num_samples=20)
    with pytest.warns(UserWarning, match=rf"no {missing} voxel.*RandCropByPosNegLabeld"):
        patches = sampler.set_random_state(0)({"image": image(), "label": label})
    assert len(patches) == 20
    assert all(int(p["label"][0, 4, 4, 4]) == centre_label for p in patches)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mpp.LabelSampler(spatial_size=8, label_key="label", pos=pos, neg=neg, warn=False)(
            {"image": image(), "label": label}
        )


def test_item06_empty_index_lists_without_label_map_say_no_location():
    empty = np.array([], int)
    pos_neg = mpp.LabelSampler(spatial_size=8, label_key="label", fg_indices_key="fg", bg_indices_key="bg")
    with pytest.raises(ValueError, match=r"no sampling location available.*'fg'.*'bg'.*empty"):
        pos_neg({"image": image(), "fg": empty, "bg": empty})
    classes = mpp.LabelSampler(spatial_size=8, label_key="label", indices_key="idx", num_classes=2)
    with pytest.raises(ValueError, match=r"no sampling location available.*'idx'.*empty"):
        classes({"image": image(), "idx": [empty, empty]})


@pytest.mark.parametrize("meta_keys", [(), ("absent",)])
def test_item07_empty_patch_metadata_collates(meta_keys):
    volumes = [{"image": MetaTensor(torch.rand(1, 12, 12, 12))} for _ in range(2)]
    queue = mpp.PatchQueue(volumes, 4, 2, mpp.UniformSampler(4), meta_keys=meta_keys, seed=0)
    batch = next(iter(DataLoader(queue, batch_size=2, num_workers=0)))  # monai's list_data_collate
    assert batch["image"].shape == (2, 1, 4, 4, 4)
    assert set(batch["image"].meta) == {"patch_index"}


def test_item08_no_mass_messages_say_what_is_wrong():
    data = {"image": image()}
    zero_map = torch.zeros(2, *SHAPE)
    zero_map[1, 10, 10, 10] = 1.0
    with pytest.raises(ValueError, match=r"no mass: channel 0 is all zero.*channels \[1\] have mass") as err:
        mpp.WeightedSampler(8, "p")({**data, "p": zero_map})
    assert "Pad" not in str(err.value)
    with pytest.raises(TypeError, match=r"WeightedSampler: probability map 'p' is complex \(complex64\)"):
        mpp.WeightedSampler(8, "p")({**data, "p": torch.ones(1, *SHAPE, dtype=torch.complex64)})
    background = torch.zeros(1, *SHAPE, dtype=torch.uint8)
    threshold = mpp.LabelSampler(spatial_size=8, label_key="label", image_key="image", image_threshold=2.0)
    with pytest.raises(ValueError, match=r"background voxels all lie where image_key 'image' is <= image_threshold=2"):
        threshold({**data, "label": background})
    lists = mpp.LabelSampler(spatial_size=8, label_key="label", fg_indices_key="fg", bg_indices_key="bg")
    empty = np.array([], int)
    with pytest.raises(ValueError, match="no sampling location available") as err:
        lists({**data, "label": background, "fg": empty, "bg": empty})
    assert "Pad" not in str(err.value)
    border = torch.zeros(1, *SHAPE)
    border[0, 1, 12, 12] = 1.0  # mass, but only outside the valid centres: padding helps, so it is suggested
    with pytest.raises(ValueError, match=r"Pad the image by \(4, 4, 4\) before and \(3, 3, 3\) after"):
        mpp.WeightedSampler(8, "p")({**data, "p": border})
    with pytest.raises(ValueError, match="Pad the image"):
        lists({**data, "fg": np.array([12 * 24 * 24]), "bg": np.array([1])})


def test_item09_one_size_under_both_names_is_no_conflict():
    assert mpp.UniformSampler(8, roi_size=(8, 8, 8)).patch_size == (8, 8, 8)
    assert mpp.WeightedSampler(8, "p", spatial_size=[8, 8, 8]).patch_size == (8, 8, 8)
    assert mpp.LabelSampler(8, spatial_size=np.array([8, 8, 8])).patch_size == (8, 8, 8)
    assert mpp.UniformSampler(8, roi_size=(8, 8)).patch_size == (8, 8)  # the same size on a 2D image
    for roi_size in [(8, 8, 6), (8, 8, 1), 6]:
        with pytest.raises(ValueError, match=r"give patch_size=8 or MONAI's roi_size=.*not both"):
            mpp.UniformSampler(8, roi_size=roi_size)


@pytest.mark.parametrize(
    "data, got",
    [(None, "NoneType None"), ({"image": "a.nii"}, r"dict \{'image': 'a.nii'\}"), ("abc", "str 'abc'")],
)
def test_item10_wrong_containers_are_type_errors_naming_data(data, got):
    with pytest.raises(TypeError, match=rf"PatchQueue: data must be a sequence .* or a map-style dataset, got {got}"):
        mpp.PatchQueue(data, 4, 2, mpp.UniformSampler(8))


def test_item10_sampler_given_a_tensor_asks_for_a_dict():
    with pytest.raises(TypeError, match=r"UniformSampler: data must be a dict .*got Tensor.*sampler\(\{'image'"):
        mpp.UniformSampler(8)(image())


def test_item12_one_hot_error_prints_the_map_shape():
    label = torch.zeros(3, *SHAPE, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"label 3 is not a channel of the one-hot label map 'label' of shape "
                                         r"\(3, 24, 24, 24\)"):
        mpp.LabelSampler(8, "label", {3: 1})({"image": image(), "label": label})
