"""Our overlap modes as MONAI ``Merger`` classes: ``PatchInferer`` with them equals ``GridInferer`` on a regular grid,
takes arbitrary locations (checked against brute force), works with ``WSISlidingWindowSplitter``, and fails clearly."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.data.wsi_reader import BaseWSIReader
from monai.inferers import AvgMerger, Merger, PatchInferer, SlidingWindowSplitter, WSISlidingWindowSplitter

import monai_patchplug
from monai_patchplug import CropMerger, GaussianMerger, GridInferer, HannMerger

MERGERS = {"hann": HannMerger, "gaussian": GaussianMerger, "crop": CropMerger}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The patches here are tiny: one thread runs them fastest, and avoids two threads spinning on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_network(ndim: int, c_in: int = 2, c_out: int = 3, seed: int = 0):
    """A conv net that changes the channel count and whose output depends on where a voxel lies in its patch (a
    ramp in patch coordinates), so that which patch a voxel is taken from, and with what weight, shows."""
    torch.manual_seed(seed)
    conv = (torch.nn.Conv2d if ndim == 2 else torch.nn.Conv3d)(c_in, c_out, 3, padding=1)

    def network(x: torch.Tensor) -> torch.Tensor:
        ramp = torch.zeros((), dtype=x.dtype)
        for axis, n in enumerate(x.shape[2:]):
            view = [1] * (x.ndim - 2)
            view[axis] = n
            ramp = ramp + (torch.arange(n, dtype=x.dtype) * (0.37 + 0.21 * axis)).reshape(view)
        with torch.no_grad():
            return conv(x) + ramp

    return network


@st.composite
def aligned_grids(draw) -> tuple:
    """``(shape, patch, overlap)`` where MONAI's splitter and our grid lay the same corners: ``S = P + k (P - O)``."""
    ndim = draw(st.sampled_from([2, 3]))
    top = 9 if ndim == 2 else 6
    patch = tuple(draw(st.integers(2, top)) for _ in range(ndim))
    overlap = tuple(draw(st.integers(0, p - 1)) for p in patch)
    steps = tuple(draw(st.integers(0, 3 if ndim == 2 else 2)) for _ in range(ndim))
    shape = tuple(p + k * (p - o) for p, o, k in zip(patch, overlap, steps))
    return shape, patch, overlap


@settings(max_examples=40, deadline=None)
@given(
    setup=aligned_grids(),
    mode=st.sampled_from(sorted(MERGERS)),
    batch=st.sampled_from([1, 2]),
    patches_per_call=st.sampled_from([1, 3]),
)
def test_patch_inferer_with_our_merger_equals_grid_inferer(setup, mode, batch, patches_per_call):
    shape, patch, overlap = setup
    network = make_network(len(shape))
    image = torch.rand(batch, 2, *shape, generator=torch.Generator().manual_seed(1))
    expected = GridInferer(patch_size=patch, patch_overlap=overlap, overlap_mode=mode, batch_size=patches_per_call)
    splitter = SlidingWindowSplitter(patch_size=patch, overlap=overlap)
    inferer = PatchInferer(splitter, merger_cls=MERGERS[mode], batch_size=patches_per_call)
    out, ref = inferer(image, network), torch.as_tensor(expected(image, network))
    assert out.shape == ref.shape == (batch, 3, *shape)
    # crop copies values, but the network may round differently for a batch of patches than for one
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", sorted(MERGERS))
@pytest.mark.parametrize(
    ("shape", "patch", "overlap"), [((16, 12), (8, 10), (4, 6)), ((9, 10, 8), (5, 6, 4), (2, 3, 2))]
)
def test_splitter_padding_and_negative_offset_equal_grid_inferer_padding(mode, shape, patch, overlap):
    """``GridInferer(padding_mode=0)`` pads ``O // 2`` on every side; MONAI's splitter with ``offset=-(O // 2)`` lays
    the same grid, so patches start at negative locations and stick out at the end (MONAI's ``AvgMerger`` wraps the
    negative ones around)."""
    network = make_network(len(shape))
    image = torch.rand(1, 2, *shape, generator=torch.Generator().manual_seed(2))
    offset = [-(o // 2) for o in overlap]
    splitter = SlidingWindowSplitter(patch_size=patch, overlap=overlap, offset=offset, pad_mode="constant")
    last = [s + o // 2 - p for s, p, o in zip(shape, patch, overlap)]  # GridInferer's last corner, unpadded
    axes = [list(range(-(o // 2), end + 1, p - o)) for p, o, end in zip(patch, overlap, last)]
    assert all(a[-1] == end for a, end in zip(axes, last)) and min(last) < max(shape)
    assert sorted(location for _, location in splitter(image)) == sorted(itertools.product(*axes))
    out = PatchInferer(splitter, merger_cls=MERGERS[mode], batch_size=4)(image, network)
    grid = GridInferer(patch_size=patch, patch_overlap=overlap, overlap_mode=mode, padding_mode=0)
    ref = torch.as_tensor(grid(image, network))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", sorted(MERGERS))
def test_network_that_halves_the_patch(mode):
    network = make_network(3)

    def half(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool3d(network(x), 2)

    image = torch.rand(2, 2, 20, 12, 16, generator=torch.Generator().manual_seed(3))
    patch, overlap = (8, 4, 8), (4, 2, 4)
    out = PatchInferer(SlidingWindowSplitter(patch, overlap=overlap), merger_cls=MERGERS[mode], batch_size=2)(
        image, half
    )
    ref = torch.as_tensor(GridInferer(patch_size=patch, patch_overlap=overlap, overlap_mode=mode)(image, half))
    assert out.shape == ref.shape == (2, 3, 10, 6, 8)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# --- arbitrary locations, against brute force written from the documented rules ---


def reference_weight(mode: str, size: tuple[int, ...]) -> np.ndarray:
    """The patch weight from its closed form, float64."""
    windows = []
    for q in size:
        n = np.arange(q, dtype=np.float64)
        if mode == "hann":
            windows.append(np.sin(np.pi * (n + 1) / (q + 1)) ** 2)
        else:
            w = np.exp(-0.5 * ((n - (q - 1) / 2) / (0.125 * q)) ** 2)
            windows.append(np.maximum(w, 1e-3 * w.max()))
    weight = windows[0]
    for w in windows[1:]:
        weight = np.multiply.outer(weight, w)
    return np.maximum(weight, 1e-3) if mode == "gaussian" and weight.min() < 1e-3 else weight


def reference_merge(mode: str, patches: list[np.ndarray], corners: list[tuple[int, ...]], shape) -> np.ndarray:
    """Merge ``(C, *q)`` patches at ``corners`` into ``(C, *shape)``: on a canvas with a margin wider than any
    patch, so no clipping logic is shared with the package; voxels no patch reaches are 0."""
    m = max(max(p.shape[1:]) for p in patches) + 1
    canvas = tuple(s + 2 * m for s in shape)
    channels = patches[0].shape[0]
    num, den = np.zeros((channels, *canvas)), np.zeros(canvas)
    depth, dist = np.full(canvas, -np.inf), np.full(canvas, np.inf)
    for patch, corner in zip(patches, corners):
        box = tuple(slice(c + m, c + m + q) for c, q in zip(corner, patch.shape[1:]))
        if mode != "crop":
            w = reference_weight(mode, patch.shape[1:])
            num[(slice(None), *box)] += patch * w
            den[box] += w
            continue
        # depth below the nearest face first, then the summed doubled distance to the centre (+1 past the centre)
        grids = np.meshgrid(*[np.arange(q) for q in patch.shape[1:]], indexing="ij")
        s = [2 * g + 1 - q for g, q in zip(grids, patch.shape[1:])]
        d_patch = np.min([q - 1 - np.abs(si) for si, q in zip(s, patch.shape[1:])], axis=0)
        l1_patch = np.sum([2 * np.abs(si) + (si > 0) for si in s], axis=0)
        better = (d_patch > depth[box]) | ((d_patch == depth[box]) & (l1_patch < dist[box]))
        num[(slice(None), *box)] = np.where(better, patch, num[(slice(None), *box)])
        depth[box], dist[box] = np.where(better, d_patch, depth[box]), np.where(better, l1_patch, dist[box])
    inner = tuple(slice(m, m + s) for s in shape)
    if mode == "crop":
        return num[(slice(None), *inner)]
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)[(slice(None), *inner)]


@st.composite
def scattered_patches(draw) -> tuple:
    """``(shape, extra, sizes, corners)``: patches of one or several sizes anywhere, inside or sticking out of the
    output, some duplicated, some wholly outside; ``extra`` pads ``merged_shape`` beyond the output."""
    ndim = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.integers(3, 12 if ndim == 2 else 7)) for _ in range(ndim))
    extra = tuple(draw(st.integers(0, 3)) for _ in range(ndim))
    one_size = draw(st.booleans())
    size0 = tuple(draw(st.integers(1, 7 if ndim == 2 else 5)) for _ in range(ndim))
    sizes, corners = [], []
    for _ in range(draw(st.integers(1, 7))):
        size = size0 if one_size else tuple(draw(st.integers(1, 7 if ndim == 2 else 5)) for _ in range(ndim))
        corner = tuple(draw(st.integers(-q - 1, s + 1)) for q, s in zip(size, shape))
        sizes.append(size)
        corners.append(corner)
        if draw(st.integers(0, 5)) == 0:  # the same patch again
            sizes.append(size)
            corners.append(corner)
    return shape, extra, sizes, corners


@settings(max_examples=60, deadline=None)
@given(case=scattered_patches(), mode=st.sampled_from(sorted(MERGERS)))
def test_arbitrary_locations_follow_the_documented_rule(case, mode):
    shape, extra, sizes, corners = case
    rng = np.random.default_rng(len(sizes))
    patches = [rng.standard_normal((2, *q)) for q in sizes]
    pairs = [(torch.as_tensor(p, dtype=torch.float32)[None], c) for p, c in zip(patches, corners)]
    merged = (1, 2, *(s + e for s, e in zip(shape, extra)))
    inferer = PatchInferer(merger_cls=MERGERS[mode], merged_shape=merged, cropped_shape=(1, 2, *shape))
    out = inferer(pairs, lambda x: x)
    ref = reference_merge(mode, [p.astype(np.float32).astype(np.float64) for p in patches], corners, shape)
    assert out.shape == (1, 2, *shape)
    if mode == "crop":
        assert np.array_equal(out[0].numpy(), ref.astype(np.float32))
    else:
        np.testing.assert_allclose(out[0].numpy(), ref, rtol=1e-4, atol=1e-5)


def test_crop_takes_the_patch_a_voxel_lies_deepest_in_and_midpoints_go_to_the_later_patch():
    # voxel (10, 10): 4 voxels from the centre of A (corner (2, 6)) along one axis, on A's face; 2 and 2 from the centre
    # of B (corner (4, 4)): nearer to A's centre in the summed distance, but deeper in B
    for order in ((0, 1), (1, 0)):
        merger = CropMerger((1, 1, 20, 20))
        patches = [(torch.full((1, 1, 9, 9), 1.0), (2, 6)), (torch.full((1, 1, 9, 9), 2.0), (4, 4))]
        for k in order:
            merger.aggregate(*patches[k])
        assert merger.finalize()[0, 0, 10, 10] == 2
    # patches of 4 at 0 and 3 along the last axis: voxel 3 lies midway between their centres; GridInferer gives it to
    # the later patch (the boundary is (0 + 3 + 4) // 2 = 3), whatever the order the patches come in
    for order in ((0, 1), (1, 0)):
        merger = CropMerger((1, 1, 1, 7))
        patches = [(torch.full((1, 1, 1, 4), 1.0), (0, 0)), (torch.full((1, 1, 1, 4), 2.0), (0, 3))]
        for k in order:
            merger.aggregate(*patches[k])
        assert merger.finalize()[0, 0, 0].tolist() == [1, 1, 1, 2, 2, 2, 2]


def test_uncovered_voxels_are_zero_where_avg_merger_gives_nan():
    image = torch.rand(1, 1, 12, 12)
    keep = lambda patch, location: location != (4, 4)  # noqa: E731  a background tile the splitter drops
    splitter = SlidingWindowSplitter(patch_size=4, filter_fn=keep)
    assert torch.isnan(PatchInferer(splitter, merger_cls=AvgMerger)(image, lambda x: x)).any()
    for cls in MERGERS.values():
        out = PatchInferer(splitter, merger_cls=cls)(image, lambda x: x)
        assert torch.equal(out[..., 4:8, 4:8], torch.zeros(1, 1, 4, 4))
        torch.testing.assert_close(out[..., :4, :], image[..., :4, :])


class ArrayWSIReader(BaseWSIReader):
    """A whole-slide reader over an in-memory ``(3, H, W)`` array (one level), so ``WSISlidingWindowSplitter`` runs
    without OpenSlide or cuCIM."""

    backend = "openslide"  # what the splitter expects of a tile-reading backend
    supported_suffixes = ["npy"]

    def __init__(self, array: np.ndarray, **kwargs) -> None:
        super().__init__(level=0, channel_dim=0, dtype=np.float32, **kwargs)
        self.array = array

    def verify_suffix(self, filename) -> bool:
        return True

    def read(self, data, **kwargs):
        return self.array

    def get_size(self, wsi, level: int) -> tuple[int, int]:
        return tuple(wsi.shape[1:])

    def get_level_count(self, wsi) -> int:
        return 1

    def get_downsample_ratio(self, wsi, level: int) -> float:
        return 1.0

    def get_file_path(self, wsi) -> str:
        return "slide.npy"

    def get_mpp(self, wsi, level: int) -> tuple[float, float]:
        return (1.0, 1.0)

    def get_power(self, wsi, level: int) -> float:
        return 20.0

    def _get_patch(self, wsi, location, size, level, dtype, mode) -> np.ndarray:
        box = tuple(slice(lo, lo + n) for lo, n in zip(location, size))
        return np.ascontiguousarray(wsi[(slice(None), *box)], dtype=dtype)


@pytest.mark.parametrize("mode", sorted(MERGERS))
def test_whole_slide_splitter(mode):
    slide = np.random.default_rng(4).random((3, 40, 48), dtype=np.float32)
    splitter = WSISlidingWindowSplitter(patch_size=16, overlap=8, reader=ArrayWSIReader(slide), pad_mode=None)
    network = make_network(2, c_in=3, c_out=2)
    out = PatchInferer(splitter, merger_cls=MERGERS[mode], batch_size=4)(Path("slide.npy").as_posix(), network)
    ref = GridInferer(patch_size=16, patch_overlap=8, overlap_mode=mode)(torch.from_numpy(slide)[None], network)
    torch.testing.assert_close(out, torch.as_tensor(ref), rtol=1e-5, atol=1e-5)


# --- dtypes, devices, memory, finalize ---


def test_dtypes_crop_keeps_integers_blending_accumulates_in_float32():
    image = torch.arange(10 * 14).reshape(1, 1, 10, 14)
    splitter = SlidingWindowSplitter(patch_size=6, overlap=2)
    out = PatchInferer(splitter, merger_cls=CropMerger)(image, lambda x: x)
    assert out.dtype == torch.int64 and torch.equal(out, image)
    half = PatchInferer(splitter, merger_cls=HannMerger)(image.half(), lambda x: x)
    assert half.dtype == torch.float32
    wide = PatchInferer(splitter, merger_cls=HannMerger)(image.double(), lambda x: x)
    assert wide.dtype == torch.float64 and torch.allclose(wide, image.double())
    chosen = PatchInferer(splitter, merger_cls=GaussianMerger, value_dtype=torch.float64, device="cpu")
    assert chosen(image.float(), lambda x: x).dtype == torch.float64


def test_string_merger_cls_and_finalize_protocol():
    inferer = PatchInferer(SlidingWindowSplitter(patch_size=4, overlap=2), merger_cls="monai_patchplug.HannMerger")
    image = torch.rand(1, 1, 8, 8)
    torch.testing.assert_close(inferer(image, lambda x: x), image)
    merger = CropMerger(merged_shape=(1, 2, 5, 5), cropped_shape=(1, 2, 4, 3))
    empty = merger.finalize()
    assert empty.shape == (1, 2, 4, 3) and not empty.any() and merger.finalize() is empty
    merger = HannMerger(merged_shape=(1, 1, 4, 4))
    merger.aggregate(torch.ones(1, 1, 2, 2), (1, 1))
    out = merger.finalize()
    assert merger.finalize() is out and out.sum() == 4
    with pytest.raises(ValueError, match="HannMerger is already finalized"):
        merger.aggregate(torch.ones(1, 1, 2, 2), (0, 0))


@pytest.mark.parametrize(
    ("corners", "weight_volume"),
    [
        ([(0, 0), (0, 4), (4, 0), (4, 4)], False),
        ([(0, 0), (0, 4), (4, 0)], True),
        ([(0, 0), (0, 4), (4, 0), (4, 4), (4, 4)], True),
    ],
)
def test_hann_keeps_no_weight_volume_on_a_full_grid(monkeypatch, corners, weight_volume):
    """Only the output is volume-sized while patches come in; at finalize a full regular grid is divided by 1-D
    normalisers, any other layout through one single-channel weight volume."""
    merger = HannMerger(merged_shape=(2, 3, 10, 10))
    for corner in corners:
        merger.aggregate(torch.ones(2, 3, 6, 6), corner)
    big = [t.shape for t in vars(merger).values() if isinstance(t, torch.Tensor) and t.numel() >= 100]
    assert big == [(2, 3, 10, 10)]
    made, zeros = [], torch.zeros

    def recording_zeros(*size, **kwargs):
        made.append(tuple(size[0]) if len(size) == 1 and isinstance(size[0], tuple | list) else size)
        return zeros(*size, **kwargs)

    monkeypatch.setattr(torch, "zeros", recording_zeros)
    out = merger.finalize()
    assert ((1, 1, 10, 10) in made) == weight_volume
    covered = out[0, 0] != 0
    assert torch.allclose(out[:, :, covered], torch.ones(())), "a constant network gives the constant back"


def test_crop_merger_keeps_one_int32_channel():
    merger = CropMerger(merged_shape=(2, 5, 12, 10), cropped_shape=(2, 5, 11, 9))
    merger.aggregate(torch.ones(2, 5, 4, 4), (0, 0))
    assert merger.scores is not None and merger.scores.shape == (11, 9) and merger.scores.dtype == torch.int32
    assert merger.values is not None and merger.values.shape == (2, 5, 11, 9)
    merger.finalize()
    assert merger.scores is None


# --- errors and names ---


@pytest.mark.parametrize(
    ("make", "error", "words"),
    [
        (lambda: HannMerger(merged_shape=None), TypeError, "HannMerger: merged_shape"),
        (lambda: HannMerger(merged_shape=(1, 2)), ValueError, "HannMerger: merged_shape"),
        (lambda: CropMerger(merged_shape=(1, 2, 0)), ValueError, "CropMerger: merged_shape"),
        (lambda: CropMerger(merged_shape=(1, 2, 4.0)), TypeError, "CropMerger: merged_shape"),
        (lambda: HannMerger((1, 2, 8, 8), cropped_shape=(1, 2, 9, 8)), ValueError, "HannMerger: cropped_shape"),
        (lambda: HannMerger((1, 2, 8, 8), cropped_shape=(1, 3, 8, 8)), ValueError, "HannMerger: cropped_shape"),
        (lambda: HannMerger((1, 2, 8, 8), cropped_shape=(1, 2, 8)), ValueError, "HannMerger: cropped_shape"),
        (lambda: HannMerger((1, 2, 8, 8), value_dtype=torch.int32), TypeError, "HannMerger: value_dtype"),
        (lambda: CropMerger((1, 2, 8, 8), value_dtype="float32"), TypeError, "CropMerger: value_dtype"),
        (lambda: CropMerger((1, 2, 8, 8), device=0), TypeError, "CropMerger: device"),
        (lambda: HannMerger((1, 2, 8, 8), device="nowhere"), ValueError, "HannMerger: device"),
        (lambda: GaussianMerger((1, 2, 8, 8), sigma_scale=0), ValueError, "GaussianMerger: sigma_scale"),
        (lambda: GaussianMerger((1, 2, 8, 8), sigma_scale=(0.1, 0.2, 0.3)), ValueError, "GaussianMerger: sigma_scale"),
        (lambda: GaussianMerger((1, 2, 8, 8), sigma_scale="wide"), ValueError, "GaussianMerger: sigma_scale"),
    ],
)
def test_bad_arguments_name_the_class_and_argument(make, error, words):
    with pytest.raises(error, match=re.escape(words)):
        make()


@pytest.mark.parametrize(
    ("values", "location", "error", "words"),
    [
        (np.ones((1, 2, 4, 4)), (0, 0), TypeError, "values must be a torch.Tensor"),
        (torch.ones(1, 3, 4, 4), (0, 0), ValueError, "do not fit merged_shape"),
        (torch.ones(2, 2, 4, 4), (0, 0), ValueError, "do not fit merged_shape"),
        (torch.ones(1, 2, 4, 4, 4), (0, 0, 0), ValueError, "do not fit merged_shape"),
        (torch.ones(1, 2, 4, 4), (0,), ValueError, "one value per spatial dim"),
        (torch.ones(1, 2, 4, 4), (0.5, 0), TypeError, "location must hold ints"),
        (torch.ones(1, 2, 4, 4), 3, TypeError, "location must be a sequence"),
    ],
)
@pytest.mark.parametrize("cls", list(MERGERS.values()))
def test_bad_patches_name_the_class(cls, values, location, error, words):
    with pytest.raises(error, match=re.escape(cls.__name__) + ".*" + re.escape(words)):
        cls(merged_shape=(1, 2, 8, 8)).aggregate(values, location)


def test_too_narrow_gaussian_and_too_long_crop_patch_are_errors():
    with pytest.raises(ValueError, match="GaussianMerger: .*sigma_scale"):
        GaussianMerger((1, 1, 8, 400), sigma_scale=1e-4).aggregate(torch.ones(1, 1, 4, 400), (0, 0))
    limit = CropMerger.max_patch_size(2)
    assert limit == 23170 and CropMerger.max_patch_size(3) == 18918
    at_limit = CropMerger((1, 1, 1, 8))
    at_limit.aggregate(torch.ones(1, 1, 1, limit), (0, 8 - limit))  # its far edge: the largest score, fits int32
    assert at_limit.scores is not None and int(at_limit.scores.max()) < torch.iinfo(torch.int32).max
    with pytest.raises(ValueError, match="CropMerger: patches of shape"):
        CropMerger((1, 1, 1, 8)).aggregate(torch.ones(1, 1, 1, limit + 1), (0, 0))


def test_mergers_are_mergers_whose_names_monai_does_not_use():
    import monai

    source = "\n".join(p.read_text(errors="ignore") for p in Path(monai.__file__).parent.rglob("*.py"))
    for cls in MERGERS.values():
        assert issubclass(cls, Merger) and cls.__name__ in monai_patchplug.__all__
        assert cls.__module__.startswith("monai_patchplug.")
        assert not re.search(rf"\b{cls.__name__}\b", source), f"MONAI uses the name {cls.__name__}"
