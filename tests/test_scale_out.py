"""Scale-out grid inference: streamed outputs, regions of interest, sharding over torch.distributed (gloo, 2 ranks)."""

from __future__ import annotations

import datetime
import itertools

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import grid_setups
from hypothesis import given, settings
from hypothesis import strategies as st

import monai_patchplug as mpp
from monai_patchplug.inference import sinks
from monai_patchplug.inference.blend import BlendPlan, zeros_volume
from monai_patchplug.inference.roi import patches_in_roi
from monai_patchplug.inference.sinks import SlabSink

MODES = ["crop", "average", "hann"]


def lopsided(x: torch.Tensor) -> torch.Tensor:
    """Not flip-equivariant (a cumulative sum along the last axis), so mirroring changes its blend."""
    return torch.cat([x, x.cumsum(-1)], 1)


def pointwise(x: torch.Tensor) -> torch.Tensor:
    """Bit-reproducible on any memory layout; 3 channels."""
    return torch.cat([x * x, x * 3 - 1, -x], 1)


def argmax_u8(slab: torch.Tensor) -> torch.Tensor:
    return slab.argmax(0, keepdim=True).to(torch.uint8)


def conv_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(4, 2, 3, padding=1)
    )


class Counting:
    """Counts network calls and patches."""

    def __init__(self, net) -> None:
        self.net, self.calls, self.patches = net, 0, 0

    def __call__(self, x, *args, **kwargs):
        self.calls += 1
        self.patches += len(x)
        return self.net(x, *args, **kwargs)


class RecordingArray:
    """An array-like destination (slice assignment only) that records each write."""

    def __init__(self, shape, dtype=np.float32) -> None:
        self.data = np.zeros(shape, dtype=dtype)
        self.shape, self.dtype, self.writes = self.data.shape, self.data.dtype, []

    def __setitem__(self, index, value) -> None:
        rows = index[2]
        self.writes.append((index[0], rows.start, rows.stop))
        self.data[index] = value


# -- streaming --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding", [None, 0])
def test_streamed_output_equals_the_in_memory_one(mode, padding):
    x = torch.randn(2, 1, 21, 18, 15, generator=torch.Generator().manual_seed(0))
    kwargs = dict(patch_size=8, patch_overlap=3, overlap_mode=mode, batch_size=3, padding_mode=padding)
    expected = mpp.GridInferer(**kwargs)(x, pointwise)
    into = torch.full(expected.shape, float("nan"))
    assert mpp.GridInferer(**kwargs, output=into)(x, pointwise) is into
    torch.testing.assert_close(into, expected, rtol=1e-6, atol=1e-6)
    labels = expected.argmax(1, keepdim=True).to(torch.uint8)
    assert torch.equal(mpp.GridInferer(**kwargs, postprocess=argmax_u8)(x, pointwise), labels)
    array = RecordingArray((2, 1, 21, 18, 15), np.uint8)
    mpp.GridInferer(**kwargs, output=array, postprocess=lambda s: s.argmax(0, keepdim=True))(x, pointwise)
    assert np.array_equal(array.data, labels.numpy())
    for item in (0, 1):  # each row written once, in order
        rows = [(a, b) for i, a, b in array.writes if i == item]
        assert rows[0][0] == 0 and rows[-1][1] == 21 and all(b == c for (_, b), (c, _) in zip(rows, rows[1:]))


@st.composite
def streaming_cases(draw):
    shape, patch, overlap, padding = draw(grid_setups(7, 16, [None, 0, "edge"]))
    return (draw(st.integers(1, 2)), *shape), patch, overlap, padding, draw(st.integers(1, 4))


@settings(max_examples=30, deadline=None)
@given(streaming_cases(), st.sampled_from(MODES), st.booleans())
def test_streaming_and_roi_agree_with_the_in_memory_run_on_any_grid(case, mode, with_mask):
    (batch, *shape), patch, overlap, padding, batch_size = case
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, *shape, generator=generator)
    mask = (torch.rand(batch, 1, *shape, generator=generator) < 0.05) if with_mask else None
    kwargs = dict(overlap_mode=mode, batch_size=batch_size, padding_mode=padding, roi_mask=mask, fill_value=-1.0)
    expected = mpp.GridInferer(patch, overlap, **kwargs)(x, pointwise)
    into = torch.full_like(expected, float("nan"))
    mpp.GridInferer(patch, overlap, **kwargs, output=into)(x, pointwise)
    torch.testing.assert_close(into, expected, rtol=1e-5, atol=1e-5)
    full = pointwise(x)
    if mask is not None:
        inside = mask.expand_as(full)
        torch.testing.assert_close(expected[inside], full[inside], rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(expected, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_streaming_a_network_that_halves_the_patches(mode):
    x = torch.randn(1, 1, 24, 20, 16, generator=torch.Generator().manual_seed(4))
    expected = F.avg_pool3d(x, 2)
    inferer = mpp.GridInferer(8, 2, mode, batch_size=5, output=torch.zeros(1, 1, 12, 10, 8))
    out = inferer(x, lambda p: F.avg_pool3d(p, 2))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_memmap_destination_and_slabs_written_while_the_network_still_runs(tmp_path):
    x = torch.randn(1, 1, 40, 12, 10, generator=torch.Generator().manual_seed(1))
    mm = np.lib.format.open_memmap(tmp_path / "labels.npy", mode="w+", dtype=np.uint8, shape=(1, 1, 40, 12, 10))
    net = Counting(pointwise)
    log = []

    def postprocess(slab):
        log.append(net.calls)
        return argmax_u8(slab)

    mpp.GridInferer(8, 2, "hann", batch_size=2, output=mm, postprocess=postprocess)(x, net)
    expected = mpp.GridInferer(8, 2, "hann", batch_size=2)(x, pointwise).argmax(1, keepdim=True)
    assert np.array_equal(np.load(tmp_path / "labels.npy"), expected.numpy())
    assert log[0] < net.calls / 2  # the first slabs are out long before the last patch


def _two_items(seed: int, rows: int, mask_share: float | None, **kwargs) -> tuple[torch.Tensor, dict]:
    """A random ``(2, 1, rows, 9, 7)`` input and GridInferer keywords: ``kwargs``, a fill of -1 and, when
    ``mask_share`` is given, a random ROI mask holding about that share of the voxels."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1, rows, 9, 7, generator=generator)
    mask = (torch.rand(x.shape, generator=generator) < mask_share) if mask_share is not None else None
    return x, dict(kwargs, roi_mask=mask, fill_value=-1.0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("masked", [False, True])
def test_slab_sink_reuses_the_accumulators_of_written_segments(mode, masked, monkeypatch):
    """Segments have few heights: a written segment's accumulator is zeroed and reused, with bit-identical results."""
    x, kwargs = _two_items(3, 61, 0.02 if masked else None, overlap_mode=mode, batch_size=3)
    allocated = []

    def zeros(shape, dtype, device):
        allocated.append(tuple(shape))
        return zeros_volume(shape, dtype, device)

    monkeypatch.setattr(sinks, "zeros_volume", zeros)
    out = np.full((2, 3, 61, 9, 7), np.nan, np.float32)  # an array: written from accumulators
    mpp.GridInferer(6, 2, **kwargs, output=out)(x, pointwise)
    reused = len(allocated)
    allocated.clear()
    monkeypatch.setattr(sinks.SlabSink, "_keep", lambda self, s: False)  # every accumulator new
    fresh = np.full_like(out, np.nan)
    mpp.GridInferer(6, 2, **kwargs, output=fresh)(x, pointwise)
    assert np.array_equal(out, fresh)
    assert len(allocated) >= 2 * 15 and reused <= 2 * 7  # one accumulator per segment, against one per height
    if not masked:  # the fill of skipped patches is added in another order in memory
        assert np.array_equal(out, mpp.GridInferer(6, 2, **kwargs)(x, pointwise).numpy())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("masked", [False, True])
def test_a_tensor_destination_is_its_own_accumulator(mode, masked, monkeypatch):
    x, kwargs = _two_items(6, 37, 0.03 if masked else None, overlap_mode=mode, batch_size=4)
    copied = np.full((2, 3, 37, 9, 7), np.nan, np.float32)
    mpp.GridInferer(6, 2, **kwargs, output=copied)(x, pointwise)
    monkeypatch.setattr(sinks, "zeros_volume", lambda *args: pytest.fail("an accumulator was allocated"))
    out = torch.full((2, 3, 37, 9, 7), float("nan"))
    assert mpp.GridInferer(6, 2, **kwargs, output=out)(x, pointwise) is out
    assert np.array_equal(out.numpy(), copied)
    wider = torch.zeros((2, 3, 37, 9, 7), dtype=torch.float64)  # not the accumulator dtype: written from one
    with pytest.raises(pytest.fail.Exception, match="an accumulator was allocated"):
        mpp.GridInferer(6, 2, **kwargs, output=wider)(x, pointwise)


class ChunkedDestination(RecordingArray):
    """A :class:`RecordingArray` stored in ``chunks``, as a zarr array: it records the index of every write."""

    def __init__(self, shape, dtype, chunks) -> None:
        super().__init__(shape, dtype)
        self.chunks, self.indices = chunks, []

    def __setitem__(self, index, value) -> None:
        self.indices.append(index)
        super().__setitem__(index, value)


@pytest.mark.parametrize("postprocess", [None, argmax_u8])
def test_a_chunked_destination_gets_chunk_aligned_writes(postprocess, monkeypatch):
    channels, dtype = (3, np.float32) if postprocess is None else (1, np.uint8)
    monkeypatch.setattr(sinks, "_CHUNK", 3 * 2 * 18 * 15)  # postprocess sees two rows at a time
    monkeypatch.setattr(sinks, "PIECE_BYTES", 5 * 6 * 15 * channels * np.dtype(dtype).itemsize)  # tiles of a chunk
    x = torch.randn(1, 1, 40, 18, 15, generator=torch.Generator().manual_seed(5))
    inferer = mpp.GridInferer(8, 2, "hann", batch_size=3, postprocess=postprocess)
    destination = ChunkedDestination((1, channels, 40, 18, 15), dtype, (1, channels, 5, 6, 15))
    mpp.GridInferer(8, 2, "hann", batch_size=3, output=destination, postprocess=postprocess)(x, pointwise)
    expected = inferer(x, pointwise)
    assert np.array_equal(destination.data, expected.numpy())
    written = np.zeros((40, 18), int)
    for _, _, rows, cols, depth in destination.indices:
        assert rows.start // 5 == (rows.stop - 1) // 5  # within one chunk row: no chunk is read back
        assert cols.start % 6 == 0 and cols.stop - cols.start <= 6 and depth == slice(0, 15)
        written[rows, cols] += 1
    assert (written == 1).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("in_place", [False, True])
def test_slab_sink_holds_at_most_one_row_of_patches(mode, in_place):
    """Grid order: the accumulators in use and those kept for reuse never cover more output rows than one patch row
    (a numpy destination: accumulators of their own, reused), and none at all when a float32 tensor destination is
    its own accumulator."""
    sampler = mpp.GridSampler((6, 5, 4), (2, 1, 1))
    geometry = sampler.plan((29, 11, 9))
    plan = BlendPlan(geometry, mode, geometry.patch_size)
    out = torch.zeros(1, 29, 11, 9) if in_place else np.zeros((1, 29, 11, 9), np.float32)
    writer = SlabSink(plan, 1, torch.float32, torch.device("cpu"), out)
    image = torch.randn(1, 29, 11, 9)
    held = []
    for index in itertools.product(*[range(n) for n in geometry.grid_shape]):
        box = tuple(slice(c[j], c[j] + p) for c, j, p in zip(geometry.corners, index, geometry.patch_size))
        writer.add(image[(slice(None), *box)][None], [index])
        buffers = [*writer._buffers.values(), *(b for pooled in writer._pool.values() for b in pooled)]
        own = [b for b in buffers if not in_place or b.untyped_storage().data_ptr() != out.untyped_storage().data_ptr()]
        held.append(sum(b.shape[1] for b in own))
    assert writer.finish() is out and max(held) <= 6 and held[-1] == 0
    assert max(held) == 0 if in_place else max(held) > 0
    torch.testing.assert_close(torch.as_tensor(out), image)


def test_aggregator_streams_in_sampler_order_and_checks_all_patches():
    sampler = mpp.GridSampler(8, 2)
    image = torch.randn(1, 30, 14, 12)
    into = torch.zeros(2, 30, 14, 12, dtype=torch.float64)
    aggregator = mpp.GridAggregator(sampler, "hann", output=into)
    patches = sampler({"image": image})
    for p in patches:
        aggregator.add_batch(torch.cat([p["image"], -p["image"]])[None], p[mpp.LOCATION][None])
    assert aggregator.get_output_tensor() is into
    torch.testing.assert_close(into.float(), torch.cat([image, -image]), rtol=1e-5, atol=1e-5)
    aggregator = mpp.GridAggregator(sampler, "crop", postprocess=lambda s: (s > 0).to(torch.uint8))
    sampler({"image": image})
    for p in patches[:-1]:
        aggregator.add_batch(p["image"][None], p[mpp.LOCATION][None])
    with pytest.raises(ValueError, match="1 of 20 grid patches were never added"):
        aggregator.get_output_tensor()


@pytest.mark.parametrize(
    ("mode", "network"),
    [
        ("crop", lambda p: (p * 1e9).long()),  # int64 beyond float32's 24-bit mantissa
        ("hann", lambda p: p.double()),
        ("crop", lambda p: p > 0),  # ``~`` takes only integer and bool slabs
    ],
)
def test_postprocess_without_output_gets_and_returns_the_accumulator_dtype(mode, network):
    """The destination that ``postprocess`` fills is allocated from a dry run on a slab of the accumulator's dtype,
    so an identity postprocess gives what no postprocess gives, of the same dtype, for the inferer and the
    aggregator."""
    x = torch.randn(1, 1, 12, 10, 8) * 1e-3 + 1
    flip = (lambda s: ~s) if network(x).dtype == torch.bool else (lambda s: s)
    expected = flip(mpp.GridInferer(4, 2, mode)(x, network))
    ours = mpp.GridInferer(4, 2, mode, postprocess=flip)(x, network)
    assert ours.dtype == expected.dtype and torch.equal(ours, expected)
    sampler = mpp.GridSampler(4, 2)
    aggregator = mpp.GridAggregator(sampler, mode, postprocess=flip)
    for p in sampler({"image": x[0]}):
        aggregator.add_batch(network(p["image"][None]), p[mpp.LOCATION][None])
    result = aggregator.get_output_tensor()
    assert result.dtype == expected.dtype and torch.equal(result, expected[0])


def test_bad_destinations_are_clear_errors_before_anything_is_written():
    x = torch.randn(2, 1, 16, 16, 16)
    net = Counting(pointwise)
    with pytest.raises(ValueError, match=r"output of shape \(1, 3, 16, 16, 16\) does not fit"):
        mpp.GridInferer(8, output=torch.zeros(1, 3, 16, 16, 16))(x, net)
    assert net.calls == 0
    with pytest.raises(TypeError, match="list"):
        mpp.GridInferer(8, output=[[0]])(x, net)
    with pytest.raises(ValueError, match=r"spatial shape \(16, 16, 16\)"):
        mpp.GridInferer(8, output=torch.zeros(2, 3, 16, 16, 15))(x, net)
    bad = torch.full((2, 3, 16, 16, 16), 7, dtype=torch.uint8)
    with pytest.raises(ValueError, match="torch.float32 but the output is torch.uint8"):
        mpp.GridInferer(8, output=bad)(x, net)
    with pytest.raises(ValueError, match=r"slab of shape \(1, 16, 16\)"):  # postprocess drops the channel dim
        mpp.GridInferer(8, output=torch.zeros(2, 1, 16, 16, 16), postprocess=lambda s: s.argmax(0))(x, net)
    assert (bad == 7).all()
    with pytest.raises(ValueError, match="outside the output dtype torch.uint8"):
        mpp.GridInferer(
            8, output=torch.zeros(2, 1, 16, 16, 16, dtype=torch.uint8), postprocess=lambda s: s[:1].long() + 300
        )(x, net)
    with pytest.raises(ValueError, match="one tensor"):
        mpp.GridInferer(8, output=torch.zeros(2, 1, 16, 16, 16))(x, lambda p: (p, p))
    with pytest.raises(TypeError, match="postprocess must be callable"):
        mpp.GridInferer(8, postprocess="argmax")


# -- regions of interest ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding", [None, "edge"])
def test_patches_in_roi_is_exact(padding):
    rng = np.random.default_rng(0)
    shape = (23, 17, 12)
    geometry = mpp.GridInferer(7, 3, padding_mode=padding).geometry(shape)
    for density in (0.0005, 0.003, 0.02):
        mask = rng.random(shape) < density
        brute = np.zeros(geometry.grid_shape, dtype=bool)
        for index in itertools.product(*[range(n) for n in geometry.grid_shape]):
            box = tuple(
                slice(max(c[j] - b, 0), c[j] - b + p)
                for c, j, b, p in zip(geometry.corners, index, geometry.pad_before, geometry.patch_size)
            )
            brute[index] = mask[box].any()
        assert np.array_equal(patches_in_roi(mask, geometry), brute)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fill", [0.0, -3.0])
def test_roi_skips_empty_patches_keeps_the_output_inside_the_mask_and_fills_the_rest(mode, fill):
    x = torch.randn(2, 1, 24, 20, 16, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(2, 1, 24, 20, 16)
    mask[0, 0, 3:9, 4:10, 2:6] = 1
    mask[1, 0, 15:22, 12:19, 10:15] = 1
    net = conv_net()
    with torch.no_grad():
        full = mpp.GridInferer(8, 2, mode, batch_size=4)(x, net)
        counting = Counting(net)
        inferer = mpp.GridInferer(8, 2, mode, batch_size=4, roi_mask=mask, fill_value=fill)
        ours = inferer(x, counting)
        streamed = torch.zeros_like(full)
        mpp.GridInferer(8, 2, mode, batch_size=4, roi_mask="mask", fill_value=fill, output=streamed)(x, net, mask=mask)
    run = [patches_in_roi(m[0].numpy() > 0, inferer.geometry((24, 20, 16))) for m in mask]
    assert counting.patches == sum(int(r.sum()) for r in run) < 0.5 * 2 * run[0].size
    inside = (mask > 0).expand_as(full)
    assert torch.equal(ours[inside], full[inside])
    torch.testing.assert_close(streamed, ours, rtol=1e-5, atol=1e-5)
    far = torch.zeros_like(inside)  # two patches away from the mask: only skipped patches reach
    far[0, :, 16:] = True
    far[1, :, :6] = True
    torch.testing.assert_close(ours[far], torch.full_like(ours[far], fill), rtol=0, atol=1e-6 if mode != "crop" else 0)


def test_roi_with_no_mask_voxel_calls_the_network_once_and_fills():
    net = Counting(lambda p: p * 2)
    out = mpp.GridInferer(8, 2, "hann", roi_mask=torch.zeros(16, 16, 16), fill_value=5.0)(
        torch.ones(1, 1, 16, 16, 16), net
    )
    assert net.calls == 1 and torch.allclose(out, torch.full_like(out, 5.0))


def test_roi_mask_errors():
    x = torch.zeros(2, 1, 16, 16, 16)
    with pytest.raises(ValueError, match=r"roi_mask of shape \(16, 16, 15\) does not fit"):
        mpp.GridInferer(8, roi_mask=torch.ones(16, 16, 15))(x, pointwise)
    with pytest.raises(ValueError, match=r"roi_mask of shape \(3, 1, 16, 16, 16\)"):
        mpp.GridInferer(8, roi_mask=torch.ones(3, 1, 16, 16, 16))(x, pointwise)
    with pytest.raises(KeyError, match="mask"):
        mpp.GridInferer(8, roi_mask="mask")(x, pointwise)
    with pytest.raises(TypeError, match="roi_mask must be a tensor"):
        mpp.GridAggregator(mpp.GridSampler(8), roi_mask="mask")


def test_aggregator_with_roi_runs_only_the_listed_patches():
    sampler = mpp.GridSampler(6, 2)
    image = torch.randn(1, 22, 18)
    mask = torch.zeros(22, 18)
    mask[2:5, 3:7] = 1
    aggregator = mpp.GridAggregator(sampler, "average", roi_mask=mask, fill_value=-1.0)
    patches = sampler({"image": image})
    chosen = aggregator.patches_to_run(patches)
    assert 0 < len(chosen) < len(patches) / 2
    for p in chosen + patches[-1:]:  # a skipped patch added anyway is ignored
        aggregator.add_batch(p["image"][None] * 2, p[mpp.LOCATION][None])
    out = aggregator.get_output_tensor()
    torch.testing.assert_close(out[:, mask > 0], image[:, mask > 0] * 2)
    assert torch.allclose(out[:, 15:, 12:], torch.tensor(-1.0))


# -- torch.distributed ------------------------------------------------------------------------------------------------
def _rank_main(rank: int, world: int, init: str, folder: str) -> None:
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    x = torch.randn(1, 1, 20, 18, 16, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(20, 18, 16)
    mask[12:, 5:9, 3:] = 1
    results = {}
    for mode in MODES:
        results[mode] = mpp.GridInferer(8, 2, mode, batch_size=3, distributed=True)(x, pointwise)
    results["dst"] = mpp.GridInferer(8, 2, "hann", distributed=True, dst=1)(x, pointwise)
    results["roi"] = mpp.GridInferer(8, 2, "average", roi_mask=mask, fill_value=-1.0, distributed=True)(x, pointwise)
    sampler = mpp.GridSampler(8, 2)
    aggregator = mpp.GridAggregator(sampler, "hann", distributed=True)
    patches = sampler({"image": x[0]})
    for p in patches[rank::world]:
        aggregator.add_batch(pointwise(p["image"][None]), p[mpp.LOCATION][None])
    results["aggregator"] = aggregator.get_output_tensor()
    out = np.load(f"{folder}/out.npy", mmap_mode="r+")  # each rank writes its own rows of one store
    mpp.GridInferer(8, 2, "hann", batch_size=3, distributed=True, output=out)(x, pointwise)
    out.flush()
    results["labels"] = mpp.GridInferer(8, 2, "hann", distributed=True, postprocess=argmax_u8)(x, pointwise)
    results["labels_dst"] = mpp.GridInferer(8, 2, "hann", distributed=True, dst=0, postprocess=argmax_u8)(x, pointwise)
    results["positive"] = mpp.GridInferer(8, 2, "crop", distributed=True, postprocess=lambda v: v[:1] > 0)(x, pointwise)
    results["mirrored"] = mpp.GridInferer(8, 2, "hann", distributed=True, mirror_axes=(0, 2))(x, lopsided)
    try:
        y = torch.zeros(1, 1, 20 + rank, 18, 16)
        mpp.GridInferer(8, 2, distributed=True)(y, pointwise)
    except ValueError as err:
        results["error"] = str(err)
    torch.save(results, f"{folder}/{rank}.pt")
    dist.destroy_process_group()


def test_sharded_inference_over_two_gloo_processes_equals_one_process(tmp_path):
    np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=np.float32, shape=(1, 3, 20, 18, 16))
    mp.spawn(_rank_main, args=(2, f"file://{tmp_path}/init", str(tmp_path)), nprocs=2, join=True)
    x = torch.randn(1, 1, 20, 18, 16, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(20, 18, 16)
    mask[12:, 5:9, 3:] = 1
    single = {mode: mpp.GridInferer(8, 2, mode, batch_size=3)(x, pointwise) for mode in MODES}
    roi = mpp.GridInferer(8, 2, "average", roi_mask=mask, fill_value=-1.0)(x, pointwise)
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert torch.equal(got["crop"], single["crop"])
        for mode in ("average", "hann"):
            torch.testing.assert_close(got[mode], single[mode], rtol=1e-6, atol=1e-6)
        assert (got["dst"] is None) == (rank == 0)
        torch.testing.assert_close(got["roi"], roi, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got["aggregator"], single["hann"][0], rtol=1e-6, atol=1e-6)
        assert "disagree on the input's shape" in got["error"] and "[1, 1, 21, 18, 16" in got["error"]
    torch.testing.assert_close(torch.load(tmp_path / "1.pt")["dst"], single["hann"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "out.npy")), single["hann"], rtol=1e-6, atol=1e-6)
    mirrored = mpp.GridInferer(8, 2, "hann", mirror_axes=(0, 2))(x, lopsided)
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert torch.equal(got["labels"], single["hann"].argmax(1, keepdim=True).byte())
        assert (got["labels_dst"] is None) == (rank == 1)
        assert torch.equal(got["positive"], single["crop"][:, :1] > 0)
        torch.testing.assert_close(got["mirrored"], mirrored, rtol=1e-6, atol=1e-6)
    assert torch.equal(torch.load(tmp_path / "0.pt")["labels_dst"], single["hann"].argmax(1, keepdim=True).byte())


def test_sharding_without_a_process_group_is_a_clear_error():
    with pytest.raises(RuntimeError, match="init_process_group"):
        mpp.GridInferer(8, distributed=True)(torch.zeros(1, 1, 8, 8, 8), pointwise)
    with pytest.raises(ValueError, match="cannot be combined"):
        mpp.GridAggregator(mpp.GridSampler(8), output=torch.zeros(1), distributed=True)
