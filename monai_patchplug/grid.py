"""Pure geometry of a regular patch grid, shared by :class:`~monai_patchplug.GridSampler` and inference.

Per axis of size ``S`` (after padding), patch ``P`` and overlap ``O``, the corners are ``0, P-O, 2(P-O), ...``
and always a last corner ``S-P``, so every voxel is covered and the last patch is shifted back inside the volume
rather than padded out. The geometry is a small frozen record (:class:`GridGeometry`) built by :func:`make_grid`;
``crop`` mode's ownership boundaries and the padding of a batch are pure functions of it. Nothing here imports
a sampler or an inference module.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from monai.transforms.croppad.functional import pad_nd

from ._shapes import TypeSpatialShape, resolve_patch_size, spec_length

__all__ = [
    "GridGeometry",
    "TypePaddingMode",
    "axis_corners",
    "check_overlap_fits",
    "check_pad_fits",
    "check_padding_mode",
    "crop_boundaries",
    "make_grid",
    "pad_batch",
    "resolve_overlap",
]

TypePaddingMode = str | float | None

#: Pad modes accepted by name: numpy's and torch's (MONAI's ``pad_nd`` dispatches to either).
PAD_MODES = frozenset(
    {"constant", "edge", "linear_ramp", "maximum", "mean", "median", "minimum", "reflect", "symmetric", "wrap"}
    | {"replicate", "circular"}
)


def resolve_overlap(patch_overlap: TypeSpatialShape, patch_size: Sequence[int]) -> tuple[int, ...]:
    """Overlap per axis for ``patch_size`` (any number of axes), checked against it.

    Args:
        patch_overlap: an int (same on every axis) or one int per axis of ``patch_size``; extra trailing values are
            accepted when they are all 0 and are dropped (TorchIO's convention: ``(4, 4, 0)`` for a 2-D patch).
        patch_size: the patch size per axis.

    Returns:
        The overlap as a tuple of Python ints, one per axis of ``patch_size``. Allocates nothing but the tuple.

    Raises:
        TypeError: a value that is not an integer.
        ValueError: a wrong number of values, or an overlap that is negative or not smaller than the patch.
    """
    if isinstance(patch_overlap, torch.Tensor | np.ndarray):
        patch_overlap = patch_overlap.tolist()
    ndim = len(patch_size)
    values = (patch_overlap,) * ndim if isinstance(patch_overlap, Integral | Real) else tuple(patch_overlap)
    if len(values) < ndim or any(v != 0 for v in values[ndim:]):
        raise ValueError(f"patch_overlap {patch_overlap!r} does not fit patch_size {tuple(patch_size)}.")
    for v in values:
        if isinstance(v, bool | np.bool_) or not isinstance(v, Integral):
            raise TypeError(f"patch_overlap must hold integers, got {patch_overlap!r}.")
    out = tuple(int(v) for v in values[:ndim])
    if any(o < 0 or o >= p for o, p in zip(out, patch_size)):
        raise ValueError(
            f"patch_overlap must satisfy 0 <= overlap < patch_size on every axis, got patch_overlap={out} "
            f"for patch_size={tuple(patch_size)}."
        )
    return out


def axis_corners(size: int, patch: int, overlap: int) -> tuple[int, ...]:
    """Patch corners along one axis: ``0, P-O, 2(P-O), ...`` below ``S-P``, then ``S-P``.

    Args:
        size: the axis length ``S`` (already padded), ``S >= P``.
        patch: the patch length ``P``.
        overlap: the overlap ``O``, ``0 <= O < P``.

    Returns:
        The increasing corners as a tuple of ints; consecutive corners are at most ``P - O`` apart.
    """
    last = size - patch
    return (*range(0, last, patch - overlap), last)


def crop_boundaries(corners: Sequence[int], patch: int) -> tuple[int, ...]:
    """Where ownership passes from one patch to the next along an axis (``crop`` mode).

    A voxel belongs to the patch whose centre is nearest; the boundary between corners ``a < b`` is
    ``(a + b + P) // 2``, which lies inside both patches whenever ``b - a <= P``.

    Args:
        corners: increasing corners of one axis (from :func:`axis_corners`).
        patch: the patch length ``P``.

    Returns:
        ``len(corners) - 1`` boundaries: patch ``j`` owns ``[boundary[j-1], boundary[j])`` (the first from 0, the last
        to the end of the axis).
    """
    return tuple((a + b + patch) // 2 for a, b in zip(corners[:-1], corners[1:]))


@dataclass(frozen=True)
class GridGeometry:
    """The regular grid laid over one volume.

    Attributes:
        spatial_shape: the input's spatial shape (before padding).
        patch_size: patch size per axis.
        patch_overlap: overlap per axis.
        pad_before: voxels padded before the input on each axis.
        pad_after: voxels padded after the input on each axis.
        corners: per axis, the patch corners in padded coordinates.
    """

    spatial_shape: tuple[int, ...]
    patch_size: tuple[int, ...]
    patch_overlap: tuple[int, ...]
    pad_before: tuple[int, ...]
    pad_after: tuple[int, ...]
    corners: tuple[tuple[int, ...], ...]

    @property
    def padded_shape(self) -> tuple[int, ...]:
        """Spatial shape of the padded volume the grid is laid on."""
        return tuple(s + a + b for s, a, b in zip(self.spatial_shape, self.pad_before, self.pad_after))

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Number of patches along each axis."""
        return tuple(len(c) for c in self.corners)

    @property
    def num_patches(self) -> int:
        """Number of patches in the grid."""
        return int(np.prod(self.grid_shape))

    @property
    def is_padded(self) -> bool:
        """Whether any axis is padded."""
        return any(self.pad_before) or any(self.pad_after)

    @property
    def pad_widths(self) -> list[tuple[int, int]]:
        """``(before, after)`` per dim of a channel-first image (the channel dim unpadded), as MONAI's pads take."""
        return [(0, 0), *zip(self.pad_before, self.pad_after)]

    def corner_array(self) -> np.ndarray:
        """Every patch corner, ``(num_patches, ndim)`` int64, in C order of the grid (last axis fastest)."""
        return np.asarray(list(itertools.product(*self.corners)), dtype=np.int64).reshape(-1, len(self.corners))


def make_grid(
    spatial_shape: Sequence[int], patch_size: Sequence[int], patch_overlap: Sequence[int], pad_border: bool
) -> GridGeometry:
    """Lay the grid over a volume, padding where asked or needed.

    Args:
        spatial_shape: the input's spatial shape.
        patch_size: patch size per axis (as many values as ``spatial_shape``).
        patch_overlap: overlap per axis, already checked by :func:`resolve_overlap`.
        pad_border: pad every side by ``O // 2`` so that border voxels get full blending. Independently of it, an
            axis shorter than the patch is padded (as evenly as possible on both sides) up to the patch.

    Returns:
        The :class:`GridGeometry`. Allocates only small tuples.
    """
    before, after = [], []
    for s, p, o in zip(spatial_shape, patch_size, patch_overlap):
        margin = o // 2 if pad_border else 0
        extra = max(p - (s + 2 * margin), 0)
        before.append(margin + extra // 2)
        after.append(margin + extra - extra // 2)
    padded = [s + a + b for s, a, b in zip(spatial_shape, before, after)]
    return GridGeometry(
        spatial_shape=tuple(int(s) for s in spatial_shape),
        patch_size=tuple(patch_size),
        patch_overlap=tuple(patch_overlap),
        pad_before=tuple(before),
        pad_after=tuple(after),
        corners=tuple(axis_corners(s, p, o) for s, p, o in zip(padded, patch_size, patch_overlap)),
    )


def check_padding_mode(padding_mode: TypePaddingMode) -> tuple[str, dict[str, Any]] | None:
    """``(mode, pad kwargs)`` for MONAI's ``pad_nd``/``pad_func`` from a user's ``padding_mode``, or ``None``.

    Raises:
        ValueError: an unknown mode name, or a value that is neither a name, a number nor ``None``.
    """
    if padding_mode is None:
        return None
    if isinstance(padding_mode, str):
        if padding_mode not in PAD_MODES:
            raise ValueError(
                f"padding_mode must be None, a number or one of {sorted(PAD_MODES)}, got {padding_mode!r}."
            )
        return padding_mode, {}
    if isinstance(padding_mode, Real) and not isinstance(padding_mode, bool | np.bool_):
        return "constant", {"value": float(padding_mode)}
    raise ValueError(f"padding_mode must be None, a number or a pad mode name, got {padding_mode!r}.")


def check_pad_fits(mode: str, geometry: GridGeometry) -> None:
    """Raise if torch's ``reflect``/``circular`` padding cannot pad this grid's volume.

    Raises:
        ValueError: a pad at least as large as the axis (``reflect``) or larger (``circular``), naming both.
    """
    limit = {"reflect": 0, "circular": 1}.get(mode)
    if limit is None:
        return
    for axis, (size, a, b) in enumerate(zip(geometry.spatial_shape, geometry.pad_before, geometry.pad_after)):
        if max(a, b) >= size + limit:
            raise ValueError(
                f"padding_mode {mode!r} cannot pad axis {axis} of size {size} by ({a}, {b}); use another mode "
                "(e.g. 'symmetric' or 'edge') or a smaller patch."
            )


def pad_batch(images: torch.Tensor, geometry: GridGeometry, mode: str = "constant", **kwargs: Any) -> torch.Tensor:
    """Pad a ``(B, C, *spatial)`` batch as ``geometry`` says (a no-op returning ``images`` when nothing is padded).

    Raises:
        ValueError: a ``reflect``/``circular`` pad larger than the axis (see :func:`check_pad_fits`).

    Args:
        images: the batch; never modified.
        geometry: the grid, whose ``spatial_shape`` matches ``images``.
        mode, kwargs: pad mode (numpy or torch name) and its arguments (``value`` for ``constant``).

    Returns:
        The padded batch (a plain tensor). Allocates one padded copy of ``images`` when padding.
    """
    if not geometry.is_padded:
        return images
    check_pad_fits(mode, geometry)
    b, c = images.shape[:2]
    flat = images.reshape(b * c, *images.shape[2:])
    return torch.as_tensor(pad_nd(flat, geometry.pad_widths, mode, **kwargs)).reshape(b, c, *geometry.padded_shape)


def check_overlap_fits(patch_size: TypeSpatialShape, patch_overlap: TypeSpatialShape) -> None:
    """Check ``patch_overlap`` against ``patch_size`` before the image's rank is known.

    The pair is valid when some rank accepts it (see :func:`~monai_patchplug._shapes.resolve_patch_size` and
    :func:`resolve_overlap`); only ranks up to the longer of the two sequences (1 for two ints) can, so those are
    tried. Allocates nothing.

    Raises:
        TypeError, ValueError: as :func:`resolve_overlap`, when no rank accepts the pair (an error about the overlap
            is preferred to one about the patch size).
    """
    lengths = [spec_length(patch_size) or 1, spec_length(patch_overlap) or 1]
    error: Exception | None = None
    for ndim in range(1, max(lengths) + 1):
        try:
            resolve_overlap(patch_overlap, resolve_patch_size(patch_size, ndim))
            return
        except (TypeError, ValueError) as err:
            error = error if error is not None and "patch_overlap" in str(error) else err
    assert error is not None
    raise error
