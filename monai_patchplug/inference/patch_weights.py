"""The normalised weight of each patch of a regular grid, for the separable blending modes (``average``, ``hann``).

Over a Cartesian grid the summed weights at a voxel are the product of one sum per axis, so the weight of a patch
divided by them is an outer product of 1-D vectors: per axis, the window divided by that axis' sums over the
patch's span. Grid positions whose vectors are equal (all interior positions of an evenly spaced axis) share one
*class*; a patch weight is named by its classes and the part of the patch that is used, and built once per name:
a number when every vector is constant (``average`` where overlaps are even), else a tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .windows import grid_normaliser

__all__ = ["PatchWeights"]

#: the least elements of a plan's store of built weights (1 MiB in float32); it holds one whole patch weight at
#: least. A larger store buys little: near the volume's borders (the shifted last patch included) almost every
#: patch of a grid over a volume of a few patches per axis has a weight of its own (125 of 150 on 180x200x170 with
#: 64^3 patches, overlap 32), so a weight is built for most patches whatever the store keeps.
_STORE_ELEMENTS = 1 << 18


class PatchWeights:
    """Patch weights divided by the grid's summed weights.

    Args:
        windows: per axis, the 1-D window of the patch (float64).
        starts: per axis, the start of each patch in padded output coordinates.
        lengths: per axis, the padded output length.
        dtype: the weights' dtype (the accumulator's).

    Allocates per axis one vector per class, and, at the first weight, a store of ``max(2^18, patch)`` elements for
    built weights (1 MiB for 64^3 float32 patches), emptied when full.
    """

    def __init__(
        self,
        windows: Sequence[torch.Tensor],
        starts: Sequence[Sequence[int]],
        lengths: Sequence[int],
        dtype: torch.dtype,
    ) -> None:
        self.dtype = dtype
        self.device = windows[0].device
        np_dtype = np.float32 if dtype == torch.bfloat16 else torch.empty((), dtype=dtype).numpy().dtype
        #: per axis, the class of each grid position, and the normalised vector of each class
        self.classes: list[list[int]] = []
        self.vectors: list[list[torch.Tensor]] = []
        for w, axis_starts, length in zip(windows, starts, lengths):
            inv = 1.0 / grid_normaliser(w, axis_starts, length).cpu().numpy()
            window = w.cpu().numpy()
            known: dict[bytes, int] = {}
            vectors: list[np.ndarray] = []
            classes = []
            for s in axis_starts:
                v = (window * inv[s : s + len(window)]).astype(np_dtype)
                c = known.setdefault(v.tobytes(), len(known))
                if c == len(vectors):
                    vectors.append(v)
                classes.append(c)
            self.classes.append(classes)
            self.vectors.append([torch.from_numpy(v).to(self.device, dtype) for v in vectors])
        self._parts: dict[tuple[int, int, int, int], tuple[torch.Tensor, float | None]] = {}
        self._built: dict[tuple, torch.Tensor] = {}
        self._store: torch.Tensor | None = None
        self._capacity = max(_STORE_ELEMENTS, math.prod(len(w) for w in windows))
        self._used = 0

    def _part(self, axis: int, j: int, src: slice) -> tuple[tuple[int, int, int, int], torch.Tensor, float | None]:
        """The name, vector and constant value (``None`` if it varies) of grid position ``j``'s vector on ``axis``
        over ``src``."""
        key = (axis, self.classes[axis][j], src.start, src.stop)
        part = self._parts.get(key)
        if part is None:
            v = self.vectors[axis][key[1]][src]
            part = self._parts[key] = (v, float(v[0]) if bool((v == v[0]).all()) else None)
        return (key, *part)

    def get(self, index: Sequence[int], src: Sequence[slice], fresh: bool = False) -> torch.Tensor | float:
        """The weight of the patch at grid ``index`` over its part ``src`` (per-axis slices of the patch).

        A number when it is constant there; else a tensor of the part's shape, kept in the store until the store
        is full (then the store is emptied and refilled). Allocates the store at the first weight, and nothing else
        but the small per-axis parts; with ``fresh``, a new tensor for every weight that is not a number instead
        (for autograd to keep for the backward pass: the store is overwritten in place).
        """
        parts = [self._part(axis, j, s) for axis, (j, s) in enumerate(zip(index, src))]
        if all(c is not None for _, _, c in parts):
            return math.prod(c for _, _, c in parts)
        vectors = [v for _, v, _ in parts]
        shape = [len(v) for v in vectors]
        if fresh:
            return _outer(vectors, torch.empty(shape, dtype=self.dtype, device=self.device))
        key = tuple(name for name, _, _ in parts)
        weight = self._built.get(key)
        if weight is not None:
            return weight
        numel = math.prod(shape)
        if self._store is None or self._used + numel > self._store.numel():
            if self._store is None:
                self._store = torch.empty(self._capacity, dtype=self.dtype, device=self.device)
            self._built = {}
            self._used = 0
        weight = self._built[key] = _outer(vectors, self._store[self._used : self._used + numel].view(shape))
        self._used += numel
        return weight


def _outer(vectors: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """The outer product of ``vectors``, written into ``out`` (of their lengths' shape); returns ``out``.

    On the CPU the product is written by numpy through a view of ``out``: a broadcast multiply whose innermost axis
    is a stride-0 patch row is several times faster there than torch's (``benchmarks/inference.py``'s cohort rows
    rebuild a weight for most patches). Allocates the small outer product of all vectors but the last.
    """
    if len(vectors) == 1:
        return out.copy_(vectors[0])
    if out.device.type == "cpu" and out.dtype != torch.bfloat16:
        arrays = [v.numpy() for v in vectors]
        plane = arrays[0]
        for a in arrays[1:-1]:
            plane = np.multiply.outer(plane, a)
        np.multiply(plane[..., None], arrays[-1], out=out.numpy())
        return out
    plane = vectors[0]
    for v in vectors[1:-1]:
        plane = plane[..., None] * v
    return torch.mul(plane[..., None], vectors[-1], out=out)
