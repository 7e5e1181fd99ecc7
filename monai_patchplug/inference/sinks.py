"""Sinks: where the blended patches of one volume go.

A sink takes a volume's network output patches (``add``) and gives the finished volume (``finish``), as MONAI's
``Merger`` does with ``aggregate``/``finalize``. Both front ends drive the same sinks:

- :class:`VolumeSink` accumulates into one in-memory ``(C, *spatial_out)`` tensor and normalises it at the end;
- :class:`SlabSink` streams: it accumulates into slabs of the first spatial axis, and as soon as no later patch
  touches a slab, normalises it, passes it through the caller's ``postprocess`` and writes it into the caller's
  destination (a tensor, a ``numpy.memmap`` or any array supporting slice assignment);
- :class:`ShardedSink` wraps a :class:`VolumeSink` whose patches are shared out over a ``torch.distributed`` group
  and sums the ranks' accumulators before normalising.

Patches that a region of interest skips count as network outputs of ``fill_value`` everywhere; both sinks add them
through :meth:`~.blend.BlendPlan.add_constant`, so the blend stays exact. :func:`open_sink` picks the sink for a
front end's options. A new sink (e.g. a chunked store) implements ``add`` and ``finish``.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from .._shapes import PIECE_BYTES, chunk_pieces, torch_dtype
from .blend import BlendPlan, zeros_volume
from .distributed import check_same_on_ranks, reduce_sum_

__all__ = [
    "PatchSink",
    "ShardedSink",
    "SlabSink",
    "VolumeSink",
    "allocate_destination",
    "check_destination",
    "destination_dtype",
    "open_sink",
]

#: Maps a finished ``(C, rows, *rest)`` float slab to what is written, e.g. ``lambda x: x.argmax(0, keepdim=True)``.
TypePostprocess = Callable[[torch.Tensor], Any]

_CHUNK = 1 << 22  # elements of the ``(C, rows, *rest)`` slabs handed to ``postprocess`` (about 16 MB of float32)


class PatchSink(Protocol):
    """What a front end hands one volume's patches to."""

    def add(self, patches: torch.Tensor, grid_index: Sequence[Sequence[int]]) -> None:
        """Add ``(n, C, *out_patch)`` outputs (accumulator dtype and device) of the patches at ``grid_index``."""

    def finish(self) -> Any:
        """Complete the volume (skipped patches' fill, normalisation) and return it (or the destination)."""


def _skipped(run: np.ndarray | None, rows: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """Grid indices of the patches ``run`` skips (all of them, or those of grid rows ``rows``)."""
    if run is None:
        return []
    skipped = np.argwhere(~run)
    if rows is not None:
        skipped = skipped[np.isin(skipped[:, 0], list(rows))]
    return [tuple(int(v) for v in row) for row in skipped]


class VolumeSink:
    """Accumulate one volume in memory.

    Args:
        plan: the grid's :class:`~.blend.BlendPlan`.
        volume: the zeroed ``(C, *plan.out_shape)`` accumulator (e.g. one item of a batch's output).
        run: ``grid_shape`` booleans, the patches that will be added (``None``: all); the others are filled.
        fill_value: the value of skipped patches.

    Allocates nothing (the caller owns ``volume``).
    """

    def __init__(
        self, plan: BlendPlan, volume: torch.Tensor, run: np.ndarray | None = None, fill_value: float = 0.0
    ) -> None:
        self.plan, self.volume, self.run, self.fill_value = plan, volume, run, float(fill_value)

    def add(self, patches: torch.Tensor, grid_index: Sequence[Sequence[int]]) -> None:
        """Blend ``patches`` into the volume (see :meth:`~.blend.BlendPlan.add`)."""
        self.plan.add(self.volume, patches, grid_index)

    def add_skipped(self) -> None:
        """Add the skipped patches' fill (a no-op without a mask or with a zero fill)."""
        if self.fill_value != 0:
            self.plan.add_constant(self.volume, self.fill_value, _skipped(self.run))

    def finish(self) -> torch.Tensor:
        """Add the skipped patches' fill, normalise in place and return the volume."""
        self.add_skipped()
        return self.plan.normalise_(self.volume)


class ShardedSink:
    """A :class:`VolumeSink` whose patches are shared out over the ranks of a process group.

    Each rank adds its share into its own zeroed accumulator; :meth:`finish` adds the skipped patches' fill on one
    rank, sums the accumulators over the ranks (``all_reduce``, or ``reduce`` onto ``dst``) and normalises. Summing
    is exact for the blending modes (a sum of weighted sums) and for ``crop`` (each voxel is owned by one patch).

    Args:
        inner: the rank's in-memory sink.
        group: the process group.
        dst: the global rank that gets the result (``None``: every rank).
        who: the public class named in error messages.
    """

    def __init__(self, inner: VolumeSink, group: Any, dst: int | None, who: str) -> None:
        self.inner, self.group, self.dst, self.who = inner, group, dst, who

    def add(self, patches: torch.Tensor, grid_index: Sequence[Sequence[int]]) -> None:
        """Blend ``patches`` into this rank's accumulator."""
        self.inner.add(patches, grid_index)

    def finish(self) -> torch.Tensor | None:
        """The summed, normalised volume (``None`` on ranks other than ``dst``).

        Raises:
            ValueError: ranks whose accumulators differ in shape or element size (on every rank, no hang).
            RuntimeError: a collective failed or timed out.
        """
        volume = self.inner.volume
        what = "the output's shape and element size (ranks ran networks that disagree)"
        check_same_on_ranks(self.group, [*volume.shape, volume.element_size()], what, self.who)
        if dist.get_rank(self.group) == 0:
            self.inner.add_skipped()
        reduce_sum_(volume, self.group, self.dst)
        if self.dst is not None and dist.get_rank() != self.dst:
            return None
        return self.inner.plan.normalise_(volume)


def check_destination(output: Any, leading: Sequence[int], ndim: int, who: str) -> None:
    """Check a caller-supplied destination before anything runs.

    Args:
        output: the destination: it needs a ``shape`` and slice assignment.
        leading: the dims expected before the channel dim (``(B,)`` for the inferer, ``()`` for the aggregator).
        ndim: the number of spatial dims.
        who: the class named in the messages.

    Raises:
        TypeError: an object without ``shape`` or ``__setitem__``.
        ValueError: a destination of another rank or leading dims.
    """
    shape = getattr(output, "shape", None)
    if shape is None or not hasattr(output, "__setitem__"):
        raise TypeError(
            f"{who}: output must be a torch tensor, a numpy array/memmap or an array supporting slice assignment, "
            f"got {type(output).__name__}."
        )
    shape = tuple(int(s) for s in shape)
    expected = (*leading, "C", *["*"] * ndim)
    if len(shape) != len(expected) or shape[: len(leading)] != tuple(leading):
        raise ValueError(
            f"{who}: output of shape {shape} does not fit: expected ({', '.join(map(str, expected))}), the channel "
            "count being postprocess's (or the network's)."
        )


def destination_dtype(output: Any) -> torch.dtype | None:
    """The torch dtype matching the destination's ``dtype`` (``None`` when it has none torch knows)."""
    try:
        return torch_dtype(getattr(output, "dtype", None))
    except (TypeError, ValueError):
        return None


def allocate_destination(
    postprocess: TypePostprocess | None,
    plan: BlendPlan,
    channels: int,
    leading: Sequence[int],
    device: torch.device,
    dtype: torch.dtype,
    who: str,
    rows: int | None = None,
) -> torch.Tensor:
    """A zeroed ``(*leading, C', *out_shape)`` tensor for ``postprocess``'s slabs (``rows`` rows of the first spatial
    axis when given: a part's), its channels and dtype read from a dry run on one output row of the accumulator's
    ``dtype`` (allocated with calloc on the CPU).

    Raises:
        ValueError: ``postprocess`` returns a slab of another rank.
    """
    probe = torch.zeros((channels, 1, *plan.out_shape[1:]), dtype=dtype, device=device)
    sample = torch.as_tensor(postprocess(probe) if postprocess is not None else probe)
    if sample.ndim != len(plan.out_shape) + 1:
        raise ValueError(
            f"{who}: postprocess returned a slab of shape {tuple(sample.shape)} for one of shape "
            f"{tuple(probe.shape)}; expected (C', rows, *other spatial dims)."
        )
    shape = (plan.out_shape[0] if rows is None else rows, *plan.out_shape[1:])
    return zeros_volume((*leading, int(sample.shape[0]), *shape), sample.dtype, sample.device)


class SlabSink:
    """Aggregate one volume's patches into a rolling set of slab accumulators and write each finished slab.

    The output's first spatial axis is cut at every row where a grid row of patches begins or ends (in ``crop``
    mode, at the ownership boundaries), into *segments*. Each segment is touched by a fixed set of grid rows, so it
    is finished once every patch of those rows has been added. Accumulators are allocated at a segment's first
    patch, so with patches in grid order (first axis slowest, as the front ends produce them) at most one row of
    patches (``out_patch[0]`` output rows of ``C`` channels) is held at a time.

    Args:
        plan: the grid's :class:`~.blend.BlendPlan` (its output patch shape fixed by the network's first batch).
        channels: the network's output channels ``C``.
        dtype: the accumulator dtype (:func:`~.blend.accumulator_dtype`).
        device: where slabs are accumulated.
        destination: where finished slabs go, ``(*prefix, C', *out_shape)``, ``C'`` being the channels of
            ``postprocess``'s output (``C`` without it). Its slice assignment must copy what it is given (as tensors,
            numpy arrays and stores do): the accumulators are reused.
        prefix: the destination's leading index (``(item,)`` for a batch item).
        postprocess: maps a finished, normalised ``(C, rows, *out_shape[1:])`` slab (``rows >= 1``, any split of the
            first axis) to the ``(C', rows, *out_shape[1:])`` tensor or array that is written; ``None``: the slab.
        run: ``grid_shape`` booleans, the patches that will be added (``None``: all). The others are *skipped*: they
            count as patches whose network output is ``fill_value`` everywhere.
        fill_value: the value of skipped patches.
        who: the public class named in error messages.
        rows: the ``[a, b)`` output row intervals this sink writes (``None``: all). Segments are also cut at their
            ends; a segment outside them is never accumulated nor written, and patches are only needed for (and
            only added to) the segments inside: a part of a volume, or what a resumed run has left to do.
        row_offset: the output row that the destination's first row holds (a destination holding only a part's
            rows).
        on_written: called with ``(a, b)`` once output rows ``[a, b)`` are in the destination (e.g. to record a
            completion marker).

    Raises:
        ValueError: a destination whose shape does not fit, or a ``postprocess`` whose output does not fit it (shape,
            or a dtype that cannot be cast without changing kind, e.g. float to integer).
        TypeError: a ``postprocess`` that returns neither a tensor nor an array.

    Allocates a segment's accumulator (``C`` x rows x the other output axes) at its first patch, unless a written
    segment of the same height left one, which is zeroed in place and reused (segments are cut where rows of patches
    begin and end, so they have few heights; a reused buffer faults no new pages). A written segment's accumulator is
    kept only for a segment of its height that opens with the next row of patches, so about one row of patches'
    output is held at a time; segments whose patches are all skipped are written at construction, one at a time.
    A tensor destination of the accumulator's dtype and device, with no ``postprocess``, is its own accumulator: each
    segment is zeroed, accumulated and normalised in its rows and nothing is allocated (rows not finished when a run
    stops hold partial sums). Otherwise a finished segment is written in pieces: ``postprocess`` runs on ``_CHUNK``
    elements at a time, and a chunked destination (one with ``chunks``, e.g. zarr) gets writes cut at its chunk
    edges, each covering a chunk-aligned tile of about :data:`~.._shapes.PIECE_BYTES` (so the store reads no chunk
    back and encodes a few at once), the postprocessed rows of such a write joined first (allocated).
    """

    def __init__(
        self,
        plan: BlendPlan,
        channels: int,
        dtype: torch.dtype,
        device: torch.device,
        destination: Any,
        prefix: Sequence[int] = (),
        postprocess: TypePostprocess | None = None,
        run: np.ndarray | None = None,
        fill_value: float = 0.0,
        who: str = "GridInferer",
        rows: Sequence[tuple[int, int]] | None = None,
        row_offset: int = 0,
        on_written: Callable[[int, int], None] | None = None,
    ) -> None:
        self.plan, self.channels, self.dtype, self.device = plan, int(channels), dtype, device
        self.destination, self.prefix, self.postprocess = destination, tuple(prefix), postprocess
        self.grid_shape = plan.grid_shape
        self.run = np.ones(self.grid_shape, dtype=bool) if run is None else np.asarray(run, dtype=bool)
        self.fill_value, self.who = float(fill_value), who
        self.row_offset, self.on_written = int(row_offset), on_written
        n = plan.out_shape[0]
        intervals = [(0, n)] if rows is None else [(max(a, 0), min(b, n)) for a, b in rows if a < b]
        ranges = [plan.row_range(j) for j in range(self.grid_shape[0])]
        ends = [v for pair in (*ranges, *intervals) for v in pair]
        cuts = sorted({0, n, *(v for v in ends if 0 <= v <= n)})
        #: ``[a, b)`` output rows of each segment, and whether this sink writes it
        self.segments = [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if a < b]
        self.active = [any(lo <= a and b <= hi for lo, hi in intervals) for a, b in self.segments]
        self._rows_of = [[j for j, (lo, hi) in enumerate(ranges) if lo <= a and b <= hi] for a, b in self.segments]
        self._segments_of = [
            [s for s, (a, b) in enumerate(self.segments) if lo <= a and b <= hi and self.active[s]] for lo, hi in ranges
        ]
        per_row = self.run.reshape(self.grid_shape[0], -1).sum(1)
        self._pending = [
            int(sum(per_row[j] for j in rows)) if on else -1 for rows, on in zip(self._rows_of, self.active)
        ]
        self._buffers: dict[int, torch.Tensor] = {}
        #: segments accumulate in their rows of the destination (a tensor of the accumulator's dtype and device, and
        #: nothing to postprocess): no accumulator, no copy
        self._in_place = (
            postprocess is None
            and isinstance(destination, torch.Tensor)
            and destination.dtype == dtype
            and destination.device == torch.device(device)
            and not destination.requires_grad
        )
        #: accumulators of written segments, by height, kept for segments about to open
        self._pool: dict[int, list[torch.Tensor]] = {}
        self._starts = [a for a, _ in self.segments]
        self._left = sum(self.active)
        self._check_destination()
        self._step = max(1, _CHUNK // max(self.channels * int(np.prod(plan.out_shape[1:])), 1))
        self._row_cuts, self._tiles = self._write_pieces()
        for s, pending in enumerate(self._pending):
            if pending == 0:
                self._finish(s)

    def rows_needed(self) -> list[int]:
        """The grid rows whose patches this sink needs (those touching a segment it writes)."""
        return sorted({j for s, rows in enumerate(self._rows_of) if self.active[s] for j in rows})

    def add(self, patches: torch.Tensor, grid_index: Sequence[Sequence[int]]) -> None:
        """Add ``(n, C, *out_patch)`` network outputs (in the accumulator dtype and device) of the patches at
        ``grid_index`` (``n`` rows of per-axis indices); writes every slab this completes.

        Raises:
            ValueError: a patch that is skipped, or added after its slabs were written.
        """
        for i, index in enumerate(grid_index):
            index = tuple(int(j) for j in index)
            if not self.run[index]:
                raise ValueError(f"{self.who}: patch {index} is outside the region of interest (skipped).")
            for s in self._segments_of[index[0]]:  # the segments this sink writes
                if self._pending[s] <= 0:
                    raise ValueError(f"{self.who}: patch {index} was added after its output rows were written.")
                self.plan.add(self._buffer(s), patches[i : i + 1], [index], base=self.segments[s][0])
                self._pending[s] -= 1
                if self._pending[s] == 0:
                    self._finish(s)

    def finish(self) -> Any:
        """The destination, every slab written.

        Raises:
            RuntimeError: some slabs were never finished (patches were not added).
        """
        if self._left:
            raise RuntimeError(f"{self.who}: {self._left} output slabs were never finished (patches missing).")
        return self.destination

    def _buffer(self, s: int) -> torch.Tensor:
        """The accumulator of segment ``s``, taken at first use (with the skipped patches' fill added): its rows of
        the destination, a pooled one of its height, or a new one, zeroed."""
        buffer = self._buffers.get(s)
        if buffer is None:
            a, b = self.segments[s]
            if self._in_place:
                rows = slice(a - self.row_offset, b - self.row_offset)
                buffer = self.destination[(*self.prefix, slice(None), rows)].zero_()
            elif self._pool.get(b - a):
                buffer = self._pool[b - a].pop().zero_()
            else:
                buffer = zeros_volume((self.channels, b - a, *self.plan.out_shape[1:]), self.dtype, self.device)
            if self.fill_value != 0:
                self.plan.add_constant(buffer, self.fill_value, _skipped(self.run, self._rows_of[s]), base=a)
            self._buffers[s] = buffer
        return buffer

    def _finish(self, s: int) -> None:
        """Normalise segment ``s``; unless it is in the destination already, postprocess and write it piece by piece
        (:meth:`_pieces`) and pool its accumulator for a segment of its height about to open (else drop it)."""
        buffer = self._buffer(s)
        del self._buffers[s]
        a, b = self.segments[s]
        self.plan.normalise_(buffer, base=a)
        self._pending[s] = -1
        if self._in_place:  # the rows are in the destination already
            self._check_half(self.destination.dtype, lambda: bool(torch.isfinite(buffer).all()))
        else:
            for lo, hi in self._pieces(a, b):
                self._write(lo, self._postprocessed(buffer[:, lo - a : hi - a]))
            if self._keep(s):
                self._pool.setdefault(b - a, []).append(buffer)
        self._left -= 1
        if self.on_written is not None:
            self.on_written(a, b)

    def _pieces(self, a: int, b: int) -> list[tuple[int, int]]:
        """The writes of output rows ``[a, b)``: cut at the chunk edges of a chunked destination (a write that covers
        part of a chunk makes the store read it back), else every ``_CHUNK`` elements of the accumulator."""
        if self._row_cuts is None:
            cuts = list(range(a, b, self._step))
        else:
            cuts = [a, *(int(c) for c in self._row_cuts if a < c < b)]
        return list(zip(cuts, [*cuts[1:], b]))

    def _postprocessed(self, rows: torch.Tensor) -> Any:
        """What is written for the normalised ``(C, n, ...)`` ``rows``: ``postprocess`` applied every ``_CHUNK``
        elements and the results joined along the rows (allocates the joined rows when there are several), or the
        rows themselves.

        Raises:
            ValueError, TypeError: a result that does not fit (see :meth:`_check_values`).
        """
        if self.postprocess is None:
            return rows
        n = int(rows.shape[1])
        parts = [self.postprocess(rows[:, i : i + self._step]) for i in range(0, n, self._step)]
        for i, part in zip(range(0, n, self._step), parts):
            self._check_values(part, min(self._step, n - i))
        if len(parts) == 1:
            return parts[0]
        if all(isinstance(part, torch.Tensor) for part in parts):
            return torch.cat(parts, 1)
        return np.concatenate([p.detach().cpu().numpy() if isinstance(p, torch.Tensor) else p for p in parts], 1)

    def _keep(self, s: int) -> bool:
        """Whether the accumulator of segment ``s``, just written, is kept for reuse: a segment of its height, not
        opened yet and not waited for by a kept one, opens with the next row of patches (the one after the last that
        touches ``s``)."""
        a, b = self.segments[s]
        following = max(self._rows_of[s], default=self.grid_shape[0]) + 1
        if following >= self.grid_shape[0]:
            return False
        end = bisect.bisect_left(self._starts, self.plan.row_range(following)[1])
        waiting = sum(
            1
            for t in range(s + 1, end)
            if self._pending[t] > 0 and t not in self._buffers and self.segments[t][1] - self.segments[t][0] == b - a
        )
        return len(self._pool.get(b - a, ())) < waiting

    def _write_pieces(self) -> tuple[np.ndarray | None, list[tuple[slice, ...]]]:
        """The output rows at which a chunked destination's chunks begin (``None`` when it has no ``chunks``) and the
        chunk-aligned tiles of the other axes that each write covers (:func:`~.._shapes.chunk_pieces`)."""
        chunks = getattr(self.destination, "chunks", None)
        shape = tuple(int(v) for v in self.destination.shape)
        if not isinstance(chunks, tuple | list) or len(chunks) != len(shape):
            return None, [()]
        target = destination_dtype(self.destination)
        voxel = shape[len(self.prefix)] * (target.itemsize if target is not None else 4)
        rows = self.plan.out_patch[0]
        edges, tiles = chunk_pieces(chunks, shape[len(self.prefix) + 1 :], rows, PIECE_BYTES // max(voxel, 1))
        return edges + self.row_offset, tiles

    def _check_values(self, values: Any, rows: int) -> torch.dtype:
        """Raise if a postprocessed slab does not fit the destination; returns its torch dtype."""
        if isinstance(values, np.ndarray):
            dtype = torch_dtype(values.dtype)
        elif isinstance(values, torch.Tensor):
            dtype = values.dtype
        else:
            raise TypeError(
                f"{self.who}: postprocess must return a tensor or a numpy array, got {type(values).__name__}."
            )
        expected = (int(self.destination.shape[len(self.prefix)]), rows, *self.plan.out_shape[1:])
        if tuple(values.shape) != expected:
            raise ValueError(
                f"{self.who}: postprocess returned a slab of shape {tuple(values.shape)} for {rows} output rows; the "
                f"output {tuple(self.destination.shape)} needs {expected} (channels, rows, *other spatial dims)."
            )
        target = destination_dtype(self.destination)
        if target is not None and not torch.can_cast(dtype, target):
            raise ValueError(
                f"{self.who}: the slabs written are {dtype} but the output is {target}: casting would change the kind "
                "of value (e.g. floats into integers); pass a postprocess that converts them (e.g. "
                "lambda x: x.argmax(0, keepdim=True).to(torch.uint8)) or an output of a wider dtype."
            )
        return dtype

    def _check_destination(self) -> None:
        """Check the destination against the output spatial shape and a dry run of ``postprocess`` on one row."""
        shape = tuple(int(v) for v in self.destination.shape)
        spatial = shape[len(self.prefix) + 1 :]
        written = [b for (a, b), on in zip(self.segments, self.active) if on]
        rows_needed = max(written, default=0) - self.row_offset
        whole = self.row_offset == 0 and all(self.active)  # a destination for the whole volume
        if (
            spatial[1:] != tuple(self.plan.out_shape[1:])
            or spatial[0] < rows_needed
            or (whole and spatial[0] != self.plan.out_shape[0])
        ):
            raise ValueError(
                f"{self.who}: output of shape {shape} does not fit: the aggregated volume has spatial shape "
                f"{tuple(self.plan.out_shape)}."
            )
        probe = torch.zeros((self.channels, 1, *self.plan.out_shape[1:]), dtype=self.dtype, device=self.device)
        self._check_values(self.postprocess(probe) if self.postprocess is not None else probe, 1)

    def _write(self, row: int, values: Any) -> None:
        """Write ``values`` (``(C', rows, ...)``) at output row ``row``; integers are range-checked when narrowed."""
        dtype = self._check_values(values, int(values.shape[1]))
        target = destination_dtype(self.destination)
        if target is not None and not target.is_floating_point and not target.is_complex and target != torch.bool:
            count = values.numel() if isinstance(values, torch.Tensor) else values.size
            if not dtype.is_floating_point and dtype != target and count != 0:
                info = torch.iinfo(target)
                lo, hi = (values.min(), values.max())
                if int(lo) < info.min or int(hi) > info.max:
                    raise ValueError(
                        f"{self.who}: postprocess returned values in [{int(lo)}, {int(hi)}], outside the output "
                        f"dtype {target}."
                    )
        row -= self.row_offset
        index = (*self.prefix, slice(None), slice(row, row + int(values.shape[1])))
        if isinstance(self.destination, torch.Tensor):
            written = self.destination[index].copy_(torch.as_tensor(values))
            self._check_half(target, lambda: bool(torch.isfinite(written).all()))
        else:
            array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values
            dtype_np = getattr(self.destination, "dtype", None)
            if isinstance(dtype_np, np.dtype):
                array = array.astype(dtype_np, copy=False)
            self._check_half(target, lambda: bool(np.isfinite(array).all()))
            for tile in self._tiles:
                self.destination[(*index, *tile)] = array[(slice(None), slice(None), *tile)]

    def _check_half(self, target: torch.dtype | None, finite: Callable[[], bool]) -> None:
        """Raise when a float16 destination received values beyond its range (``finite()`` tells, after the cast).

        Raises:
            RuntimeError: naming ``accumulate_dtype``, the option that chose float16.
        """
        if target == torch.float16 and not finite():
            raise RuntimeError(
                f"{self.who}: the float16 accumulator overflowed (accumulate_dtype=torch.float16, or a float16 "
                "output=): values beyond +-65504, or the network returned infinities; use "
                "accumulate_dtype=torch.bfloat16 or torch.float32."
            )


def open_sink(
    plan: BlendPlan,
    channels: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    volume: torch.Tensor | None,
    destination: Any,
    prefix: Sequence[int],
    postprocess: TypePostprocess | None,
    run: np.ndarray | None,
    fill_value: float,
    who: str,
    group: Any = None,
    dst: int | None = None,
    **rows: Any,
) -> PatchSink:
    """The sink for one volume: streamed into ``destination`` when one is given (``rows``: :class:`SlabSink`'s
    ``rows``, ``row_offset`` and ``on_written``), else in memory in ``volume`` (summed over ``group`` when one is
    given). Allocates what the sink allocates (see each)."""
    if destination is not None:
        return SlabSink(plan, channels, dtype, device, destination, prefix, postprocess, run, fill_value, who, **rows)
    assert volume is not None
    sink = VolumeSink(plan, volume, run, fill_value)
    return sink if group is None else ShardedSink(sink, group, dst, who)
