"""GridInferer: reconstruction, agreement with MONAI's SlidingWindowInferer, structures, meta, MONAI integration."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from conftest import grid_setups, reference_hann_blend
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.inferers import Inferer, SlidingWindowInferer
from monai.networks.nets import UNet

import monai_patchplug as mpp
from monai_patchplug.inference import blend

MODES = ["crop", "average", "hann"]


class Counting(torch.nn.Module):
    """Wraps a network and counts its calls."""

    def __init__(self, net) -> None:
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x, *args, **kwargs):
        self.calls += 1
        return self.net(x, *args, **kwargs)


def pointwise(x: torch.Tensor) -> torch.Tensor:
    """Bit-reproducible on any memory layout (no transcendental functions, whose SIMD and scalar paths differ)."""
    return torch.cat([x * x, x * 3 - 1], 1)


@st.composite
def inferer_cases(draw):
    shape, patch, overlap, padding = draw(grid_setups(8, 18, [None, 0, "edge", "symmetric"]))
    return (draw(st.integers(1, 3)), *shape), patch, overlap, padding, draw(st.integers(1, 5))


@settings(max_examples=40, deadline=None)
@given(inferer_cases(), st.sampled_from(MODES))
def test_pointwise_network_reconstructs_the_input(case, mode):
    (batch, *shape), patch, overlap, padding, batch_size = case
    x = torch.randn(batch, 2, *shape, generator=torch.Generator().manual_seed(0))
    inferer = mpp.GridInferer(patch, overlap, mode, batch_size=batch_size, padding_mode=padding)
    out = inferer(x, pointwise)
    if mode == "crop":
        assert torch.equal(out, pointwise(x))
    else:
        torch.testing.assert_close(out, pointwise(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["average", "hann"])
@pytest.mark.parametrize(
    "network",
    [
        lambda x: x,
        lambda x: x.mul_(2).sub_(1),
        lambda x: (x[:, :1], x * 2),
        lambda x: torch.from_numpy(x.numpy()[:, 1:]),
        lambda x: torch.from_dlpack(x[:, 1:]),
    ],
)
@torch.no_grad()
def test_outputs_that_alias_the_input_batch_are_blended_as_returned(mode, network):
    """An output that shares the input batch's memory (returned as is, changed in place, a view of it, or a view
    made through numpy or DLPack) is blended as it was returned, before the buffer is refilled."""
    x = torch.randn(2, 2, 19, 17, 13)
    expected = network(x.clone())
    out = mpp.GridInferer((8, 7, 6), (3, 2, 3), mode, batch_size=3)(x, network)
    for ours, theirs in zip(
        out if isinstance(out, tuple) else [out], expected if isinstance(expected, tuple) else [expected]
    ):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["average", "hann"])
@pytest.mark.parametrize("through", [lambda a: torch.from_numpy(a.numpy()), torch.from_dlpack])
@torch.no_grad()
def test_a_view_that_starts_inside_the_input_batch_is_blended_before_the_buffer_is_refilled(mode, through):
    """The centre of each patch, seen through numpy or DLPack: a storage of its own that starts inside the batch's
    buffer, which the next batch refills only after this one was blended."""
    x = torch.randn(1, 1, 20, 16, 16)
    inferer = mpp.GridInferer(8, 4, mode, batch_size=3)
    view = inferer(x, lambda p: through(p[:, :, 1:-1, 1:-1, 1:-1]))
    assert torch.equal(view, inferer(x, lambda p: p[:, :, 1:-1, 1:-1, 1:-1].clone()))


@pytest.mark.parametrize("mode", ["average", "hann"])
@torch.no_grad()
def test_runs_of_patches_with_equal_weights_across_batch_boundaries_blend_exactly(mode):
    """Runs of patches with one weight cross batch boundaries (4 positions along the last axis, batches of 3): a
    reused inferer gives a fresh one's result bit for bit, and the blend of a pointwise network is the network."""
    x = torch.randn(1, 1, 13, 16, 14)
    inferer = mpp.GridInferer((5, 6, 4), (2, 2, 1), mode, batch_size=3)
    expected = inferer(x, pointwise)
    out = mpp.GridInferer((5, 6, 4), (2, 2, 1), mode, batch_size=3)(x, pointwise)
    assert torch.equal(out, expected) and torch.equal(inferer(x, pointwise), expected)
    torch.testing.assert_close(out, pointwise(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["average", "hann", "gaussian"])
def test_an_inferer_reused_across_shapes_and_outputs_gives_what_a_fresh_one_gives(mode):
    """Blend plans are kept between calls: interleaved shapes and two outputs of two dtypes must give exactly a fresh
    inferer's result."""
    inferer = mpp.GridInferer(40, (15, 12, 9), mode, batch_size=3)

    def net(x):
        return {"a": pointwise(x), "b": (x * 2).double()}

    for shape in [(1, 1, 100, 90, 80), (2, 1, 50, 61, 45), (1, 1, 100, 90, 80)]:
        x = torch.randn(shape)
        ours, fresh = inferer(x, net), mpp.GridInferer(40, (15, 12, 9), mode, batch_size=3)(x, net)
        assert torch.equal(ours["a"], fresh["a"]) and torch.equal(ours["b"], fresh["b"])
        torch.testing.assert_close(ours["a"], pointwise(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", [*MODES, "gaussian"])
@pytest.mark.parametrize("input_grad", [False, True])
def test_gradients_reach_the_network_and_the_input(mode, input_grad):
    """As through MONAI's inferer. Autograd keeps each batch (the conv's input), so it may not be overwritten by a
    later batch (the batch buffer is reused in place without autograd), and the in-place normalisation must keep the
    graph. A 1x1x1 conv is pointwise, so the result is ``a * x + b`` and the gradients of its sum are known."""
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 1, 1)
    x = torch.randn(1, 1, 19, 17, 13, requires_grad=input_grad)
    out = mpp.GridInferer((8, 7, 6), (3, 2, 3), mode, batch_size=2)(x, net)
    out.sum().backward()
    a = net.weight.detach().reshape(())
    torch.testing.assert_close(out.detach(), a * x.detach() + net.bias.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net.weight.grad.reshape(()), x.detach().sum(), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(net.bias.grad.reshape(()), torch.tensor(float(x.numel())), rtol=1e-5, atol=1e-2)
    if input_grad:
        torch.testing.assert_close(x.grad, a.expand_as(x), rtol=1e-5, atol=1e-6)


def test_an_input_that_requires_grad_and_a_network_output_that_does_not():
    """Autograd records nothing through an integer output, but the input batch still cannot be stacked into a
    reused buffer (``out=`` refuses inputs that require grad)."""
    x = torch.randn(1, 1, 20, 18, 16, requires_grad=True)
    out = mpp.GridInferer(8, 4, "crop", batch_size=2)(x, lambda p: (p > 0).to(torch.uint8))
    assert torch.equal(out, (x.detach() > 0).to(torch.uint8))


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
@torch.no_grad()
def test_pointwise_network_gives_monai_output(mode):
    x = torch.randn(2, 1, 30, 27, 21)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 1), torch.nn.Sigmoid())
    theirs = SlidingWindowInferer((12, 10, 8), sw_batch_size=3, overlap=0.4, mode=mode)(x, net)
    for ours_mode in MODES:
        ours = mpp.GridInferer((12, 10, 8), (5, 4, 3), ours_mode, batch_size=3)(x, net)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_unet_agrees_with_monai_and_with_a_reference_hann_blend():
    """Same grid and equal weights (our ``average``, MONAI ``constant``): 1e-5 everywhere, with no more network calls.
    ``hann``: the brute-force weighted mean of every patch's output with the closed-form window (float32 rounding
    only); a UNet's outputs differ from patch to patch where patches overlap, so the weights show."""
    torch.manual_seed(0)
    net = UNet(3, 1, 2, channels=(4, 8), strides=(2,), num_res_units=0).eval()
    x = torch.randn(2, 1, 40, 36, 32)
    with torch.no_grad():
        ours_net, theirs_net = Counting(net), Counting(net)
        ours = mpp.GridInferer(16, 8, "average", batch_size=4)(x, ours_net)
        theirs = SlidingWindowInferer(16, 4, 0.5, mode="constant")(x, theirs_net)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        assert ours_net.calls <= theirs_net.calls
        hann = mpp.GridInferer(16, 8, "hann", batch_size=4)(x, net)
        reference = torch.from_numpy(reference_hann_blend(x, net, 16, 8)).float()
    torch.testing.assert_close(hann, reference, rtol=1e-5, atol=1e-5)
    average_vs_hann = (ours - reference).abs().max()
    assert average_vs_hann > 100 * 1e-5, average_vs_hann  # the network and the grid make the weights matter


def test_structures_channels_scaling_args_and_dtypes_are_kept():
    x = torch.randn(2, 1, 24, 20, 16)

    def net(p, scale, *, offset):
        half = F.avg_pool3d(p, 2)
        return {"seg": torch.cat([p, p * scale + offset], 1), "low": half.half(), "ints": (p > 0).to(torch.uint8)}

    for mode in MODES:
        out = mpp.GridInferer(8, 2, mode, batch_size=5)(x, net, 2.0, offset=1.0)  # even corners: pooling aligns
        assert list(out) == ["seg", "low", "ints"]
        torch.testing.assert_close(out["seg"], torch.cat([x, 2 * x + 1], 1), rtol=1e-5, atol=1e-5)
        assert out["low"].shape == (2, 1, 12, 10, 8)
        assert out["low"].dtype == (torch.half if mode == "crop" else torch.float32)
        torch.testing.assert_close(out["low"].float(), F.avg_pool3d(x, 2).half().float(), rtol=2e-3, atol=2e-3)
        assert torch.allclose(out["ints"].float(), (x > 0).float(), atol=1e-6)
    tup = mpp.GridInferer(8, 2, batch_size=2)(x, lambda p: (p, -p))
    assert isinstance(tup, tuple) and torch.allclose(tup[1], -x, atol=1e-5)
    lst = mpp.GridInferer(8, 2, batch_size=2)(x, lambda p: [p])
    assert isinstance(lst, list) and torch.allclose(lst[0], x, atol=1e-5)
    pair = collections.namedtuple("Pair", ["seg", "aux"])
    named = mpp.GridInferer(8, 2, batch_size=2)(x, lambda p: pair(p, -p))
    assert type(named) is pair and torch.allclose(named.aux, -x, atol=1e-5)


@pytest.mark.parametrize("mode", [*MODES, "gaussian"])
def test_a_mode_changed_after_a_call_is_not_served_from_kept_plans(mode):
    x = torch.randn(1, 1, 20, 18, 16)
    inferer = mpp.GridInferer(8, 4, "hann" if mode != "hann" else "crop", batch_size=2)
    inferer(x, pointwise)
    inferer.overlap_mode = mode
    assert torch.equal(inferer(x, pointwise), mpp.GridInferer(8, 4, mode, batch_size=2)(x, pointwise))


def test_input_smaller_than_the_patch_is_padded_and_cropped_back_in_2d():
    x = torch.randn(1, 3, 5, 9)
    out = mpp.GridInferer((8, 8, 1), (2, 2, 0), "crop")(x, lambda p: p * 2)
    assert torch.equal(out, x * 2)


def test_meta_tensor_keeps_its_meta_and_devices_are_honoured():
    affine = torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0], dtype=torch.float64))
    x = MetaTensor(torch.randn(1, 1, 20, 18, 12), affine=affine, meta={"filename_or_obj": "a.nii.gz"})

    def net(p):
        assert p.device.type == "cpu" and not isinstance(p, MetaTensor)
        return p

    out = mpp.GridInferer(8, 2, device="cpu", sw_device="cpu", progress=True)(x, net)
    assert isinstance(out, MetaTensor) and out.device.type == "cpu"
    assert torch.equal(out.affine, affine) and out.meta["filename_or_obj"] == "a.nii.gz"
    torch.testing.assert_close(out.as_tensor(), x.as_tensor())


def test_autocast_and_no_grad():
    """Under bfloat16 autocast the network runs in bfloat16 and the blend accumulates in float32: the output is the
    reference Hann blend of the same bfloat16 patch outputs (tolerance: a few bfloat16 steps, as a batch of 4 and a
    batch of 1 may round the convolution differently)."""
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 2, 3, padding=1)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = mpp.GridInferer(8, 4, batch_size=4)(x, net)
        assert net(x[..., :8, :8, :8]).dtype == torch.bfloat16
        reference = torch.from_numpy(reference_hann_blend(x, net, 8, 4)).float()
    assert out.dtype == torch.float32 and out.shape == (1, 2, 16, 16, 16) and not out.requires_grad
    torch.testing.assert_close(out, reference, rtol=0, atol=2e-2)


def test_is_a_monai_inferer_from_a_bundle_config():
    parser = ConfigParser(
        {
            "inferer": {
                "_target_": "monai_patchplug.GridInferer",
                "patch_size": [8, 8, 8],
                "patch_overlap": 2,
                "overlap_mode": "average",
                "batch_size": 2,
            }
        }
    )
    inferer = parser.get_parsed_content("inferer")
    assert isinstance(inferer, mpp.GridInferer) and isinstance(inferer, Inferer)
    x = torch.randn(1, 1, 12, 12, 12)
    torch.testing.assert_close(inferer(x, lambda p: p), x)


def test_supervised_evaluator_runs_with_the_inferer():
    pytest.importorskip("ignite")
    from monai.engines import SupervisedEvaluator

    data = [{"image": torch.randn(1, 12, 12, 12), "label": torch.zeros(1, 12, 12, 12)}]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=torch.utils.data.DataLoader(data, batch_size=1),
        network=torch.nn.Identity(),
        inferer=mpp.GridInferer(8, 2),
    )
    evaluator.run()
    torch.testing.assert_close(evaluator.state.output[0]["pred"], data[0]["image"])


def test_bad_arguments_and_outputs_are_clear_errors():
    with pytest.raises(ValueError, match="patch_overlap"):
        mpp.GridInferer(8, 8)
    with pytest.raises(ValueError, match="'gauss'"):
        mpp.GridInferer(8, 2, "gauss")
    with pytest.raises(ValueError, match="batch_size"):
        mpp.GridInferer(8, batch_size=0)
    inferer = mpp.GridInferer(8)
    with pytest.raises(ValueError, match=r"at least one spatial axis.*got shape \(8, 8\)"):
        inferer(torch.zeros(8, 8), lambda p: p)
    with pytest.raises(ValueError, match=r"no empty axis, got shape \(1, 1, 8, 0, 8\)"):
        inferer(torch.zeros(1, 1, 8, 0, 8), lambda p: p)
    with pytest.raises(ValueError, match=r"no empty axis, got shape \(0, 1, 8, 8, 8\)"):
        inferer(torch.zeros(0, 1, 8, 8, 8), lambda p: p)
    with pytest.raises(ValueError, match="network returned"):
        inferer(torch.zeros(1, 1, 8, 8, 8), lambda p: p[0])
    with pytest.raises(TypeError, match="str"):
        inferer(torch.zeros(1, 1, 8, 8, 8), lambda p: "no")
    with pytest.raises(TypeError, match=r"tuple \(empty\)"):
        inferer(torch.zeros(1, 1, 8, 8, 8), lambda p: ())


@pytest.mark.parametrize("mode", ["average", "hann"])
@pytest.mark.parametrize("chunk", [1, 40, 1 << 18])
def test_normalising_a_few_rows_at_a_time_is_normalising_at_once(mode, chunk, monkeypatch):
    """The separable normalisation builds its factors a few rows at a time: chunks of one row, of a few rows and of
    the whole volume give one result, the blend of a pointwise network (slabs too: ``postprocess`` streams)."""
    monkeypatch.setattr(blend, "_NORMALISE_CHUNK", chunk)
    x = torch.randn(2, 1, 13, 9, 8)
    for kwargs in ({}, {"postprocess": lambda s: s}):
        out = mpp.GridInferer((5, 4, 4), (2, 1, 2), mode, batch_size=5, **kwargs)(x, pointwise)
        torch.testing.assert_close(out, pointwise(x), rtol=1e-5, atol=1e-5)
