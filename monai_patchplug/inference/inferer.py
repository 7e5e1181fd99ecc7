"""GridInferer: a MONAI ``Inferer`` that runs a network over a regular patch grid and aggregates its outputs.

It lays the same grid as :class:`~monai_patchplug.GridSampler` over a ``(B, C, *spatial)`` batch, cuts the patches of
all batch items as one flat sequence (so one network call can hold patches of two items and the number of calls is
``ceil(B * num_patches / batch_size)``), and puts each output back with a :class:`BlendPlan`: no weight or count map,
float32 accumulation, one batch of patches in flight (the patch weights are built in the input batch's buffer once
the network has returned).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.utils import optional_import

from .._shapes import TypeSpatialShape, fill_patch_size, resolve_patch_size
from ..sampling.grid import (
    GridGeometry,
    TypePaddingMode,
    make_grid,
    pad_batch,
    resolve_overlap,
)
from .aggregator import BlendPlan, accumulator_dtype, check_overlap_mode, zeros_volume
from .distributed import check_same_on_ranks, reduce_sum_, resolve_group, share
from .monai_args import overlap_from_fraction, sliding_window_settings
from .scale_out import allocate_destination, check_scale_out_options, item_runs, run_mask
from .streaming import SlabWriter, check_destination

tqdm, has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = ["GridInferer"]

TypeNetworkOutput = torch.Tensor | Sequence[torch.Tensor] | Mapping[Any, torch.Tensor]

_KEPT_PLANS = 8  # blend plans a GridInferer keeps between calls


def _flatten(output: TypeNetworkOutput) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], Any]]:
    """The tensors of a network output and a function that rebuilds the same structure from new tensors."""
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
        "GridInferer: the network must return a tensor, or a non-empty tuple/list or dict of tensors, "
        f"got {type(output).__name__}{' (empty)' if isinstance(output, Sized) and not len(output) else ''}."
    )


def reusable_input(buffer: torch.Tensor | None, outputs: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """``buffer`` (the network's input batch, ours) when no output's memory overlaps it, so that, the network having
    returned, its memory can take the patch weights; else ``None``. Compares the storages' address ranges, so views
    made through numpy or DLPack (a storage of their own inside the buffer's) count too. Allocates nothing."""
    if buffer is None:
        return None
    start, stop = _address_range(buffer)
    for o in outputs:
        lo, hi = _address_range(o)
        if lo < stop and start < hi and o.device == buffer.device:
            return None
    return buffer


def _address_range(tensor: torch.Tensor) -> tuple[int, int]:
    """The ``[start, stop)`` addresses of ``tensor``'s storage."""
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


class GridInferer(Inferer):
    """Sliding-window inference on a regular grid, usable wherever MONAI takes an ``Inferer``.

    The grid is :class:`~monai_patchplug.GridSampler`'s (corners ``0, P-O, 2(P-O), ...`` and a last corner ``S-P`` per
    axis) and the blending :class:`~monai_patchplug.GridAggregator`'s. The network may return a tensor, a tuple/list
    or a dict of tensors (the same structure is returned), change the channel count, or return patches scaled by a
    per-axis factor (the output volume is scaled alike).

    Args:
        patch_size: an int or one int per spatial dim.
        patch_overlap: an int or one int per spatial dim, ``0 <= overlap < patch_size`` (default 0).
        overlap_mode: ``"hann"`` (default), ``"average"``, ``"gaussian"`` (MONAI's importance map) or ``"crop"``.
        batch_size: patches per network call (patches of consecutive batch items share calls; default 1).
        padding_mode: ``None``: no padding except for inputs smaller than the patch, which are zero-padded up to it;
            a numpy/torch pad mode name or a number (constant): pad every side by ``overlap // 2`` too, so border
            voxels are blended like the others. The padding is cropped away from the output.
        device: where the output is accumulated; ``None``: the input's device.
        sw_device: where the network runs; ``None``: the input's device.
        progress: show a progress bar over the network calls (needs ``tqdm``).
        roi_size, sw_batch_size, overlap, mode, sigma_scale, cval, cpu_thresh: ``SlidingWindowInferer``'s arguments
            with MONAI's meaning, so that swapping only a config's ``_target_`` gives MONAI's output. Any of
            ``roi_size``, ``sw_batch_size``, ``overlap`` (a fraction, or one per dim) or ``mode`` (``"constant"`` =
            ``average``, ``"gaussian"``) switches to MONAI's defaults: overlap 0.25, ``mode="constant"``, and
            ``padding_mode`` (default ``"constant"`` with ``cval``) pads only inputs smaller than the window.
            ``roi_size`` values <= 0 take the input's size.
        cache_roi_weight_map, buffer_steps, buffer_dim: MONAI's speed/memory knobs; accepted, no effect (they do not
            change MONAI's results, and this inferer keeps no weight map to cache or buffer).
        with_coord: MONAI's option to pass window coordinates to the network; only ``False`` is supported.
        output: stream the result into this destination instead of returning a new volume: a torch tensor, a
            ``numpy.memmap`` or any array supporting slice assignment, of shape ``(B, C', *spatial_out)``. Slabs of
            the first spatial axis are normalised, passed through ``postprocess`` and written as soon as no later
            patch touches them, so only about one row of patches' output (``C`` x ``patch[0]`` x the other axes) is
            held; the call returns ``output``. The network must return one tensor; not with ``distributed``.
        postprocess: applied to each finished, normalised ``(C, rows, *spatial_out[1:])`` slab (any split of the
            first axis, so it must work row by row), e.g. ``lambda x: x.argmax(0, keepdim=True).to(torch.uint8)``;
            its ``(C', rows, ...)`` result is what is written. Without ``output``, a new ``(B, C', ...)`` volume of
            its dtype is returned (the float volume never exists). Its dtype must cast to ``output``'s without
            changing kind (float into an integer output is an error; integers are range-checked).
        roi_mask: run only the patches whose box holds a nonzero voxel of this mask: a tensor/array of shape
            ``spatial``, ``(1, *spatial)`` or ``(B, 1, *spatial)``, or the name of a keyword argument of the call
            that holds it (``inferer(image, net, mask=m)`` with ``roi_mask="mask"``; it is not passed to the
            network). A skipped patch counts as a network output of ``fill_value`` everywhere: where only skipped
            patches reach, the output is ``fill_value`` (``crop``: exactly; blending: up to float rounding), and
            inside the mask the output equals the full run's exactly, since every patch covering a mask voxel holds
            it and is run. Near the mask, outside it, run and skipped patches blend.
        fill_value: the value of skipped patches (before ``postprocess``).
        distributed: shard the grid over the default ``torch.distributed`` process group (initialised by the caller,
            NCCL on GPUs, gloo on CPUs, with a ``timeout``): each rank runs a contiguous, balanced share of the
            patches to run, the accumulators are summed (``all_reduce``), and every rank returns the single-process
            result. Every rank must call with the same input shape and mask (checked: ``ValueError`` otherwise).
        process_group: shard over this group instead (implies ``distributed``).
        dst: with sharding, sum onto this (global) rank only (``reduce``); the other ranks return ``None``.

    ``gaussian`` floors the product of the axis windows as MONAI does, so its summed weights are not separable and
    one single-channel weight volume is kept (as MONAI's count map); the other modes keep none.

    The inferer keeps the blend plans of the last few grids (per-axis weights, at most a 1 MiB store of built patch
    weights each; see :meth:`plan`), so repeated calls on inputs of one shape do not rebuild them; one instance
    should therefore not be called from several threads at once. Unless autograd records the network, the batch of
    patches handed to the network is one buffer, refilled for every call and, once the network has returned (and no
    output shares its memory), overwritten with patch weights: a network must not keep its input past the call
    (a hook that stores it should store a copy). With autograd recording, every call gets a new batch.

    Raises:
        TypeError, ValueError: bad sizes, overlap, mode, batch size or padding mode, one setting given under our
            name and MONAI's with different values, or ``with_coord=True``; a ``postprocess`` that is not callable,
            a bad ``dst``.

    Example::

        inferer = GridInferer(patch_size=96, patch_overlap=32, batch_size=4)
        with torch.no_grad():
            prediction = inferer(image, model)        # image: (B, C, H, W, D)
    """

    def __init__(
        self,
        patch_size: TypeSpatialShape | None = None,
        patch_overlap: TypeSpatialShape | None = None,
        overlap_mode: str | None = None,
        batch_size: int | None = None,
        padding_mode: TypePaddingMode = None,
        device: torch.device | str | None = None,
        sw_device: torch.device | str | None = None,
        progress: bool = False,
        *,
        roi_size: TypeSpatialShape | None = None,
        sw_batch_size: int | None = None,
        overlap: float | Sequence[float] | None = None,
        mode: str | None = None,
        sigma_scale: float | Sequence[float] = 0.125,
        cval: float = 0.0,
        cache_roi_weight_map: bool = False,
        cpu_thresh: int | None = None,
        buffer_steps: int | None = None,
        buffer_dim: int = -1,
        with_coord: bool = False,
        output: Any = None,
        postprocess: Callable[[torch.Tensor], Any] | None = None,
        roi_mask: Any = None,
        fill_value: float = 0.0,
        distributed: bool = False,
        process_group: Any = None,
        dst: int | None = None,
    ) -> None:
        super().__init__()
        self.settings = sliding_window_settings(
            patch_size,
            patch_overlap,
            overlap_mode,
            batch_size,
            padding_mode,
            roi_size=roi_size,
            sw_batch_size=sw_batch_size,
            overlap=overlap,
            mode=mode,
            sigma_scale=sigma_scale,
            cval=cval,
            cpu_thresh=cpu_thresh,
            with_coord=with_coord,
        )
        self.patch_size = self.settings.patch_size
        self.patch_overlap = self.settings.patch_overlap
        self.overlap_mode = check_overlap_mode(self.settings.overlap_mode)
        self.batch_size = self.settings.batch_size
        self.padding_mode = padding_mode
        self.device = device
        self.sw_device = sw_device
        self.progress = progress
        self.cache_roi_weight_map, self.buffer_steps, self.buffer_dim = cache_roi_weight_map, buffer_steps, buffer_dim
        check_scale_out_options(postprocess, dst)
        self.output, self.postprocess, self.roi_mask, self.fill_value = output, postprocess, roi_mask, float(fill_value)
        self.distributed, self.process_group, self.dst = bool(distributed), process_group, dst
        self._plans: dict[tuple, BlendPlan] = {}

    def plan(
        self, geometry: GridGeometry, out_patch: Sequence[int], device: torch.device, dtype: torch.dtype
    ) -> BlendPlan:
        """The :class:`BlendPlan` of ``geometry`` for network output patches of spatial shape ``out_patch``.

        Plans are kept between calls (a few per inferer, dropped when inputs of other shapes come), so repeated
        calls on inputs of one shape reuse the weights they built, except ``gaussian`` plans, which hold a
        volume of summed weights. Allocates a :class:`BlendPlan` when none is kept for this grid, output patch,
        device and dtype.

        Raises:
            ValueError: an ``out_patch`` of another rank than the grid, or one that scales the volume to nothing.
        """
        sigma = self.settings.sigma_scale
        sigma = tuple(sigma) if isinstance(sigma, Sequence) else sigma
        key = (geometry, self.overlap_mode, sigma, tuple(int(q) for q in out_patch), torch.device(device), dtype)
        plan = self._plans.get(key)
        if plan is None:
            plan = BlendPlan(geometry, self.overlap_mode, out_patch, device, dtype, self.settings.sigma_scale)
            if plan.inv_norm_volume is None:
                if len(self._plans) >= _KEPT_PLANS:
                    self._plans.clear()
                self._plans[key] = plan
        return plan

    def geometry(self, spatial_shape: Sequence[int]) -> GridGeometry:
        """The grid this inferer lays over inputs of ``spatial_shape`` (small tuples only).

        Raises:
            ValueError: a patch size or overlap that does not fit the input's rank.
        """
        spatial_shape = tuple(int(s) for s in spatial_shape)
        spec = fill_patch_size(self.patch_size, spatial_shape) if self.settings.fill_non_positive else self.patch_size
        size = resolve_patch_size(spec, len(spatial_shape))
        if self.settings.overlap_fraction is not None:
            padded = [max(s, p) for s, p in zip(spatial_shape, size)]
            overlap = overlap_from_fraction(self.settings.overlap_fraction, size, padded)
        else:
            overlap = resolve_overlap(self.patch_overlap, size)
        return make_grid(spatial_shape, size, overlap, pad_border=self.settings.pad_border)

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
            With ``output``: ``output``, written (only about one row of patches' output is held at a time); with
            ``postprocess`` alone: a new ``(B, C', ...)`` volume of its dtype; sharded with ``dst``: ``None`` on the
            other ranks. ``roi_mask`` adds one boolean copy of the mask.

        Raises:
            ValueError: inputs that are not ``(B, C, H, W[, D])``, or network outputs whose batch or spatial
                dimensions do not fit the patches; an ``output`` of the wrong shape, or slabs whose shape, dtype kind
                or integer range do not fit it (raised before anything is written); a ``roi_mask`` of another shape;
                sharded: ranks with different input shapes, masks or network outputs (on every rank, no hang).
            TypeError: a network output that is not a tensor, a tuple/list or a dict of tensors; an ``output``
                without ``shape``/slice assignment.
            KeyError: ``roi_mask`` names a keyword argument that was not passed.
            RuntimeError: sharding without an initialised process group; a collective that timed out.
        """

        if inputs.ndim not in (4, 5) or 0 in inputs.shape:
            raise ValueError(
                f"GridInferer: inputs must be (B, C, H, W[, D]) with no empty axis, got shape {tuple(inputs.shape)}."
            )
        spatial = tuple(int(s) for s in inputs.shape[2:])
        n_items = int(inputs.shape[0])
        geometry = self.geometry(spatial)
        settings = self.settings
        group = resolve_group(self.distributed, self.process_group)
        streaming = self.output is not None or self.postprocess is not None
        if group is not None and streaming:
            raise ValueError(
                "GridInferer: output=/postprocess= (streaming) cannot be combined with distributed inference; use "
                "dst=<rank> and postprocess the returned volume on that rank."
            )
        roi = self.roi_mask
        if isinstance(roi, str):
            if roi not in kwargs:
                raise KeyError(
                    f"GridInferer: roi_mask={roi!r} names a keyword argument of the call (not passed to the network), "
                    f"e.g. inferer(image, network, {roi}=batch[{roi!r}]); none was given."
                )
            kwargs = dict(kwargs)
            roi = kwargs.pop(self.roi_mask)
        n_patches = geometry.num_patches
        run = run_mask(roi, geometry, n_items)
        if self.output is not None:
            check_destination(self.output, (n_items,), len(spatial))
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
        sw_device = torch.device(self.sw_device) if self.sw_device is not None else inputs.device
        device = torch.device(self.device) if self.device is not None else inputs.device
        if settings.cpu_thresh is not None and int(np.prod(spatial)) > settings.cpu_thresh:
            device = torch.device("cpu")

        plans: list[BlendPlan] = []
        dtypes: list[torch.dtype] = []
        channels: list[int] = []
        volumes: list[torch.Tensor] = []
        writers: list[SlabWriter] = []
        destination: Any = self.output
        rebuild: Callable[[list[torch.Tensor]], Any] = list
        buffer: torch.Tensor | None = None
        graph = torch.is_grad_enabled()  # until a batch's outputs show that autograd records nothing
        size = self.batch_size
        starts: Iterable[int] = range(0, len(mine), size)
        if self.progress and has_tqdm:
            starts = tqdm(starts, total=-(-len(mine) // size), desc="GridInferer")
        for first in starts:
            chunk = mine[first : first + size]
            views = [padded[k // n_patches][(..., *boxes[k % n_patches])] for k in chunk]
            if graph:  # autograd may keep each batch for the backward pass
                window = torch.stack(views)
            else:  # one patch buffer for the whole run: fresh large allocations cost page faults on every batch
                if buffer is None:
                    buffer = padded.new_empty((min(size, len(mine)), *padded.shape[1:2], *geometry.patch_size))
                window = torch.stack(views, out=buffer[: len(chunk)])
            outputs, rebuild = _flatten(network(window.to(sw_device), *args, **kwargs))
            # the batch can be reused once autograd is seen to record nothing (and stacking into it records nothing)
            graph = graph and (padded.requires_grad or any(o.requires_grad for o in outputs))
            scratch = reusable_input(buffer, outputs)
            if not plans:
                for out in outputs:
                    self._check_output(out, window)
                    dtype = accumulator_dtype(self.overlap_mode, out.dtype)
                    plan = self.plan(geometry, out.shape[2:], device, dtype)
                    plans.append(plan)
                    dtypes.append(dtype)
                    channels.append(int(out.shape[1]))
                    if not streaming:
                        volumes.append(zeros_volume((n_items, channels[-1], *plan.out_shape), dtype, device))
                if streaming:
                    if len(outputs) != 1 or not isinstance(rebuild([outputs[0]]), torch.Tensor):
                        raise ValueError("GridInferer: output=/postprocess= need a network that returns one tensor.")
                    if destination is None:
                        destination = allocate_destination(
                            self.postprocess, plans[0], channels[0], n_items, device, dtypes[0]
                        )
                    writers = [
                        SlabWriter(
                            plans[0],
                            geometry.grid_shape,
                            channels[0],
                            dtypes[0],
                            device,
                            destination,
                            (item,),
                            self.postprocess,
                            run[item].reshape(geometry.grid_shape),
                            self.fill_value,
                        )
                        for item in range(n_items)
                    ]
            elif len(outputs) != len(plans):
                raise ValueError(f"GridInferer: the network returned {len(outputs)} outputs, earlier {len(plans)}.")
            if probe:
                break
            for o, (out, plan) in enumerate(zip(outputs, plans)):
                self._check_output(out, window, (channels[o], *plan.out_patch))
                out = out.as_tensor() if isinstance(out, MetaTensor) else out
                out = out.to(device=device, dtype=dtypes[o])
                for item, lo, hi in item_runs(chunk, n_patches):
                    index = [grid_index[k % n_patches] for k in chunk[lo:hi]]
                    if writers:
                        writers[item].add(out[lo:hi], index)
                    else:
                        plan.add(volumes[o][item], out[lo:hi], index, scratch=scratch)
            del outputs, out  # free this batch's outputs before the network allocates the next ones

        if streaming:
            if not all(w.finished for w in writers):  # every segment's patches were added: cannot happen
                raise RuntimeError("GridInferer: some output slabs were never finished.")
            if self.output is None and isinstance(inputs, MetaTensor):
                return MetaTensor(destination).copy_meta_from(inputs)
            return destination
        results = []
        fill = float(self.fill_value)
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
                reduce_sum_(volume, group, self.dst)
                if self.dst is not None and dist.get_rank() != self.dst:
                    continue
            plan.normalise_(volume)
            if isinstance(inputs, MetaTensor):
                volume = MetaTensor(volume).copy_meta_from(inputs)
            results.append(volume)
        if group is not None and self.dst is not None and dist.get_rank() != self.dst:
            return None
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
