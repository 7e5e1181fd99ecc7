"""Clear errors and agreement between the two inference front ends on edge inputs (issues 12 and 13)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import monai_patchplug as mpp


def two_channels(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, 2 * x], 1)


def test_a_numpy_input_is_taken_as_a_tensor():
    x = np.random.default_rng(0).random((1, 1, 12, 10, 9), dtype=np.float32)
    got = mpp.GridInferer(8, 2, "hann", batch_size=3)(x, two_channels)
    expected = mpp.GridInferer(8, 2, "hann", batch_size=3)(torch.from_numpy(x), two_channels)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("inputs", [[[1.0]], "image", None])
def test_an_input_that_is_no_array_is_a_type_error(inputs):
    with pytest.raises(
        TypeError,
        match=r"GridInferer: inputs must be a tensor, a numpy array or an array-like with shape, dtype and slicing",
    ):
        mpp.GridInferer(8, 2)(inputs, two_channels)


def test_fill_value_that_is_no_number_names_the_argument():
    with pytest.raises(TypeError, match=r"GridInferer: fill_value must be a real number, got 'a'"):
        mpp.GridInferer(8, 2, fill_value="a")
    with pytest.raises(TypeError, match=r"GridAggregator: fill_value must be a real number, got True"):
        mpp.GridAggregator(mpp.GridSampler(8), fill_value=True)


@pytest.mark.parametrize("name", ["device", "sw_device"])
def test_bad_devices_name_the_argument(name):
    with pytest.raises(ValueError, match=rf"GridInferer: {name}='meta' holds no data"):
        mpp.GridInferer(8, 2, **{name: "meta"})
    with pytest.raises(ValueError, match=rf"GridInferer: {name}='gpu0' is not a device torch knows"):
        mpp.GridInferer(8, 2, **{name: "gpu0"})
    with pytest.raises(TypeError, match=rf"GridInferer: {name} must be None, a string or a torch.device, got 3"):
        mpp.GridInferer(8, 2, **{name: 3})


def test_aggregator_needs_a_grid_sampler():
    with pytest.raises(TypeError, match=r"GridAggregator: sampler must be a GridSampler, got UniformSampler"):
        mpp.GridAggregator(mpp.UniformSampler(8))


@pytest.mark.parametrize("mode", ["crop", "average", "hann", "gaussian"])
def test_a_mask_that_skips_every_patch_gives_the_fill_volume_in_both_front_ends(mode):
    """GridInferer returns the fill volume; GridAggregator does so once an empty batch says the channels."""
    x = torch.rand(1, 1, 20, 20, 20)
    mask = torch.zeros(20, 20, 20)
    inferred = mpp.GridInferer(8, 2, mode, roi_mask=mask, fill_value=-3.0)(x, two_channels)
    sampler = mpp.GridSampler(8, 2)
    patches = sampler({"image": x[0]})
    aggregator = mpp.GridAggregator(sampler, mode, roi_mask=mask, fill_value=-3.0)
    assert aggregator.patches_to_run(patches) == []
    with pytest.raises(RuntimeError, match=r"add an empty batch of shape \(0, C, \*patch_size\)"):
        aggregator.get_output_tensor()
    aggregator.add_batch(torch.empty(0, 2, 8, 8, 8), torch.empty(0, 6, dtype=torch.int64))
    aggregated = aggregator.get_output_tensor()
    torch.testing.assert_close(inferred[0], aggregated)
    torch.testing.assert_close(aggregated, torch.full((2, 20, 20, 20), -3.0))


class Keeper(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return two_channels(x)


@pytest.mark.parametrize("mode", ["average", "hann"])
def test_a_forward_hook_that_keeps_its_input_sees_every_batch_unchanged(mode):
    net = Keeper()
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    net.register_forward_hook(lambda module, args, output: kept.append((args[0], args[0].clone())))
    x = torch.rand(1, 1, 20, 18, 16)
    with torch.no_grad():
        got = mpp.GridInferer(8, 2, mode, batch_size=4)(x, net)
    assert len(kept) > 2
    for seen, copy in kept:
        assert torch.equal(seen, copy)  # the buffer was not refilled under the hook's feet
    torch.testing.assert_close(got, mpp.GridInferer(8, 2, mode, batch_size=4)(x, two_channels))


def test_without_hooks_the_batch_buffer_is_reused():
    """The reuse the hook rule turns off is real: a plain callable sees one buffer refilled."""
    seen: list[int] = []

    def net(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.data_ptr())
        return two_channels(x)

    with torch.no_grad():
        mpp.GridInferer(8, 2, "hann", batch_size=4)(torch.rand(1, 1, 20, 18, 16), net)
    assert len(seen) > 2 and len(set(seen)) == 1


def test_a_window_that_underflows_to_zero_is_a_clear_error():
    """An even-sized gaussian this narrow is 0 everywhere: it would divide by zero (NaNs)."""
    with pytest.raises(ValueError, match=r"GridInferer: the 'gaussian' window of axis 0 .* strictly positive"):
        mpp.GridInferer(8, 2, "gaussian", sigma_scale=1e-200)(torch.rand(1, 1, 12, 12, 12), two_channels)


def test_one_size_under_our_name_and_monais_is_no_conflict():
    x = torch.rand(1, 1, 12, 10, 9)
    same = mpp.GridInferer(8, roi_size=(8, 8, 8), overlap=0.25)(x, two_channels)
    torch.testing.assert_close(same, mpp.GridInferer(roi_size=(8, 8, 8), overlap=0.25)(x, two_channels))
    with pytest.raises(ValueError, match=r"^GridInferer: give patch_size=8 or MONAI's roi_size=\(8, 8, 6\), not both"):
        mpp.GridInferer(8, roi_size=(8, 8, 6))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"patch_size": 8, "batch_size": 0}, ValueError, r"^GridInferer: batch_size must be a positive int, got 0"),
        ({"patch_size": 8, "patch_overlap": 8}, ValueError, r"^GridInferer: patch_overlap must satisfy"),
        ({"patch_size": 8, "padding_mode": "bogus"}, ValueError, r"^GridInferer: padding_mode must be None"),
        ({"roi_size": 8, "mode": "hann"}, ValueError, r"^GridInferer: mode must be one of"),
        ({"roi_size": 8, "overlap": 1.5}, ValueError, r"^GridInferer: overlap must be a fraction"),
    ],
)
def test_every_settings_error_names_the_class(kwargs, error, match):
    with pytest.raises(error, match=match):
        mpp.GridInferer(**kwargs)
