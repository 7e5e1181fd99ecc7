"""A persistent label index: where each foreground label of a case lies, stored as runs along the last axis.

A label map's voxels of one label form runs along the last spatial axis (rows of a C-ordered array); the index keeps,
per label, the flat index of each run's first voxel and the run's length, in the narrowest unsigned integer types that
hold them, sorted. Segmentations are blobs, so a run stands for tens of voxels: the index of a case whose foreground is
a few percent of the volume is a fraction of a percent of its uint8 label map (nnU-Net's CSR index stores every voxel).

It is data, never code: a ``.npz`` file read with ``allow_pickle=False`` and written atomically (a temporary file,
then a rename). :class:`~monai_patchplug.LabelSampler` draws from it exactly as from the label map itself: a foreground
label's voxels on valid patch centres are those of its runs clipped to the valid-centre box, each equally likely;
background centres are uniform valid centres rejected when they fall in a foreground run (no voxel is read).
It is built slab by slab (:meth:`LabelIndex.build`), so a map larger than memory can be indexed.

With ``max_runs_per_label`` (a cap, as nnU-Net caps its stored locations) a label with more runs keeps a seeded
uniform random subset of them, and the draw is an approximation: a label's voxels are drawn from its kept runs only
(each kept voxel equally likely; ``P(label)`` normalised over the labels present among the kept runs), and the
background from the valid centres outside the kept runs, the voxels of dropped runs included.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._shapes import host_array

__all__ = ["LabelIndex", "index_path"]

_FORMAT = 1
#: Voxels :meth:`LabelIndex.build` reads at a time (whole rows of the last axis; a longer row is read whole): 4 Mi,
#: 4 MiB of a uint8 map, 32 MiB of its int64 run starts at worst.
SLAB_VOXELS = 1 << 22
#: The seed of the runs :meth:`LabelIndex.build` keeps under ``max_runs_per_label`` (fixed: same map, same index).
_CAP_SEED = 0


def index_path(path: str | os.PathLike) -> Path:
    """Where the label index of the label file or store ``path`` lives: ``<path>.index.npz`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".index.npz")


def _narrow(values: np.ndarray, top: int) -> np.ndarray:
    """``values`` (>= 0, <= ``top``) in the narrowest unsigned integer type holding ``top``."""
    return values.astype(np.min_scalar_type(max(int(top), 0)), copy=False)


def check_max_runs(value: Any, owner: str) -> int | None:
    """``max_runs_per_label`` checked for ``owner`` (named in the messages): ``None`` or a positive int.

    Returns:
        ``None`` or the cap as an int.

    Raises:
        TypeError: neither ``None`` nor an int (a bool, a float, a string).
        ValueError: an int below 1.

    Example:
        >>> from monai_patchplug.label_index import check_max_runs
        >>> check_max_runs(None, "PatchStore"), check_max_runs(1000, "PatchStore")
        (None, 1000)
        >>> check_max_runs(0, "PatchStore")
        Traceback (most recent call last):
        ...
        ValueError: PatchStore: max_runs_per_label must be None or a positive int, got 0.
    """
    if value is None:
        return None
    message = f"{owner}: max_runs_per_label must be None or a positive int, got {value!r}."
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(message)
    if value < 1:
        raise ValueError(message)
    return int(value)


def _map_shape(label_map: Any, channel_first: bool) -> tuple[int, ...]:
    """The spatial shape of a single-channel integer (or whole-number float) label map; reads no voxel.

    Raises:
        ValueError: a multi-channel map, no spatial axis, or a dtype that is not bool, integer or float.
    """
    shape = tuple(int(s) for s in label_map.shape)
    if channel_first:
        if len(shape) < 2 or shape[0] != 1:
            raise ValueError(f"LabelIndex.build: expected a single-channel label map, got {shape}.")
        shape = shape[1:]
    if len(shape) < 1 or _dtype_kind(label_map.dtype) not in "biuf":
        raise ValueError(f"LabelIndex.build: expected a single-channel label map, got {shape} {label_map.dtype}.")
    return shape


def _dtype_kind(dtype: Any) -> str:
    """numpy's kind (``"b"``, ``"i"``, ``"u"``, ``"f"``, ...) of a numpy or torch dtype (bfloat16: float); ``"O"``
    for one numpy does not know."""
    if isinstance(dtype, torch.dtype):
        return host_array(torch.empty(0, dtype=dtype)).dtype.kind
    try:
        return np.dtype(dtype).kind
    except TypeError:
        return "O"


def _slabs(shape: tuple[int, ...], voxels: int) -> Iterator[tuple[slice, ...]]:
    """Boxes of whole rows (last axis) covering ``shape`` in C order, each one flat range of the map of at most
    ``max(voxels, shape[-1])`` voxels: a range along the first axis whose inner size fits ``voxels`` (the inner axes
    whole), the axes before it one index at a time."""
    if not math.prod(shape):
        return
    if len(shape) == 1:
        yield (slice(0, shape[0]),)
        return
    axis = next((a for a in range(len(shape) - 1) if math.prod(shape[a + 1 :]) <= voxels), len(shape) - 2)
    step = max(1, voxels // math.prod(shape[axis + 1 :]))
    inner = tuple(slice(0, s) for s in shape[axis + 1 :])
    for prefix in np.ndindex(*shape[:axis]):
        for first in range(0, shape[axis], step):
            yield (*(slice(i, i + 1) for i in prefix), slice(first, min(first + step, shape[axis])), *inner)


def _read(label_map: Any, box: tuple[slice, ...]) -> np.ndarray:
    """``label_map[box]`` as a numpy array (a CPU tensor's or numpy array's box: a view; another device's: a copy)."""
    block = label_map[box]
    return host_array(block) if isinstance(block, torch.Tensor) else np.asarray(block)


def _whole_numbers(values: np.ndarray) -> np.ndarray:
    """``values`` as they are, a float slab as int64 once checked to hold whole numbers.

    Raises:
        ValueError: a float value that is not a whole number (or not finite).
    """
    if values.dtype.kind != "f":
        return values
    if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
        raise ValueError("LabelIndex.build: a float label map must hold whole numbers.")
    return values.astype(np.int64)


def _row_runs(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The runs of non-zero values of ``rows`` (``(n, width)``; a run never crosses a row): flat starts within
    ``rows``, lengths and values (int64 each), by start. Allocates a bool mask of ``rows``' size."""
    change = np.empty(rows.shape, dtype=bool)
    change[:, 0] = True  # a run never crosses a row
    np.not_equal(rows[:, 1:], rows[:, :-1], out=change[:, 1:])
    starts = np.flatnonzero(change)
    flat = rows.reshape(-1)
    values = flat[starts]
    lengths = np.diff(np.append(starts, flat.size))
    keep = values != 0
    return starts[keep], lengths[keep], values[keep].astype(np.int64)


def _random_subset(offsets: np.ndarray, cap: int) -> np.ndarray:
    """A mask over runs grouped by label (``offsets[i]:offsets[i + 1]``) keeping, of each label, a uniform random
    subset of ``min(n, cap)`` runs (seeded with ``_CAP_SEED``: the same runs and cap keep the same subset)."""
    counts = np.diff(offsets)
    group = np.repeat(np.arange(counts.size), counts)
    keys = np.random.default_rng(_CAP_SEED).random(group.size)
    order = np.lexsort((keys, group))  # by label, then by a random key
    rank = np.empty(group.size, dtype=np.int64)
    rank[order] = np.arange(group.size) - offsets[group]  # the sorted groups are the groups: rank within its label
    return rank < cap


class LabelIndex:
    """The runs of every non-zero label of a label map (see the module docstring); built once, loaded fast.

    Args:
        shape: the label map's spatial shape.
        labels: the label values, sorted (``int64``).
        offsets: ``len(labels) + 1`` offsets: the runs of ``labels[i]`` are ``offsets[i]:offsets[i + 1]``.
        starts: flat index (C order over ``shape``) of each run's first voxel, sorted within a label.
        lengths: each run's length along the last axis.
        max_runs_per_label: the cap the runs were kept under (``None``: every run, the exact index); saved with the
            index, so a loaded index tells whether its draw is an approximation.

    Raises:
        ValueError: arrays whose sizes or values do not fit together or ``shape``; a ``max_runs_per_label`` below 1.
        TypeError: a ``max_runs_per_label`` neither ``None`` nor an int.

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
        >>> LabelIndex.build(label, max_runs_per_label=1).counts()  # a seeded random one of label 1's runs kept
        {1: 3, 2: 1}
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
        max_runs_per_label: int | None = None,
    ) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.max_runs_per_label = check_max_runs(max_runs_per_label, "LabelIndex")
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
    def build(cls, label_map: Any, channel_first: bool = False, max_runs_per_label: int | None = None) -> LabelIndex:
        """Index a label map, read slab by slab: it need not fit in memory.

        The map is read in boxes of whole rows of the last axis, in C order, of at most :data:`SLAB_VOXELS` voxels
        each (a range along the first spatial axis whose rows fit, the axes before it one index at a time; a row
        longer than that is one box), every voxel once. A run never crosses a row, so the runs are those of the whole
        map.

        Args:
            label_map: a ``(*spatial)`` array-like of integer values (a float map must hold whole numbers): a numpy
                array or memmap, a tensor (on any device), a ``zarr.Array``, an ``h5py.Dataset``, anything with
                ``shape``, ``dtype`` and ``__getitem__`` with slices.
            channel_first: ``label_map`` is ``(1, *spatial)`` (one channel in front).
            max_runs_per_label: keep at most this many runs per label (``None``: all, the exact index), as nnU-Net
                caps its stored locations: a label with more keeps a uniform random subset of its runs, seeded, so
                the same map and cap give the same index. An approximation: the sampler then draws a label's voxels
                from its kept runs only (each kept voxel equally likely; ``P(label)`` still normalised over the labels
                present among the kept runs), the background from every valid centre outside the kept runs (so also
                from the voxels of dropped runs), and :meth:`counts` counts the kept voxels.

        Returns:
            The index. Allocates a few temporaries of one slab's size (the slab, a bool change mask, int64 run
            starts; a float map's slab as int64 too) and a few arrays of the run count (starts and lengths in their
            small types, labels and sort order as int64; with a cap, a float64 key per run); the index holds 2 small
            integers per run.

        Raises:
            ValueError: a multi-channel map, non-integer values, or ``max_runs_per_label`` below 1.
            TypeError: ``max_runs_per_label`` neither ``None`` nor an int.
        """
        cap = check_max_runs(max_runs_per_label, "LabelIndex.build")
        label_map = label_map if hasattr(label_map, "shape") else np.asarray(label_map)
        shape = _map_shape(label_map, channel_first)
        size, width = math.prod(shape), shape[-1]
        lead = (slice(0, 1),) if channel_first else ()
        empty = np.zeros(0, dtype=np.int64)
        parts = [(_narrow(empty, size), _narrow(empty, width), empty)]
        offset = 0
        for box in _slabs(shape, SLAB_VOXELS):
            rows = _whole_numbers(_read(label_map, lead + box)).reshape(-1, width)
            starts, lengths, values = _row_runs(rows)
            parts.append((_narrow(starts + offset, size), _narrow(lengths, width), values))
            offset += rows.size
        starts, lengths, run_values = (np.concatenate(column) for column in zip(*parts))
        order = np.argsort(run_values, kind="stable")  # by label, then by start (starts are ascending)
        labels, counts = np.unique(run_values, return_counts=True)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        starts, lengths = starts[order], lengths[order]
        if cap is not None:
            keep = _random_subset(offsets, cap)
            starts, lengths = starts[keep], lengths[keep]
            offsets = np.concatenate([[0], np.cumsum(np.minimum(counts, cap))]).astype(np.int64)
        return cls(shape, labels, offsets, starts, lengths, cap)

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
                    max_runs_per_label=np.int64(self.max_runs_per_label or 0),
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
                cap = int(f["max_runs_per_label"]) if "max_runs_per_label" in f.files else 0  # 0: none (older files)
                return cls(f["shape"], f["labels"], f["offsets"], f["starts"], f["lengths"], cap or None)
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
