"""Streamed aggregation: finish the output slab by slab along the first spatial axis and hand it to the caller.

The output's first spatial axis is cut at every row where a grid row of patches begins or ends (in ``crop`` mode, at
the ownership boundaries), into *segments*. Each segment is touched by a fixed set of grid rows, so it is finished
once every patch of those rows has been added: then it is finished (already normalised for ``average``/``hann``,
whose patch weights are divided by the grid's sums of weights; divided by the summed weights for ``gaussian``), passed
through the caller's ``postprocess`` and written into the caller's destination (a torch tensor, a ``numpy.memmap`` or
any array supporting slice assignment), and its accumulator is dropped. Accumulators are allocated at a segment's
first patch, so with patches in grid order (first axis slowest, as :class:`~monai_patchplug.GridInferer` and
:class:`~monai_patchplug.GridSampler` produce them) at most one row of patches (``out_patch[0]`` output rows of
``C`` channels) is held at a time; in any other order, at most the segments with pending patches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .aggregator import BlendPlan, zeros_volume

__all__ = ["SlabWriter", "check_destination", "destination_dtype"]

#: Maps a finished ``(C, rows, *rest)`` float slab to what is written, e.g. ``lambda x: x.argmax(0, keepdim=True)``.
TypePostprocess = Callable[[torch.Tensor], Any]

_CHUNK = 1 << 22  # elements of the ``(C, rows, *rest)`` slabs handed to ``postprocess`` (about 16 MB of float32)


def check_destination(output: Any, leading: Sequence[int], ndim: int, who: str = "GridInferer") -> None:
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
    dtype = getattr(output, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return torch.from_numpy(np.empty(0, dtype=np.dtype(dtype))).dtype
    except (TypeError, ValueError):
        return None


class SlabWriter:
    """Aggregate one volume's patches into a rolling set of slab accumulators and write each finished slab.

    Args:
        plan: the grid's :class:`BlendPlan` (its output patch shape fixed by the network's first batch).
        grid_shape: patches per axis.
        channels: the network's output channels ``C``.
        dtype: the accumulator dtype (:func:`~monai_patchplug.inference.aggregator.accumulator_dtype`).
        device: where slabs are accumulated.
        destination: where finished slabs go, ``(*prefix, C', *out_shape)``, ``C'`` being the channels of
            ``postprocess``'s output (``C`` without it).
        prefix: the destination's leading index (``(item,)`` for a batch item).
        postprocess: maps a finished, normalised ``(C, rows, *out_shape[1:])`` slab (``rows >= 1``, any split of the
            first axis) to the ``(C', rows, *out_shape[1:])`` tensor or array that is written; ``None``: the slab.
        run: ``grid_shape`` booleans, the patches that will be added (``None``: all). The others are *skipped*: they
            count as patches whose network output is ``fill_value`` everywhere.
        fill_value: the value of skipped patches.

    Raises:
        ValueError: a destination whose shape does not fit, or a ``postprocess`` whose output does not fit it (shape,
            or a dtype that cannot be cast without changing kind, e.g. float to integer).
        TypeError: a ``postprocess`` that returns neither a tensor nor an array.

    Allocates a segment's accumulator (``C`` x rows x the other output axes) at its first patch and frees it when the
    segment is written; segments whose patches are all skipped are written at construction, one at a time.
    """

    def __init__(
        self,
        plan: BlendPlan,
        grid_shape: Sequence[int],
        channels: int,
        dtype: torch.dtype,
        device: torch.device,
        destination: Any,
        prefix: Sequence[int] = (),
        postprocess: TypePostprocess | None = None,
        run: np.ndarray | None = None,
        fill_value: float = 0.0,
    ) -> None:
        self.plan, self.channels, self.dtype, self.device = plan, int(channels), dtype, device
        self.destination, self.prefix, self.postprocess = destination, tuple(prefix), postprocess
        self.grid_shape = tuple(int(n) for n in grid_shape)
        self.run = np.ones(self.grid_shape, dtype=bool) if run is None else np.asarray(run, dtype=bool)
        self.fill_value = float(fill_value)
        n = plan.out_shape[0]
        ranges = [plan.row_range(j) for j in range(self.grid_shape[0])]
        cuts = sorted({0, n, *(lo for lo, _ in ranges), *(hi for _, hi in ranges)})
        #: ``[a, b)`` output rows of each segment
        self.segments = [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if a < b]
        self._rows_of = [[j for j, (lo, hi) in enumerate(ranges) if lo <= a and b <= hi] for a, b in self.segments]
        self._segments_of = [[s for s, (a, b) in enumerate(self.segments) if lo <= a and b <= hi] for lo, hi in ranges]
        per_row = self.run.reshape(self.grid_shape[0], -1).sum(1)
        self._pending = [int(sum(per_row[j] for j in rows)) for rows in self._rows_of]
        self._buffers: dict[int, torch.Tensor] = {}
        self._left = len(self.segments)
        self._check_destination()
        for s, pending in enumerate(self._pending):
            if pending == 0:
                self._finish(s)

    @property
    def finished(self) -> bool:
        """Whether every slab has been written."""
        return self._left == 0

    def add(self, patches: torch.Tensor, grid_index: Sequence[Sequence[int]]) -> None:
        """Add ``(n, C, *out_patch)`` network outputs (in the accumulator dtype and device) of the patches at
        ``grid_index`` (``n`` rows of per-axis indices); writes every slab this completes.

        Raises:
            ValueError: a patch that is skipped, or added after its slabs were written.
        """
        for i, index in enumerate(grid_index):
            index = tuple(int(j) for j in index)
            if not self.run[index]:
                raise ValueError(f"SlabWriter: patch {index} is outside the region of interest (skipped).")
            for s in self._segments_of[index[0]]:
                if self._pending[s] <= 0:
                    raise ValueError(f"SlabWriter: patch {index} was added after its output rows were written.")
                self.plan.add(self._buffer(s), patches[i : i + 1], [index], base=self.segments[s][0])
                self._pending[s] -= 1
                if self._pending[s] == 0:
                    self._finish(s)

    def _buffer(self, s: int) -> torch.Tensor:
        """The accumulator of segment ``s``, allocated (with the skipped patches' fill added) at first use."""
        buffer = self._buffers.get(s)
        if buffer is None:
            a, b = self.segments[s]
            buffer = zeros_volume((self.channels, b - a, *self.plan.out_shape[1:]), self.dtype, self.device)
            if self.fill_value != 0:
                skipped = [(j, *rest) for j in self._rows_of[s] for rest in zip(*np.nonzero(~self.run[j]))]
                if skipped:
                    fill = torch.full((), self.fill_value, dtype=self.dtype, device=buffer.device)
                    self.plan.add(
                        buffer, fill.expand(len(skipped), self.channels, *self.plan.out_patch), skipped, base=a
                    )
            self._buffers[s] = buffer
        return buffer

    def _finish(self, s: int) -> None:
        """Normalise segment ``s``, postprocess it chunk by chunk, write it and drop its accumulator."""
        buffer = self._buffer(s)
        del self._buffers[s]
        a, b = self.segments[s]
        self.plan.normalise_(buffer, base=a)
        plane = int(np.prod(self.plan.out_shape[1:]))
        step = max(1, _CHUNK // max(self.channels * plane, 1))
        for i in range(0, b - a, step):
            rows = buffer[:, i : i + step]
            self._write(a + i, self.postprocess(rows) if self.postprocess is not None else rows)
        self._pending[s] = -1
        self._left -= 1

    def _check_values(self, values: Any, rows: int) -> torch.dtype:
        """Raise if a postprocessed slab does not fit the destination; returns its torch dtype."""
        if isinstance(values, np.ndarray):
            dtype = torch.from_numpy(np.empty(0, dtype=values.dtype)).dtype
        elif isinstance(values, torch.Tensor):
            dtype = values.dtype
        else:
            raise TypeError(f"postprocess must return a tensor or a numpy array, got {type(values).__name__}.")
        expected = (int(self.destination.shape[len(self.prefix)]), rows, *self.plan.out_shape[1:])
        if tuple(values.shape) != expected:
            raise ValueError(
                f"postprocess returned a slab of shape {tuple(values.shape)} for {rows} output rows; the output "
                f"{tuple(self.destination.shape)} needs {expected} (channels, rows, *other spatial dims)."
            )
        target = destination_dtype(self.destination)
        if target is not None and not torch.can_cast(dtype, target):
            raise ValueError(
                f"the slabs written are {dtype} but the output is {target}: casting would change the kind of value "
                "(e.g. floats into integers); pass a postprocess that converts them (e.g. "
                "lambda x: x.argmax(0, keepdim=True).to(torch.uint8)) or an output of a wider dtype."
            )
        return dtype

    def _check_destination(self) -> None:
        """Check the destination against the output spatial shape and a dry run of ``postprocess`` on one row."""
        shape = tuple(int(v) for v in self.destination.shape)
        if shape[len(self.prefix) + 1 :] != tuple(self.plan.out_shape):
            raise ValueError(
                f"output of shape {shape} does not fit: the aggregated volume has spatial shape "
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
                        f"postprocess returned values in [{int(lo)}, {int(hi)}], outside the output dtype {target}."
                    )
        index = (*self.prefix, slice(None), slice(row, row + int(values.shape[1])))
        if isinstance(self.destination, torch.Tensor):
            self.destination[index].copy_(torch.as_tensor(values))
        else:
            array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values
            dtype_np = getattr(self.destination, "dtype", None)
            if isinstance(dtype_np, np.dtype):
                array = array.astype(dtype_np, copy=False)
            self.destination[index] = array
