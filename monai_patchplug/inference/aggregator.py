"""GridAggregator: TorchIO's front end to grid aggregation.

It reads the grid of a :class:`~monai_patchplug.GridSampler`, checks every batch of patches the caller adds against
it (locations on the grid, each patch once), and hands the outputs to a sink (:mod:`.sinks`), which blends them with
the grid's :class:`~.blend.BlendPlan`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from .._shapes import LOCATION
from ..grid import GridGeometry
from ..sampling.grid import GridSampler
from .blend import BlendPlan, accumulator_dtype, check_overlap_mode, zeros_volume
from .distributed import check_same_on_ranks, collective_device, reduce_sum_, resolve_group
from .options import check_device, check_scale_out
from .roi import run_mask
from .sinks import PatchSink, allocate_destination, check_destination, open_sink

__all__ = ["GridAggregator"]

WHO = "GridAggregator"


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
        ValueError: an unknown ``overlap_mode``, streaming with sharding, a bad ``dst`` or ``device``.
        TypeError: a ``sampler`` that is not a :class:`~monai_patchplug.GridSampler`, a ``roi_mask`` given as a key,
            a ``postprocess`` that is not callable, a ``fill_value`` that is not a number.

    Example:
        >>> import torch
        >>> from monai_patchplug import LOCATION, GridAggregator, GridSampler
        >>> image = torch.rand(1, 10, 12)
        >>> sampler = GridSampler(patch_size=4, patch_overlap=2)
        >>> aggregator = GridAggregator(sampler, overlap_mode="hann")
        >>> for patch in sampler({"t1": image}):
        ...     output = 2 * patch["t1"][None]  # the network: a (1, C, 4, 4) batch in, (1, C', 4, 4) out
        ...     aggregator.add_batch(output, patch[LOCATION][None])
        >>> volume = aggregator.get_output_tensor()
        >>> volume.shape, torch.allclose(volume, 2 * image)
        (torch.Size([1, 10, 12]), True)
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
        if not isinstance(sampler, GridSampler):
            raise TypeError(f"{WHO}: sampler must be a GridSampler, got {type(sampler).__name__}.")
        self.options = check_scale_out(
            WHO, output, postprocess, roi_mask, fill_value, distributed, process_group, dst, mask_key=False
        )
        self.sampler = sampler
        self.overlap_mode = check_overlap_mode(overlap_mode, WHO)
        self.sigma_scale = sigma_scale
        self.device = check_device(device, "device", WHO)
        self._geometry: GridGeometry | None = None
        self._plan: BlendPlan | None = None
        self._sink: PatchSink | None = None
        self._run: np.ndarray | None = None
        self._seen: torch.Tensor | None = None
        self._channels = 0
        self._finished = False
        self._result: Any = None

    def _grid(self) -> GridGeometry:
        geometry = self.sampler.geometry
        if geometry is None:
            raise RuntimeError(
                f"{WHO}.add_batch: the sampler has not laid a grid yet; call it on the subject first "
                "(or sampler.plan(spatial_shape) where the sampler runs in DataLoader workers)."
            )
        if self._geometry is None:
            self._geometry = geometry
        elif geometry != self._geometry:
            raise ValueError(
                f"{WHO}: mixing subjects of different shapes: this aggregator holds a grid over spatial "
                f"shape {self._geometry.spatial_shape} but the sampler's last call was on {geometry.spatial_shape}; "
                "use one aggregator per subject."
            )
        return self._geometry

    def _patches_run(self, geometry: GridGeometry) -> np.ndarray | None:
        """The ``grid_shape`` booleans of the patches ``roi_mask`` keeps (``None`` without a mask)."""
        if self.options.roi_mask is not None and self._run is None:
            self._run = run_mask(self.options.roi_mask, geometry, 1, WHO)[0]
        return self._run

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
                f"{WHO}: location {locations[row].tolist()} is outside the volume of spatial shape "
                f"{geometry.padded_shape} (padded grid coordinates)."
            )
        wrong = (ends - starts != size).any(1)
        if wrong.any():
            row = int(wrong.nonzero()[0])
            raise ValueError(
                f"{WHO}: location {locations[row].tolist()} is not a box of the sampler's patch size "
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
                    f"{WHO}: location {locations[row].tolist()} is not on the sampler's grid "
                    f"(corners along axis {axis}: {list(corners)})."
                )
            columns.append(j)
        return torch.stack(columns, 1)

    @staticmethod
    def _checked(batch_tensor: Any, batch_locations: Any, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch as a plain tensor and its locations as ``(n, 2 * ndim)`` int64, checked against each other."""
        if not isinstance(batch_tensor, torch.Tensor | np.ndarray):
            raise TypeError(f"{WHO}: batch_tensor must be a tensor or array, got {type(batch_tensor).__name__}.")
        batch = batch_tensor.as_tensor() if isinstance(batch_tensor, MetaTensor) else torch.as_tensor(batch_tensor)
        given = torch.as_tensor(batch_locations).detach().to("cpu")
        locations = given.to(torch.int64)
        if given.is_floating_point() and not torch.equal(given, locations.to(given.dtype)):
            raise ValueError(f"{WHO}: locations must be integers, got {given.tolist()}.")
        if locations.ndim == 1:
            locations = locations[None]
        if batch.ndim != ndim + 2 or locations.shape != (batch.shape[0], 2 * ndim):
            raise ValueError(
                f"{WHO}: batch of shape {tuple(batch.shape)} does not match locations of shape "
                f"{tuple(locations.shape)}: expected (n, C, {', '.join('*' * ndim)}) and (n, {2 * ndim})."
            )
        return batch, locations

    def _open(self, geometry: GridGeometry, batch: torch.Tensor) -> None:
        """Plan the blend and open the sink for outputs shaped like ``batch`` (allocates the output)."""
        options = self.options
        dtype = accumulator_dtype(self.overlap_mode, batch.dtype)
        device = self.device or batch.device
        plan = BlendPlan(geometry, self.overlap_mode, batch.shape[2:], device, dtype, self.sigma_scale, WHO)
        channels = int(batch.shape[1])
        destination = options.output
        if options.streaming:
            if destination is None:
                destination = allocate_destination(options.postprocess, plan, channels, (), device, dtype, WHO)
            check_destination(destination, (), len(plan.out_shape), WHO)
        volume = None if options.streaming else zeros_volume((channels, *plan.out_shape), dtype, device)
        self._sink = open_sink(
            plan, channels, dtype, device,
            volume=volume, destination=destination, prefix=(), postprocess=options.postprocess,
            run=self._patches_run(geometry), fill_value=options.fill_value,
            group=resolve_group(options.distributed, options.process_group, WHO), dst=options.dst, who=WHO,
        )  # fmt: skip
        self._plan, self._channels = plan, channels
        self._seen = torch.zeros(geometry.grid_shape, dtype=torch.bool)

    def add_batch(self, batch_tensor: torch.Tensor, batch_locations: torch.Tensor | np.ndarray) -> None:
        """Add the network's outputs for a batch of grid patches.

        Args:
            batch_tensor: ``(n, C, *spatial)`` outputs; ``C`` and the spatial shape are fixed by the first batch
                (an empty batch, ``n = 0``, fixes them too: the way to get the ``fill_value`` volume when
                ``roi_mask`` skips every patch).
            batch_locations: ``(n, 2 * ndim)`` patch boxes, as the patches' ``LOCATION`` collated.

        Allocates one converted copy of the batch when it is not already in the accumulator's dtype and device,
        and, at the first call, the output volume.

        Raises:
            RuntimeError: the sampler has laid no grid yet, or :meth:`get_output_tensor` was already called.
            TypeError: a batch that is not a tensor or array.
            ValueError: a batch whose shape does not match its locations or earlier batches, locations that are not
                integers, outside the volume or off the grid, a patch added twice, or a grid from a subject of
                another shape.
        """
        if self._finished:
            raise RuntimeError(f"{WHO}.add_batch after get_output_tensor(); use a new aggregator.")
        geometry = self._grid()
        batch, locations = self._checked(batch_tensor, batch_locations, len(geometry.patch_size))
        index = self._grid_index(geometry, locations)
        if self._sink is None:
            self._open(geometry, batch)
        assert self._seen is not None and self._plan is not None and self._sink is not None
        expected = (self._channels, *self._plan.out_patch)
        if tuple(batch.shape[1:]) != expected:
            raise ValueError(
                f"{WHO}: batch of patch shape {tuple(batch.shape[1:])} does not match the earlier batches' {expected}."
            )
        seen = self._seen[tuple(index.T)]
        if seen.any() or len(torch.unique(index, dim=0)) < len(index):
            rows = locations[seen] if seen.any() else locations
            raise ValueError(f"{WHO}: a patch was added twice (locations {rows.tolist()}).")
        self._seen[tuple(index.T)] = True
        run = self._run
        if run is not None:  # patches outside the region of interest are ignored
            inside = torch.as_tensor(run[tuple(index.T.numpy())])
            index, batch = index[inside], batch[inside]
        if len(index):
            batch = batch.detach().to(device=self._plan.device, dtype=self._plan.dtype)
            self._sink.add(batch, index.tolist())

    def patches_to_run(self, patches: Sequence[Mapping[Hashable, Any]]) -> list[Mapping[Hashable, Any]]:
        """The patch dicts of the sampler's last call whose box holds a voxel of ``roi_mask`` (all without a mask):
        the ones worth running through the network. Allocates the mask's booleans.

        Raises:
            RuntimeError: the sampler has laid no grid yet.
        """
        if self.options.roi_mask is None:
            return list(patches)
        geometry = self._grid()
        run = self._patches_run(geometry)
        if not patches:
            return []
        index = self._grid_index(geometry, torch.stack([torch.as_tensor(p[LOCATION]) for p in patches]).to(torch.int64))
        return [p for p, keep in zip(patches, run[tuple(index.T.numpy())]) if keep]

    def _check_all_added(self) -> None:
        """Raise unless every patch to run was added exactly once (over all ranks when sharded)."""
        assert self._seen is not None
        counts = self._seen.to(torch.int32)
        group = resolve_group(self.options.distributed, self.options.process_group, WHO)
        if group is not None:
            check_same_on_ranks(group, [*self._seen.shape], "the grid's shape", WHO)
            counts = counts.to(collective_device(group))
            reduce_sum_(counts, group, None)
            counts = counts.cpu()
            if (counts > 1).any():
                raise ValueError(f"{WHO}: a patch was added on several ranks; share the patches out.")
        needed = torch.ones_like(self._seen) if self._run is None else torch.as_tensor(self._run)
        missing = int((needed & (counts == 0)).sum())
        if missing:
            raise ValueError(
                f"{WHO}: {missing} of {int(needed.sum())} grid patches were never added; every patch of the grid"
                + ("" if self._run is None else " holding a voxel of roi_mask")
                + " must be added once."
            )

    def get_output_tensor(self) -> Any:
        """The aggregated volume ``(C_out, *spatial)`` over the unpadded input (scaled if the network scales).

        Finishes the accumulator in place on the first call (no copy; ``gaussian`` divides it by the summed weights,
        the other modes' weights were normalised as they were added); later calls return the same tensor.

        Returns:
            A tensor; with ``output``/``postprocess``, the destination (already written, any array type); sharded
            with ``dst``, ``None`` on the other ranks.

        Raises:
            RuntimeError: no batch was added (with a ``roi_mask`` that skips every patch, add an empty batch
                ``(0, C, *patch)`` to say the output's channels); a collective failed or timed out.
            ValueError: some patches of the grid (inside ``roi_mask``) were never added (the weights were
                normalised for all of them); sharded: a patch added on several ranks, or ranks with different grids.
        """
        if self._sink is None:
            raise RuntimeError(
                f"{WHO}.get_output_tensor: no batch was added, so the output's channels and patch shape are unknown; "
                "where roi_mask skips every patch, add an empty batch of shape (0, C, *patch_size) first."
            )
        if not self._finished:
            self._check_all_added()
            self._result = self._sink.finish()
            self._finished = True
        return self._result
