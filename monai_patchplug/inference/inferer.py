"""GridInferer: MONAI's front end to grid inference, usable wherever MONAI takes an ``Inferer``.

A call is a short sequence of steps: resolve the grid and the patches to run (:meth:`GridInferer._prepare`), cut
them into batches (:class:`_Batches`: the patches of all batch items as one flat sequence, so one network call can
hold patches of two items), run the network, hand its outputs to one sink per output and item (:mod:`.sinks`), and
finish the sinks. The blending itself is :class:`~.blend.BlendPlan`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from monai.data import MetaTensor
from monai.inferers import Inferer

from .._shapes import TypeSpatialShape, fill_patch_size, resolve_patch_size
from ..grid import GridGeometry, TypePaddingMode, make_grid, resolve_overlap
from .blend import BlendPlan, accumulator_dtype, check_overlap_mode, zeros_volume
from .distributed import check_same_on_ranks, gather_rows, receives_rows, resolve_group
from .ensemble import AveragedNetwork, flatten_output, mirror_subsets
from .inputs import is_lazy, open_source
from .monai_args import overlap_from_fraction, sliding_window_settings
from .options import (
    check_accumulate_dtype,
    check_device,
    check_ensemble,
    check_margin,
    check_mirror_axes,
    check_scale_out,
)
from .parts import Markers, check_part, part_rows, remaining_rows
from .roi import run_mask
from .sinks import PatchSink, allocate_destination, check_destination, open_sink

__all__ = ["GridInferer"]

TypeNetworkOutput = torch.Tensor | Sequence[torch.Tensor] | Mapping[Any, torch.Tensor]

WHO = "GridInferer"
_KEPT_PLANS = 8  # blend plans a GridInferer keeps between calls


@dataclass
class _Job:
    """One call's resolved grid, devices and share of the patches."""

    geometry: GridGeometry
    n_items: int
    #: where patches are read (:mod:`.inputs`)
    source: Any
    #: ``(n_items, *grid_shape)`` booleans: the patches to run (the others are skipped, filled)
    run: np.ndarray
    #: the flat indices ``item * num_patches + patch`` this process runs
    mine: list[int]
    #: this process runs no patch: one network call on the first patch learns the output's structure
    probe: bool
    group: Any
    device: torch.device
    sw_device: torch.device
    kwargs: dict
    #: the part of the output's first axis this process writes (``part=``, or its rank's when sharded)
    part: tuple[int, int] | None = None
    #: the completion markers (``resume=``)
    markers: Markers | None = None
    boxes: list[tuple[slice, ...]] = field(default_factory=list)
    grid_index: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        corners = self.geometry.corner_array().tolist()
        self.boxes = [tuple(slice(c, c + p) for c, p in zip(corner, self.geometry.patch_size)) for corner in corners]
        shape = self.geometry.grid_shape
        self.grid_index = np.stack(np.unravel_index(np.arange(self.geometry.num_patches), shape), 1).tolist()

    @property
    def by_rows(self) -> bool:
        """Whether this process writes only some output rows (a part, or what a resumed job has left)."""
        return self.part is not None or self.markers is not None

    def item_runs(self, chunk: Sequence[int]) -> Iterator[tuple[int, int, int]]:
        """``(item, lo, hi)``: the consecutive stretches of ``chunk`` (flat indices) that belong to one item."""
        n, lo = self.geometry.num_patches, 0
        for hi in range(1, len(chunk) + 1):
            if hi == len(chunk) or chunk[hi] // n != chunk[lo] // n:
                yield chunk[lo] // n, lo, hi
                lo = hi


@dataclass
class _Output:
    """One network output's blend plan, channels, sinks (one per batch item) and the volume they fill."""

    plan: BlendPlan
    channels: int
    #: the network's output dtype, which the returned volume takes when ``accumulate_dtype`` is given
    dtype: torch.dtype
    sinks: list[PatchSink]
    #: the ``(B, C', *spatial_out)`` result: the in-memory accumulator, or the streamed destination
    volume: Any


def _progress_bar(batches: _Batches) -> Any:
    """``batches`` behind a tqdm progress bar, or as they are when tqdm is not installed (an optional extra)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return batches
    return tqdm(batches, total=len(batches), desc=WHO)


def _has_forward_hooks(networks: Sequence[Any]) -> bool:
    """Whether any of ``networks`` is an ``nn.Module`` that runs forward hooks (its own, a submodule's or global
    ones), which may keep the input batch they see."""
    modules = [n for n in networks if isinstance(n, torch.nn.Module)]
    if not modules:
        return False
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for n in modules for m in n.modules())


class _Batches:
    """The network's input batches of one call.

    Every batch is stacked into one buffer, allocated at the first batch and refilled for every call (fresh large
    allocations cost page faults on every batch). Every batch is a new tensor instead while
    autograd records (the input, or the first batch's outputs, require grad), and whenever the network is an
    ``nn.Module`` with forward hooks, since a hook may keep the batch it sees. The patches of an in-memory source are
    views that stay valid, stacked at once; those of a lazy source are views of a slab that the next patch may
    overwrite (a batch may straddle two rows of patches), so each is copied into the batch as soon as it is read.
    """

    def __init__(self, job: _Job, size: int, networks: Sequence[Any]) -> None:
        self.job, self.size = job, size
        self.hooked = _has_forward_hooks(networks)
        self.graph = torch.is_grad_enabled()  # until a batch's outputs show that autograd records nothing
        self.buffer: torch.Tensor | None = None

    def __len__(self) -> int:
        return -(-len(self.job.mine) // self.size)

    def __iter__(self) -> Iterator[tuple[list[int], torch.Tensor]]:
        for first in range(0, len(self.job.mine), self.size):
            chunk = self.job.mine[first : first + self.size]
            yield chunk, self._batch(chunk)

    def _batch(self, chunk: list[int]) -> torch.Tensor:
        """The ``(len(chunk), C, *patch)`` batch of the patches at flat indices ``chunk``: the shared buffer's first
        rows, or a new tensor while autograd records or hooks may keep it (allocates it, or the buffer at the first
        batch)."""
        job, n = self.job, self.job.geometry.num_patches
        fresh = self.graph or self.hooked
        views = (job.source.patch(k // n, job.boxes[k % n]) for k in chunk)
        if job.source.stable_views:
            stacked = list(views)
            return torch.stack(stacked) if fresh else torch.stack(stacked, out=self._out(stacked[0], len(chunk)))
        batch = None
        for i, view in enumerate(views):
            if batch is None:
                batch = view.new_empty((len(chunk), *view.shape)) if fresh else self._out(view, len(chunk))
            batch[i].copy_(view)
        assert batch is not None
        return batch

    def _out(self, patch: torch.Tensor, count: int) -> torch.Tensor:
        """The shared buffer's first ``count`` patches, the buffer allocated at first use (as many patches as a batch
        of this call holds, each shaped and typed as ``patch``)."""
        if self.buffer is None:
            self.buffer = patch.new_empty((min(self.size, len(self.job.mine)), *patch.shape))
        return self.buffer[:count]

    def note(self, outputs: Sequence[torch.Tensor]) -> None:
        """Note whether autograd records the network (then every batch stays a new tensor)."""
        self.graph = self.graph and (self.job.source.requires_grad or any(o.requires_grad for o in outputs))


class GridInferer(Inferer):
    """Sliding-window inference on a regular grid, usable wherever MONAI takes an ``Inferer``.

    The grid is :class:`~monai_patchplug.GridSampler`'s (corners ``0, P-O, 2(P-O), ...`` and a last corner ``S-P`` per
    axis) and the blending :class:`~monai_patchplug.GridAggregator`'s. The network may return a tensor, a tuple/list
    or a dict of tensors (the same structure is returned), change the channel count, or return patches scaled by a
    per-axis factor (the output volume is scaled alike).

    Args:
        patch_size: an int or one int per spatial dim; inputs of any spatial rank >= 1. The input's rank decides: an
            int is that size on each of its axes; values beyond its rank must be 1 (TorchIO's ``(64, 64, 1)``).
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
            held; the call returns ``output``. The network must return one tensor; not with ``distributed``. A
            tensor of the accumulator's dtype (float32 for float networks) without ``postprocess`` is its own
            accumulator: nothing is held, and rows of a run that failed part-way hold partial sums. A chunked store
            (one with ``chunks``: zarr, h5py) is written in pieces cut at its chunk edges.
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
            NCCL on GPUs, gloo on CPUs, with a ``timeout``): rank ``r`` of ``w`` computes ``part=(r, w)`` (the
            patches its rows of the output need). With ``output=`` every rank writes its own rows (one barrier at
            the end); without it every rank returns the single-process result: a rank holds the whole output, its
            rows blended into it in place and the others' rows broadcast into it, and nothing else of its size.
            Every rank must call with the same input shape and mask (checked: ``ValueError`` otherwise).
        process_group: shard over this group instead (implies ``distributed``).
        dst: with sharding and no ``output``, gather the rows on this (global) rank only, which returns the result;
            the other ranks hold only their own rows, send them, and return ``None``.
        mirror_axes: test-time mirroring (nnU-Net's): spatial axes (0-based among the spatial dims); every subset of
            them, the empty one included, flips each batch of patches, runs the network(s) on it and flips the
            outputs back, and the ``2^k`` results are averaged per patch before blending. ``None``: no mirroring.
        ensemble_weights: with a list of networks given to the call (an ensemble, e.g. one per fold), one weight per
            network (``None``: equal weights). The networks' outputs are averaged per patch; with ``sw_device`` one
            device per network, every device gets its batch before any result is waited for.
        accumulate_dtype: ``torch.float16``, ``torch.bfloat16`` or ``torch.float32`` (also by name): the dtype of the
            volume the output is aggregated into (``None``: float32, or float64 for float64/wide integer outputs;
            ``crop`` keeps the network's dtype). Half precision halves that volume: the blending modes sum the
            patches in float32 slabs of the rows still open (about one row of patches) and round each finished
            voxel once into the half volume (nnU-Net's float16 accumulator rounds at every add); a float16 result
            that overflowed raises. The returned volume takes the network's dtype again (a converted copy at the
            end, unless streaming), so the saving is largest with a half precision network or with
            ``output=``/``postprocess=`` (whose slabs are then float32 too).
        output_margin: valid convolutions: the network returns each patch less this margin on every side (an int or
            one per spatial dim; e.g. 96^3 in, 88^3 out for 4). The output lands where it belongs and the volume keeps
            the input's shape; the input is padded by the margin (``padding_mode``, zeros by default), so border
            voxels come from patches read with padding. Needs ``patch_overlap >= 2 * margin``. ``0`` (default): a
            smaller output is a scaled patch.

    ``gaussian`` floors the product of the axis windows as MONAI does, so its summed weights are not separable and
    one single-channel weight volume is kept (as MONAI's count map); the other modes keep none.

    The inferer keeps the blend plans of the last few grids (per-axis weights and a store of built patch weights
    each, one patch weight and at least 1 MiB; see :meth:`plan`), so repeated calls on inputs of one shape do not
    rebuild them; one instance should therefore not be called from several threads at once. The batch of patches
    handed to the network is one buffer, refilled for every call, so a plain callable must not keep its input past
    the call. Every call gets a new batch instead while autograd records, and when the network is an ``nn.Module`` with
    forward hooks (or global ones are registered), so a hook may keep the input it sees.

    Raises:
        TypeError, ValueError: bad sizes, overlap, mode, batch size or padding mode, one setting given under our
            name and MONAI's with different values, or ``with_coord=True``; a ``postprocess`` that is not callable,
            a bad ``dst``.

    Example:
        >>> import torch
        >>> from monai_patchplug import GridInferer
        >>> inferer = GridInferer(patch_size=8, patch_overlap=4, batch_size=4)
        >>> image = torch.rand(2, 1, 20, 18, 12)  # (B, C, H, W, D)
        >>> model = torch.nn.Conv3d(1, 3, kernel_size=1)  # 3 output channels
        >>> with torch.no_grad():
        ...     prediction = inferer(image, model)
        >>> prediction.shape
        torch.Size([2, 3, 20, 18, 12])
        >>> torch.allclose(inferer(image, lambda x: x), image)  # an identity network reconstructs the image
        True
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
        mirror_axes: Sequence[int] | None = None,
        ensemble_weights: Sequence[float] | None = None,
        accumulate_dtype: torch.dtype | str | None = None,
        output_margin: TypeSpatialShape = 0,
        part: tuple[int, int] | None = None,
        resume: str | None = None,
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
        self.overlap_mode = check_overlap_mode(self.settings.overlap_mode, WHO)
        self.batch_size = self.settings.batch_size
        self.padding_mode = padding_mode
        self.device = check_device(device, "device", WHO)
        self.sw_device: Any = (
            tuple(check_device(d, "sw_device", WHO) for d in sw_device)
            if isinstance(sw_device, list | tuple)
            else check_device(sw_device, "sw_device", WHO)
        )
        self.progress = progress
        self.cache_roi_weight_map, self.buffer_steps, self.buffer_dim = cache_roi_weight_map, buffer_steps, buffer_dim
        self.options = check_scale_out(
            WHO, output, postprocess, roi_mask, fill_value, distributed, process_group, dst, streamed_shards=True
        )
        self.mirror_axes = check_mirror_axes(mirror_axes, WHO)
        self.ensemble_weights = ensemble_weights
        self.accumulate_dtype = check_accumulate_dtype(accumulate_dtype, WHO)
        self.output_margin = check_margin(output_margin, WHO)
        self.part = check_part(part, WHO)
        self.resume = resume
        if (self.part is not None or resume is not None) and output is None:
            raise ValueError(f"{WHO}: part= and resume= write into a store: give output= too.")
        if self.part is not None and self.options.sharded:
            raise ValueError(f"{WHO}: part= and distributed inference both choose the rows to write; give one.")
        self._plans: dict[tuple, BlendPlan] = {}

    def plan(
        self, geometry: GridGeometry, out_patch: Sequence[int], device: torch.device, dtype: torch.dtype
    ) -> BlendPlan:
        """The :class:`~.blend.BlendPlan` of ``geometry`` for network output patches of spatial shape ``out_patch``.

        Plans are kept between calls (a few per inferer, dropped when inputs of other shapes come), so repeated
        calls on inputs of one shape reuse the weights they built, except ``gaussian`` plans, which hold a
        volume of summed weights. Allocates a :class:`~.blend.BlendPlan` when none is kept for this grid, output
        patch, device and dtype.

        Raises:
            ValueError: an ``out_patch`` of another rank than the grid, or one that scales the volume to nothing.
        """
        sigma = self.settings.sigma_scale
        sigma = tuple(sigma) if isinstance(sigma, Sequence) else sigma
        margin = self._margin(len(geometry.patch_size))
        key = (
            geometry,
            self.overlap_mode,
            sigma,
            tuple(int(q) for q in out_patch),
            torch.device(device),
            dtype,
            margin,
        )
        plan = self._plans.get(key)
        if plan is None:
            plan = BlendPlan(
                geometry, self.overlap_mode, out_patch, device, dtype, self.settings.sigma_scale, WHO, margin
            )
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
        margin = self._margin(len(spatial_shape))
        if not any(margin):
            return make_grid(spatial_shape, size, overlap, pad_border=self.settings.pad_border)
        if any(2 * m >= p or o < 2 * m for m, p, o in zip(margin, size, overlap)):
            raise ValueError(
                f"{WHO}: output_margin {margin} needs patches larger than twice the margin and an overlap of at least "
                f"twice the margin on every axis, got patch_size {size} and patch_overlap {overlap}."
            )
        widened = make_grid([s + 2 * m for s, m in zip(spatial_shape, margin)], size, overlap, self.settings.pad_border)
        return replace(  # the margin is padding around the input: the network reads it, no output lands there
            widened,
            spatial_shape=spatial_shape,
            pad_before=tuple(b + m for b, m in zip(widened.pad_before, margin)),
            pad_after=tuple(a + m for a, m in zip(widened.pad_after, margin)),
        )

    def _margin(self, ndim: int) -> tuple[int, ...]:
        """``output_margin`` per spatial axis.

        Raises:
            ValueError: a number of values that does not fit the input's rank.
        """
        margin = self.output_margin * ndim if len(self.output_margin) == 1 else self.output_margin
        if len(margin) != ndim:
            raise ValueError(f"{WHO}: output_margin {self.output_margin} does not fit {ndim} spatial dims.")
        return margin

    def __call__(
        self, inputs: torch.Tensor, network: Callable[..., TypeNetworkOutput], *args: Any, **kwargs: Any
    ) -> TypeNetworkOutput:
        """Run ``network`` over the grid of every item of ``inputs`` and aggregate.

        Args:
            inputs: ``(B, C, *spatial)`` with any number >= 1 of spatial dims (tensor, MetaTensor or numpy array).
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
            ValueError: inputs that are not ``(B, C, *spatial)`` (at least one spatial dim), or network outputs whose
                batch or spatial dimensions do not fit the patches; an ``output`` of the wrong shape, or slabs whose
                shape, dtype kind or integer range do not fit it (raised before anything is written); a ``roi_mask`` of
                another shape;
                sharded: ranks with different input shapes, masks or network outputs (on every rank, no hang).
            TypeError: inputs that are not a tensor or array; a network output that is not a tensor, a tuple/list
                or a dict of tensors; an ``output`` without ``shape``/slice assignment.
            KeyError: ``roi_mask`` names a keyword argument that was not passed.
            RuntimeError: sharding without an initialised process group; a collective that timed out.
        """
        job = self._prepare(inputs, kwargs)
        networks, run = self._networks(network, job, args)
        batches = _Batches(job, self.batch_size, networks)
        steps: Any = batches
        if self.progress:
            steps = _progress_bar(batches)
        opened: list[_Output] = []
        rebuild: Callable[[list[Any]], Any] = list
        if job.by_rows:
            opened, rebuild = self._open_by_rows(job, batches, run)
        for chunk, window in steps:
            outputs, rebuild = flatten_output(run(window), WHO)
            batches.note(outputs)
            if not opened:
                opened = self._open_sinks(job, outputs, window, rebuild)
            if job.probe:
                break
            self._hand_over(job, opened, outputs, window, chunk)
            del outputs  # free this batch's outputs before the network allocates the next ones
        return self._finish(job, opened, rebuild, inputs)

    def _open_by_rows(
        self, job: _Job, batches: _Batches, run: Callable[[torch.Tensor], Any]
    ) -> tuple[list[_Output], Callable[[list[Any]], Any]]:
        """Open sinks that write only this process's rows (one network call on a patch of the part's first row of
        patches shapes them) and keep only the patches those rows need."""
        geometry = job.geometry
        first = part_rows(geometry.spatial_shape[0], job.part)[0] + geometry.pad_before[0]  # the part's rows, roughly
        row = max(int(np.searchsorted(geometry.corners[0], first, side="right")) - 1, 0)
        mine, job.mine = job.mine, [row * (geometry.num_patches // geometry.grid_shape[0])]
        chunk, window = next(iter(batches))
        outputs, rebuild = flatten_output(run(window), WHO)
        opened = self._open_sinks(job, outputs, window, rebuild)
        batches.buffer = None  # sized for the probe: the part's batches take a buffer of their own
        n = job.geometry.num_patches
        needed = [set(sink.rows_needed()) for sink in opened[0].sinks]
        run_flat = job.run.reshape(job.n_items, -1)
        candidates = range(job.n_items * n) if job.probe else mine
        job.mine = [k for k in candidates if job.grid_index[k % n][0] in needed[k // n] and run_flat[k // n, k % n]]
        job.probe = False
        if job.mine and job.mine[0] == chunk[0]:  # the probed patch is the part's first: its output is not wasted
            self._hand_over(job, opened, outputs, window, chunk)
            job.mine = job.mine[1:]
        return opened, rebuild

    def _rows(self, job: _Job, plan: BlendPlan, item: int) -> dict[str, Any]:
        """What the sink of ``item`` writes when this process writes only some rows: the row intervals, the
        destination's first row (a sharded part's own destination) and the marker callback."""
        if not job.by_rows:
            return {}
        a, b = part_rows(plan.out_shape[0], job.part)
        markers = job.markers
        rows = [(a, b)] if markers is None else remaining_rows((a, b), markers.done(item))
        local = job.group is not None and self.options.output is None and not receives_rows(job.group, self.options.dst)
        destination = self.options.output

        def written(lo: int, hi: int) -> None:
            flush = getattr(destination, "flush", None)
            if callable(flush):
                flush()  # the data is on disk before its marker
            markers.mark(item, lo, hi)

        return {"rows": rows, "row_offset": a if local else 0, "on_written": None if markers is None else written}

    def _networks(
        self, network: Any, job: _Job, args: tuple
    ) -> tuple[list[Callable[..., Any]], Callable[[torch.Tensor], Any]]:
        """The call's networks, and what runs one batch of patches: the network on ``sw_device``, or, with mirroring
        or several networks, their average (:class:`~.ensemble.AveragedNetwork`).

        Raises:
            ValueError: a mirror axis beyond the input's spatial dims; see :func:`~.options.check_ensemble`.
        """
        networks, weights, devices = check_ensemble(network, self.ensemble_weights, self.sw_device, WHO)
        ndim = len(job.geometry.spatial_shape)
        if any(a >= ndim for a in self.mirror_axes):
            raise ValueError(f"{WHO}: mirror_axes {self.mirror_axes} must be spatial axes 0..{ndim - 1}.")
        if len(networks) == 1 and not self.mirror_axes:
            device = devices[0] or job.sw_device
            return networks, lambda window: networks[0](window.to(device), *args, **job.kwargs)
        averaged = AveragedNetwork(networks, weights, devices, mirror_subsets(self.mirror_axes), job.device, WHO)
        return networks, lambda window: averaged(window, *args, **job.kwargs)

    def _prepare(self, inputs: Any, kwargs: dict) -> _Job:
        """Check the input, lay the grid, pick the devices and this process's share of the patches to run."""
        if not isinstance(inputs, torch.Tensor | np.ndarray) and not is_lazy(inputs):
            raise TypeError(
                f"{WHO}: inputs must be a tensor, a numpy array or an array-like with shape, dtype and slicing, got "
                f"{type(inputs).__name__}."
            )
        shape = tuple(int(v) for v in inputs.shape)
        if len(shape) < 3 or 0 in shape:
            raise ValueError(
                f"{WHO}: inputs must be (B, C, *spatial) with at least one spatial axis and no empty axis, got shape "
                f"{shape}."
            )
        spatial, n_items = shape[2:], shape[0]
        geometry = self.geometry(spatial)
        group = resolve_group(self.options.distributed, self.options.process_group, WHO)
        run, kwargs = self._patches_to_run(geometry, n_items, kwargs)
        if self.options.output is not None:
            check_destination(self.options.output, (n_items,), len(spatial), WHO)
        rank, world = 0, 1
        if group is not None:
            rank, world = dist.get_rank(group), dist.get_world_size(group)
            what = "the input's shape (B, C, *spatial) and the number of patches to run"
            check_same_on_ranks(group, [*shape, int(run.sum())], what, WHO)
        todo = np.flatnonzero(run.reshape(-1))
        mine = todo.tolist()  # sharded: each rank keeps the patches its part's rows need (_open_by_rows)
        source = open_source(inputs, geometry, self.settings.pad, WHO)
        device = self.device or source.device
        if self.settings.cpu_thresh is not None and int(np.prod(spatial)) > self.settings.cpu_thresh:
            device = torch.device("cpu")
        return _Job(
            geometry=geometry,
            n_items=n_items,
            source=source,
            run=run,
            mine=mine or [0],
            probe=not mine,
            group=group,
            device=device,
            sw_device=self.sw_device if isinstance(self.sw_device, torch.device) else source.device,
            kwargs=kwargs,
            part=self.part if group is None else (rank, world),
            markers=self._markers(shape),
        )

    def _markers(self, shape: Sequence[int]) -> Markers | None:
        """The completion markers of ``resume=`` for inputs of ``shape`` (``None`` without it)."""
        if self.resume is None:
            return None
        output = self.options.output
        settings = {
            "input_shape": list(shape),
            "output_shape": [int(v) for v in output.shape],
            "output_dtype": str(output.dtype),
            "patch_size": repr(self.patch_size),
            "patch_overlap": repr(
                self.patch_overlap if self.settings.overlap_fraction is None else self.settings.overlap_fraction
            ),
            "overlap_mode": self.overlap_mode,
            "padding": repr(self.settings.pad),
            "sigma_scale": repr(self.settings.sigma_scale),
            "output_margin": list(self.output_margin),
            "mirror_axes": list(self.mirror_axes),
            "accumulate_dtype": str(self.accumulate_dtype),
            "roi_mask": self.options.roi_mask is not None,
            "fill_value": self.options.fill_value,
        }
        return Markers(self.resume, settings, WHO)

    def _patches_to_run(self, geometry: GridGeometry, n_items: int, kwargs: dict) -> tuple[np.ndarray, dict]:
        """The ``(n_items, *grid_shape)`` patches ``roi_mask`` keeps, and the network's keyword arguments (without
        the mask when ``roi_mask`` names one of them)."""
        roi = self.options.roi_mask
        if isinstance(roi, str):
            if roi not in kwargs:
                raise KeyError(
                    f"{WHO}: roi_mask={roi!r} names a keyword argument of the call (not passed to the network), "
                    f"e.g. inferer(image, network, {roi}=batch[{roi!r}]); none was given."
                )
            kwargs = dict(kwargs)
            roi = kwargs.pop(self.options.roi_mask)
        return run_mask(roi, geometry, n_items, WHO), kwargs

    def _open_sinks(
        self, job: _Job, outputs: list[torch.Tensor], window: torch.Tensor, rebuild: Callable[[list[Any]], Any]
    ) -> list[_Output]:
        """One sink per network output and batch item, shaped by the first batch's outputs (allocates the output
        volumes, or the destination for ``postprocess`` without ``output``)."""
        options = self.options
        if options.streaming and (len(outputs) != 1 or not isinstance(rebuild([outputs[0]]), torch.Tensor)):
            raise ValueError(f"{WHO}: output=/postprocess= need a network that returns one tensor.")
        opened = []
        for out in outputs:
            self._check_output(out, window)
            held = self.accumulate_dtype or accumulator_dtype(self.overlap_mode, out.dtype)
            # a half-precision volume is blended in float32 slabs of the rows still open, each rounded once into it
            dtype = held if held.itemsize >= 4 or self.overlap_mode == "crop" else torch.float32
            plan = self.plan(job.geometry, out.shape[2:], job.device, dtype)
            channels = int(out.shape[1])
            streamed = options.streaming or job.group is not None or dtype != held
            if not options.streaming and job.group is None:  # in memory (a half volume: written slab by slab)
                volume = zeros_volume((job.n_items, channels, *plan.out_shape), held, job.device)
            elif options.output is None:  # sharded: the whole volume where it is gathered, else this rank's rows
                a, b = part_rows(plan.out_shape[0], job.part)
                rows = None if receives_rows(job.group, options.dst) else b - a
                probe = held if options.postprocess is None else dtype
                volume = allocate_destination(
                    options.postprocess, plan, channels, (job.n_items,), job.device, probe, WHO, rows=rows
                )
            else:
                volume = options.output
            sinks = [
                open_sink(
                    plan,
                    channels,
                    dtype,
                    job.device,
                    volume=None if streamed else volume[item],
                    destination=volume if streamed else None,
                    prefix=(item,),
                    postprocess=options.postprocess,
                    run=job.run[item],
                    fill_value=options.fill_value,
                    who=WHO,
                    **self._rows(job, plan, item),
                )  # fmt: skip
                for item in range(job.n_items)
            ]
            opened.append(_Output(plan, channels, out.dtype, sinks, volume))
        return opened

    def _hand_over(
        self,
        job: _Job,
        opened: list[_Output],
        outputs: list[torch.Tensor],
        window: torch.Tensor,
        chunk: list[int],
    ) -> None:
        """Give each output's patches to the sinks of their items."""
        if len(outputs) != len(opened):
            raise ValueError(f"{WHO}: the network returned {len(outputs)} outputs, earlier {len(opened)}.")
        n = job.geometry.num_patches
        for out, target in zip(outputs, opened):
            self._check_output(out, window, (target.channels, *target.plan.out_patch))
            out = out.as_tensor() if isinstance(out, MetaTensor) else out
            out = out.to(device=target.plan.device, dtype=target.plan.dtype)
            for item, lo, hi in job.item_runs(chunk):
                index = [job.grid_index[k % n] for k in chunk[lo:hi]]
                target.sinks[item].add(out[lo:hi], index)

    def _finish(
        self, job: _Job, opened: list[_Output], rebuild: Callable[[list[Any]], Any], inputs: Any
    ) -> TypeNetworkOutput | None:
        """Finish every sink and return the network's structure of volumes (MetaTensors for a MetaTensor input, but
        for a caller's ``output``); sharded: every rank's rows gathered (``None`` on the ranks other than ``dst``),
        or, with ``output``, every rank's rows written (one barrier)."""
        results = []
        for target in opened:
            for sink in target.sinks:
                sink.finish()  # normalises its item of the volume in place, or checks every slab was written
            volume = target.volume
            if job.group is not None:
                if self.options.output is not None:
                    dist.barrier(group=job.group, async_op=True).wait()
                else:
                    volume = gather_rows(volume, target.plan.out_shape[0], job.group, self.options.dst)
                if volume is None:
                    return None
            if self.accumulate_dtype is not None and not self.options.streaming:
                volume = volume.to(target.dtype)  # the network's dtype, as without the option
            results.append(volume)
        if isinstance(inputs, MetaTensor) and self.options.output is None:
            results = [MetaTensor(r).copy_meta_from(inputs) for r in results]
        return results[0] if self.options.streaming else rebuild(results)

    @staticmethod
    def _check_output(out: Any, window: torch.Tensor, expected: tuple[int, ...] | None = None) -> None:
        """Raise if a network output does not fit the batch of patches it was computed from."""
        if not isinstance(out, torch.Tensor) or out.ndim != window.ndim or out.shape[0] != window.shape[0]:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"{WHO}: the network returned {got} for patches of shape {tuple(window.shape)}; expected "
                f"(n, C_out, *spatial) with n = {window.shape[0]}."
            )
        if expected is not None and tuple(out.shape[1:]) != expected:
            raise ValueError(
                f"{WHO}: the network returned patches of shape {tuple(out.shape[1:])}, earlier {expected}."
            )
