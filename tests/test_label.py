"""LabelSampler: centre-label frequencies follow the requested probabilities over the labels present."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_label_map
from hypothesis import given, settings
from hypothesis import strategies as st
from stats import assert_counts_follow

import monai_patchplug as mpp

PROBS = {0: 0.1, 1: 0.8, 2: 0.4, 3: 0.6}


def centre_labels(patches, key="label") -> np.ndarray:
    out = []
    for p in patches:
        lab = torch.as_tensor(p[key])
        centre = tuple(s // 2 for s in lab.shape[1:])
        out.append(int(lab[(0, *centre)]) if lab.shape[0] == 1 else int(lab[(slice(None), *centre)].argmax()))
    return np.asarray(out)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.float32])
def test_centre_label_frequencies(dtype):
    label = make_label_map((40, 36, 30)).to(dtype)
    n = 4000
    patches = mpp.LabelSampler(9, "label", PROBS, num_samples=n).set_random_state(0)({"label": label})
    counts = np.bincount(centre_labels(patches), minlength=4)
    p = np.asarray(list(PROBS.values()))
    assert_counts_follow(counts, p / p.sum())


def test_one_hot_map_keys_are_channels():
    values = make_label_map((30, 30, 20))[0].long()
    one_hot = torch.nn.functional.one_hot(values, 4).permute(3, 0, 1, 2).to(torch.uint8)
    n = 3000
    patches = mpp.LabelSampler(7, "oh", {1: 1, 3: 3}, num_samples=n).set_random_state(2)({"oh": one_hot})
    counts = np.bincount(centre_labels(patches, "oh"), minlength=4)
    assert counts[0] == counts[2] == 0
    assert_counts_follow(counts[[1, 3]], [0.25, 0.75])


def centre_counts(patches, cells, patch_size) -> np.ndarray:
    """How often each of ``cells`` is a patch centre; every centre must be one of them."""
    got = [tuple((p[mpp.LOCATION][:3] + torch.tensor(patch_size) // 2).tolist()) for p in patches]
    counts = np.asarray([got.count(c) for c in cells])
    assert counts.sum() == len(patches), set(got) - set(cells)
    return counts


def test_voxels_of_a_label_equally_likely():
    """A row of 18 voxels of label 1 along the last axis and a lone voxel of it in another row: each of the 19 voxels
    is drawn with probability 1/19 (a draw that picked a row first, then a voxel, would give the lone one 1/2)."""
    label = torch.zeros(1, 7, 7, 24, dtype=torch.uint8)
    row = [(3, 3, k) for k in range(3, 21)]
    cells = [*row, (2, 5, 11)]
    for c in cells:
        label[(0, *c)] = 1
    label[0, 3, 3, 0] = 1  # not a valid centre for patches of 3: never drawn
    patches = mpp.LabelSampler(3, "l", {1: 1.0}, num_samples=4000).set_random_state(0)({"l": label})
    assert_counts_follow(centre_counts(patches, cells, (3, 3, 3)), np.full(len(cells), 1 / len(cells)))


def test_probabilities_are_normalised_over_the_labels_present():
    """Labels 1 and 2 present with equal odds; 9 absent and 7 only where no patch can be centred. Their requests must
    not go to any present label: the split stays 1/2, 1/2 (giving them to label 1 would make it 3/4 or more)."""
    label = make_label_map((20, 20, 20))
    label[0, 0, 0, 0] = 7  # label 7 only where no centre is valid
    probs = {1: 1, 2: 1, 9: 2, 7: 100}
    patches = mpp.LabelSampler(5, "l", probs, num_samples=2000).set_random_state(0)({"l": label})
    counts = np.bincount(centre_labels(patches, "l"), minlength=10)
    assert counts[[0, 3, 7, 9]].sum() == 0
    assert_counts_follow(counts[[1, 2]], [0.5, 0.5])


def test_default_probabilities_make_every_foreground_voxel_equally_likely():
    """``label_probabilities=None``: each foreground voxel (any value > 0) has the same chance, whatever its label
    value and row: 12 voxels of label 1 in one row, one of label 2, three of label 5 (a draw per label value would
    give the label-2 voxel 1/3 instead of 1/16); background and border voxels are never centres."""
    label = torch.zeros(1, 8, 9, 18, dtype=torch.uint8)
    cells = {**{(4, 4, k): 1 for k in range(3, 15)}, (2, 6, 8): 2, (5, 2, 4): 5, (5, 6, 6): 5, (3, 5, 12): 5}
    for c, value in cells.items():
        label[(0, *c)] = value
    label[0, 0, 4, 4] = label[0, 4, 4, 17] = 3  # foreground where no patch of 5 can be centred
    patches = mpp.LabelSampler(5, "l", num_samples=4000).set_random_state(0)({"l": label})
    assert_counts_follow(centre_counts(patches, list(cells), (5, 5, 5)), np.full(len(cells), 1 / len(cells)))


def test_label_name_none_finds_integer_map(subject):
    patch = mpp.LabelSampler(6, label_probabilities={3: 1}).set_random_state(0)(subject)
    assert int(patch["label"][0, 3, 3, 3]) == 3


def test_json_string_keys():
    probs = json.loads(json.dumps(PROBS))
    assert set(probs) == {"0", "1", "2", "3"}
    assert mpp.LabelSampler(4, "l", probs).label_probabilities == PROBS


@pytest.mark.parametrize(
    "probs, error, match",
    [({1: -0.5}, ValueError, "label 1"), ({0: 0, 1: 0}, ValueError, "positive"),
     ({1: float("nan")}, ValueError, "finite"), ({"one": 1}, ValueError, "'one'"), ({1.5: 1}, ValueError, "1.5"),
     ({1: "a"}, TypeError, "number"),
     ([0.1, 0.9], TypeError, "dict"), ({}, ValueError, "positive")],
)
def test_bad_probabilities(probs, error, match):
    with pytest.raises(error, match=match):
        mpp.LabelSampler(4, "l", probs)


def test_all_labels_absent():
    label = make_label_map((12, 12, 12))
    with pytest.raises(ValueError, match=r"holds none of the labels \[5, 6\] \(it holds \[0, 1, 2, 3\]\)"):
        mpp.LabelSampler(4, "l", {5: 1, 6: 1})({"l": label})
    border = torch.zeros(1, 12, 12, 12, dtype=torch.uint8)
    border[0, 0, 5, 5] = 1
    with pytest.raises(ValueError, match="Pad the image"):
        mpp.LabelSampler(4, "l", {1: 1})({"l": border})


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(3, 12), min_size=2, max_size=3),
    frac=st.floats(0.1, 1.0),
    seed=st.integers(0, 1000),
)
def test_centre_always_has_a_wanted_label(shape, frac, seed):
    size = [max(1, int(s * frac)) for s in shape]
    gen = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 3, (1, *shape), generator=gen, dtype=torch.uint8)
    label[(0, *[s // 2 for s in shape])] = 2  # the middle voxel is a valid centre for every patch size
    patches = mpp.LabelSampler(size, "l", {2: 1}, num_samples=5).set_random_state(seed)({"l": label})
    for patch in patches:
        loc = patch[mpp.LOCATION]
        centre = loc[: len(shape)] + torch.tensor(size) // 2
        assert int(label[(0, *centre.tolist())]) == 2
