"""GridAggregator: put the network's patch outputs back into one volume.

The work is split in two: :class:`BlendPlan` is everything that depends only on the grid and the network's output
patch shape (scaled corners, crop ownership, windows divided by the per-axis sums of weights) and knows how to add
a batch of patches into an output tensor; :class:`GridAggregator` adds the user-facing state (the sampler
it reads the grid from, the accumulator, which patches were seen) and the checks. :class:`~monai_patchplug.GridInferer`
drives a :class:`BlendPlan` directly.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from .._shapes import LOCATION
from ..sampling.grid import GridGeometry, GridSampler, crop_boundaries
from .patch_weights import PatchWeights
from .windows import WINDOWS, axis_windows, outer_window

__all__ = ["GridAggregator", "BlendPlan", "OVERLAP_MODES", "accumulator_dtype", "check_overlap_mode"]

#: The overlap modes: ``crop`` (each voxel from the patch whose centre is nearest), and the blending modes.
OVERLAP_MODES = ("crop", *WINDOWS)


def zeros_volume(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
    """A zero-filled accumulator. On the CPU it comes from ``numpy.zeros`` (calloc): the kernel hands out zeroed
    pages on first touch, which the accumulation does anyway, instead of ``torch.zeros`` writing the whole volume
    up front (a third of the run time of a cheap network on 2 cores). Allocates the volume."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cpu" and dtype != torch.bfloat16:
        return torch.from_numpy(np.zeros(tuple(shape), dtype=torch.empty((), dtype=dtype).numpy().dtype))
    return torch.zeros(tuple(shape), dtype=dtype, device=device)


def check_overlap_mode(overlap_mode: str) -> str:
    """``overlap_mode`` if it is one of :data:`OVERLAP_MODES`.

    Raises:
        ValueError: an unknown mode, naming it and the known ones.
    """
    if overlap_mode not in OVERLAP_MODES:
        raise ValueError(f"overlap_mode must be one of {OVERLAP_MODES}, got {overlap_mode!r}.")
    return overlap_mode


def accumulator_dtype(overlap_mode: str, dtype: torch.dtype) -> torch.dtype:
    """dtype in which outputs of ``dtype`` are aggregated.

    ``crop`` copies values and keeps ``dtype``. The blending modes accumulate weighted sums: in float64 for float64
    and for integers wider than 16 bits (float32 would round them), else in float32 (never in half precision or an
    integer type, which would overflow or round).
    """
    if overlap_mode == "crop":
        return dtype
    if dtype == torch.float64 or (not dtype.is_floating_point and dtype != torch.bool and torch.iinfo(dtype).bits > 16):
        return torch.float64
    return torch.float32


class BlendPlan:
    """How the patches of one grid, as output by a network, go back into one output volume.

    A network output patch of spatial shape ``Q`` for an input patch ``P`` is scaled by ``Q / P`` per axis: a patch at
    input corner ``c`` lands at output corner ``c * Q // P`` (exact when the product is a multiple of ``P``), in an
    output volume of ``S * Q // P`` voxels, where ``S`` is the unpadded input size; the padding is cropped away.

    ``average`` and ``hann`` are separable: the summed weights at a voxel are the product of per-axis sums, so each
    patch's weight is divided by them up front, one 1-D window per axis and grid position (``w_j / N`` over the
    patch's span). The accumulator then holds the normalised result as soon as every patch was added: no weight or
    count volume, and no pass over the output at the end. ``gaussian`` (MONAI's importance map, floored as a whole)
    is not separable and keeps one single-channel volume of summed weights, divided out by :meth:`normalise_`.

    Args:
        geometry: the grid.
        overlap_mode: one of :data:`OVERLAP_MODES`.
        out_patch: spatial shape of one output patch.
        device: where the windows and normalisers live (the accumulator's device).
        dtype: the accumulator's dtype (:func:`accumulator_dtype`), which the patch weight takes.
        sigma_scale: the ``gaussian`` window's standard deviation as a fraction of the patch size (one value or
            one per axis), as MONAI's ``sigma_scale``.

    Raises:
        ValueError: an unknown mode, or an ``out_patch`` of another rank than the grid.

    Allocates per-axis 1-D tensors; ``gaussian``: one patch-sized weight and its single-channel volume of summed
    weights; ``average``/``hann``: the weights built by :class:`~.patch_weights.PatchWeights` (at most a 1 MiB store,
    or one patch-sized weight for larger patches, none when :meth:`add` gets a fitting ``scratch``).
    """

    def __init__(
        self,
        geometry: GridGeometry,
        overlap_mode: str,
        out_patch: Sequence[int],
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        sigma_scale: float | Sequence[float] = 0.125,
    ) -> None:
        self.overlap_mode = check_overlap_mode(overlap_mode)
        if len(out_patch) != len(geometry.patch_size):
            raise ValueError(f"output patch shape {tuple(out_patch)} does not fit the grid's {geometry.patch_size}.")
        self.out_patch = tuple(int(q) for q in out_patch)
        self.crop = overlap_mode == "crop"
        scale = list(zip(self.out_patch, geometry.patch_size))
        #: per axis, the output start of each patch in padded output coordinates
        self.starts = [[c * q // p for c in corners] for corners, (q, p) in zip(geometry.corners, scale)]
        padded = [s * q // p for s, (q, p) in zip(geometry.padded_shape, scale)]
        #: where the unpadded volume begins in padded output coordinates
        self.offset = [b * q // p for b, (q, p) in zip(geometry.pad_before, scale)]
        #: spatial shape of the output volume
        self.out_shape = tuple(s * q // p for s, (q, p) in zip(geometry.spatial_shape, scale))
        if min(self.out_shape) < 1:
            raise ValueError(f"output patches of shape {self.out_patch} scale the volume to {self.out_shape}.")
        #: per axis and grid position, ``(lo, hi, start)``: the output range the patch writes (``crop``: owns) and
        #: where the patch begins, in unpadded output coordinates
        self.spans: list[list[tuple[int, int, int]]] = []
        for corners, starts, (q, p), off, n in zip(geometry.corners, self.starts, scale, self.offset, self.out_shape):
            begin = [s - off for s in starts]
            ranges = self._ownership(corners, p, q, off, n) if self.crop else [(b, b + q) for b in begin]
            self.spans.append([(min(max(lo, 0), n), min(max(hi, 0), n), b) for (lo, hi), b in zip(ranges, begin)])
        #: per axis and grid position, the destination and source slices in a whole-volume accumulator
        self._slices = [[(slice(lo, hi), slice(lo - b, hi - b)) for lo, hi, b in spans] for spans in self.spans]
        #: the ``gaussian`` patch weight, and the reciprocal of its sums over the grid as one volume
        self.weight: torch.Tensor | None = None
        self.inv_norm_volume: torch.Tensor | None = None
        #: ``average``/``hann``: every patch's weight divided by the grid's summed weights
        self.patch_weights: PatchWeights | None = None
        if self.crop:
            return
        windows = axis_windows(overlap_mode, self.out_patch, sigma_scale, dtype=torch.float64, device=device)
        if overlap_mode == "gaussian":
            self.weight = outer_window(windows).to(dtype)
            self._gaussian_normaliser(geometry, dtype, device)
        else:
            self.patch_weights = PatchWeights(windows, self.starts, padded, dtype)

    def _gaussian_normaliser(self, geometry: GridGeometry, dtype: torch.dtype, device: torch.device | None) -> None:
        """MONAI's importance map floors the product of the axis windows as a whole (at ``max(min, 1e-3)``), which is
        what lets MONAI's outputs be reproduced, but makes the summed weights non-separable: they are summed over
        the grid into one single-channel volume (MONAI keeps the same count map). Allocates that volume."""
        assert self.weight is not None
        self.weight.clamp_(min=max(float(self.weight.min()), 1e-3))
        norm = zeros_volume((1, *self.out_shape), dtype, device)
        ones = torch.ones((), dtype=dtype, device=norm.device).expand(1, 1, *self.out_patch)
        for index in np.ndindex(*geometry.grid_shape):
            self.add(norm, ones, [index])
        self.inv_norm_volume = norm.reciprocal_()

    @staticmethod
    def _ownership(corners: Sequence[int], p: int, q: int, offset: int, n: int) -> list[tuple[int, int]]:
        """Per patch on one axis, the ``[lo, hi)`` output range it owns in ``crop`` mode (unpadded coordinates)."""
        cuts = [0] + [b * q // p - offset for b in crop_boundaries(corners, p)] + [n]
        return list(zip(cuts[:-1], cuts[1:]))

    def row_range(self, j: int) -> tuple[int, int]:
        """Output rows ``[lo, hi)`` of the first spatial axis that patches of grid row ``j`` write (maybe empty)."""
        lo, hi, _ = self.spans[0][j]
        return lo, max(lo, hi)

    def add(
        self,
        out: torch.Tensor,
        patches: torch.Tensor,
        grid_index: Sequence[Sequence[int]],
        *,
        base: int = 0,
        scratch: torch.Tensor | None = None,
    ) -> None:
        """Add (blend modes) or copy (``crop``) ``patches`` into ``out`` in place.

        Args:
            out: ``(..., *out_shape)`` accumulator, of :func:`accumulator_dtype`; or, with ``base``, a slab
                ``(..., rows, *out_shape[1:])`` holding output rows ``[base, base + rows)`` of the first spatial axis
                (the parts of the patches outside the slab are left out).
            patches: ``(n, ..., *out_patch)`` on ``out``'s device, in its dtype.
            grid_index: ``n`` rows of per-axis patch indices into the grid's corners.
            base: the output row where ``out`` begins along the first spatial axis.
            scratch: memory the caller no longer needs (the network's input batch, once the network returned and
                when no output aliases it), overwritten with the patch weights of ``average``/``hann`` when it fits.

        Allocates nothing but, in the separable modes, the store of built weights at the first patch whose weight
        does not go into ``scratch`` (see :class:`~.patch_weights.PatchWeights`; ``crop``: one patch-sized temporary
        only when the dtypes differ); when autograd records the adds (``patches`` require grad), a new tensor per
        patch weight, which autograd keeps for the backward pass.
        """
        top = base + out.shape[out.ndim - len(self.out_shape)]
        fresh = torch.is_grad_enabled() and patches.requires_grad  # autograd keeps the weights it multiplies
        try:
            for patch, index in zip(patches, grid_index):
                box = self._box(index, base, top)
                if box is None:
                    continue
                dst, src = box
                target, values = out[(..., *dst)], patch[(..., *src)]
                if self.crop:
                    target.copy_(values)
                elif self.weight is not None:
                    target.addcmul_(values, self.weight[src])
                else:
                    assert self.patch_weights is not None
                    weight = self.patch_weights.get(index, src, scratch, fresh)
                    if isinstance(weight, float):
                        target.add_(values, alpha=weight)
                    else:
                        target.addcmul_(values, weight)
        finally:
            if self.patch_weights is not None:
                self.patch_weights.forget_scratch()  # the caller reuses scratch

    def _box(self, index: Sequence[int], base: int, top: int) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
        """Where the patch at grid ``index`` goes in an accumulator holding output rows ``[base, top)``: the
        destination and source slices per spatial axis, or ``None`` when it has no voxel there."""
        dst, src = [], []
        for axis, j in enumerate(index):
            lo, hi, start = self.spans[axis][j]
            if lo >= hi:
                return None
            if axis == 0 and (base > lo or top < hi):  # a slab: the part of the patch in it
                lo, hi = max(lo, base), min(hi, top)
                if lo >= hi:
                    return None
                dst.append(slice(lo - base, hi - base))
                src.append(slice(lo - start, hi - start))
            else:
                to, of = self._slices[axis][j]
                dst.append(slice(to.start - base, to.stop - base) if axis == 0 and base else to)
                src.append(of)
        return tuple(dst), tuple(src)

    def normalise_(self, out: torch.Tensor, *, base: int = 0) -> torch.Tensor:
        """Finish ``out`` (``(..., *out_shape)``, or a slab of it from output row ``base`` as in :meth:`add`) in place
        and return it: ``gaussian`` divides by the summed weights' volume; the other modes are already normalised
        (``crop`` copies, ``average``/``hann`` add pre-normalised weights), so this is a no-op for them.
        """
        if self.inv_norm_volume is not None:
            rows = out.shape[out.ndim - len(self.out_shape)]
            out.mul_(self.inv_norm_volume[:, base : base + rows].to(out.dtype))
        return out


class GridAggregator:
    """Aggregate the network's outputs for the patches of a :class:`~monai_patchplug.GridSampler`.

    Made from the sampler before any subject: at the first :meth:`add_batch` it reads the grid of the sampler's last
    call (or :meth:`~monai_patchplug.GridSampler.plan`), and every later batch must belong to that grid.
    Every patch of the grid must be added exactly once.

    ``crop``: every output voxel comes from the one patch whose centre is nearest along each axis, in the network's
    output dtype. ``average`` (equal weights), ``hann`` (separable Hann window, strictly positive at the edges) and
    ``gaussian`` (MONAI's importance map) accumulate weighted sums in float32 (float64 for float64 or wide integer
    outputs). The summed weights of ``average`` and ``hann`` are separable, so each patch's weight is divided by
    them before it is added: no weight or count map, no pass over the volume at the end, and the memory is the
    output volume alone; ``gaussian`` keeps one single-channel weight volume, as MONAI does, because MONAI floors
    the product of its axis windows as a whole, and divides by it in :meth:`get_output_tensor`.
    The network may change the channel count and scale patches by a per-axis factor (see :class:`BlendPlan`).

    Args:
        sampler: the grid sampler whose patches are aggregated.
        overlap_mode: ``"crop"``, ``"average"``, ``"hann"`` or ``"gaussian"`` (MONAI's importance map).
        device: where the output is accumulated; ``None``: the device of the first batch.
        sigma_scale: for ``overlap_mode="gaussian"`` (MONAI's importance map: the product of the axis windows,
            floored as a whole at ``max(min, 1e-3)``), the standard deviation as a fraction of the patch size.
        output: stream the result into this ``(C', *spatial_out)`` destination (a torch tensor, a ``numpy.memmap`` or
            any array supporting slice assignment): each slab of the first spatial axis is normalised, passed through
            ``postprocess`` and written once every patch touching it was added, and its accumulator dropped, so with
            patches added in grid order (the sampler's) about one row of patches' output is held.
            :meth:`get_output_tensor` returns ``output``.
        postprocess: applied to each finished ``(C, rows, *spatial_out[1:])`` slab (any split of the first axis),
            returning the ``(C', rows, ...)`` slab written, e.g.
            ``lambda x: x.argmax(0, keepdim=True).to(torch.uint8)``; without ``output`` a new volume of its dtype is
            allocated and returned.
        roi_mask: a tensor/array of the subject's spatial shape (or ``(1, *spatial)``): only patches whose box holds
            a nonzero voxel must be added (:meth:`patches_to_run` lists them); others are skipped, and ignored if
            added. A skipped patch counts as an output of ``fill_value`` everywhere, so the output is ``fill_value``
            where only skipped patches reach and equals the full run's everywhere inside the mask.
        fill_value: the value of skipped patches.
        distributed: the ranks of the default ``torch.distributed`` group (initialised with a ``timeout``) each add
            a share of the patches; :meth:`get_output_tensor` (called on every rank) sums them and returns the whole
            volume on every rank. Not with ``output``/``postprocess``.
        process_group: shard over this group (implies ``distributed``).
        dst: sum onto this global rank only; the others get ``None``.

    Raises:
        ValueError: an unknown ``overlap_mode``, streaming with sharding, a bad ``dst``.
        TypeError: a ``roi_mask`` given as a key, a ``postprocess`` that is not callable.

    Example::

        aggregator = GridAggregator(sampler, overlap_mode="hann")
        for patch in sampler(subject):
            aggregator.add_batch(model(patch["t1"][None]), patch[LOCATION][None])
        output = aggregator.get_output_tensor()
    """

    def __init__(
        self,
        sampler: GridSampler,
        overlap_mode: str = "crop",
        *,
        device: torch.device | str | None = None,
        sigma_scale: float | Sequence[float] = 0.125,
        output: Any = None,
        postprocess: Callable[[torch.Tensor], Any] | None = None,
        roi_mask: Any = None,
        fill_value: float = 0.0,
        distributed: bool = False,
        process_group: Any = None,
        dst: int | None = None,
    ) -> None:
        from .scale_out import AggregationSink  # scale_out builds on this module

        self._sink = AggregationSink(output, postprocess, roi_mask, fill_value, distributed, process_group, dst)
        self._result: Any = None
        self.sampler = sampler
        self.overlap_mode = check_overlap_mode(overlap_mode)
        self.sigma_scale = sigma_scale
        self.device = None if device is None else torch.device(device)
        self._geometry: GridGeometry | None = None
        self._plan: BlendPlan | None = None
        self._output: torch.Tensor | None = None
        self._seen: torch.Tensor | None = None
        self._normalised = False

    def _grid(self) -> GridGeometry:
        geometry = self.sampler.geometry
        if geometry is None:
            raise RuntimeError(
                "GridAggregator.add_batch: the sampler has not laid a grid yet; call it on the subject first "
                "(or sampler.plan(spatial_shape) where the sampler runs in DataLoader workers)."
            )
        if self._geometry is None:
            self._geometry = geometry
        elif geometry != self._geometry:
            raise ValueError(
                "GridAggregator: mixing subjects of different shapes: this aggregator holds a grid over spatial "
                f"shape {self._geometry.spatial_shape} but the sampler's last call was on {geometry.spatial_shape}; "
                "use one aggregator per subject."
            )
        return self._geometry

    def _grid_index(self, geometry: GridGeometry, locations: torch.Tensor) -> torch.Tensor:
        """Per-axis corner indices (``(n, ndim)`` int64) of ``locations``, checked against the grid."""
        ndim = len(geometry.patch_size)
        starts, ends = locations[:, :ndim], locations[:, ndim:]
        size = torch.as_tensor(geometry.patch_size)
        padded = torch.as_tensor(geometry.padded_shape)
        outside = ((starts < 0) | (ends > padded)).any(1)
        if outside.any():
            row = int(outside.nonzero()[0])
            raise ValueError(
                f"GridAggregator: location {locations[row].tolist()} is outside the volume of spatial shape "
                f"{geometry.padded_shape} (padded grid coordinates)."
            )
        wrong = (ends - starts != size).any(1)
        if wrong.any():
            row = int(wrong.nonzero()[0])
            raise ValueError(
                f"GridAggregator: location {locations[row].tolist()} is not a box of the sampler's patch size "
                f"{geometry.patch_size}."
            )
        columns = []
        for axis, corners in enumerate(geometry.corners):
            grid = torch.as_tensor(corners)
            j = torch.searchsorted(grid, starts[:, axis].contiguous()).clamp_(max=len(corners) - 1)
            off = grid[j] != starts[:, axis]
            if off.any():
                row = int(off.nonzero()[0])
                raise ValueError(
                    f"GridAggregator: location {locations[row].tolist()} is not on the sampler's grid "
                    f"(corners along axis {axis}: {list(corners)})."
                )
            columns.append(j)
        return torch.stack(columns, 1)

    def add_batch(self, batch_tensor: torch.Tensor, batch_locations: torch.Tensor | np.ndarray) -> None:
        """Add the network's outputs for a batch of grid patches.

        Args:
            batch_tensor: ``(n, C, *spatial)`` outputs; ``C`` and the spatial shape are fixed by the first batch.
            batch_locations: ``(n, 2 * ndim)`` patch boxes, as the patches' ``LOCATION`` collated.

        Allocates one converted copy of the batch when it is not already in the accumulator's dtype and device,
        and, at the first call, the output volume.

        Raises:
            RuntimeError: the sampler has laid no grid yet, or :meth:`get_output_tensor` was already called.
            ValueError: a batch whose shape does not match its locations or earlier batches, locations that are not
                integers, outside the volume or off the grid, a patch added twice, or a grid from a subject of
                another shape.
        """
        if self._normalised:
            raise RuntimeError("GridAggregator.add_batch after get_output_tensor(); use a new aggregator.")
        geometry = self._grid()
        ndim = len(geometry.patch_size)
        batch = batch_tensor.as_tensor() if isinstance(batch_tensor, MetaTensor) else torch.as_tensor(batch_tensor)
        given = torch.as_tensor(batch_locations).detach().to("cpu")
        locations = given.to(torch.int64)
        if given.is_floating_point() and not torch.equal(given, locations.to(given.dtype)):
            raise ValueError(f"GridAggregator: locations must be integers, got {given.tolist()}.")
        if locations.ndim == 1:
            locations = locations[None]
        if batch.ndim != ndim + 2 or locations.shape != (batch.shape[0], 2 * ndim):
            raise ValueError(
                f"GridAggregator: batch of shape {tuple(batch.shape)} does not match locations of shape "
                f"{tuple(locations.shape)}: expected (n, C, {', '.join('*' * ndim)}) and (n, {2 * ndim})."
            )
        index = self._grid_index(geometry, locations)
        if self._plan is None:
            dtype = accumulator_dtype(self.overlap_mode, batch.dtype)
            device = self.device or batch.device
            self._plan = BlendPlan(geometry, self.overlap_mode, batch.shape[2:], device, dtype, self.sigma_scale)
            self._output = self._sink.start(self._plan, geometry, batch.shape[1], dtype, device)
            self._seen = torch.zeros(geometry.grid_shape, dtype=torch.bool)
        assert self._seen is not None
        if batch.shape[1:] != (self._sink.channels, *self._plan.out_patch):
            raise ValueError(
                f"GridAggregator: batch of patch shape {tuple(batch.shape[1:])} does not match the earlier batches' "
                f"{(self._sink.channels, *self._plan.out_patch)}."
            )
        seen = self._seen[tuple(index.T)]
        if seen.any() or len(torch.unique(index, dim=0)) < len(index):
            rows = locations[seen] if seen.any() else locations
            raise ValueError(f"GridAggregator: a patch was added twice (locations {rows.tolist()}).")
        self._seen[tuple(index.T)] = True
        index, batch = self._sink.keep(index, batch)
        batch = batch.detach().to(device=self._sink.device, dtype=self._sink.dtype)
        self._sink.add(self._plan, self._output, batch, index.tolist())

    def patches_to_run(self, patches: Sequence[Mapping[Hashable, Any]]) -> list[Mapping[Hashable, Any]]:
        """The patch dicts of the sampler's last call whose box holds a voxel of ``roi_mask`` (all without a mask):
        the ones worth running through the network. Allocates the mask's booleans.

        Raises:
            RuntimeError: the sampler has laid no grid yet.
        """
        if self._sink.roi_mask is None:
            return list(patches)
        from .scale_out import run_mask

        geometry = self._grid()
        run = run_mask(self._sink.roi_mask, geometry, 1, "GridAggregator")[0].reshape(geometry.grid_shape)
        if not patches:
            return []
        index = self._grid_index(geometry, torch.stack([torch.as_tensor(p[LOCATION]) for p in patches]).to(torch.int64))
        return [p for p, keep in zip(patches, run[tuple(index.T.numpy())]) if keep]

    def get_output_tensor(self) -> Any:
        """The aggregated volume ``(C_out, *spatial)`` over the unpadded input (scaled if the network scales).

        Finishes the accumulator in place on the first call (no copy; ``gaussian`` divides it by the summed weights,
        the other modes' weights were normalised as they were added); later calls return the same tensor.

        Returns:
            A tensor; with ``output``/``postprocess``, the destination (already written, any array type); sharded
            with ``dst``, ``None`` on the other ranks.

        Raises:
            RuntimeError: no batch was added; a collective failed or timed out.
            ValueError: some patches of the grid (inside ``roi_mask``) were never added (the weights were
                normalised for all of them); sharded: a patch added on several ranks, or ranks with different grids.
        """
        if self._plan is None or self._seen is None:
            raise RuntimeError("GridAggregator.get_output_tensor: no batch was added.")
        if not self._normalised:
            self._result = self._sink.finish(self._plan, self._output, self._seen)
            self._normalised = True
        return self._result
