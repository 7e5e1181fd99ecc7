"""Where the inferer's patches come from: an in-memory batch, or an array-like read one row of patches at a time.

An *array-like* is anything with ``shape``, ``dtype`` and ``__getitem__`` taking a tuple of slices and returning a
numpy array or a tensor: ``numpy.memmap``, ``zarr.Array``, ``h5py.Dataset``, a dask array, or :func:`lazy_batch`
over nibabel's ``img.dataobj``. It is never read whole: :class:`LazySource` reads the rows of the first spatial
axis that the current row of patches covers (padding made in memory), and keeps them only as long as a later row of
patches shares them, so each input voxel is read about once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms.croppad.functional import pad_nd

from .._shapes import is_lazy, torch_dtype
from ..grid import GridGeometry, check_pad_fits, pad_batch

__all__ = ["LazyBatch", "LazySource", "TensorSource", "is_lazy", "lazy_batch", "open_source"]

#: pad modes whose padded rows copy rows of the input (so a slab can be padded from the rows read for it)
_ROW_MODES = {"constant": "constant", "edge": "edge", "replicate": "edge", "reflect": "reflect",
              "symmetric": "symmetric", "wrap": "wrap", "circular": "wrap"}  # fmt: skip


def _as_tensor(block: Any) -> torch.Tensor:
    """A block read from an array-like as a tensor (a copy for a memmap view, so the file is not held)."""
    if isinstance(block, torch.Tensor):
        return block
    array = np.asarray(block)
    return torch.from_numpy(np.array(array) if isinstance(block, np.memmap) else np.ascontiguousarray(array))


class TensorSource:
    """Patches of an in-memory ``(B, C, *spatial)`` batch: views of its padded copy (one copy when padding)."""

    def __init__(self, images: torch.Tensor, geometry: GridGeometry, mode: str, pad_kwargs: dict) -> None:
        self.padded = pad_batch(images, geometry, mode, **pad_kwargs)
        self.dtype, self.device, self.requires_grad = images.dtype, images.device, self.padded.requires_grad

    def patch(self, item: int, box: tuple[slice, ...]) -> torch.Tensor:
        """The ``(C, *patch)`` view of ``item`` at ``box`` (padded coordinates)."""
        return self.padded[(item, slice(None), *box)]


class LazySource:
    """Patches of an array-like ``(B, C, *spatial)``, read a row of patches at a time.

    Args:
        array: the array-like.
        geometry: the grid (its padding is made in memory).
        mode, pad_kwargs: the pad mode (numpy or torch name) and its arguments (``value`` for ``constant``).
        who: the public class named in error messages.

    Holds one slab: the padded rows ``[lo, hi)`` of the first spatial axis (all channels, the other axes padded)
    that the patches asked for since the last row change cover. Asking for rows below ``lo`` (another item, or out of
    grid order) reads them again. ``bytes_read`` counts what was read from ``array``.

    Raises:
        ValueError: a pad mode that needs the whole axis (``mean``, ``median``, ``maximum``, ``minimum``,
            ``linear_ramp``).
    """

    def __init__(self, array: Any, geometry: GridGeometry, mode: str, pad_kwargs: dict, who: str) -> None:
        if mode not in _ROW_MODES:
            raise ValueError(
                f"{who}: padding_mode {mode!r} needs the whole input; array-like inputs take one of "
                f"{sorted(_ROW_MODES)}."
            )
        check_pad_fits(mode, geometry)
        self.array, self.geometry, self.mode, self.pad_kwargs = array, geometry, _ROW_MODES[mode], pad_kwargs
        size, before, after = geometry.spatial_shape[0], geometry.pad_before[0], geometry.pad_after[0]
        rows = np.arange(size)
        #: for each padded row of the first axis, the input row it copies (-1: the constant)
        self.row_source = (
            np.pad(rows, (before, after), constant_values=-1)
            if self.mode == "constant"
            else np.pad(rows, (before, after), mode=self.mode)
        )
        self.dtype, self.device, self.requires_grad = torch_dtype(array.dtype), torch.device("cpu"), False
        self.bytes_read = 0
        self._item, self._lo, self._slab = -1, 0, None

    def patch(self, item: int, box: tuple[slice, ...]) -> torch.Tensor:
        """The ``(C, *patch)`` view of ``item`` at ``box`` (padded coordinates); reads the rows it adds to the slab."""
        a, b = box[0].start, box[0].stop
        if self._slab is None or item != self._item or a < self._lo:
            self._item, self._lo, self._slab = item, a, self._read(item, a, b)
        else:
            top = self._lo + self._slab.shape[1]
            kept = self._slab[:, a - self._lo :]  # empty when the new rows start past the slab
            start = max(top, a)
            self._slab = torch.cat([kept, self._read(item, start, b)], 1) if b > start else kept
            self._lo = a
        return self._slab[(slice(None), slice(a - self._lo, b - self._lo), *box[1:])]

    def _read(self, item: int, a: int, b: int) -> torch.Tensor:
        """Padded rows ``[a, b)`` of ``item``: ``(C, b - a, *padded rest)``; reads the input rows they copy."""
        source = self.row_source[a:b]
        inside = source >= 0
        geometry = self.geometry
        rest = geometry.padded_shape[1:]
        if inside.any():
            needed = np.unique(source[inside])
            runs = np.split(needed, np.flatnonzero(np.diff(needed) > 1) + 1)  # contiguous input rows, one read each
            blocks = [_as_tensor(self.array[(item, slice(None), slice(int(r[0]), int(r[-1]) + 1))]) for r in runs]
            self.bytes_read += sum(b.numel() * b.element_size() for b in blocks)
            block = blocks[0] if len(blocks) == 1 else torch.cat(blocks, 1)
            widths = [(0, 0), (0, 0), *zip(geometry.pad_before[1:], geometry.pad_after[1:])]
            if any(w != (0, 0) for w in widths):
                block = torch.as_tensor(pad_nd(block, widths, self.mode, **self.pad_kwargs))
            position = np.searchsorted(needed, np.where(inside, source, needed[0]))
            if inside.all() and np.array_equal(position, np.arange(len(position))):
                rows = block  # the rows as read: no reordering copy
            else:
                rows = block[:, torch.from_numpy(position)]
        else:
            rows = torch.empty((int(self.array.shape[1]), b - a, *rest), dtype=self.dtype)
        if not inside.all():
            rows[:, torch.from_numpy(~inside)] = float(self.pad_kwargs.get("value", 0.0))
        return rows


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
    array and returns it channel-first. See :func:`lazy_batch`.
    """

    def __init__(self, array: Any, channel_dim: int | None) -> None:
        self.array, self.channel_dim = array, channel_dim
        shape = [int(s) for s in array.shape]
        channels = 1 if channel_dim is None else shape.pop(channel_dim)
        self.shape = (1, channels, *shape)
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
