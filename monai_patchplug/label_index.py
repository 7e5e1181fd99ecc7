"""A persistent label index: where each foreground label of a case lies, stored as runs along the last axis.

A label map's voxels of one label form runs along the last spatial axis (rows of a C-ordered array); the index keeps,
per label, the flat index of each run's first voxel and the run's length, in the narrowest unsigned integer types that
hold them, sorted. Segmentations are blobs, so a run stands for tens of voxels: the index of a case whose foreground is
a few percent of the volume is a fraction of a percent of its uint8 label map (nnU-Net's CSR index stores every voxel).

It is data, never code: a ``.npz`` file read with ``allow_pickle=False`` and written atomically (a temporary file,
then a rename). :class:`~monai_patchplug.LabelSampler` draws from it exactly as from the label map itself: a foreground
label's voxels on valid patch centres are those of its runs clipped to the valid-centre box, each equally likely;
background centres are uniform valid centres rejected when they fall in a foreground run (no voxel is read).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LabelIndex", "index_path"]

_FORMAT = 1


def index_path(path: str | os.PathLike) -> Path:
    """Where the label index of the label file or store ``path`` lives: ``<path>.index.npz`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".index.npz")


def _narrow(values: np.ndarray, top: int) -> np.ndarray:
    """``values`` (>= 0, <= ``top``) in the narrowest unsigned integer type holding ``top``."""
    return values.astype(np.min_scalar_type(max(int(top), 0)), copy=False)


class LabelIndex:
    """The runs of every non-zero label of a label map (see the module docstring); built once, loaded fast.

    Args:
        shape: the label map's spatial shape.
        labels: the label values, sorted (``int64``).
        offsets: ``len(labels) + 1`` offsets: the runs of ``labels[i]`` are ``offsets[i]:offsets[i + 1]``.
        starts: flat index (C order over ``shape``) of each run's first voxel, sorted within a label.
        lengths: each run's length along the last axis.

    Raises:
        ValueError: arrays whose sizes or values do not fit together or ``shape``.

    Example:
        >>> import os
        >>> import tempfile
        >>> import numpy as np
        >>> from monai_patchplug import LabelIndex
        >>> label = np.zeros((1, 4, 6), dtype=np.uint8)
        >>> label[0, 1:3, 2:5] = 1
        >>> label[0, 3, 0] = 2
        >>> index = LabelIndex.build(label)
        >>> index.counts()  # voxels per non-zero label
        {1: 6, 2: 1}
        >>> index.runs(1)  # the flat index of each run's first voxel, and the run's length along the last axis
        (array([ 8, 14]), array([3, 3]))
        >>> folder = tempfile.TemporaryDirectory()
        >>> path = index.save(os.path.join(folder.name, "label.npy.index.npz"))
        >>> LabelIndex.load(path).counts()
        {1: 6, 2: 1}
        >>> folder.cleanup()
    """

    def __init__(
        self,
        shape: Sequence[int],
        labels: np.ndarray,
        offsets: np.ndarray,
        starts: np.ndarray,
        lengths: np.ndarray,
    ) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.starts, self.lengths = np.asarray(starts), np.asarray(lengths)
        size = math.prod(self.shape)
        ok = (
            len(self.shape) >= 1
            and self.offsets.shape == (len(self.labels) + 1,)
            and self.starts.shape == self.lengths.shape == (int(self.offsets[-1]),)
            and int(self.offsets[0]) == 0
            and np.all(np.diff(self.offsets) >= 0)
            and (self.starts.size == 0 or int((self.starts.astype(np.int64) + self.lengths).max()) <= size)
        )
        if not ok:
            raise ValueError(
                f"LabelIndex: inconsistent index for shape {self.shape}: {len(self.labels)} labels, offsets "
                f"{self.offsets.shape}, {self.starts.shape} starts, {self.lengths.shape} lengths."
            )
        self._union: dict[bool, tuple[np.ndarray, np.ndarray]] = {}

    # -- building, saving, loading -------------------------------------------------------------------------------
    @classmethod
    def build(cls, label_map: Any, channel_first: bool = False) -> LabelIndex:
        """Index a label map held in memory.

        Args:
            label_map: a ``(*spatial)`` numpy array or tensor of integer values (a float map must hold whole numbers).
            channel_first: ``label_map`` is ``(1, *spatial)`` (one channel in front).

        Returns:
            The index. Allocates a few temporaries of the map's size (a bool change mask, flat run starts); the index
            holds 2 small integers per run.

        Raises:
            ValueError: a multi-channel map, or non-integer values.
        """
        values = np.asarray(label_map.numpy() if hasattr(label_map, "numpy") else label_map)
        if channel_first:
            if values.ndim < 2 or values.shape[0] != 1:
                raise ValueError(f"LabelIndex.build: expected a single-channel label map, got {values.shape}.")
            values = values[0]
        if values.ndim < 1 or values.dtype.kind not in "biuf":
            raise ValueError(
                f"LabelIndex.build: expected a single-channel label map, got {values.shape} {values.dtype}."
            )
        if values.dtype.kind == "f":
            if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
                raise ValueError("LabelIndex.build: a float label map must hold whole numbers.")
            values = values.astype(np.int64)
        shape, width = values.shape, values.shape[-1]
        flat = values.reshape(-1)
        change = np.empty(flat.size, dtype=bool)
        change[0] = True
        np.not_equal(flat[1:], flat[:-1], out=change[1:])
        change[::width] = True  # a run never crosses a row
        starts = np.flatnonzero(change)
        run_values = flat[starts]
        lengths = np.diff(np.append(starts, flat.size))
        keep = run_values != 0
        starts, lengths, run_values = starts[keep], lengths[keep], run_values[keep].astype(np.int64)
        order = np.argsort(run_values, kind="stable")  # by label, then by start (starts are ascending)
        labels, counts = np.unique(run_values, return_counts=True)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        size = math.prod(shape)
        return cls(shape, labels, offsets, _narrow(starts[order], size), _narrow(lengths[order], width))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to ``path`` (``.npz``, no pickle) atomically: a temporary file beside it, then a rename.

        Returns:
            The path written. Allocates nothing beyond numpy's writer.
        """
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp.npz", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    format=np.int64(_FORMAT),
                    shape=np.asarray(self.shape, dtype=np.int64),
                    labels=self.labels,
                    offsets=self.offsets,
                    starts=self.starts,
                    lengths=self.lengths,
                )
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> LabelIndex:
        """Read an index written by :meth:`save` (``allow_pickle=False``: a file cannot run code when opened).

        Raises:
            ValueError: not a label index of this format (the message names the file).
        """
        try:
            with np.load(path, allow_pickle=False) as f:
                if int(f["format"]) != _FORMAT:
                    raise ValueError(f"format {int(f['format'])}, expected {_FORMAT}")
                return cls(f["shape"], f["labels"], f["offsets"], f["starts"], f["lengths"])
        except (KeyError, OSError, ValueError) as error:
            raise ValueError(f"LabelIndex: {str(path)!r} is not a readable label index ({error}).") from error

    @property
    def nbytes(self) -> int:
        """Bytes held by the index arrays (about the size of its ``.npz`` file)."""
        return sum(a.nbytes for a in (self.labels, self.offsets, self.starts, self.lengths))

    def counts(self) -> dict[int, int]:
        """Voxels per label (from the run lengths; reads nothing else)."""
        sums = np.add.reduceat(self.lengths.astype(np.int64), self.offsets[:-1]) if self.starts.size else []
        return {int(label): int(s) if n else 0 for label, s, n in zip(self.labels, sums, np.diff(self.offsets))}

    # -- runs on valid centres ------------------------------------------------------------------------------------
    def runs(self, label: int) -> tuple[np.ndarray, np.ndarray]:
        """``(starts, lengths)`` of ``label`` as int64 (empty for a label the map lacks)."""
        where = np.flatnonzero(self.labels == int(label))
        if not where.size:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        lo, hi = self.offsets[where[0]], self.offsets[where[0] + 1]
        return self.starts[lo:hi].astype(np.int64), self.lengths[lo:hi].astype(np.int64)

    def union(self, positive_only: bool) -> tuple[np.ndarray, np.ndarray]:
        """The runs of every label (or of labels > 0), sorted by start, as int64 (cached; for membership tests)."""
        if positive_only not in self._union:
            keep = np.repeat(
                self.labels > 0 if positive_only else np.ones(len(self.labels), bool), np.diff(self.offsets)
            )
            starts, lengths = self.starts[keep].astype(np.int64), self.lengths[keep].astype(np.int64)
            order = np.argsort(starts, kind="stable")
            self._union[positive_only] = (starts[order], lengths[order])
        return self._union[positive_only]


def clip_runs(
    starts: np.ndarray, lengths: np.ndarray, shape: Sequence[int], patch_size: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """The parts of runs (flat ``starts``, ``lengths`` along the last axis) that are valid patch centres.

    Valid centres are ``P//2 ... S-1-(P-1)//2`` on each axis. Returns the clipped ``(starts, lengths)`` (int64,
    runs left empty dropped). Allocates a few arrays of the run count.
    """
    width = int(shape[-1])
    lo = np.asarray([p // 2 for p in patch_size], dtype=np.int64)
    hi = np.asarray([s - (p - 1) // 2 for s, p in zip(shape, patch_size)], dtype=np.int64)
    rows, cols = np.divmod(starts, width)
    keep = np.ones(starts.shape, dtype=bool)
    if len(shape) > 1:
        coords = np.unravel_index(rows, tuple(int(s) for s in shape[:-1]))
        for axis, coord in enumerate(coords):
            keep &= (coord >= lo[axis]) & (coord < hi[axis])
    first = np.maximum(cols, lo[-1])
    last = np.minimum(cols + lengths, hi[-1])
    keep &= last > first
    return rows[keep] * width + first[keep], (last - first)[keep]


def draw_from_runs(starts: np.ndarray, lengths: np.ndarray, k: int, rng: np.random.RandomState) -> np.ndarray:
    """``k`` flat voxel indices, each voxel of the runs equally likely. Allocates the cumulative lengths."""
    ends = np.cumsum(lengths)
    u = rng.randint(0, int(ends[-1]), size=k).astype(np.int64)
    run = np.searchsorted(ends, u, side="right")
    return starts[run] + u - (ends[run] - lengths[run])


def in_runs(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Whether each flat index lies in one of the sorted, disjoint runs (binary search; reads nothing else)."""
    if not starts.size:
        return np.zeros(flat.shape, dtype=bool)
    run = np.searchsorted(starts, flat, side="right") - 1
    safe = np.maximum(run, 0)
    return (run >= 0) & (flat < starts[safe] + lengths[safe])


class RunClass:
    """A class of patch centres given by runs (a label, or the union of labels > 0), restricted to valid centres.

    Draws corners with every voxel of the clipped runs equally likely (the in-memory sampler's law).

    Args:
        name: the class's name for messages (a label value, ``"foreground"``).
        p: its unnormalised probability.
        runs: ``(starts, lengths)`` over the full map (see :class:`LabelIndex`).
        shape: the map's spatial shape.
        patch_size: the patch size (decides the valid centres).
    """

    def __init__(
        self,
        name: Any,
        p: float,
        runs: tuple[np.ndarray, np.ndarray],
        shape: Sequence[int],
        patch_size: Sequence[int],
    ) -> None:
        self.name, self.p, self.shape, self.patch_size = name, p, tuple(shape), tuple(patch_size)
        self.starts, self.lengths = clip_runs(*runs, self.shape, self.patch_size)

    @property
    def present(self) -> bool:
        """Whether the class has a valid centre."""
        return bool(self.lengths.size)

    def draw(self, k: int, rng: np.random.RandomState) -> np.ndarray:
        """``k`` patch corners (``(k, ndim)`` int64) from ``rng``; allocates the cumulative run lengths."""
        centres = np.stack(np.unravel_index(draw_from_runs(self.starts, self.lengths, k, rng), self.shape), 1)
        return centres - np.asarray(self.patch_size, dtype=np.int64) // 2


class ComplementClass:
    """The valid centres outside given runs (the background): drawn as uniform valid centres, rejected when they fall
    in a run (a binary search in the index; no voxel is read). Arguments as :class:`RunClass`; ``runs`` must be
    sorted by start and disjoint (:meth:`LabelIndex.union`)."""

    def __init__(
        self,
        name: Any,
        p: float,
        runs: tuple[np.ndarray, np.ndarray],
        shape: Sequence[int],
        patch_size: Sequence[int],
    ) -> None:
        self.name, self.p, self.shape, self.patch_size = name, p, tuple(shape), tuple(patch_size)
        self.runs = runs
        self.span = np.asarray([s - q + 1 for s, q in zip(self.shape, self.patch_size)], dtype=np.int64)
        self.count = int(np.prod(self.span)) - int(clip_runs(*runs, self.shape, self.patch_size)[1].sum())

    @property
    def present(self) -> bool:
        """Whether a valid centre lies outside the runs."""
        return self.count > 0

    def draw(self, k: int, rng: np.random.RandomState) -> np.ndarray:
        """``k`` patch corners (``(k, ndim)`` int64): batches of uniform valid corners (about ``k`` over the fraction
        of valid centres outside the runs, at most 2**20 a batch) until ``k`` are outside the runs."""
        fraction = self.count / float(np.prod(self.span))
        half = np.asarray(self.patch_size, dtype=np.int64) // 2
        found: list[np.ndarray] = []
        need = k
        while need > 0:
            batch = int(min(max(2 * need, need / fraction * 1.25 + 16), 1 << 20))
            corners = rng.randint(0, self.span, size=(batch, len(self.shape))).astype(np.int64)
            flat = np.ravel_multi_index(tuple((corners + half).T), self.shape)
            corners = corners[~in_runs(flat, *self.runs)][:need]
            found.append(corners)
            need -= len(corners)
        return np.concatenate(found)


def index_classes(
    index: LabelIndex,
    label_probabilities: dict[int, float] | None,
    pos_neg: tuple[float, float] | None,
    shape: Sequence[int],
    patch_size: Sequence[int],
) -> list[RunClass | ComplementClass]:
    """The classes :class:`~monai_patchplug.LabelSampler` draws from, built from ``index`` instead of the map.

    ``label_probabilities``: one class per label with ``p > 0`` (label 0: every voxel outside the index). ``None``
    with ``pos_neg=None``: the foreground (labels > 0); with ``pos_neg``: foreground and background (labels <= 0).

    Raises:
        ValueError: ``index`` was built for another shape.
    """
    if tuple(index.shape) != tuple(shape):
        raise ValueError(f"LabelSampler: the label index has shape {index.shape}, the label map {tuple(shape)}.")
    if label_probabilities is not None:
        return [
            ComplementClass(label, p, index.union(False), shape, patch_size)
            if label == 0
            else RunClass(label, p, index.runs(label), shape, patch_size)
            for label, p in label_probabilities.items()
            if p > 0
        ]
    classes: list[RunClass | ComplementClass] = [
        RunClass("foreground", 1.0 if pos_neg is None else pos_neg[0], index.union(True), shape, patch_size)
    ]
    if pos_neg is not None:
        classes.append(ComplementClass("background", pos_neg[1], index.union(True), shape, patch_size))
    return classes
