"""Test-time mirroring and ensembles: several network calls per batch of patches, averaged into one output.

For mirror axes ``A``, every subset ``S`` of ``A`` (the empty one included) flips the batch along ``S``, runs every
network on it, and flips the outputs back; the ``2^|A|`` x ``len(networks)`` results are averaged per patch (the
networks weighted, the flips equally), as nnU-Net's predictor does. The front end then blends the averaged patches
once, so the grid is gathered and blended once, whatever the number of flips and networks. Each network may run on
its own device: for every flip, every device is handed its copy of the batch before any result is waited for.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence, Sized
from typing import Any

import torch

from .blend import accumulator_dtype

__all__ = ["AveragedNetwork", "flatten_output", "mirror_subsets"]


def flatten_output(output: Any, who: str) -> tuple[list[torch.Tensor], Callable[[list[Any]], Any]]:
    """The tensors of a network output and a function that rebuilds the same structure from new items.

    Raises:
        TypeError: an output that is not a tensor, or a non-empty tuple/list or dict of tensors.
    """
    if isinstance(output, torch.Tensor):
        return [output], lambda items: items[0]
    if isinstance(output, Mapping):
        keys = list(output)
        return [output[k] for k in keys], lambda items: dict(zip(keys, items))
    if isinstance(output, tuple | list) and output and all(isinstance(t, torch.Tensor) for t in output):
        kind = type(output)
        if hasattr(output, "_fields"):  # a namedtuple takes its fields as arguments
            return list(output), lambda items: kind(*items)
        return list(output), lambda items: kind(items)
    raise TypeError(
        f"{who}: the network must return a tensor, or a non-empty tuple/list or dict of tensors, "
        f"got {type(output).__name__}{' (empty)' if isinstance(output, Sized) and not len(output) else ''}."
    )


def mirror_subsets(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``axes``, the empty one first, then by size (``2^len(axes)`` tuples)."""
    return [s for k in range(len(axes) + 1) for s in itertools.combinations(axes, k)]


class AveragedNetwork:
    """Several networks, each run on every mirrored copy of a batch, averaged into one network output.

    Args:
        networks: the networks (one or more).
        weights: one weight per network (normalised here to sum to 1).
        devices: per network, where it runs (``None``: where the batch is).
        flips: the spatial axis subsets to flip (from :func:`mirror_subsets`; ``[()]`` mirrors nothing).
        device: where the average is kept (the accumulator's device).
        who: the public class named in error messages.

    Calling it on a ``(n, C, *patch)`` batch returns the networks' output structure of averaged ``(n, C', ...)``
    tensors, summed as the blending modes sum (:func:`~.blend.accumulator_dtype`: float32, float64 for float64 and
    wide integers) and returned in the networks' dtype (floats for integer outputs).
    Allocates, per call, one flipped copy of the batch at a time, the networks' outputs (one at a time on a single
    device; one per device otherwise), a flipped-back copy of one output patch at a time, and the running mean (one
    output batch per network output), which starts as a scaled copy of the first result and is never rescaled.
    """

    def __init__(
        self,
        networks: Sequence[Callable[..., Any]],
        weights: Sequence[float],
        devices: Sequence[torch.device | None],
        flips: Sequence[tuple[int, ...]],
        device: torch.device,
        who: str,
    ) -> None:
        total = float(sum(weights))
        self.networks, self.devices, self.flips, self.device, self.who = (
            list(networks),
            list(devices),
            flips,
            device,
            who,
        )
        #: each network's weight in the average (the flips are then averaged equally)
        self.weights = [float(w) / total for w in weights]

    def _launch(self, batch: torch.Tensor, args: tuple, kwargs: dict) -> Iterator[tuple[float, Any]]:
        """Each network's weight and output on ``batch``. On several devices every device gets its batch before any
        result is waited for (their outputs are held together, each released once consumed); on one device each
        output is consumed before the next network runs, so one output is held at a time. (Fresh pairs, not
        ``zip``: ``zip`` keeps its last tuple, and with it the last output, alive while the next network runs.)"""
        calls = [
            (
                weight,
                lambda n=network, d=device: n(batch if d is None else batch.to(d, non_blocking=True), *args, **kwargs),
            )
            for weight, network, device in zip(self.weights, self.networks, self.devices)
        ]
        if len({str(d) for d in self.devices}) > 1:
            launched = [(weight, call()) for weight, call in calls]
            while launched:
                yield launched.pop(0)
        else:
            for weight, call in calls:
                yield weight, call()

    def __call__(self, batch: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        sums: list[torch.Tensor] | None = None
        dtypes: list[torch.dtype] = []
        rebuild: Callable[[list[Any]], Any] = list
        for flip in self.flips:
            dims = [2 + a for a in flip]
            flipped = batch.flip(dims) if dims else batch
            for weight, output in self._launch(flipped, args, kwargs):
                items, rebuild = flatten_output(output, self.who)
                if sums is not None and len(items) != len(sums):
                    raise ValueError(f"{self.who}: the networks returned {len(items)} outputs, earlier {len(sums)}.")
                items = [t.to(self.device) for t in items]
                scale = weight / len(self.flips)  # each result's share of the mean: no pass over the sums at the end
                if sums is None:  # the first result starts the sums: no zeroed buffers to add into
                    dtypes = [t.dtype for t in items]  # the averages take them back (integer outputs stay floats)
                    sums = [_scaled_copy(t.flip(dims) if dims else t, scale) for t in items]
                else:
                    _add_flipped(sums, items, dims, scale)
                del output, items  # not held while the next network runs
            del flipped
        assert sums is not None
        return rebuild([m.to(d) if d.is_floating_point else m for m, d in zip(sums, dtypes)])


def _add_flipped(sums: list[torch.Tensor], items: list[torch.Tensor], dims: list[int], scale: float) -> None:
    """``total += scale * flip(t, dims)`` for each running sum and output, flipping back one patch at a time: the
    flipped copy held is one patch, not the batch (whose copy would be as large as the running mean). A function of
    its own, so no loop variable keeps an output alive in the caller while the next network runs."""
    patch_dims = [d - 1 for d in dims]
    for total, t in zip(sums, items):
        if not dims:
            total.add_(t, alpha=scale)
            continue
        for i in range(len(t)):  # indexing, not unbinding: autograd allows in-place adds into single views
            total[i].add_(t[i].flip(patch_dims), alpha=scale)


def _scaled_copy(t: torch.Tensor, scale: float) -> torch.Tensor:
    """A new tensor ``t * scale`` in the blending accumulator's dtype for ``t`` (one pass over ``t``; never ``t``)."""
    dtype = accumulator_dtype("average", t.dtype)
    if t.dtype == dtype:
        return t.mul(scale)
    return t.to(dtype).mul_(scale)
