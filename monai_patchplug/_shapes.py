"""Spatial shapes, patch boxes and the ``location`` key: the small pure helpers every module shares."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from numbers import Integral
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

__all__ = ["LOCATION", "TypeSpatialShape", "parse_spatial_shape", "get_batch_images_and_size"]

#: Key under which every patch dict stores its box ``[i0, j0, k0, i1, j1, k1]`` (start inclusive, end exclusive).
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
    """Patch size for an image with ``spatial_ndim`` spatial dims (2 or 3).

    An ``int`` means the same size on every axis. For a 2D image, 3 values whose last is 1 (TorchIO's 2D
    convention) or 2 values are accepted.

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
    if len(values) == spatial_ndim:
        return values
    if spatial_ndim == 2 and len(values) == 3 and values[2] == 1:
        return values[:2]
    raise ValueError(f"patch_size {tuple(patch_size)!r} does not fit an image with {spatial_ndim} spatial dimensions.")


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


def plain_tensor(img: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``img`` as a plain ``torch.Tensor`` sharing its memory (a MetaTensor's data, a numpy array's buffer)."""
    return img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)


def host_array(img: torch.Tensor | np.ndarray) -> np.ndarray:
    """``img`` as a numpy array: a view of a CPU tensor's memory; a copy from another device or for bfloat16.

    The samplers' bulk passes (compare, row sums, min/max) run in numpy: on a loaded 2-core machine torch's
    threaded reductions over a strided view were 5-10x slower than numpy's single pass.
    """
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
    """``[i0, j0, (k0,) i1, j1, (k1)]`` as an int64 tensor: start inclusive, end exclusive."""
    start = [int(c) for c in corner]
    return torch.tensor(start + [c + s for c, s in zip(start, size)], dtype=torch.int64)


def get_batch_images_and_size(batch: Mapping[Hashable, Any]) -> tuple[list[Hashable], int]:
    """Names of the image tensors in a collated batch dict and the batch size.

    An image is a tensor or array with a batch dim, a channel dim and at least two spatial dims (``ndim >= 4``).

    Args:
        batch: a dict as produced by ``monai.data.list_data_collate``.

    Returns:
        ``(names, batch_size)``: the image keys in insertion order and the length of their first dim.

    Raises:
        TypeError: if ``batch`` is not a mapping.
        ValueError: if it holds no image, or the images disagree on the batch size.
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a dict of batched tensors, got {type(batch).__name__}.")
    names = [key for key, value in batch.items() if is_array(value) and value.ndim >= 4]
    if not names:
        raise ValueError(f"batch holds no image (a tensor with ndim >= 4); keys: {list(batch)!r}.")
    sizes = {name: int(batch[name].shape[0]) for name in names}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"images in the batch disagree on the batch size: {sizes!r}.")
    return names, sizes[names[0]]
