"""GridAggregator: exact reconstruction, crop ownership, windows, dtypes, scaled outputs, errors; the 1-D windows."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import box_slices, grid_setups
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.data import DataLoader, list_data_collate
from monai.data.utils import compute_importance_map

import monai_patchplug as mpp
from monai_patchplug.inference.windows import gaussian_window, grid_normaliser, hann_window

MODES = ["crop", "average", "hann"]


def aggregate(sampler, subject, mode, network=lambda x: x, batch=3, seed=0, key="image", **kwargs):
    """Run the grid through ``network`` in shuffled batches and return the aggregated output."""
    patches = sampler(subject)
    order = np.random.RandomState(seed).permutation(len(patches))
    aggregator = mpp.GridAggregator(sampler, mode, **kwargs)
    for start in range(0, len(order), batch):
        chosen = [patches[i] for i in order[start : start + batch]]
        images = torch.stack([p[key] for p in chosen])
        aggregator.add_batch(network(images), torch.stack([p[mpp.LOCATION] for p in chosen]))
    return aggregator.get_output_tensor()


@st.composite
def grid_cases(draw):
    shape, patch, overlap, padding = draw(grid_setups(9, 20, [None, 0, "reflect", "replicate"]))
    if padding in (None, "reflect"):  # torch's reflect needs the axis longer than the pad
        shape = tuple(max(s, p) for s, p in zip(shape, patch))
    return shape, patch, overlap, padding


@settings(max_examples=40, deadline=None)
@given(grid_cases(), st.sampled_from(MODES))
def test_identity_network_reconstructs_the_input(case, mode):
    shape, patch, overlap, padding = case
    image = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    sampler = mpp.GridSampler(patch, overlap, padding_mode=padding)
    out = aggregate(sampler, {"image": image}, mode, network=lambda x: x * 2 - 1)
    assert out.shape == image.shape and out.dtype == torch.float32
    if mode == "crop":
        assert torch.equal(out, image * 2 - 1)
    else:
        torch.testing.assert_close(out, image * 2 - 1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overlap", [0, 1, 4, 5, 7])
def test_crop_takes_each_voxel_from_the_patch_with_the_nearest_centre(overlap):
    shape, patch = (23, 17, 11), (8, 6, 5)
    sampler = mpp.GridSampler(patch, tuple(min(overlap, p - 1) for p in patch))  # each axis up to its largest overlap
    image = torch.zeros(1, *shape)
    patches = sampler({"image": image})
    aggregator = mpp.GridAggregator(sampler, "crop")
    for index, p in enumerate(patches):  # each patch filled with its own index
        aggregator.add_batch(torch.full((1, 1, *patch), index, dtype=torch.int64), p[mpp.LOCATION][None])
    out = aggregator.get_output_tensor()
    assert out.dtype == torch.int64
    # per axis, the owner's centre is the nearest one (ties may go either way)
    g = sampler.geometry
    owners = np.unravel_index(out[0].numpy(), g.grid_shape)
    for axis, (size, p, corners) in enumerate(zip(shape, patch, g.corners)):
        centres = np.asarray(corners) + p / 2
        d = np.abs(np.arange(size)[:, None] + 0.5 - centres)
        index = [None, None, None]
        index[axis] = slice(None)
        x = np.broadcast_to(np.arange(size)[tuple(index)], shape)
        assert (d[x, owners[axis]] == d.min(1)[x]).all()


def test_every_voxel_is_covered_and_blended_with_positive_weights():
    sampler = mpp.GridSampler(7, 3, padding_mode="edge")
    image = torch.zeros(1, 19, 13, 9)
    for mode in ("average", "hann"):
        out = aggregate(sampler, {"image": image}, mode, network=lambda x: torch.ones_like(x))
        assert torch.allclose(out, torch.ones_like(out), atol=1e-6)
    assert hann_window(7).min() > 0 and hann_window(1).item() == pytest.approx(1.0)


def closed_form_hann(size: int) -> torch.Tensor:
    """The design's Hann window, strictly positive at the edges: ``sin^2(pi (n + 1) / (size + 1))``, n < size."""
    n = np.arange(size)
    return torch.from_numpy(np.sin(np.pi * (n + 1) / (size + 1)) ** 2)


@pytest.mark.parametrize("size", [1, 2, 5, 8, 33])
def test_hann_window_is_the_closed_form(size):
    torch.testing.assert_close(hann_window(size, torch.float64), closed_form_hann(size), rtol=0, atol=1e-12)


def test_hann_blending_is_a_weighted_mean_with_the_separable_window():
    """Patches holding different constants: the output is the Hann-weighted mean of the covering patches."""
    shape, patch, overlap = (10, 9), (6, 5), (3, 2)
    sampler = mpp.GridSampler(patch, overlap)
    patches = sampler({"image": torch.zeros(1, *shape)})
    aggregator = mpp.GridAggregator(sampler, "hann")
    num = torch.zeros(shape, dtype=torch.float64)
    den = torch.zeros(shape, dtype=torch.float64)
    weight = closed_form_hann(6)[:, None] * closed_form_hann(5)
    for index, p in enumerate(patches):
        aggregator.add_batch(torch.full((1, 1, *patch), float(index)), p[mpp.LOCATION][None])
        num[box_slices(p[mpp.LOCATION])[1:]] += index * weight
        den[box_slices(p[mpp.LOCATION])[1:]] += weight
    torch.testing.assert_close(aggregator.get_output_tensor()[0].double(), num / den, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_network_may_change_channels_and_scale_patches(mode):
    shape = (32, 24, 16)
    image = torch.randn(1, *shape)
    sampler = mpp.GridSampler(8, 4)

    def half(x):
        return torch.cat([F.avg_pool3d(x, 2), -F.avg_pool3d(x, 2)], 1)

    out = aggregate(sampler, {"image": image}, mode, network=half)
    expected = half(image[None])[0]
    assert out.shape == (2, 16, 12, 8)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out = aggregate(sampler, {"image": image}, mode, network=lambda x: F.interpolate(x, scale_factor=(2, 1, 3)))
    torch.testing.assert_close(out, F.interpolate(image[None], scale_factor=(2, 1, 3))[0], rtol=1e-5, atol=1e-5)


def test_integer_and_half_outputs_neither_overflow_nor_round():
    sampler = mpp.GridSampler(6, 3)
    image = torch.zeros(1, 14, 11, 8)
    big = 2**31 - 7  # float32 would round it
    for mode in MODES:
        out = aggregate(sampler, {"image": image}, mode, network=lambda x: torch.full_like(x, big, dtype=torch.int32))
        assert out.dtype == (torch.int32 if mode == "crop" else torch.float64)
        assert (out.double() - big).abs().max() < 1e-5  # float32 would be off by up to 128
        out = aggregate(sampler, {"image": image}, mode, network=lambda x: torch.full_like(x, 60000, dtype=torch.half))
        assert out.dtype == (torch.half if mode == "crop" else torch.float32)  # a half sum overflows above 65504
        torch.testing.assert_close(out.double(), torch.full_like(out, 60000.0, dtype=torch.float64), rtol=1e-6, atol=0)
        out = aggregate(sampler, {"image": image}, mode, network=lambda x: torch.full_like(x, 255, dtype=torch.uint8))
        assert out.dtype == (torch.uint8 if mode == "crop" else torch.float32)
        assert (out.double() - 255).abs().max() < 1e-4


def test_seed_streaming_loop_and_dataloader_batches(subject):
    sampler = mpp.GridSampler(patch_size=8, patch_overlap=2)
    aggregator = mpp.GridAggregator(sampler=sampler, overlap_mode="average")  # made before any subject
    for patch in sampler(subject):
        aggregator.add_batch(patch["image"].unsqueeze(0) + 1, patch[mpp.LOCATION].unsqueeze(0))
    torch.testing.assert_close(aggregator.get_output_tensor(), subject["image"].as_tensor() + 1)

    aggregator = mpp.GridAggregator(sampler, "hann")
    loader = DataLoader(sampler(subject), batch_size=4, collate_fn=list_data_collate)
    for batch in loader:
        aggregator.add_batch(batch["image"] * 2, batch[mpp.LOCATION])
    assert sampler.num_patches == 4 * 3 * 3
    torch.testing.assert_close(aggregator.get_output_tensor(), subject["image"].as_tensor() * 2)


def test_output_is_normalised_once():
    sampler = mpp.GridSampler(6, 2)
    aggregator = mpp.GridAggregator(sampler, "average")
    for p in sampler({"image": torch.ones(1, 12, 12)}):
        aggregator.add_batch(p["image"][None], p[mpp.LOCATION][None])
    first = aggregator.get_output_tensor().clone()
    assert torch.equal(aggregator.get_output_tensor(), first)
    with pytest.raises(RuntimeError, match="after get_output_tensor"):
        aggregator.add_batch(torch.ones(1, 1, 6, 6), torch.tensor([[0, 0, 6, 6]]))


def test_bad_batches_and_locations_are_clear_errors():
    with pytest.raises(ValueError, match="'bogus'"):
        mpp.GridAggregator(mpp.GridSampler(4), "bogus")
    sampler = mpp.GridSampler(6, 2)
    aggregator = mpp.GridAggregator(sampler, "average")
    with pytest.raises(RuntimeError, match="has not laid a grid"):
        aggregator.add_batch(torch.ones(1, 1, 6, 6), torch.tensor([[0, 0, 6, 6]]))
    patches = sampler({"image": torch.ones(1, 14, 10)})
    locs = torch.stack([p[mpp.LOCATION] for p in patches[:2]])
    with pytest.raises(ValueError, match=r"batch of shape \(3, 1, 6, 6\) does not match locations of shape \(2, 4\)"):
        aggregator.add_batch(torch.ones(3, 1, 6, 6), locs)
    with pytest.raises(ValueError, match=r"location \[10, 4, 16, 10\] is outside the volume of spatial shape \(14, 10"):
        aggregator.add_batch(torch.ones(1, 1, 6, 6), torch.tensor([[10, 4, 16, 10]]))
    with pytest.raises(ValueError, match=r"\[1, 0, 7, 6\] is not on the sampler's grid"):
        aggregator.add_batch(torch.ones(1, 1, 6, 6), torch.tensor([[1, 0, 7, 6]]))
    with pytest.raises(ValueError, match=r"locations must be integers, got \[\[0.5, 0.0, 6.5, 6.0\]\]"):
        aggregator.add_batch(torch.ones(1, 1, 6, 6), torch.tensor([[0.5, 0.0, 6.5, 6.0]]))
    with pytest.raises(ValueError, match=r"\[0, 0, 5, 6\] is not a box of the sampler's patch size \(6, 6\)"):
        aggregator.add_batch(torch.ones(1, 1, 5, 6), torch.tensor([[0, 0, 5, 6]]))
    aggregator.add_batch(torch.ones(2, 1, 6, 6), locs)
    with pytest.raises(ValueError, match="added twice"):
        aggregator.add_batch(torch.ones(1, 1, 6, 6), locs[:1])
    with pytest.raises(ValueError, match=r"patch shape \(2, 6, 6\) does not match the earlier batches' \(1, 6, 6\)"):
        aggregator.add_batch(torch.ones(1, 2, 6, 6), torch.stack([patches[2][mpp.LOCATION]]))
    with pytest.raises(ValueError, match=f"{len(patches) - 2} of {len(patches)} grid patches were never added"):
        aggregator.get_output_tensor()
    sampler({"image": torch.ones(1, 16, 10)})
    with pytest.raises(ValueError, match=r"mixing subjects of different shapes.*\(14, 10\).*\(16, 10\)"):
        aggregator.add_batch(torch.ones(1, 1, 6, 6), locs[:1])


def test_plan_records_the_grid_for_aggregators_fed_by_workers():
    sampler = mpp.GridSampler(5, 1)
    geometry = sampler.plan((9, 13, 5))
    aggregator = mpp.GridAggregator(sampler, "crop", device="cpu")
    image = torch.randn(3, 9, 13, 5)
    for corner in geometry.corner_array():
        loc = torch.as_tensor(np.concatenate([corner, corner + 5]))
        aggregator.add_batch(image[box_slices(loc)][None], loc[None])
    assert torch.equal(aggregator.get_output_tensor(), image)


# -- windows ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 2, 7, 16, 33])
def test_gaussian_window_matches_monai_importance_map_on_one_axis(size):
    ours = gaussian_window(size)
    theirs = compute_importance_map((size,), mode="gaussian", sigma_scale=0.125)
    # MONAI floors at 1e-3 absolute, we at 1e-3 of the peak (which is below 1 for even sizes): compare elsewhere
    kept = theirs > 1e-3
    torch.testing.assert_close(ours[kept], theirs[kept], rtol=1e-6, atol=1e-7)
    assert torch.allclose(ours[~kept], ours.max() * 1e-3) and torch.equal(ours, ours.flip(0))


def test_grid_normaliser_is_the_sum_of_placed_windows():
    window = hann_window(5, torch.float64)
    starts = [0, 3, 6, 8]
    expected = torch.zeros(13, dtype=torch.float64)
    for s in starts:
        expected[s : s + 5] += window
    assert torch.allclose(grid_normaliser(window, starts, 13), expected)


def test_separable_normaliser_equals_the_full_weight_map():
    """The per-axis sums multiply to the N-D sum of outer-product windows over the Cartesian grid."""
    sizes, patch, starts = (11, 9), (5, 4), ([0, 3, 6], [0, 2, 5])
    windows = [hann_window(p, torch.float64) for p in patch]
    full = torch.zeros(sizes, dtype=torch.float64)
    for a, b in itertools.product(*starts):
        full[a : a + 5, b : b + 4] += windows[0][:, None] * windows[1]
    separable = grid_normaliser(windows[0], starts[0], 11)[:, None] * grid_normaliser(windows[1], starts[1], 9)
    assert torch.allclose(full, separable)
