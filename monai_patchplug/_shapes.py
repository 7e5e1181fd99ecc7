"""Spatial shapes, patch boxes and the ``location`` key: the small pure helpers every module shares."""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Mapping, Sequence
from numbers import Integral
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

__all__ = ["LOCATION", "TypeSpatialShape", "parse_spatial_shape", "get_batch_images_and_size"]

#: Key under which every patch dict stores its box: ``2 * ndim`` values, the start on each spatial axis (inclusive),
#: then the end (exclusive): ``[i0, j0, k0, i1, j1, k1]`` in 3-D, ``[i0, i1]`` for a 1-D signal.
#:
#: Example:
#:     >>> import torch
#:     >>> from monai_patchplug import LOCATION, GridSampler
#:     >>> image = torch.arange(24.0).reshape(1, 4, 6)
#:     >>> patches = GridSampler(patch_size=(2, 3))({"image": image})
#:     >>> [patch[LOCATION].tolist() for patch in patches]
#:     [[0, 0, 2, 3], [0, 3, 2, 6], [2, 0, 4, 3], [2, 3, 4, 6]]
#:     >>> i0, j0, i1, j1 = patches[1][LOCATION].tolist()
#:     >>> torch.equal(patches[1]["image"], image[:, i0:i1, j0:j1])
#:     True
LOCATION = "location"

TypeSpatialShape = int | Sequence[int]


def _as_positive_int(value: Any, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Integral):
        raise TypeError(f"{name} must hold integers, got {value!r} of type {type(value).__name__}.")
    if value <= 0:
        raise ValueError(f"{name} must hold positive integers, got {value!r}.")
    return int(value)


def parse_spatial_shape(shape: TypeSpatialShape) -> tuple[int, int, int]:
    """Turn an ``int`` or a sequence of three positive integers into a 3-tuple of Python ``int``.

    Args:
        shape: ``n`` (meaning ``(n, n, n)``) or a sequence of 3 positive integers (numpy/torch integers too).

    Returns:
        ``(n0, n1, n2)`` as Python ints. Allocates nothing but the tuple.

    Raises:
        TypeError: if ``shape`` or one of its items is not an integer.
        ValueError: if a value is not positive or the sequence does not have 3 items.

    Example:
        >>> import numpy as np
        >>> from monai_patchplug import parse_spatial_shape
        >>> parse_spatial_shape(64)
        (64, 64, 64)
        >>> parse_spatial_shape(np.array([96, 96, 32]))
        (96, 96, 32)
    """
    if isinstance(shape, torch.Tensor | np.ndarray):
        shape = shape.tolist()
    if isinstance(shape, Integral) and not isinstance(shape, (bool, np.bool_)):
        n = _as_positive_int(shape, "shape")
        return n, n, n
    if not isinstance(shape, Sequence) or isinstance(shape, str):
        raise TypeError(f"shape must be an int or a sequence of 3 ints, got {shape!r}.")
    if len(shape) != 3:
        raise ValueError(f"shape must have 3 values, got {len(shape)}: {tuple(shape)!r}.")
    return tuple(_as_positive_int(v, "shape") for v in shape)  # type: ignore[return-value]


def resolve_patch_size(patch_size: TypeSpatialShape, spatial_ndim: int) -> tuple[int, ...]:
    """Patch size for an image with ``spatial_ndim >= 1`` spatial dims.

    The image's rank decides: an ``int`` means that size on each of its ``spatial_ndim`` axes (``64`` is
    ``(64,)`` on a signal, ``(64, 64, 64, 64)`` on a 4-D volume). A sequence gives one value per axis; values beyond
    the image's rank are accepted when they are all 1 and are dropped (TorchIO's convention, where a 2-D image is a
    3-D one of depth 1: ``(64, 64, 1)`` on a ``(C, H, W)`` image is ``(64, 64)``).

    Args:
        patch_size: an int or a sequence of ints (numpy/torch integers and arrays too).
        spatial_ndim: the image's number of spatial dims.

    Returns:
        ``spatial_ndim`` Python ints. Allocates nothing but the tuple.

    Raises:
        TypeError: non-integer values.
        ValueError: non-positive values or a number of values that does not fit the image.
    """
    if isinstance(patch_size, torch.Tensor | np.ndarray):
        patch_size = patch_size.tolist()
    if isinstance(patch_size, Integral) and not isinstance(patch_size, (bool, np.bool_)):
        return (_as_positive_int(patch_size, "patch_size"),) * spatial_ndim
    if not isinstance(patch_size, Sequence) or isinstance(patch_size, str):
        raise TypeError(f"patch_size must be an int or a sequence of ints, got {patch_size!r}.")
    values = tuple(_as_positive_int(v, "patch_size") for v in patch_size)
    if len(values) < spatial_ndim or any(v != 1 for v in values[spatial_ndim:]):
        raise ValueError(
            f"patch_size {tuple(patch_size)!r} does not fit an image with {spatial_ndim} spatial dimensions "
            f"(give {spatial_ndim} values, or more whose extra trailing values are 1)."
        )
    return values[:spatial_ndim]


def spec_length(spec: Any) -> int | None:
    """How many values a size spec gives: the length of a sequence or array, ``None`` for a single number (its
    rank is left to the image). Allocates nothing but a small array for a sequence."""
    if is_array(spec) or (isinstance(spec, Sequence) and not isinstance(spec, str)):
        return int(np.asarray(spec.tolist() if is_array(spec) else spec, dtype=object).size)
    return None


def fill_patch_size(spec: TypeSpatialShape, shape: tuple[int, ...] | None) -> TypeSpatialShape:
    """Replace values <= 0 of a patch-size spec by the image's size (by 1 when ``shape`` is None, to validate)."""
    if isinstance(spec, Sequence) or is_array(spec):
        values = list(np.asarray(spec).ravel())
        return [
            (shape[i] if shape is not None and i < len(shape) else 1) if v <= 0 else v for i, v in enumerate(values)
        ]
    if spec <= 0:
        return [1] * 3 if shape is None else list(shape)
    return spec


def is_array(value: Any) -> bool:
    """Whether ``value`` is a torch tensor or a numpy array."""
    return isinstance(value, torch.Tensor | np.ndarray)


def is_lazy(value: Any) -> bool:
    """Whether ``value`` is an array-like to read box by box rather than an array in memory.

    A ``numpy.memmap`` counts (a file read in place); other numpy arrays and tensors are in memory; anything else with
    ``shape``, ``dtype`` and ``__getitem__`` (``zarr.Array``, ``h5py.Dataset``, a dask array, nibabel's ``ArrayProxy``,
    :class:`~monai_patchplug.LazyVolume`) counts. Reads nothing.
    """
    if isinstance(value, np.memmap):
        return True
    if isinstance(value, torch.Tensor | np.ndarray):
        return False
    return hasattr(value, "shape") and hasattr(value, "dtype") and hasattr(value, "__getitem__")


def read_box(array: Any, index: tuple) -> torch.Tensor:
    """``array[index]`` of an array-like as a CPU tensor of its own (a memmap's box is copied, so the file is not held).

    Reads only the box (the array-like's own ``__getitem__``); allocates the box.
    """
    block = array[index]
    if isinstance(block, torch.Tensor):
        return block
    data = np.asarray(block)
    data = np.array(data) if isinstance(block, np.memmap) or not data.flags.writeable else np.ascontiguousarray(data)
    return torch.from_numpy(data)


def plain_tensor(img: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``img`` as a plain ``torch.Tensor`` sharing its memory (a MetaTensor's data, a numpy array's buffer)."""
    return img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)


def host_array(img: torch.Tensor | np.ndarray) -> np.ndarray:
    """``img`` as a numpy array: a view of a CPU tensor's memory; a copy from another device or for bfloat16; an
    array-like (see :func:`is_lazy`) read whole into memory.

    The samplers' bulk passes (compare, row sums, min/max) run in numpy: on a loaded 2-core machine torch's
    threaded reductions over a strided view were 5-10x slower than numpy's single pass.
    """
    if isinstance(img, np.ndarray) and not isinstance(img, np.memmap):
        return img
    if is_lazy(img):  # an array-like: read whole (callers that need less read boxes with read_box)
        img = read_box(img, (slice(None),) * len(img.shape))
        if isinstance(img, np.ndarray):
            return img
    t = plain_tensor(img).detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.cpu().numpy()


def spatial_shape(img: torch.Tensor | np.ndarray) -> tuple[int, ...]:
    """Spatial shape of a channel-first image; a MetaTensor's pending (lazy) shape where it has one."""
    if isinstance(img, MetaTensor):
        return tuple(int(s) for s in img.peek_pending_shape())
    return tuple(int(s) for s in img.shape[1:])


def location_tensor(corner: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """The box as ``2 * ndim`` int64 values: the start per axis (inclusive), then the end per axis (exclusive).

    Allocates the small tensor only.
    """
    start = [int(c) for c in corner]
    return torch.tensor(start + [c + s for c, s in zip(start, size)], dtype=torch.int64)


def image_entries(data: Mapping[Hashable, Any], leading: int = 1) -> list[Hashable]:
    """Keys of the entries of ``data`` that are images, in insertion order (how ``keys=None`` finds them).

    An image is an array with ``leading`` leading dims (1: the channel of a subject's image; 2: batch and channel of
    a collated batch) and at least one spatial dim. Arrays with 2 or more spatial dims are the images; arrays with one
    spatial dim (a ``(C, S)`` signal) count only when the data holds no image of higher rank, so a small 2-D array
    next to a volume (an affine, a table) is copied, not cropped. Allocates only the list.

    Args:
        data: a subject or batch dict.
        leading: how many dims precede the spatial ones.

    Returns:
        The image keys.
    """
    arrays = {
        k: len(v.shape) - leading for k, v in data.items() if (is_array(v) or is_lazy(v)) and len(v.shape) > leading
    }
    least = 2 if any(ndim >= 2 for ndim in arrays.values()) else 1
    return [k for k, ndim in arrays.items() if ndim >= least]


def get_batch_images_and_size(batch: Mapping[Hashable, Any]) -> tuple[list[Hashable], int]:
    """Names of the image tensors in a collated batch dict and the batch size.

    An image is a tensor or array with a batch dim, a channel dim and at least two spatial dims (``ndim >= 4``), or,
    when the batch holds none, one spatial dim (``ndim == 3``, a batch of 1-D signals); see :func:`image_entries`.

    Args:
        batch: a dict as produced by ``monai.data.list_data_collate``.

    Returns:
        ``(names, batch_size)``: the image keys in insertion order and the length of their first dim.

    Raises:
        TypeError: if ``batch`` is not a mapping.
        ValueError: if it holds no image, or the images disagree on the batch size.

    Example:
        >>> import torch
        >>> from monai.data import list_data_collate
        >>> from monai_patchplug import get_batch_images_and_size
        >>> subjects = [{"image": torch.zeros(1, 8, 8, 8), "label": torch.zeros(1, 8, 8, 8), "id": i} for i in (1, 2)]
        >>> get_batch_images_and_size(list_data_collate(subjects))
        (['image', 'label'], 2)
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a dict of batched tensors, got {type(batch).__name__}.")
    names = image_entries(batch, leading=2)
    if not names:
        raise ValueError(f"batch holds no image (a (B, C, *spatial) tensor with ndim >= 3); keys: {list(batch)!r}.")
    sizes = {name: int(batch[name].shape[0]) for name in names}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"images in the batch disagree on the batch size: {sizes!r}.")
    return names, sizes[names[0]]


def torch_dtype(dtype: Any) -> torch.dtype:
    """The torch dtype of a numpy (or torch) dtype (allocates nothing but an empty array).

    Raises:
        TypeError: a dtype numpy or torch does not know.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    return torch.from_numpy(np.empty(0, dtype=np.dtype(dtype))).dtype


#: bytes that one read or write of a chunked array-like (zarr, h5py, dask) asks for at most, beyond one chunk: its
#: codec holds the chunks it decodes or encodes at once, so rows are read and written in chunk-aligned pieces
PIECE_BYTES = 1 << 23


def _chunk_edges(chunks: Any, size: int) -> np.ndarray:
    """The chunk boundaries of one axis of ``size``, 0 and ``size`` included, from its ``chunks`` entry (an int, as
    zarr and h5py give, or a sequence of chunk sizes, as dask gives; ``None``: one chunk). Allocates the edges."""
    if chunks is None:
        return np.array([0, size])
    if isinstance(chunks, int | np.integer):
        return np.unique(np.r_[np.arange(0, size, max(int(chunks), 1)), size])
    return np.unique(np.clip(np.r_[0, np.cumsum(chunks), size], 0, size))


def chunk_pieces(
    chunks: Any, shape: Sequence[int], rows: int, budget: int
) -> tuple[np.ndarray, list[tuple[slice, ...]]]:
    """Chunk-aligned pieces in which to read or write rows of an array-like's last ``len(shape)`` axes.

    A read or write of rows is cut at the chunk edges of the first axis, and covers one tile of the other axes at a
    time. Tiles start as one chunk per axis and grow, last axis first (the contiguous one), while a tile of ``rows``
    rows (fewer when a chunk holds fewer) stays within ``budget`` voxels; without chunks: one tile, rows uncut.

    Args:
        chunks: the array-like's ``chunks`` attribute (one entry per dim; the last ``len(shape)`` are used), or
            ``None`` or anything else for an unchunked one (a memmap, a tensor).
        shape: the sizes of those axes.
        rows: the rows a piece holds at most.
        budget: the voxels (of all leading axes together) a piece may hold, beyond one chunk.

    Returns:
        The chunk edges of the first axis (0 and its size included) and the tiles (slices of the other axes);
        allocates them.

    Example:
        >>> edges, tiles = chunk_pieces((1, 1, 64, 256, 256), (128, 512, 256), 64, 64 * 256 * 256)
        >>> edges.tolist(), tiles
        ([0, 64, 128], [(slice(0, 256, None), slice(0, 256, None)), (slice(256, 512, None), slice(0, 256, None))])
    """
    ndim = len(shape)
    if not isinstance(chunks, tuple | list) or len(chunks) < ndim:
        chunks = (None,) * ndim
    edges = [_chunk_edges(c, int(n)) for c, n in zip(chunks[len(chunks) - ndim :], shape)]
    rows = min(int(np.diff(edges[0]).max()), rows)
    cuts = list(edges[1:])
    tile = rows * int(np.prod([np.diff(e).max() for e in cuts]))  # voxels of a piece: one chunk per axis to start
    for axis in reversed(range(len(cuts))):
        width = int(np.diff(cuts[axis]).max())
        cuts[axis] = np.unique(np.r_[cuts[axis][:: max(budget // tile, 1)], cuts[axis][-1]])  # the chunks that fit
        if len(cuts[axis]) > 2:  # this axis is cut: the axes before it stay one chunk per tile
            break
        tile = tile // width * int(cuts[axis][-1])
    spans = [[slice(int(a), int(b)) for a, b in zip(c[:-1], c[1:])] for c in cuts]
    return edges[0], list(itertools.product(*spans))
