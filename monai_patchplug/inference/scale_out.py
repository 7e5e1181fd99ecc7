"""The scale-out options of :class:`~monai_patchplug.GridInferer` and :class:`~monai_patchplug.GridAggregator`.

- ``roi_mask``: only patches holding a mask voxel are run (:mod:`.roi`, :func:`run_mask`); a skipped patch counts as
  if the network had returned ``fill_value`` everywhere in it, so the normalised weights stay exact;
- ``output`` / ``postprocess``: the volume is streamed slab by slab into the destination (:mod:`.streaming`);
- ``distributed`` / ``process_group``: the patches to run are shared out over the ranks and the accumulators summed
  (:mod:`.distributed`).

:class:`AggregationSink` applies them to the aggregator's batches; the inferer's loop uses the helpers here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .aggregator import BlendPlan, zeros_volume
from .distributed import check_same_on_ranks, reduce_sum_, resolve_group
from .roi import patches_in_roi, resolve_roi_mask
from .streaming import SlabWriter, check_destination

__all__ = ["AggregationSink", "allocate_destination", "check_scale_out_options", "item_runs", "run_mask"]


def run_mask(roi_mask: Any, geometry: Any, n_items: int, who: str = "GridInferer") -> np.ndarray:
    """``(n_items, num_patches)`` booleans: the patches holding a voxel of ``roi_mask`` (all when it is ``None``).

    Raises:
        ValueError: a mask of another shape (see :func:`~monai_patchplug.inference.roi.resolve_roi_mask`).
    """
    if roi_mask is None:
        return np.ones((n_items, geometry.num_patches), dtype=bool)
    masks = resolve_roi_mask(roi_mask, n_items, geometry.spatial_shape, who)
    rows = [patches_in_roi(m, geometry).reshape(-1) for m in masks]
    return np.stack(rows * n_items if len(rows) == 1 else rows)


def check_scale_out_options(postprocess: Any, dst: Any) -> None:
    """Raise on a ``postprocess`` that is not callable (``TypeError``) or a ``dst`` that is not ``None`` or a
    non-negative int (``ValueError``), naming the value."""
    if postprocess is not None and not callable(postprocess):
        raise TypeError(f"postprocess must be callable, got {type(postprocess).__name__}.")
    if dst is not None and (isinstance(dst, bool) or not isinstance(dst, int | np.integer) or dst < 0):
        raise ValueError(f"dst must be None or a rank (a non-negative int), got {dst!r}.")


def item_runs(flat: list[int], n_patches: int) -> Iterable[tuple[int, int, int]]:
    """``(item, lo, hi)``: the consecutive stretches of ``flat`` (flat patch indices) that belong to one item."""
    lo = 0
    for hi in range(1, len(flat) + 1):
        if hi == len(flat) or flat[hi] // n_patches != flat[lo] // n_patches:
            yield flat[lo] // n_patches, lo, hi
            lo = hi


def allocate_destination(
    postprocess: Callable[[torch.Tensor], Any] | None,
    plan: BlendPlan,
    channels: int,
    n_items: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """A ``(B, C', *out_shape)`` tensor for ``postprocess``'s slabs, its channels and dtype read from a dry run on
    one output row of the accumulator's ``dtype`` (allocated with calloc on the CPU)."""
    probe = torch.zeros((channels, 1, *plan.out_shape[1:]), dtype=dtype, device=device)
    sample = torch.as_tensor(postprocess(probe) if postprocess is not None else probe)
    if sample.ndim != len(plan.out_shape) + 1:
        raise ValueError(
            f"GridInferer: postprocess returned a slab of shape {tuple(sample.shape)} for one of shape "
            f"{tuple(probe.shape)}; expected (C', rows, *other spatial dims)."
        )
    return zeros_volume((n_items, int(sample.shape[0]), *plan.out_shape), sample.dtype, sample.device)


class AggregationSink:
    """Where :class:`~monai_patchplug.GridAggregator` puts its batches: one in-memory accumulator (the default), or
    a :class:`SlabWriter` streaming into ``output``; optionally restricted to a region of interest and summed over a
    process group. The options are :class:`~monai_patchplug.GridAggregator`'s.

    Raises:
        TypeError: a ``roi_mask`` that is a key (the aggregator sees no data dict) or a non-callable ``postprocess``.
        ValueError: streaming combined with sharding, or a bad ``dst``.
    """

    def __init__(
        self,
        output: Any = None,
        postprocess: Callable[[torch.Tensor], Any] | None = None,
        roi_mask: Any = None,
        fill_value: float = 0.0,
        distributed: bool = False,
        process_group: Any = None,
        dst: int | None = None,
    ) -> None:
        if isinstance(roi_mask, str):
            raise TypeError(
                "GridAggregator: roi_mask must be a tensor or array (the aggregator sees no data dict); pass "
                "subject[key]."
            )
        check_scale_out_options(postprocess, dst)
        if (output is not None or postprocess is not None) and (distributed or process_group is not None):
            raise ValueError("GridAggregator: output=/postprocess= (streaming) cannot be combined with sharding.")
        self.output, self.postprocess, self.roi_mask, self.fill_value = output, postprocess, roi_mask, float(fill_value)
        self.distributed, self.process_group, self.dst = bool(distributed), process_group, dst
        self.streaming = output is not None or postprocess is not None
        self.run: np.ndarray | None = None
        self.writer: SlabWriter | None = None
        self.channels, self.dtype, self.device = 0, torch.float32, torch.device("cpu")

    def start(
        self, plan: BlendPlan, geometry: Any, channels: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor | None:
        """Set up for the grid; returns the in-memory accumulator (``None`` when streaming). Allocates it (or the
        destination, for ``postprocess`` without ``output``) and the mask's booleans."""
        self.channels, self.dtype = int(channels), dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.roi_mask is not None:
            self.run = run_mask(self.roi_mask, geometry, 1, "GridAggregator")[0].reshape(geometry.grid_shape)
        if not self.streaming:
            return zeros_volume((self.channels, *plan.out_shape), dtype, self.device)
        destination = self.output
        if destination is None:
            destination = allocate_destination(self.postprocess, plan, self.channels, 1, self.device, dtype)[0]
        check_destination(destination, (), len(plan.out_shape), "GridAggregator")
        self.writer = SlabWriter(
            plan, geometry.grid_shape, self.channels, dtype, self.device, destination, (), self.postprocess,
            self.run, self.fill_value,
        )  # fmt: skip
        return None

    def keep(self, index: torch.Tensor, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop the rows of patches outside the region of interest (their outputs are ignored)."""
        if self.run is None:
            return index, batch
        inside = torch.as_tensor(self.run[tuple(index.T.numpy())])
        return (index, batch) if bool(inside.all()) else (index[inside], batch[inside])

    def add(self, plan: BlendPlan, accumulator: torch.Tensor | None, batch: torch.Tensor, index: list) -> None:
        """Add a converted batch of patches (rows of ``index``)."""
        if self.writer is not None:
            self.writer.add(batch, index)
        elif accumulator is not None:
            plan.add(accumulator, batch, index)

    def finish(self, plan: BlendPlan, accumulator: torch.Tensor | None, seen: torch.Tensor) -> Any:
        """Check that every patch to run was added (on some rank), add the skipped patches' fill, sum over the
        ranks, normalise; returns the volume, the destination when streaming, or ``None`` on ranks other than
        ``dst``.

        Raises:
            ValueError: patches never added, or (sharded) added on several ranks or ranks that disagree.
        """
        group = resolve_group(self.distributed, self.process_group, "GridAggregator")
        counts = seen.to(torch.int32)
        if group is not None:
            check_same_on_ranks(group, [*seen.shape, *accumulator.shape], "the grid and the output's shape")
            counts = counts.to(_collective_device(group))
            reduce_sum_(counts, group, None)
            counts = counts.cpu()
            if (counts > 1).any():
                raise ValueError("GridAggregator: a patch was added on several ranks; share the patches out.")
        needed = torch.ones_like(seen) if self.run is None else torch.as_tensor(self.run)
        missing = int((needed & (counts == 0)).sum())
        if missing:
            raise ValueError(
                f"GridAggregator: {missing} of {int(needed.sum())} grid patches were never added; every patch of the "
                "grid" + ("" if self.run is None else " holding a voxel of roi_mask") + " must be added once."
            )
        if self.writer is not None:
            return self.writer.destination
        assert accumulator is not None
        rank = 0 if group is None else dist.get_rank(group)
        if self.run is not None and self.fill_value != 0 and rank == 0:
            index = [tuple(int(v) for v in row) for row in np.argwhere(~self.run)]
            if index:
                value = torch.full((), self.fill_value, dtype=accumulator.dtype, device=accumulator.device)
                plan.add(accumulator, value.expand(len(index), accumulator.shape[0], *plan.out_patch), index)
        if group is not None:
            reduce_sum_(accumulator, group, self.dst)
            if self.dst is not None and dist.get_rank() != self.dst:
                return None
        return plan.normalise_(accumulator)


def _collective_device(group: Any) -> torch.device:
    """The device the group's collectives take (CUDA for NCCL)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
