"""GridInferer: a MONAI ``Inferer`` that runs a network over a regular patch grid and aggregates its outputs.

It lays the same grid as :class:`~monai_patchplug.GridSampler` over a ``(B, C, *spatial)`` batch, cuts the patches of
all batch items as one flat sequence (so one network call can hold patches of two items and the number of calls is
``ceil(B * num_patches / batch_size)``), and puts each output back with a :class:`BlendPlan`: no weight or count map,
float32 accumulation, one batch of patches in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.utils import optional_import

from .._shapes import TypeSpatialShape, resolve_patch_size
from ..sampling.grid import (
    GridGeometry,
    TypePaddingMode,
    check_overlap_fits,
    check_padding_mode,
    make_grid,
    pad_batch,
    resolve_overlap,
)
from .aggregator import BlendPlan, accumulator_dtype, check_overlap_mode, zeros_volume

tqdm, has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = ["GridInferer"]

TypeNetworkOutput = torch.Tensor | Sequence[torch.Tensor] | Mapping[Any, torch.Tensor]


def _flatten(output: TypeNetworkOutput) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], Any]]:
    """The tensors of a network output and a function that rebuilds the same structure from new tensors."""
    if isinstance(output, torch.Tensor):
        return [output], lambda items: items[0]
    if isinstance(output, Mapping):
        keys = list(output)
        return [output[k] for k in keys], lambda items: dict(zip(keys, items))
    if isinstance(output, tuple | list) and all(isinstance(t, torch.Tensor) for t in output):
        kind = type(output)
        return list(output), lambda items: kind(items)
    raise TypeError(
        "GridInferer: the network must return a tensor, a tuple/list or a dict of tensors, "
        f"got {type(output).__name__}."
    )


class GridInferer(Inferer):
    """Sliding-window inference on a regular grid, usable wherever MONAI takes an ``Inferer``.

    The grid is :class:`~monai_patchplug.GridSampler`'s (corners ``0, P-O, 2(P-O), ...`` and a last corner ``S-P`` per
    axis) and the blending :class:`~monai_patchplug.GridAggregator`'s. The network may return a tensor, a tuple/list
    or a dict of tensors (the same structure is returned), change the channel count, or return patches scaled by a
    per-axis factor (the output volume is scaled alike).

    Args:
        patch_size: an int or one int per spatial dim.
        patch_overlap: an int or one int per spatial dim, ``0 <= overlap < patch_size``.
        overlap_mode: ``"hann"``, ``"average"`` or ``"crop"``.
        batch_size: patches per network call (patches of consecutive batch items share calls).
        padding_mode: ``None``: no padding except for inputs smaller than the patch, which are zero-padded up to it;
            a numpy/torch pad mode name or a number (constant): pad every side by ``overlap // 2`` too, so border
            voxels are blended like the others. The padding is cropped away from the output.
        device: where the output is accumulated; ``None``: the input's device.
        sw_device: where the network runs; ``None``: the input's device.
        progress: show a progress bar over the network calls (needs ``tqdm``).

    Raises:
        TypeError, ValueError: bad sizes, overlap, mode, batch size or padding mode.

    Example::

        inferer = GridInferer(patch_size=96, patch_overlap=32, batch_size=4)
        with torch.no_grad():
            prediction = inferer(image, model)        # image: (B, C, H, W, D)
    """

    def __init__(
        self,
        patch_size: TypeSpatialShape,
        patch_overlap: TypeSpatialShape = 0,
        overlap_mode: str = "hann",
        batch_size: int = 1,
        padding_mode: TypePaddingMode = None,
        device: torch.device | str | None = None,
        sw_device: torch.device | str | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__()
        check_overlap_fits(patch_size, patch_overlap)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
        self.patch_size = patch_size
        self.patch_overlap = patch_overlap
        self.overlap_mode = check_overlap_mode(overlap_mode)
        self.batch_size = int(batch_size)
        self.padding_mode = padding_mode
        self._pad = check_padding_mode(padding_mode)
        self.device = device
        self.sw_device = sw_device
        self.progress = progress

    def geometry(self, spatial_shape: Sequence[int]) -> GridGeometry:
        """The grid this inferer lays over inputs of ``spatial_shape`` (small tuples only).

        Raises:
            ValueError: a patch size or overlap that does not fit the input's rank.
        """
        size = resolve_patch_size(self.patch_size, len(spatial_shape))
        overlap = resolve_overlap(self.patch_overlap, size)
        return make_grid(spatial_shape, size, overlap, pad_border=self._pad is not None)

    def __call__(
        self, inputs: torch.Tensor, network: Callable[..., TypeNetworkOutput], *args: Any, **kwargs: Any
    ) -> TypeNetworkOutput:
        """Run ``network`` over the grid of every item of ``inputs`` and aggregate.

        Args:
            inputs: ``(B, C, *spatial)`` with 2 or 3 spatial dims (tensor or MetaTensor).
            network: called as ``network(patches, *args, **kwargs)`` on ``(n, C, *patch_size)`` batches on
                ``sw_device``.
            args, kwargs: passed on to ``network``.

        Returns:
            The network's structure (tensor, tuple/list or dict) of ``(B, C_out, *spatial_out)`` volumes on
            ``device``, MetaTensors carrying the input's metadata when ``inputs`` is one. Allocates the outputs, a
            padded copy of ``inputs`` when padding, and one batch of patches (plus its converted copy) at a time.

        Raises:
            ValueError: inputs that are not ``(B, C, H, W[, D])``, or network outputs whose batch or spatial
                dimensions do not fit the patches.
            TypeError: a network output that is not a tensor, a tuple/list or a dict of tensors.
        """
        if inputs.ndim not in (4, 5):
            raise ValueError(f"GridInferer: inputs must be (B, C, H, W[, D]), got shape {tuple(inputs.shape)}.")
        spatial = tuple(int(s) for s in inputs.shape[2:])
        geometry = self.geometry(spatial)
        mode, pad_kwargs = self._pad if self._pad is not None else ("constant", {})
        images = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        padded = pad_batch(images, geometry, mode, **pad_kwargs)
        corners = geometry.corner_array().tolist()
        grid_index = np.stack(np.unravel_index(np.arange(geometry.num_patches), geometry.grid_shape), 1).tolist()
        boxes = [tuple(slice(c, c + p) for c, p in zip(corner, geometry.patch_size)) for corner in corners]
        sw_device = torch.device(self.sw_device) if self.sw_device is not None else inputs.device
        device = torch.device(self.device) if self.device is not None else inputs.device
        n_items, n_patches = inputs.shape[0], geometry.num_patches
        total = n_items * n_patches

        plans: list[BlendPlan] = []
        volumes: list[torch.Tensor] = []
        rebuild: Callable[[list[torch.Tensor]], Any] = list
        buffer: torch.Tensor | None = None
        starts: Iterable[int] = range(0, total, self.batch_size)
        if self.progress and has_tqdm:
            starts = tqdm(starts, total=-(-total // self.batch_size), desc="GridInferer")
        for first in starts:
            last = min(first + self.batch_size, total)
            views = [padded[k // n_patches][(..., *boxes[k % n_patches])] for k in range(first, last)]
            if padded.requires_grad:
                window = torch.stack(views)
            else:  # one patch buffer for the whole run: fresh large allocations cost page faults on every batch
                if buffer is None:
                    buffer = padded.new_empty((min(self.batch_size, total), *padded.shape[1:2], *geometry.patch_size))
                window = torch.stack(views, out=buffer[: last - first])
            outputs, rebuild = _flatten(network(window.to(sw_device), *args, **kwargs))
            if not plans:
                for out in outputs:
                    self._check_output(out, window)
                    dtype = accumulator_dtype(self.overlap_mode, out.dtype)
                    plan = BlendPlan(geometry, self.overlap_mode, out.shape[2:], device, dtype)
                    plans.append(plan)
                    volumes.append(zeros_volume((n_items, out.shape[1], *plan.out_shape), dtype, device))
            elif len(outputs) != len(plans):
                raise ValueError(f"GridInferer: the network returned {len(outputs)} outputs, earlier {len(plans)}.")
            for out, plan, volume in zip(outputs, plans, volumes):
                self._check_output(out, window, (volume.shape[1], *plan.out_patch))
                out = out.as_tensor() if isinstance(out, MetaTensor) else out
                out = out.to(device=device, dtype=volume.dtype)
                for item in range(first // n_patches, (last - 1) // n_patches + 1):
                    lo, hi = max(first, item * n_patches), min(last, (item + 1) * n_patches)
                    rows = grid_index[lo - item * n_patches : hi - item * n_patches]
                    plan.add(volume[item], out[lo - first : hi - first], rows)
        results = []
        for plan, volume in zip(plans, volumes):
            plan.normalise_(volume)
            if isinstance(inputs, MetaTensor):
                volume = MetaTensor(volume).copy_meta_from(inputs)
            results.append(volume)
        return rebuild(results)

    @staticmethod
    def _check_output(out: Any, window: torch.Tensor, expected: tuple[int, ...] | None = None) -> None:
        """Raise if a network output does not fit the batch of patches it was computed from."""
        if not isinstance(out, torch.Tensor) or out.ndim != window.ndim or out.shape[0] != window.shape[0]:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"GridInferer: the network returned {got} for patches of shape {tuple(window.shape)}; expected "
                f"(n, C_out, *spatial) with n = {window.shape[0]}."
            )
        if expected is not None and tuple(out.shape[1:]) != expected:
            raise ValueError(
                f"GridInferer: the network returned patches of shape {tuple(out.shape[1:])}, earlier {expected}."
            )
