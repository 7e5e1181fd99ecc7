"""Where the inferer's patches come from: an in-memory batch, or an array-like read one row of patches at a time.

An *array-like* is anything with ``shape``, ``dtype`` and ``__getitem__`` taking a tuple of slices and returning a
numpy array or a tensor: ``numpy.memmap``, ``zarr.Array``, ``h5py.Dataset``, a dask array, or :func:`lazy_batch`
over nibabel's ``img.dataobj``. It is never read whole: :class:`LazySource` reads the rows of the first spatial
axis that the current row of patches covers into one preallocated slab (padding made in place), in chunk-aligned
pieces when the array-like is chunked, and keeps them only as long as a later row of patches shares them, so each
input voxel is read about once. Its patches are views of the slab, valid until the next patch is asked for. A whole
memmap is served from a mapping of its file instead, released row by row.
"""

from __future__ import annotations

import mmap
import warnings
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from .._shapes import PIECE_BYTES, chunk_pieces, is_lazy, torch_dtype
from ..grid import GridGeometry, check_pad_fits, pad_batch

__all__ = ["LazyBatch", "LazySource", "TensorSource", "is_lazy", "lazy_batch", "open_source"]

#: pad modes whose padded rows copy rows of the input (so a slab can be padded from the rows read for it)
_ROW_MODES = {"constant": "constant", "edge": "edge", "replicate": "edge", "reflect": "reflect",
              "symmetric": "symmetric", "wrap": "wrap", "circular": "wrap"}  # fmt: skip


def _as_array(block: Any) -> np.ndarray:
    """A block read from an array-like as a numpy array: the block itself for a numpy array (a memmap's block is a
    view, read from the file when it is copied into the slab) or a CPU tensor; allocates only a block that is not
    in memory yet (a dask array's, a GPU tensor's)."""
    if isinstance(block, torch.Tensor):
        return block.detach().cpu().numpy()
    return np.asarray(block)


def _shared_tensor(block: np.ndarray) -> torch.Tensor | None:
    """A tensor sharing ``block``'s memory, only ever read from (so torch's warning about a read-only block, e.g. a
    memmap's, does not apply), or ``None`` where torch cannot share it (a dtype or byte order it lacks). Allocates
    nothing."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(block)
    except (TypeError, ValueError):
        return None


class _MemmapFile:
    """Rows of a C-ordered ``numpy.memmap`` (not a view of one) served as views of a read-only mapping of its file.

    The mapping is this class's own, so the caller's memmap is untouched. A row range is a view: no copy, the file's
    pages are mapped as the patches are copied out of it (from the page cache, or read from disk then). Mapped pages
    stay in the process's resident memory until released, so the rows a row of patches has passed are released
    (``madvise(MADV_DONTNEED)``; the pages stay in the page cache), and only about one row of patches' input is
    resident (a 2 GiB input copied through its map left the process 2.3 GiB resident). Against copying each row into
    a slab first (positioned reads), this saves a copy of the input: 1.14x instead of 1.26x the in-memory run's wall
    time in ``benchmarks/out_of_core.py``.
    """

    def __init__(self, array: np.memmap, rows: torch.Tensor, mapping: mmap.mmap, start: int) -> None:
        self.shape, self.rows_tensor, self.mapping = array.shape, rows, mapping
        #: where the array begins in the mapping (the mapping starts at an allocation-granularity boundary)
        self.start = start
        #: bytes of one row of the first spatial axis (all the other spatial axes)
        self.row_bytes = int(np.prod(array.shape[3:], dtype=np.int64)) * array.dtype.itemsize
        self._low: dict[int, int] = {}  # per item: the lowest row served and not released since

    @classmethod
    def open(cls, array: Any) -> _MemmapFile | None:
        """A mapping of ``array``'s file if ``array`` is a whole, C-ordered, native-order memmap of a file whose
        dtype torch has, not copy-on-write (mode ``"c"``: its changes are not in the file), on an OS that can release
        mapped pages, and the file still holds it; else ``None``. Maps the array's bytes (no read)."""
        usable = (
            isinstance(array, np.memmap)
            and isinstance(array.base, mmap.mmap)
            and array.filename is not None
            and getattr(array, "mode", "c") != "c"
            and array.flags.c_contiguous
            and array.dtype.isnative
            and array.size > 0
            and hasattr(mmap, "MADV_DONTNEED")
        )
        if not usable:
            return None
        offset = int(array.offset)
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            with open(array.filename, "rb") as f:
                mapping = mmap.mmap(f.fileno(), offset - start + array.nbytes, access=mmap.ACCESS_READ, offset=start)
        except (OSError, ValueError):  # the file is gone or shorter now: read through the caller's memmap
            return None
        flat = np.frombuffer(mapping, dtype=array.dtype, count=array.size, offset=offset - start)
        rows = _shared_tensor(flat.reshape(array.shape))
        return None if rows is None else cls(array, rows, mapping, offset - start)

    def rows(self, item: int, r0: int, r1: int) -> torch.Tensor:
        """The ``(C, r1 - r0, *rest)`` view of rows ``[r0, r1)`` of ``item``; releases the rows of ``item`` below
        ``r0`` first (see :meth:`release`). Allocates nothing."""
        self.release(item, r0)
        self._low[item] = min(self._low.get(item, r0), r0)  # rows asked for out of order are released later too
        return self.rows_tensor[item, :, r0:r1]

    def release(self, item: int, below: int | None = None) -> None:
        """Release the mapped pages of ``item``'s rows below ``below`` (all its rows for ``None``), in every channel,
        from the lowest row served since the last release (from the page it starts in); nothing when none was
        served."""
        first = self._low.get(item)
        last = self.shape[2] if below is None else below
        if first is None or last <= first:
            return
        self._low[item] = last
        page = mmap.PAGESIZE
        for c in range(self.shape[1]):
            channel = self.start + (item * self.shape[1] + c) * self.shape[2] * self.row_bytes
            # pages end where a row ends rounded down, so consecutive releases tile: a page shared with the next
            # row stays until the next release (not before its channel: another channel's rows may be in use)
            lo = max((channel + first * self.row_bytes) // page * page, -(-channel // page) * page)
            hi = (channel + last * self.row_bytes) // page * page
            if hi > lo:
                self.mapping.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


class TensorSource:
    """Patches of an in-memory ``(B, C, *spatial)`` batch: views of its padded copy (one copy when padding).

    The views stay valid for the whole call (``stable_views``), so a batch can stack them at once.
    """

    stable_views = True

    def __init__(self, images: torch.Tensor, geometry: GridGeometry, mode: str, pad_kwargs: dict) -> None:
        self.padded = pad_batch(images, geometry, mode, **pad_kwargs)
        self.dtype, self.device, self.requires_grad = images.dtype, images.device, self.padded.requires_grad

    def patch(self, item: int, box: tuple[slice, ...]) -> torch.Tensor:
        """The ``(C, *patch)`` view of ``item`` at ``box`` (padded coordinates)."""
        return self.padded[(item, slice(None), *box)]


class LazySource:
    """Patches of an array-like ``(B, C, *spatial)``, read a row of patches at a time into one slab.

    Args:
        array: the array-like.
        geometry: the grid (its padding is made in memory).
        mode, pad_kwargs: the pad mode (numpy or torch name) and its arguments (``value`` for ``constant``).
        who: the public class named in error messages.

    The slab holds the padded rows ``[lo, lo + patch rows)`` of the first spatial axis (all channels, the other axes
    padded) of the current row of patches. When the row of patches advances, the rows it keeps move down in place and
    only the new input rows are read, straight into the slab, which is then padded in place; rows below ``lo`` (another
    item, or out of grid order) are read again. A patch is a view of the slab, valid only until the next
    :meth:`patch` call (``stable_views`` is false): copy it before asking for the next one. ``bytes_read`` counts what
    was read from ``array``.

    A whole C-ordered ``numpy.memmap`` whose other axes are not padded needs no slab: rows inside the file are views
    of a read-only mapping of the file of this source's own (no copy before the patch's own), and the rows a row of
    patches has passed are released from the process's memory (see :class:`_MemmapFile`); ``bytes_read`` counts each
    of those rows once per item.

    Allocates the slab (``C`` x patch rows x the other padded axes) at the first patch read into it and keeps it
    while rows are read into it; a read allocates what the array-like returns (a memmap's block is a view), and a
    padded border a copy of its source voxels.

    Raises:
        ValueError: a pad mode that needs the whole axis (``mean``, ``median``, ``maximum``, ``minimum``,
            ``linear_ramp``).
    """

    stable_views = False

    def __init__(self, array: Any, geometry: GridGeometry, mode: str, pad_kwargs: dict, who: str) -> None:
        if mode not in _ROW_MODES:
            raise ValueError(
                f"{who}: padding_mode {mode!r} needs the whole input; array-like inputs take one of "
                f"{sorted(_ROW_MODES)}."
            )
        check_pad_fits(mode, geometry)
        self.array, self.geometry, self.mode, self.pad_kwargs = array, geometry, _ROW_MODES[mode], pad_kwargs
        self.dtype, self.device, self.requires_grad = torch_dtype(array.dtype), torch.device("cpu"), False
        self.value = float(pad_kwargs.get("value", 0.0))
        #: per spatial axis, the input index each padded index copies (-1: the constant)
        self.sources = [
            np.pad(np.arange(size), (before, after), constant_values=-1)
            if self.mode == "constant"
            else np.pad(np.arange(size), (before, after), mode=self.mode)
            for size, before, after in zip(geometry.spatial_shape, geometry.pad_before, geometry.pad_after)
        ]
        self.row_source = self.sources[0]
        #: reads of rows are cut at these chunk edges of the first axis, and each covers one of these tiles
        self.row_edges, self.tiles = chunk_pieces(
            getattr(array, "chunks", None),
            geometry.spatial_shape,
            geometry.patch_size[0],
            PIECE_BYTES // (int(array.shape[1]) * self.dtype.itemsize),
        )
        self.bytes_read = 0
        self._item, self._lo = -1, 0
        self._slab: torch.Tensor | None = None
        unpadded = tuple(geometry.padded_shape[1:]) == tuple(geometry.spatial_shape[1:])
        #: a whole memmap's rows inside the file are views of a mapping of their own, released once passed
        self._file = _MemmapFile.open(array) if unpadded else None
        self._viewed: dict[int, int] = {}  # per item, the rows below this one were counted in ``bytes_read``
        self._file_rows: dict[tuple[int, int], int | None] = {}  # see _file_row

    def patch(self, item: int, box: tuple[slice, ...]) -> torch.Tensor:
        """The ``(C, *patch)`` view of ``item`` at ``box`` (padded coordinates), valid until the next call; reads the
        rows it adds to the slab."""
        a, b = box[0].start, box[0].stop
        first = self._file_row(a, b) if self._file is not None else None
        if first is not None:
            return self._view(item, first, first + b - a, box)
        slab = self._slab
        if slab is None or item != self._item or a < self._lo:
            start = a  # a fresh slab
        else:
            start = max(self._lo + slab.shape[1], a)  # rows from here on are new
            if a > self._lo:
                self._shift(a - self._lo)
        self._item, self._lo = item, a
        if b > start:
            self._read(item, start, b)
        assert self._slab is not None
        return self._slab[(slice(None), slice(None), *box[1:])]

    def _file_row(self, a: int, b: int) -> int | None:
        """The file row that padded rows ``[a, b)`` start at when they are rows of the file in order (no padding
        among them), else ``None``; worked out once per row of patches."""
        if (a, b) not in self._file_rows:
            rows = self.row_source[a:b]
            inside = rows[0] >= 0 and rows[-1] - rows[0] == b - a - 1 and bool((np.diff(rows) == 1).all())
            self._file_rows[(a, b)] = int(rows[0]) if inside else None
        return self._file_rows[(a, b)]

    def _view(self, item: int, r0: int, r1: int, box: tuple[slice, ...]) -> torch.Tensor:
        """The patch at ``box`` as a view of the file's rows ``[r0, r1)`` of ``item`` (see :class:`_MemmapFile`):
        the rows of earlier items and those of ``item`` below ``r0`` are released, the slab (if any) is freed, and
        the rows not served before are counted in ``bytes_read``."""
        assert self._file is not None
        for earlier in [k for k in self._viewed if k != item]:
            self._file.release(earlier)
            del self._viewed[earlier]
        seen = self._viewed.get(item, r0)
        self.bytes_read += max(r1 - max(r0, seen), 0) * self._file.row_bytes * int(self.array.shape[1])
        self._viewed[item] = max(seen, r1)
        self._slab, self._item = None, -1  # the next slab read (padded rows) starts afresh
        return self._file.rows(item, r0, r1)[(slice(None), slice(None), *box[1:])]

    def _shift(self, step: int) -> None:
        """Move the slab's rows ``[step, height)`` down to ``[0, height - step)`` (``step > 0``), in blocks of
        ``step`` rows so that no copy overlaps itself; allocates nothing."""
        slab = self._slab
        assert slab is not None
        kept = slab.shape[1] - step
        for row in range(0, kept, step):
            n = min(step, kept - row)
            slab[:, row : row + n].copy_(slab[:, row + step : row + step + n])

    def _read(self, item: int, a: int, b: int) -> None:
        """Fill the slab's rows for padded rows ``[a, b)`` of ``item`` (at ``a - lo``): read the input rows they copy
        straight into the slab (a read per contiguous run of rows within a chunk, and per tile), fill the constant
        rows, pad the other axes in place."""
        source = self.row_source[a:b]
        inside = source >= 0
        before = self.geometry.pad_before[1:]
        needed = np.unique(source[inside])
        chunk = np.searchsorted(self.row_edges, needed, side="right")
        breaks = np.flatnonzero((np.diff(needed) > 1) | (np.diff(chunk) != 0)) + 1
        for run in np.split(needed, breaks) if len(needed) else []:
            r0, r1 = int(run[0]), int(run[-1]) + 1
            places = np.flatnonzero(inside & (source >= r0) & (source < r1))
            offsets = source[places] - r0
            in_order = np.array_equal(offsets, np.arange(len(places))) and places[-1] - places[0] == len(places) - 1
            rows = slice(int(places[0]), int(places[-1]) + 1) if in_order else places
            for tile in self.tiles:
                block = _as_array(self.array[(item, slice(None), slice(r0, r1), *tile)])
                self.bytes_read += block.nbytes
                target = self._rows(a, b, block.dtype)
                index = (slice(None), rows, *(slice(p + t.start, p + t.stop) for p, t in zip(before, tile)))
                shared = _shared_tensor(block) if in_order else None
                if shared is not None:
                    target[index].copy_(shared)  # torch copies on all its threads
                else:  # padded rows (reordered or repeated), or a dtype torch lacks
                    target.numpy()[index] = block if in_order else block[:, offsets]
        slab_rows = self._rows(a, b, None)
        if not inside.all():
            slab_rows[:, torch.from_numpy(~inside)] = self.value
        self._pad_rest(slab_rows)

    def _rows(self, a: int, b: int, dtype: np.dtype | None) -> torch.Tensor:
        """The slab's rows of padded rows ``[a, b)``; allocates the slab at first use, in ``dtype`` (that of the
        first block read, which may differ from the array-like's ``dtype``, e.g. a scaled NIfTI) or the input's."""
        if self._slab is None:
            shape = (int(self.array.shape[1]), self.geometry.patch_size[0], *self.geometry.padded_shape[1:])
            self._slab = torch.empty(shape, dtype=self.dtype if dtype is None else torch_dtype(dtype))
        return self._slab[:, a - self._lo : b - self._lo]

    def _pad_rest(self, rows: torch.Tensor) -> None:
        """Pad the axes after the first of ``(C, n, *padded rest)`` rows in place, axis by axis (as ``numpy.pad``
        does), from their interior. Allocates a copy of a border's source voxels (non-constant modes)."""
        geometry = self.geometry
        for axis, (before, size) in enumerate(zip(geometry.pad_before[1:], geometry.spatial_shape[1:]), start=1):
            index = self.sources[axis]
            border = np.flatnonzero((np.arange(len(index)) < before) | (np.arange(len(index)) >= before + size))
            if not len(border):
                continue
            dim = axis + 1
            if self.mode == "constant":
                rows.index_fill_(dim, torch.from_numpy(border), self.value)
            else:
                copied = rows.index_select(dim, torch.from_numpy(index[border] + before))
                rows.index_copy_(dim, torch.from_numpy(border), copied)


def open_source(inputs: Any, geometry: GridGeometry, pad: tuple[str, dict] | None, who: str) -> Any:
    """The patch source for ``inputs``: a :class:`LazySource` for an array-like, else a :class:`TensorSource`
    (a tensor, MetaTensor or in-memory numpy array). Allocates what each allocates."""
    mode, pad_kwargs = pad if pad is not None else ("constant", {})
    if is_lazy(inputs):
        return LazySource(inputs, geometry, mode, pad_kwargs, who)
    images = inputs.as_tensor() if isinstance(inputs, MetaTensor) else torch.as_tensor(inputs)
    return TensorSource(images, geometry, mode, pad_kwargs)


class LazyBatch:
    """A ``(*spatial)`` array-like, or one with a channel axis, presented as ``(1, C, *spatial)``, unread.

    Indexing with a tuple of slices (as :class:`LazySource` does) reads only the box asked for from the wrapped
    array and returns it channel-first. See :func:`lazy_batch`. ``chunks`` presents the wrapped array's chunks
    (zarr, h5py, dask) alike, ``None`` when it has none.
    """

    def __init__(self, array: Any, channel_dim: int | None) -> None:
        self.array, self.channel_dim = array, channel_dim
        shape = [int(s) for s in array.shape]
        channels = 1 if channel_dim is None else shape.pop(channel_dim)
        self.shape = (1, channels, *shape)
        chunks = getattr(array, "chunks", None)
        self.chunks = None
        if isinstance(chunks, tuple | list) and len(chunks) == len(array.shape):
            chunks = list(chunks)
            self.chunks = (1, 1 if channel_dim is None else chunks.pop(channel_dim), *chunks)
        self.dtype = array.dtype
        self.ndim = len(self.shape)

    def __getitem__(self, index: tuple) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (self.ndim - len(index))
        item, channels, spatial = index[0], index[1], index[2:]
        if not isinstance(item, slice) and int(item) != 0:
            raise IndexError(f"lazy_batch: batch index {item} out of range for a batch of 1.")
        if self.channel_dim is None:
            block = np.asarray(self.array[spatial])[None]
        else:
            c = self.channel_dim
            block = np.moveaxis(np.asarray(self.array[(*spatial[:c], slice(None), *spatial[c:])]), c, 0)
        block = block[channels]
        return block[None] if isinstance(item, slice) else block


def lazy_batch(array: Any, channel_dim: int | None = None) -> LazyBatch:
    """Present a ``(*spatial)`` array-like, or one with a channel axis at ``channel_dim`` (e.g. ``-1`` for
    ``(*spatial, C)``), as the ``(1, C, *spatial)`` batch that :class:`~monai_patchplug.GridInferer` takes, without
    reading it (e.g. nibabel's ``img.dataobj`` of an uncompressed NIfTI, read in place).

    Args:
        array: anything with ``shape``, ``dtype`` and slicing.
        channel_dim: the channel axis of ``array``; ``None``: no channel axis (one channel).

    Returns:
        A :class:`LazyBatch`; allocates nothing.

    Raises:
        TypeError: an object without ``shape``, ``dtype`` or ``__getitem__``.
        ValueError: a ``channel_dim`` outside the array's axes.

    Example:
        >>> import numpy as np
        >>> import torch
        >>> from monai_patchplug import GridInferer, lazy_batch
        >>> volume = np.arange(20 * 16 * 2, dtype=np.float32).reshape(20, 16, 2)  # (*spatial, C), e.g. a np.memmap
        >>> batch = lazy_batch(volume, channel_dim=-1)  # nothing is read yet
        >>> batch.shape
        (1, 2, 20, 16)
        >>> output = GridInferer(patch_size=8, patch_overlap=2)(batch, lambda x: x + 1)  # reads a patch at a time
        >>> output.shape, torch.allclose(output[0], torch.from_numpy(volume).permute(2, 0, 1) + 1)
        (torch.Size([1, 2, 20, 16]), True)
    """
    if not all(hasattr(array, name) for name in ("shape", "dtype", "__getitem__")):
        raise TypeError(f"lazy_batch: array must have shape, dtype and slicing, got {type(array).__name__}.")
    ndim = len(array.shape)
    if channel_dim is not None and not -ndim <= channel_dim < ndim:
        raise ValueError(f"lazy_batch: channel_dim {channel_dim} is outside the array's {ndim} axes.")
    return LazyBatch(array, None if channel_dim is None else channel_dim % ndim)
