"""Any number of spatial dimensions (issue 19): 1-D signals and 4-D volumes through every sampler and both front ends.

Exact reconstruction and the sampler contracts are property tests over ranks 1-4; the draws' frequencies are checked
on 1-D and 4-D maps with a stated false-alarm rate (``stats.ALPHA`` per check, fixed seeds); MONAI's own 1-D and 4-D
sliding-window cases give MONAI's output.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import box_slices, make_label_map
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor, list_data_collate
from monai.inferers import sliding_window_inference
from stats import assert_counts_follow

import monai_patchplug as mpp
from monai_patchplug._shapes import image_entries, resolve_patch_size
from monai_patchplug.grid import check_overlap_fits, make_grid, resolve_overlap
from monai_patchplug.sampling.weighted import draw_from_weights

MODES = ["crop", "average", "hann", "gaussian"]
#: per rank: the largest patch and image axis the property tests draw (keeps 4-D grids small)
LIMITS = {1: (12, 40), 2: (8, 20), 3: (5, 11), 4: (4, 7)}


def affine(x: torch.Tensor) -> torch.Tensor:
    """A voxel-wise network: reconstruction through it is exact in every mode."""
    return x * 2 - 1


@st.composite
def grids(draw, paddings=(None, 0, "replicate")) -> tuple:
    """``(shape, patch, overlap, padding)`` of a grid of rank 1-4 with at most 200 patches."""
    ndim = draw(st.integers(1, 4))
    max_patch, max_shape = LIMITS[ndim]
    patch = tuple(draw(st.integers(1, max_patch)) for _ in range(ndim))
    overlap = tuple(draw(st.integers(0, p - 1)) for p in patch)
    padding = draw(st.sampled_from(paddings))
    shape = tuple(draw(st.integers(1 if padding is not None else p, max_shape)) for p in patch)
    assume(make_grid(shape, patch, overlap, pad_border=padding is not None).num_patches <= 200)
    return shape, patch, overlap, padding


# --- exact reconstruction, ranks 1-4, every mode ------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(grids(), st.sampled_from(MODES))
def test_grid_inferer_reconstructs_any_rank(case, mode):
    shape, patch, overlap, padding = case
    x = torch.randn(2, 2, *shape, generator=torch.Generator().manual_seed(0))
    out = mpp.GridInferer(patch, overlap, mode, batch_size=16, padding_mode=padding)(x, affine)
    assert out.shape == x.shape
    if mode == "crop":
        assert torch.equal(out, affine(x))
    else:
        torch.testing.assert_close(out, affine(x), rtol=1e-5, atol=1e-5)


@settings(max_examples=80, deadline=None)
@given(grids(), st.sampled_from(MODES))
def test_grid_sampler_and_aggregator_reconstruct_any_rank(case, mode):
    shape, patch, overlap, padding = case
    image = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    sampler = mpp.GridSampler(patch, overlap, padding_mode=padding)
    patches = sampler({"image": image, "name": "case"})
    assert len(patches) == sampler.num_patches
    aggregator = mpp.GridAggregator(sampler, mode)
    order = np.random.RandomState(0).permutation(len(patches))  # batches in any order
    for start in range(0, len(order), 16):
        batch = list_data_collate([patches[i] for i in order[start : start + 16]])
        assert batch[mpp.LOCATION].shape[1] == 2 * len(shape)
        aggregator.add_batch(affine(batch["image"]), batch[mpp.LOCATION])
    out = aggregator.get_output_tensor()
    assert out.shape == image.shape
    if mode == "crop":
        assert torch.equal(out, affine(image))
    else:
        torch.testing.assert_close(out, affine(image), rtol=1e-5, atol=1e-5)


# --- MONAI's 1-D and 4-D sliding-window cases ------------------------------------------------------------------


def window_dependent(x: torch.Tensor) -> torch.Tensor:
    """Output depends on the window (its mean), so the blending weights and the grid must match MONAI's exactly."""
    spatial = tuple(range(2, x.ndim))
    return torch.cat([x * 3 + x.mean(spatial, keepdim=True), x.amax(spatial, keepdim=True).expand_as(x)], 1)


@pytest.mark.parametrize(
    ("shape", "roi", "sw_batch", "overlap"),
    [
        ((2, 3, 16), (4,), 3, 0.25),  # MONAI's 1-D case
        ((2, 3, 16, 15, 7, 9), 4, 3, 0.25),  # MONAI's 4-D case
        ((1, 2, 5), (8,), 2, 0.5),  # 1-D input shorter than the window: MONAI pads
        ((1, 1, 9, 6, 5, 7), (4, -1, 3, 8), 5, 0.6),  # 4-D, the image size on one axis, padding on another
    ],
)
@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_monai_arguments_give_monai_output_in_1d_and_4d(shape, roi, sw_batch, overlap, mode):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(2))
    expected = sliding_window_inference(x, roi, sw_batch, window_dependent, overlap=overlap, mode=mode)
    inferer = mpp.GridInferer(roi_size=roi, sw_batch_size=sw_batch, overlap=overlap, mode=mode)
    got = inferer(x, window_dependent)
    assert got.shape == expected.shape
    torch.testing.assert_close(torch.as_tensor(got), torch.as_tensor(expected), rtol=1e-5, atol=1e-6)


# --- sampler contracts, ranks 1-4 -----------------------------------------------------------------------------------


@st.composite
def sampler_cases(draw) -> tuple:
    """``(kind, shape, patch spec, seed)``: a patch spec as an int, a tuple, or a tuple with TorchIO's trailing 1s."""
    ndim = draw(st.integers(1, 4))
    _, max_shape = LIMITS[ndim]
    shape = tuple(draw(st.integers(1, max_shape)) for _ in range(ndim))
    patch = tuple(draw(st.integers(1, s)) for s in shape)
    spec = draw(
        st.sampled_from(
            ["tuple", "trailing ones"] + (["int"] if len(set(patch)) == 1 else []) + (["array"] if ndim > 1 else [])
        )
    )
    given_spec = {
        "tuple": patch,
        "trailing ones": (*patch, 1, 1)[: max(ndim + 1, 3)],
        "int": patch[0],
        "array": np.asarray(patch),
    }[spec]
    kind = draw(st.sampled_from(["uniform", "weighted", "label", "grid"]))
    return kind, shape, patch, given_spec, draw(st.integers(0, 2**31 - 1))


def _subject(shape: tuple[int, ...], patch: tuple[int, ...], seed: int) -> dict:
    """An image of unique values, a sparse weight map and a label map; each map has mass on the central centre."""
    rng = np.random.RandomState(seed)
    size = math.prod(shape)
    image = torch.arange(size, dtype=torch.float32).reshape(1, *shape)
    weights = (rng.random_sample((1, *shape)) < 0.2) * rng.random_sample((1, *shape))
    labels = rng.randint(0, 4, size=(1, *shape)).astype(np.uint8)
    middle = tuple((p // 2 + s - 1 - (p - 1) // 2) // 2 for p, s in zip(patch, shape))  # a valid centre
    weights[(0, *middle)] = 1.0
    labels[(0, *middle)] = 2
    table = np.eye(2)  # a small 2-D array: an image only when the subject is 1-D (then it has the wrong shape)
    return {"image": image, "w": torch.from_numpy(weights), "seg": torch.from_numpy(labels), "name": "x", "t": table}


def _sampler(kind: str, spec):
    keys = ["image", "w", "seg"]
    return {
        "uniform": lambda: mpp.UniformSampler(spec, keys=keys, num_samples=6),
        "weighted": lambda: mpp.WeightedSampler(spec, "w", keys=keys, num_samples=6),
        "label": lambda: mpp.LabelSampler(spec, "seg", {1: 1.0, 2: 3.0}, keys=keys, num_samples=6),
        "grid": lambda: mpp.GridSampler(spec, keys=keys),
    }[kind]()


@settings(max_examples=120, deadline=None)
@given(sampler_cases())
def test_sampler_contracts_on_any_rank(case):
    kind, shape, patch, spec, seed = case
    subject = _subject(shape, patch, seed)
    patches = _sampler(kind, spec).set_random_state(seed)(subject)
    ndim = len(shape)
    for p in patches:
        location = p[mpp.LOCATION]
        assert location.dtype == torch.int64 and location.shape == (2 * ndim,)
        start, end = location[:ndim].numpy(), location[ndim:].numpy()
        assert (end - start == patch).all() and (start >= 0).all() and (end <= shape).all()
        for key in ("image", "w", "seg"):
            assert torch.equal(torch.as_tensor(p[key]), subject[key][box_slices(location)])
        assert p["name"] == "x" and p["t"] is subject["t"]  # other entries copied, not cropped
        centre = tuple(start + np.asarray(patch) // 2)
        if kind == "weighted":
            assert subject["w"][(0, *centre)] > 0
        if kind == "label":
            assert int(subject["seg"][(0, *centre)]) in (1, 2)
    if kind == "grid":
        covered = torch.zeros(shape, dtype=torch.bool)
        for p in patches:
            covered[box_slices(p[mpp.LOCATION])[1:]] = True
        assert covered.all()


def test_every_valid_corner_is_drawn_in_1d_and_4d():
    """UniformSampler: every corner in ``[0, S - P]`` on every axis, and no other, over many draws."""
    for shape, patch in (((11,), (4,)), ((4, 3, 5, 3), (2, 3, 4, 1))):
        sampler = mpp.UniformSampler(patch, num_samples=3000).set_random_state(5)
        starts = np.stack([p[mpp.LOCATION][: len(shape)].numpy() for p in sampler({"x": torch.zeros(1, *shape)})])
        expected = {tuple(c) for c in np.ndindex(*(s - p + 1 for s, p in zip(shape, patch)))}
        assert {tuple(c) for c in starts.tolist()} == expected


# --- frequencies on 1-D and 4-D maps (false-alarm rate stats.ALPHA per check, fixed seeds) ------------------------


def centre_counts(patches, patch, cells) -> np.ndarray:
    ndim = len(patch)
    centres = [tuple(p[mpp.LOCATION][:ndim].numpy() + np.asarray(patch) // 2) for p in patches]
    index = {cell: i for i, cell in enumerate(cells)}
    assert set(centres) <= set(index), set(centres) - set(index)
    return np.bincount([index[c] for c in centres], minlength=len(cells))


@pytest.mark.parametrize(
    ("shape", "patch", "points"),
    [
        ((40,), (5,), {(2,): 1.0, (3,): 7.0, (20,): 2.5, (37,): 4.0, (38,): 9.0, (39,): 50.0, (0,): 50.0}),
        (
            (6, 5, 6, 5),
            (3, 2, 3, 2),
            {(1, 1, 1, 1): 1.0, (4, 3, 4, 3): 2.0, (2, 2, 3, 4): 3.0, (0, 2, 2, 2): 50.0, (3, 3, 5, 2): 50.0},
        ),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_weighted_centres_follow_the_map_in_1d_and_4d(shape, patch, points, dtype):
    prob = torch.zeros(1, *shape, dtype=dtype)
    for point, w in points.items():
        prob[(0, *point)] = w
    valid = {
        p: float(prob[(0, *p)])
        for p in points
        if all(q // 2 <= c <= s - 1 - (q - 1) // 2 for c, q, s in zip(p, patch, shape))
    }
    assert len(valid) < len(points)  # some mass lies where no centre may be: it must never be drawn
    n = 4000
    patches = mpp.WeightedSampler(patch, "prob", num_samples=n).set_random_state(3)({"prob": prob})
    cells = list(valid)
    weights = np.asarray([valid[c] for c in cells])
    assert_counts_follow(centre_counts(patches, patch, cells), weights / weights.sum())


def test_draw_from_weights_is_exact_on_a_signal_and_a_4d_map():
    """The hierarchical draw on rank 4 (rows over three axes) and its 1-D path, bool maps included."""
    rng = np.random.RandomState(11)
    for weights in (
        np.array([0, 3, 0, 1, 0, 0, 6], dtype=np.float64),
        np.array([0, 1, 1, 0, 1], dtype=bool),
        np.arange(2 * 3 * 2 * 4, dtype=np.int64).reshape(2, 3, 2, 4) % 5,
    ):
        n = 20000
        drawn = draw_from_weights(weights, n, rng)
        assert drawn.shape == (n, weights.ndim) and drawn.dtype == np.int64
        counts = np.bincount(np.ravel_multi_index(tuple(drawn.T), weights.shape), minlength=weights.size)
        flat = weights.ravel().astype(np.float64)
        assert_counts_follow(counts, flat / flat.sum())
    with pytest.raises(ValueError, match="no positive mass"):
        draw_from_weights(np.zeros(5), 3, rng)


@pytest.mark.parametrize("shape", [(60,), (8, 7, 6, 7)])
def test_label_centres_follow_the_probabilities_in_1d_and_4d(shape):
    """Centre-label frequencies are p_L / sum over present labels, and each voxel of a label is equally likely."""
    label = make_label_map(shape)
    probabilities = {0: 0.1, 1: 0.8, 2: 0.4, 3: 0.6, 7: 5.0}  # 7 is absent: skipped
    patch = (5,) if len(shape) == 1 else (3, 2, 3, 2)
    n = 4000
    subject = {"signal": torch.rand(1, *shape), "label": label}  # label_name=None: the integer-typed image
    patches = mpp.LabelSampler(patch, None, probabilities, num_samples=n).set_random_state(4)(subject)
    inner = label[(0, *(slice(q // 2, s - (q - 1) // 2) for q, s in zip(patch, shape)))].numpy()
    present = [lab for lab in probabilities if (inner == lab).any()]
    assert present == [0, 1, 2, 3]
    cells = [tuple(int(v) for v in np.asarray(c) + np.asarray(patch) // 2) for c in np.ndindex(*inner.shape)]
    counts = centre_counts(patches, patch, cells)
    per_label = np.asarray([counts[inner.ravel() == lab].sum() for lab in present])
    p = np.asarray([probabilities[lab] for lab in present])
    assert_counts_follow(per_label, p / p.sum())
    smallest = inner.ravel() == 3  # within a label, uniform over its voxels
    assert_counts_follow(counts[smallest], np.full(smallest.sum(), 1 / smallest.sum()))


def test_one_hot_label_map_in_1d():
    values = make_label_map((50,))[0].long()
    one_hot = torch.nn.functional.one_hot(values, 4).permute(1, 0).to(torch.uint8)  # (4, 50)
    patches = mpp.LabelSampler(3, "seg", {3: 1.0}, num_samples=50).set_random_state(0)({"seg": one_hot})
    assert all(p["seg"][3, 1] == 1 for p in patches)


# --- shapes, key selection and metadata -----------------------------------------------------------------------------


def test_the_image_rank_decides_an_int_patch_size_and_trailing_ones_are_torchio_convention():
    assert resolve_patch_size(8, 1) == (8,) and resolve_patch_size(8, 4) == (8, 8, 8, 8)
    assert resolve_patch_size((8, 1, 1), 1) == (8,) and resolve_patch_size((8, 6, 1), 2) == (8, 6)
    assert resolve_patch_size(np.array([2, 3, 4, 5]), 4) == (2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"patch_size \(8, 2\) does not fit an image with 1 spatial dimensions"):
        resolve_patch_size((8, 2), 1)
    with pytest.raises(ValueError, match="does not fit an image with 4 spatial dimensions"):
        resolve_patch_size((8, 8, 8), 4)
    assert resolve_overlap(2, (8,)) == (2,) and resolve_overlap((1, 0, 0), (4,)) == (1,)
    assert resolve_overlap((1, 2, 3, 0), (4, 4, 4, 4)) == (1, 2, 3, 0)
    check_overlap_fits((8, 8, 8, 8), (1, 2, 3, 4))
    check_overlap_fits(8, (1, 2, 3, 4, 5))
    with pytest.raises(ValueError, match="patch_overlap"):
        check_overlap_fits((8, 8, 8, 8), (1, 2, 8, 4))
    with pytest.raises(ValueError, match="patch_overlap"):
        mpp.GridSampler((4, 4, 4, 4), (1, 1))
    image = torch.zeros(1, 6, 6)
    patch = mpp.UniformSampler((4, 3, 1)).set_random_state(0)({"image": image})
    assert patch["image"].shape == (1, 4, 3) and patch[mpp.LOCATION].shape == (4,)
    assert len(mpp.GridSampler(4, (2, 2, 0))({"image": image})) == 4


def test_keys_none_takes_signals_only_when_there_is_no_higher_rank_image():
    signal = {"ecg": torch.rand(2, 30), "seg": torch.zeros(1, 30, dtype=torch.uint8), "v": np.zeros(3)}
    assert image_entries(signal) == ["ecg", "seg"]
    volume = {"t1": torch.rand(1, 6, 6, 6), "affine": np.eye(4), "cine": torch.rand(1, 6, 6, 6, 5)}
    assert image_entries(volume) == ["t1", "cine"]
    patch = mpp.UniformSampler(4).set_random_state(0)({"t1": volume["t1"], "affine": volume["affine"]})
    assert patch["t1"].shape == (1, 4, 4, 4) and patch["affine"] is volume["affine"]
    batch = list_data_collate(mpp.UniformSampler(8, num_samples=3)(signal))
    assert mpp.get_batch_images_and_size(batch) == (["ecg", "seg"], 3)
    with pytest.raises(ValueError, match=r"data\['v'\] must be a channel-first \(C, \*spatial\) array"):
        mpp.UniformSampler(4, keys=["ecg", "v"])(signal)


def test_inputs_without_a_spatial_axis_are_refused():
    with pytest.raises(ValueError, match=r"GridInferer: inputs must be \(B, C, \*spatial\).*got shape \(2, 3\)"):
        mpp.GridInferer(4)(torch.zeros(2, 3), affine)
    with pytest.raises(ValueError, match="no image"):
        mpp.UniformSampler(4)({"v": torch.zeros(5)})


@pytest.mark.parametrize("shape", [(20,), (6, 5, 4, 7)])
def test_metatensor_patches_invert_back_to_the_full_signal_or_4d_volume(shape):
    image = MetaTensor(torch.arange(math.prod(shape), dtype=torch.float32).reshape(1, *shape) + 1)
    sampler = mpp.UniformSampler(3, num_samples=2).set_random_state(0)
    for patch in sampler({"image": image}):
        assert patch["image"].meta[mpp.LOCATION].shape == (2 * len(shape),)
        assert len(patch["image"].meta["crop_center"]) == len(shape)
        full = sampler.inverse(patch)["image"]
        box = box_slices(patch[mpp.LOCATION])
        assert full.shape == image.shape and torch.equal(full[box], image[box].as_tensor())
        assert float(full.sum()) == float(image[box].sum())
