"""Regions of interest: which patches of a grid hold at least one voxel of a mask.

A patch is run iff its box, in the input's voxel grid (the grid's padding clipped away), contains a nonzero mask
voxel. The test is exact and cheap: the boxes' start and end rows cut every axis into at most ``2 n + 1`` intervals;
the mask is reduced to one "any" per cell of that partition (``numpy.logical_or.reduceat``, axis by axis, so the
largest temporary is one boolean slab of cells along the first axis), and each box's count of occupied cells comes
from a summed-area table over that small cell array.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from ..grid import GridGeometry

__all__ = ["patches_in_roi", "resolve_roi_mask", "run_mask"]


def run_mask(roi_mask: Any, geometry: GridGeometry, n_items: int, who: str) -> np.ndarray:
    """``(n_items, *grid_shape)`` booleans: the patches holding a voxel of ``roi_mask`` (all when it is ``None``).

    Raises:
        ValueError: a mask of another shape (see :func:`resolve_roi_mask`).
    """
    if roi_mask is None:
        return np.ones((n_items, *geometry.grid_shape), dtype=bool)
    masks, factors = resolve_roi_mask(roi_mask, n_items, geometry.spatial_shape, who)
    rows = [patches_in_roi(m, geometry, factors) for m in masks]
    return np.stack(rows * n_items if len(rows) == 1 else rows)


def resolve_roi_mask(
    roi_mask: Any, n_items: int, spatial_shape: Sequence[int], who: str
) -> tuple[np.ndarray, tuple[int, ...]]:
    """The mask as booleans, ``(1 or n_items, *mask_spatial)``, and the input voxels per mask voxel on each axis.

    Args:
        roi_mask: a tensor, MetaTensor, array or array-like of shape ``m``, ``(1, *m)`` (shared by every batch item)
            or ``(n_items, 1, *m)`` (one per item), where ``m`` is the input's spatial shape or a coarser one that
            divides it on every axis (a tissue mask at 1/32: each mask voxel stands for its block of input voxels);
            any nonzero value is inside.
        n_items: the batch size.
        spatial_shape: the input's spatial shape.
        who: the class named in the messages.

    Returns:
        A boolean numpy array and the per-axis factors; allocates one byte per mask voxel (the mask is read whole:
        a coarse mask keeps that small; the full-resolution mask is never built).

    Raises:
        ValueError: a mask whose shape neither equals nor divides the input's, naming both.
    """
    if isinstance(roi_mask, MetaTensor):
        roi_mask = roi_mask.as_tensor()
    mask = (roi_mask != 0).cpu().numpy() if isinstance(roi_mask, torch.Tensor) else np.asarray(roi_mask[...]) != 0
    spatial = tuple(int(s) for s in spatial_shape)
    ndim, shape = len(spatial), tuple(mask.shape)
    if len(shape) == ndim:
        mask = mask[None]
    elif len(shape) == ndim + 2 and shape[1] == 1 and shape[0] in (1, n_items):
        mask = mask[:, 0]
    elif not (len(shape) == ndim + 1 and shape[0] == 1):
        mask = None
    if mask is not None and all(m > 0 and s % m == 0 for s, m in zip(spatial, mask.shape[1:])):
        return mask, tuple(s // m for s, m in zip(spatial, mask.shape[1:]))
    raise ValueError(
        f"{who}: roi_mask of shape {shape} does not fit the input's spatial shape {spatial} (batch of {n_items}): "
        f"expected m, (1, *m) or ({n_items}, 1, *m) where m is {spatial} or divides it on every axis."
    )


def patches_in_roi(mask: np.ndarray, geometry: GridGeometry, factors: Sequence[int] | None = None) -> np.ndarray:
    """Which patches of ``geometry`` contain a nonzero voxel of ``mask``.

    Args:
        mask: booleans of the input's (unpadded) spatial shape, or of a shape that divides it by ``factors``.
        geometry: the grid; its padding lies outside the mask.
        factors: per axis, the input voxels one mask voxel stands for (``None``: 1).

    Returns:
        Booleans of shape ``geometry.grid_shape``. Allocates a boolean array of (cells along axis 0) x the other axes,
        then arrays of the size of the cell grid only.
    """
    factors = [1] * mask.ndim if factors is None else factors
    lows, highs, cuts = [], [], []
    for size, corners, p, pad, f in zip(
        geometry.spatial_shape, geometry.corners, geometry.patch_size, geometry.pad_before, factors
    ):
        c = np.asarray(corners, dtype=np.int64) - pad
        lo, hi = np.clip(c, 0, size) // f, -(-np.clip(c + p, 0, size) // f)  # the mask voxels the box reaches
        size //= f
        edges = np.unique(np.concatenate([[0], lo, hi]))
        edges = edges[edges < size]
        cuts.append(edges)
        lows.append(np.searchsorted(edges, lo))
        highs.append(np.searchsorted(edges, hi))  # an end at ``size`` maps to the number of cells
    cells = mask
    for axis, edges in enumerate(cuts):
        cells = np.logical_or.reduceat(cells, edges, axis=axis)
    table = np.zeros(tuple(n + 1 for n in cells.shape), dtype=np.int64)
    summed = cells.astype(np.int64)
    for axis in range(summed.ndim):
        summed = summed.cumsum(axis)
    table[(slice(1, None),) * summed.ndim] = summed
    count = np.zeros(geometry.grid_shape, dtype=np.int64)
    ndim = len(cuts)
    for bits in itertools.product((0, 1), repeat=ndim):
        index = np.ix_(*[highs[a] if bit else lows[a] for a, bit in enumerate(bits)])
        count += (-1) ** (ndim - sum(bits)) * table[index]
    return count > 0
