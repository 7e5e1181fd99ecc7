"""Test-time mirroring, ensembles, half-precision accumulators and valid-convolution margins (issue 14)."""

from __future__ import annotations

import itertools
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.bundle import ConfigParser

import monai_patchplug as mpp

MODES = ["crop", "average", "hann", "gaussian"]


def lopsided(p: torch.Tensor) -> torch.Tensor:
    """A network that no flip leaves alone (cumulative sums along every spatial axis), 3 channels out."""
    spatial = range(2, p.ndim)
    return torch.cat([p, sum(p.cumsum(d) * (d - 1) for d in spatial) / p.shape[-1], -p.cumsum(-1)], 1)


def shifted(p: torch.Tensor) -> torch.Tensor:
    """Another lopsided network, for ensembles."""
    return lopsided(p.roll(1, -1)) * 0.5 + 1


def mirrored_reference(networks, weights, axes):
    """The wrapped network the issue defines: the weighted mean over networks of the mean over flips."""
    total = sum(weights)
    subsets = [s for k in range(len(axes) + 1) for s in itertools.combinations(axes, k)]

    def run(p: torch.Tensor) -> torch.Tensor:
        out = 0
        for net, w in zip(networks, weights):
            for s in subsets:
                dims = [2 + a for a in s]
                out = out + w / total / len(subsets) * net(p.flip(dims)).flip(dims)
        return out

    return run


@settings(max_examples=25, deadline=None)
@given(
    ndim=st.sampled_from([2, 3]),
    shape=st.lists(st.integers(5, 13), min_size=3, max_size=3),
    axes=st.lists(st.integers(0, 2), unique=True, max_size=3),
    mode=st.sampled_from(MODES),
    batch=st.integers(1, 5),
)
def test_mirroring_equals_the_wrapped_network(ndim, shape, axes, mode, batch):
    axes = tuple(a for a in axes if a < ndim)
    x = torch.rand(2, 1, *shape[:ndim])
    got = mpp.GridInferer(4, 2, mode, batch_size=batch, mirror_axes=axes)(x, lopsided)
    expected = mpp.GridInferer(4, 2, mode, batch_size=batch)(x, mirrored_reference([lopsided], [1.0], axes))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_mirroring_changes_the_result_of_a_lopsided_network():
    """The equality above is not trivial: without the flips the output differs."""
    x = torch.rand(1, 1, 12, 10, 9)
    plain = mpp.GridInferer(6, 2, "hann")(x, lopsided)
    mirrored = mpp.GridInferer(6, 2, "hann", mirror_axes=(0, 1, 2))(x, lopsided)
    assert (plain - mirrored).abs().max() > 0.1


def test_the_flipped_copies_go_to_the_network_in_full_batches():
    sizes: list[int] = []

    def net(p: torch.Tensor) -> torch.Tensor:
        sizes.append(p.shape[0])
        return lopsided(p)

    x = torch.rand(1, 1, 12, 12, 12)
    mpp.GridInferer(6, 2, batch_size=4, mirror_axes=(0, 2))(x, net)
    patches = mpp.GridInferer(6, 2).geometry((12, 12, 12)).num_patches
    assert sizes.count(4) == 4 * (patches // 4) and len(sizes) == 4 * -(-patches // 4)


@pytest.mark.parametrize("mode", MODES)
def test_ensembles_and_mirroring_compose_with_dict_and_scaled_outputs(mode):
    x = torch.rand(1, 1, 14, 12, 10)
    weights = [2.0, 1.0]

    def pooled(net):
        return lambda p: F.avg_pool3d(net(p), 2)

    def as_dict(net):
        return lambda p: {"seg": net(p), "half": pooled(net)(p)}

    got = mpp.GridInferer(6, 2, mode, mirror_axes=(1,), ensemble_weights=weights)(
        x, [as_dict(lopsided), as_dict(shifted)]
    )
    seg = mirrored_reference([lopsided, shifted], weights, (1,))  # the average is taken per output
    half = mirrored_reference([pooled(lopsided), pooled(shifted)], weights, (1,))
    expected = mpp.GridInferer(6, 2, mode)(x, lambda p: {"seg": seg(p), "half": half(p)})
    for key in ("seg", "half"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)
    assert got["half"].shape[2:] == (7, 6, 5)


def test_an_ensemble_of_modules_equals_the_weighted_mean_with_streaming_and_a_mask():
    torch.manual_seed(0)
    nets = torch.nn.ModuleList([torch.nn.Conv3d(1, 2, 3, padding=1) for _ in range(3)]).eval()
    x = torch.rand(1, 1, 16, 12, 10)
    mask = torch.zeros(16, 12, 10)
    mask[2:6, 3:5, 1:4] = 1
    out = torch.zeros(1, 2, 16, 12, 10)
    with torch.no_grad():
        mpp.GridInferer(6, 2, "hann", batch_size=3, mirror_axes=(0,), output=out, roi_mask=mask, fill_value=-1.0)(
            x, nets
        )
        expected = mpp.GridInferer(6, 2, "hann", batch_size=3, roi_mask=mask, fill_value=-1.0)(
            x, mirrored_reference(list(nets), [1.0, 1.0, 1.0], (0,))
        )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_half_precision_accumulation_is_close_and_keeps_the_networks_dtype():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 3, 1)).eval()
    x = torch.randn(1, 1, 20, 18, 16) * 3
    with torch.no_grad():
        full = mpp.GridInferer(8, 4, "hann")(x, net)
        for dtype in (torch.float16, "float16", torch.bfloat16):
            half = mpp.GridInferer(8, 4, "hann", accumulate_dtype=dtype)(x, net)
            assert half.dtype == torch.float32
            error = ((half - full).abs().max() / full.abs().max()).item()
            assert 0 < error <= (1e-3 if dtype != torch.bfloat16 else 1e-2), error


def test_a_float16_accumulator_that_overflows_says_so():
    x = torch.rand(1, 1, 12, 12, 12)
    with pytest.raises(RuntimeError, match=r"float16 accumulator overflowed \(accumulate_dtype=torch.float16"):
        mpp.GridInferer(6, 2, "hann", accumulate_dtype=torch.float16)(x, lambda p: p * 1e6)
    big = mpp.GridInferer(6, 2, "hann", accumulate_dtype=torch.bfloat16)(x, lambda p: p * 1e6)
    assert torch.isfinite(big).all()


@pytest.mark.parametrize("margin", [1, 2])
def test_valid_convolutions_land_at_their_true_place(margin):
    torch.manual_seed(0)
    layers = [torch.nn.Conv3d(1, 2, 3)] + [torch.nn.Conv3d(2, 2, 3) for _ in range(margin - 1)]
    valid_net = torch.nn.Sequential(*layers).eval()
    x = torch.rand(1, 1, 17, 14, 11)
    with torch.no_grad():
        got = mpp.GridInferer(10, 2 * margin + 1, "crop", output_margin=margin)(x, valid_net)
        expected = valid_net(F.pad(x, [margin] * 6))
    assert got.shape == (1, 2, 17, 14, 11)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_margins_per_axis_blend_in_every_mode():
    """A margin-aware identity: its output is the patch's centre, so every mode reconstructs the input."""
    margin = (2, 1, 3)
    x = torch.rand(1, 2, 15, 13, 16)

    def centre(p: torch.Tensor) -> torch.Tensor:
        return p[(..., *[slice(m, s - m) for m, s in zip(margin, p.shape[2:])])]

    for mode in MODES:
        got = mpp.GridInferer((9, 8, 10), 6, mode, output_margin=margin)(x, centre)
        torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-6)


def test_the_options_come_from_a_bundle_config():
    config = {
        "inferer": {
            "_target_": "monai_patchplug.GridInferer",
            "patch_size": 6,
            "patch_overlap": 2,
            "mirror_axes": [0, 1, 2],
            "accumulate_dtype": "$torch.float16",
            "output_margin": 0,
        }
    }
    parser = ConfigParser(config)
    inferer = parser.get_parsed_content("inferer")
    assert inferer.mirror_axes == (0, 1, 2) and inferer.accumulate_dtype == torch.float16
    x = torch.rand(1, 1, 10, 10, 10)
    expected = mpp.GridInferer(6, 2, mirror_axes=(0, 1, 2))(x, lopsided)
    torch.testing.assert_close(inferer(x, lopsided), expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "kwargs, call, error, match",
    [
        ({"mirror_axes": (0, 0)}, None, ValueError, r"mirror_axes must not repeat an axis, got \(0, 0\)"),
        ({"mirror_axes": (3,)}, None, ValueError, r"mirror_axes \(3,\) must be spatial axes 0..2"),
        ({"mirror_axes": 1}, None, TypeError, r"mirror_axes must be a sequence of spatial axes"),
        ({"mirror_axes": (-1,)}, None, ValueError, r"mirror_axes must hold non-negative ints"),
        ({}, [], ValueError, r"GridInferer: the list of networks is empty"),
        ({"ensemble_weights": [1.0]}, [lopsided, shifted], ValueError, r"one non-negative number per network \(2\)"),
        ({"ensemble_weights": [0, 0]}, [lopsided, shifted], ValueError, r"not all zero"),
        ({}, [lopsided, 3], TypeError, r"every network must be callable, got int"),
        ({"accumulate_dtype": torch.int32}, None, ValueError, r"accumulate_dtype must be one of"),
        ({"accumulate_dtype": 16}, None, TypeError, r"accumulate_dtype must be a torch dtype, got 16"),
        ({"output_margin": 3}, None, ValueError, r"output_margin \(3, 3, 3\) needs patches larger than twice"),
        ({"output_margin": 2, "patch_overlap": 3}, None, ValueError, r"an overlap of at least twice the margin"),
        ({"output_margin": (1, 1)}, None, ValueError, r"output_margin \(1, 1\) does not fit 3 spatial dims"),
        ({"sw_device": ["cpu"]}, [lopsided, shifted], ValueError, r"sw_device has 1 devices for 2 networks"),
    ],
)
def test_bad_values_are_clear_errors(kwargs, call, error, match):
    settings_ = {"patch_size": 6, "patch_overlap": 4, **kwargs}
    with pytest.raises(error, match=match):
        mpp.GridInferer(**settings_)(torch.rand(1, 1, 12, 12, 12), lopsided if call is None else call)


def test_a_valid_net_with_the_wrong_margin_is_a_clear_error():
    net = torch.nn.Conv3d(1, 1, 3)
    with pytest.raises(ValueError, match=r"with output_margin=\(2, 2, 2\) the network must return patches"):
        with torch.no_grad():
            mpp.GridInferer(8, 4, output_margin=2)(torch.rand(1, 1, 12, 12, 12), net)


def test_networks_on_several_devices_give_the_same_average():
    """Two device names (the CPU under two spellings) take the path that hands every device its batch first."""
    x = torch.rand(1, 1, 10, 10, 10)
    inferer = mpp.GridInferer(6, 2, "hann", sw_device=["cpu", torch.device("cpu", 0)], mirror_axes=(0,))
    got = inferer(x, [lopsided, shifted])
    expected = mpp.GridInferer(6, 2, "hann")(x, mirrored_reference([lopsided, shifted], [1.0, 1.0], (0,)))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_supervised_evaluator_runs_the_mirrored_half_precision_inferer():
    pytest.importorskip("ignite")
    from monai.engines import SupervisedEvaluator

    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 2, 3, padding=1).eval()
    data = [{"image": torch.randn(1, 12, 12, 12), "label": torch.zeros(1, 12, 12, 12)}]
    inferer = mpp.GridInferer(8, 4, mirror_axes=(0, 1, 2), accumulate_dtype=torch.float16)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=torch.utils.data.DataLoader(data, batch_size=1),
        network=net,
        inferer=inferer,
    )
    evaluator.run()
    with torch.no_grad():
        expected = mpp.GridInferer(8, 4)(data[0]["image"][None], mirrored_reference([net], [1.0], (0, 1, 2)))
    torch.testing.assert_close(evaluator.state.output[0]["pred"], expected[0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.int32])
def test_mirroring_averages_outputs_of_any_dtype(dtype):
    """Outputs of half precision, of float64 and integers (averaged as floats: wide ones in float64, as the blend
    sums them) each equal the wrapped network, in the dtype they have without mirroring."""
    x = torch.rand(1, 1, 9, 8, 7)

    def net(p):
        return (lopsided(p) * 100).to(dtype)

    got = mpp.GridInferer(4, 2, "average", mirror_axes=(0, 2))(x, net)
    reference = mirrored_reference([lambda p: net(p).double()], [1.0], (0, 2))
    expected = mpp.GridInferer(4, 2, "average")(x, reference)
    assert got.dtype == mpp.GridInferer(4, 2, "average")(x, net).dtype  # the dtype without mirroring
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance * 100)


@pytest.mark.parametrize("mirror_axes, models", [((0, 1), 2), ((0,), 1), (None, 2)])
def test_no_earlier_network_output_is_held_while_a_network_runs(mirror_axes, models):
    """On one device each output is consumed before the next network runs (the documented one output at a time):
    when a network is called, every output returned before is already freed."""
    returned: list[weakref.ref] = []
    calls_with_an_output_alive = []

    def net(x):
        calls_with_an_output_alive.append(any(ref() is not None for ref in returned))
        out = torch.cat([x, x], 1)
        returned.append(weakref.ref(out))
        return out

    with torch.no_grad():
        mpp.GridInferer(8, 4, batch_size=2, mirror_axes=mirror_axes)(torch.rand(1, 1, 16, 16), [net] * models)
    assert len(calls_with_an_output_alive) == 5 * models * 2 ** len(mirror_axes or ())
    assert not any(calls_with_an_output_alive)


def test_mirroring_under_autograd_reaches_the_networks_parameters():
    """With autograd recording the flipped-back outputs' sum: the gradient of a 1x1x1 conv's weight is the sum of
    the input, as without mirroring."""
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 1, 1)
    x = torch.rand(1, 1, 9, 8, 7)
    out = mpp.GridInferer(4, 2, "hann", mirror_axes=(0, 1, 2))(x, net)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), net.weight.detach().reshape(()) * x + net.bias.detach(), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    torch.testing.assert_close(net.weight.grad.reshape(()), x.sum(), rtol=1e-4, atol=1e-3)
