"""WeightedSampler and the hierarchical draw: centres only where the map is positive, in proportion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import box_slices
from hypothesis import given, settings
from hypothesis import strategies as st

import monai_patchplug as mpp
from monai_patchplug.sampling.weighted import draw_from_weights


def centres(patches, patch_size) -> np.ndarray:
    return np.stack([p[mpp.LOCATION][:3].numpy() for p in patches]) + np.asarray(patch_size) // 2


def assert_frequencies(observed_counts: np.ndarray, probabilities: np.ndarray, n: int) -> None:
    """Each frequency within 5 standard deviations of its binomial expectation."""
    sd = np.sqrt(probabilities * (1 - probabilities) / n)
    assert np.all(np.abs(observed_counts / n - probabilities) <= 5 * sd + 1e-12), (observed_counts / n, probabilities)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.uint8, torch.int32])
def test_centres_in_proportion_to_the_map(dtype):
    shape, size = (12, 10, 8), (4, 4, 2)
    prob = torch.zeros(1, *shape, dtype=dtype)
    points = {(2, 2, 1): 1, (5, 7, 3): 2, (9, 4, 6): 3, (9, 4, 7): 4, (5, 9, 3): 5}
    for p, w in points.items():
        prob[(0, *p)] = w
    prob[0, 0, 0, 0] = 50  # not a valid centre for this patch size: must never be drawn
    prob[0, 11, 9, 7] = 50  # likewise at the far corner
    n = 6000
    patches = mpp.WeightedSampler(size, "prob", num_samples=n).set_random_state(0)({"prob": prob})
    got, counts = np.unique(centres(patches, size), axis=0, return_counts=True)
    valid = {p: w for p, w in points.items() if p != (5, 9, 3)}  # 9 > S-1-(P-1)//2 = 8 on axis 1
    assert {tuple(g) for g in got.tolist()} == set(valid)
    expected = np.asarray([valid[tuple(g)] for g in got.tolist()], dtype=float)
    assert_frequencies(counts, expected / expected.sum(), n)


def test_finite_weights_whose_row_sums_overflow_float32_keep_their_proportions():
    """Weights near float32's maximum: row sums that overflow float32 are summed again in float64."""
    shape, size = (8, 9, 10), (3, 4, 5)
    prob = torch.full((1, *shape), 1e38, dtype=torch.float32)
    prob[0, 4, 4, 4] = 3e38
    n = 6000
    got = centres(mpp.WeightedSampler(size, "prob", num_samples=n).set_random_state(0)({"prob": prob}), size)
    valid = 6 * 6 * 6
    hits = (got == (4, 4, 4)).all(1).sum()
    assert_frequencies(np.asarray([hits]), np.asarray([3 / (valid + 2)]), n)
    assert len(np.unique(got, axis=0)) == valid


def test_bool_map_and_2d():
    prob = torch.zeros(1, 9, 7, dtype=torch.bool)
    prob[0, 3, 2] = prob[0, 5, 5] = True
    patches = mpp.WeightedSampler((3, 3), "m", num_samples=400).set_random_state(1)({"m": prob})
    got = {tuple((p[mpp.LOCATION][:2] + 1).tolist()) for p in patches}
    assert got == {(3, 2), (5, 5)}


def test_hierarchical_draw_matches_distribution():
    rng = np.random.RandomState(0)
    weights = rng.gamma(0.3, size=(6, 5, 7)).astype(np.float32)
    weights[2] = 0
    n = 60000
    idx = draw_from_weights(weights, n, np.random.RandomState(1))
    flat = np.ravel_multi_index(idx.T, weights.shape)
    counts = np.bincount(flat, minlength=weights.size)
    p = (weights / weights.sum()).ravel().astype(float)
    assert counts[p == 0].sum() == 0
    assert_frequencies(counts, p, n)


def test_large_map_keeps_small_mass():
    """A single tiny weight among 10^6 zeros and one large weight is still drawn in proportion."""
    weights = np.zeros((100, 100, 100), dtype=np.float32)
    weights[10, 10, 10] = 1e-3
    weights[90, 90, 90] = 1.0
    idx = draw_from_weights(weights, 200000, np.random.RandomState(0))
    hits = (idx == [10, 10, 10]).all(1).sum()
    assert hits > 0 and abs(hits / 200000 - 1e-3 / 1.001) < 5 * np.sqrt(1e-3 / 200000)
    assert ((idx == [10, 10, 10]).all(1) | (idx == [90, 90, 90]).all(1)).all()


def test_determinism(subject):
    def run(seed):
        patches = mpp.WeightedSampler(6, "prob", num_samples=5).set_random_state(seed)(subject)
        return np.stack([p[mpp.LOCATION].numpy() for p in patches])

    assert np.array_equal(run(7), run(7)) and not np.array_equal(run(7), run(8))


@pytest.mark.parametrize("value, match", [(-1.0, "negative"), (float("nan"), "NaN"), (float("inf"), "infinite")])
def test_bad_values(value, match):
    prob = torch.ones(1, 8, 8, 8)
    prob[0, 4, 4, 4] = value
    with pytest.raises(ValueError, match=match):
        mpp.WeightedSampler(4, "prob")({"prob": prob})


def test_no_mass_on_valid_centres_says_how_to_pad():
    prob = torch.zeros(1, 8, 8, 8)
    prob[0, 0, 4, 4] = 1.0
    with pytest.raises(ValueError, match=r"no mass.*Pad the image by \(2, 2, 2\) before and \(1, 1, 1\) after"):
        mpp.WeightedSampler(4, "prob")({"prob": prob})
    with pytest.raises(ValueError, match="no mass"):
        mpp.WeightedSampler(4, "prob")({"prob": torch.zeros(1, 8, 8, 8)})


def test_missing_map_key(subject):
    with pytest.raises(KeyError, match="'weights'"):
        mpp.WeightedSampler(4, "weights")(subject)
    with pytest.raises(TypeError, match="probability_map"):
        mpp.WeightedSampler(4, None)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(2, 10), min_size=2, max_size=3),
    frac=st.floats(0.1, 1.0),
    seed=st.integers(0, 10_000),
    dtype=st.sampled_from([np.float32, np.float64, np.uint8, np.int16]),
)
def test_weighted_centres_hit_positive_weights_and_content_matches(shape, frac, seed, dtype):
    rng = np.random.RandomState(seed)
    size = [max(1, int(s * frac)) for s in shape]
    prob = (rng.rand(1, *shape) > 0.6).astype(dtype) * rng.randint(1, 5, size=(1, *shape)).astype(dtype)
    prob[(0, *[s // 2 for s in shape])] = 1  # a valid centre for every patch size
    image = rng.rand(2, *shape).astype(np.float32)
    patches = mpp.WeightedSampler(size, "p", num_samples=4).set_random_state(seed)({"p": prob, "img": image})
    for patch in patches:
        loc = patch[mpp.LOCATION].numpy()
        centre = loc[: len(shape)] + np.asarray(size) // 2
        assert prob[(0, *centre)] > 0
        assert np.array_equal(np.asarray(patch["img"]), image[box_slices(torch.from_numpy(loc))])
