""":class:`~monai_patchplug.GridInferer` beyond one process and one in-memory volume.

:func:`scale_out_call` is the inferer's run when any of its scale-out options is set:

- ``roi_mask``: only patches holding a mask voxel are run (:mod:`.roi`); a skipped patch counts as if the network
  had returned ``fill_value`` everywhere in it, so the separable normaliser stays exact;
- ``output`` / ``postprocess``: the volume is streamed slab by slab into the destination (:mod:`.streaming`);
- ``distributed`` / ``process_group``: the patches to run are shared out over the ranks and the accumulators summed
  (:mod:`.distributed`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from monai.data import MetaTensor
from monai.utils import optional_import

from ..sampling.grid import pad_batch
from .aggregator import BlendPlan, accumulator_dtype, zeros_volume
from .distributed import check_same_on_ranks, reduce_sum_, resolve_group, share
from .roi import patches_in_roi, resolve_roi_mask
from .streaming import SlabWriter, check_destination

if TYPE_CHECKING:
    from .inferer import GridInferer

tqdm, has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = ["scale_out_call", "run_mask"]


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


def _item_runs(flat: list[int], n_patches: int) -> Iterable[tuple[int, int, int]]:
    """``(item, lo, hi)``: the consecutive stretches of ``flat`` (flat patch indices) that belong to one item."""
    lo = 0
    for hi in range(1, len(flat) + 1):
        if hi == len(flat) or flat[hi] // n_patches != flat[lo] // n_patches:
            yield flat[lo] // n_patches, lo, hi
            lo = hi


def scale_out_call(
    inferer: GridInferer, inputs: torch.Tensor, network: Callable[..., Any], args: tuple, kwargs: dict
) -> Any:
    """Run ``network`` over the grid with the inferer's ``roi_mask``, ``output``/``postprocess`` and sharding.

    Returns:
        With ``output``: ``output`` itself, filled. With ``postprocess`` only: a new ``(B, C', *spatial_out)`` tensor
        of ``postprocess``'s dtype (a MetaTensor for MetaTensor inputs); the float volume never exists. Otherwise the
        network's structure of volumes, as the plain inferer; with ``dst``, ranks other than ``dst`` get ``None``.
        Allocates, besides the plain inferer's patch buffers: the mask as booleans; with streaming, one row of patches'
        output rows at a time; when sharded, each rank a full accumulator.

    Raises:
        ValueError, TypeError, KeyError, RuntimeError: see :class:`~monai_patchplug.GridInferer`.
    """
    from .inferer import _flatten, reusable_input  # the inferer imports this module

    if inputs.ndim not in (4, 5):
        raise ValueError(f"GridInferer: inputs must be (B, C, H, W[, D]), got shape {tuple(inputs.shape)}.")
    spatial = tuple(int(s) for s in inputs.shape[2:])
    n_items = int(inputs.shape[0])
    geometry = inferer.geometry(spatial)
    settings = inferer.settings
    group = resolve_group(inferer.distributed, inferer.process_group)
    streaming = inferer.output is not None or inferer.postprocess is not None
    if group is not None and streaming:
        raise ValueError(
            "GridInferer: output=/postprocess= (streaming) cannot be combined with distributed inference; use "
            "dst=<rank> and postprocess the returned volume on that rank."
        )
    roi = inferer.roi_mask
    if isinstance(roi, str):
        if roi not in kwargs:
            raise KeyError(
                f"GridInferer: roi_mask={roi!r} names a keyword argument of the call (not passed to the network), "
                f"e.g. inferer(image, network, {roi}=batch[{roi!r}]); none was given."
            )
        kwargs = dict(kwargs)
        roi = kwargs.pop(inferer.roi_mask)
    n_patches = geometry.num_patches
    run = run_mask(roi, geometry, n_items)
    if inferer.output is not None:
        check_destination(inferer.output, (n_items,), len(spatial))
    rank, world = 0, 1
    if group is not None:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        what = "the input's shape (B, C, *spatial) and the number of patches to run"
        check_same_on_ranks(group, [*inputs.shape, int(run.sum())], what)
    todo = np.flatnonzero(run.reshape(-1))
    mine = todo[share(len(todo), rank, world)].tolist()
    probe = not mine  # no patch to run here: one network call on the first patch learns the output's structure
    if probe:
        mine = [0]

    mode, pad_kwargs = settings.pad if settings.pad is not None else ("constant", {})
    images = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
    padded = pad_batch(images, geometry, mode, **pad_kwargs)
    corners = geometry.corner_array().tolist()
    grid_index = np.stack(np.unravel_index(np.arange(n_patches), geometry.grid_shape), 1).tolist()
    boxes = [tuple(slice(c, c + p) for c, p in zip(corner, geometry.patch_size)) for corner in corners]
    sw_device = torch.device(inferer.sw_device) if inferer.sw_device is not None else inputs.device
    device = torch.device(inferer.device) if inferer.device is not None else inputs.device
    if settings.cpu_thresh is not None and int(np.prod(spatial)) > settings.cpu_thresh:
        device = torch.device("cpu")

    plans: list[BlendPlan] = []
    dtypes: list[torch.dtype] = []
    channels: list[int] = []
    volumes: list[torch.Tensor] = []
    writers: list[SlabWriter] = []
    destination: Any = inferer.output
    rebuild: Callable[[list[torch.Tensor]], Any] = list
    buffer: torch.Tensor | None = None
    size = inferer.batch_size
    starts: Iterable[int] = range(0, len(mine), size)
    if inferer.progress and has_tqdm:
        starts = tqdm(starts, total=-(-len(mine) // size), desc="GridInferer")
    for first in starts:
        chunk = mine[first : first + size]
        views = [padded[k // n_patches][(..., *boxes[k % n_patches])] for k in chunk]
        if padded.requires_grad:
            window = torch.stack(views)
        else:
            if buffer is None:
                buffer = padded.new_empty((min(size, len(mine)), *padded.shape[1:2], *geometry.patch_size))
            window = torch.stack(views, out=buffer[: len(chunk)])
        outputs, rebuild = _flatten(network(window.to(sw_device), *args, **kwargs))
        scratch = reusable_input(buffer, outputs)
        if not plans:
            for out in outputs:
                inferer._check_output(out, window)
                dtype = accumulator_dtype(inferer.overlap_mode, out.dtype)
                plan = inferer.plan(geometry, out.shape[2:], device, dtype)
                plans.append(plan)
                dtypes.append(dtype)
                channels.append(int(out.shape[1]))
                if not streaming:
                    volumes.append(zeros_volume((n_items, channels[-1], *plan.out_shape), dtype, device))
            if streaming:
                if len(outputs) != 1 or not isinstance(rebuild([outputs[0]]), torch.Tensor):
                    raise ValueError("GridInferer: output=/postprocess= need a network that returns one tensor.")
                if destination is None:
                    destination = _allocate_destination(inferer.postprocess, plans[0], channels[0], n_items, device)
                writers = [
                    SlabWriter(
                        plans[0],
                        geometry.grid_shape,
                        channels[0],
                        dtypes[0],
                        device,
                        destination,
                        (item,),
                        inferer.postprocess,
                        run[item].reshape(geometry.grid_shape),
                        inferer.fill_value,
                    )
                    for item in range(n_items)
                ]
        elif len(outputs) != len(plans):
            raise ValueError(f"GridInferer: the network returned {len(outputs)} outputs, earlier {len(plans)}.")
        if probe:
            break
        for o, (out, plan) in enumerate(zip(outputs, plans)):
            inferer._check_output(out, window, (channels[o], *plan.out_patch))
            out = out.as_tensor() if isinstance(out, MetaTensor) else out
            out = out.to(device=device, dtype=dtypes[o])
            for item, lo, hi in _item_runs(chunk, n_patches):
                index = [grid_index[k % n_patches] for k in chunk[lo:hi]]
                if writers:
                    writers[item].add(out[lo:hi], index)
                else:
                    plan.add(volumes[o][item], out[lo:hi], index, scratch=scratch)
        del outputs, out  # free this batch's outputs before the network allocates the next ones

    if streaming:
        if not all(w.finished for w in writers):  # every segment's patches were added: cannot happen
            raise RuntimeError("GridInferer: some output slabs were never finished.")
        if inferer.output is None and isinstance(inputs, MetaTensor):
            return MetaTensor(destination).copy_meta_from(inputs)
        return destination
    results = []
    fill = float(inferer.fill_value)
    for o, (plan, volume) in enumerate(zip(plans, volumes)):
        if fill != 0 and rank == 0 and not run.all():  # one rank adds the skipped patches' fill
            value = torch.full((), fill, dtype=volume.dtype, device=volume.device)
            for item in range(n_items):
                index = [grid_index[k] for k in np.flatnonzero(~run[item])]
                if index:
                    plan.add(volume[item], value.expand(len(index), volume.shape[1], *plan.out_patch), index)
        if group is not None:
            what = f"output {o}'s shape and element size (ranks ran networks that disagree)"
            check_same_on_ranks(group, [*volume.shape, volume.element_size()], what)
            reduce_sum_(volume, group, inferer.dst)
            if inferer.dst is not None and dist.get_rank() != inferer.dst:
                continue
        plan.normalise_(volume)
        if isinstance(inputs, MetaTensor):
            volume = MetaTensor(volume).copy_meta_from(inputs)
        results.append(volume)
    if group is not None and inferer.dst is not None and dist.get_rank() != inferer.dst:
        return None
    return rebuild(results)


def _allocate_destination(
    postprocess: Callable[[torch.Tensor], Any] | None,
    plan: BlendPlan,
    channels: int,
    n_items: int,
    device: torch.device,
) -> torch.Tensor:
    """A ``(B, C', *out_shape)`` tensor for ``postprocess``'s slabs, its channels and dtype read from a dry run on
    one output row (allocated with calloc on the CPU)."""
    probe = torch.zeros((channels, 1, *plan.out_shape[1:]), device=device)
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
        if postprocess is not None and not callable(postprocess):
            raise TypeError(f"postprocess must be callable, got {type(postprocess).__name__}.")
        if (output is not None or postprocess is not None) and (distributed or process_group is not None):
            raise ValueError("GridAggregator: output=/postprocess= (streaming) cannot be combined with sharding.")
        if dst is not None and (isinstance(dst, bool) or not isinstance(dst, int | np.integer) or dst < 0):
            raise ValueError(f"dst must be None or a rank (a non-negative int), got {dst!r}.")
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
            destination = _allocate_destination(self.postprocess, plan, self.channels, 1, self.device)[0]
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
