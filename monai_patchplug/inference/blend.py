"""Blending: how the network's output patches of one grid go back into one volume.

Everything here depends only on the grid, the overlap mode and the network's output patch shape; it imports no
front end (:class:`~monai_patchplug.GridAggregator`, :class:`~monai_patchplug.GridInferer`) and no sink. A new
overlap mode goes here (its 1-D window in :mod:`.windows`); :class:`BlendPlan` knows how to add a batch of patches
into an accumulator (a whole volume, or a slab of its first spatial axis) and how to finish it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..grid import GridGeometry, crop_boundaries
from .windows import WINDOWS, axis_windows, grid_normaliser, outer_window

__all__ = ["BlendPlan", "OVERLAP_MODES", "accumulator_dtype", "check_overlap_mode", "zeros_volume"]

#: The overlap modes: ``crop`` (each voxel from the patch whose centre is nearest), and the blending modes.
OVERLAP_MODES = ("crop", *WINDOWS)

#: the most elements of the per-row factors :meth:`BlendPlan.normalise_` builds at a time (1 MiB of float32)
_NORMALISE_CHUNK = 1 << 18


def zeros_volume(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
    """A zero-filled accumulator (allocates the volume).

    ``torch.zeros`` writes every page once, in order, before the accumulation touches it. A ``numpy.zeros`` (calloc)
    volume was tried: it is zeroed lazily, but numpy asks for transparent huge pages, and where each volume is new
    memory (a cohort of shapes, outputs kept) their first touches, scattered in patch order inside the accumulation,
    stall on the kernel's page compaction (``benchmarks/inference.py``'s cohort rows: 1.5x slower).
    """
    return torch.zeros(tuple(shape), dtype=dtype, device=torch.device("cpu") if device is None else device)


def check_overlap_mode(overlap_mode: str, who: str) -> str:
    """``overlap_mode`` if it is one of :data:`OVERLAP_MODES`; ``who`` is the public class named in the message.

    Raises:
        ValueError: an unknown mode, naming it and the known ones.
    """
    if overlap_mode not in OVERLAP_MODES:
        raise ValueError(f"{who}: overlap_mode must be one of {OVERLAP_MODES}, got {overlap_mode!r}.")
    return overlap_mode


def accumulator_dtype(overlap_mode: str, dtype: torch.dtype) -> torch.dtype:
    """dtype in which outputs of ``dtype`` are aggregated.

    ``crop`` copies values and keeps ``dtype``. The blending modes accumulate weighted sums: in float64 for float64
    and for integers wider than 16 bits (float32 would round them), else in float32 (never in half precision or an
    integer type, which would overflow or round at every add).
    """
    if overlap_mode == "crop":
        return dtype
    if dtype == torch.float64 or (not dtype.is_floating_point and dtype != torch.bool and torch.iinfo(dtype).bits > 16):
        return torch.float64
    return torch.float32


class BlendPlan:
    """How the patches of one grid, as output by a network, go back into one output volume.

    A network output patch of spatial shape ``Q`` for an input patch ``P`` is scaled by ``Q / P`` per axis: a patch at
    input corner ``c`` lands at output corner ``c * Q // P`` (exact when the product is a multiple of ``P``), in an
    output volume of ``S * Q // P`` voxels, where ``S`` is the unpadded input size; the padding is cropped away.
    With a ``margin`` ``m`` (valid convolutions), ``Q = P - 2m`` instead and the output patch lands where it belongs,
    at ``c + m``, in a volume of the input's shape.

    ``average`` and ``hann`` are separable: the summed weights at a voxel are the product of per-axis sums, so each
    patch is added times one raw window shared by every patch (``average``: no multiply at all), and
    :meth:`normalise_` multiplies the finished accumulator by the outer product of per-axis reciprocal sums, a
    few rows at a time: no weight or count volume, and no weight built per patch (on grids of a few patches per
    axis almost every patch's normalised weight is its own, so building them cost more than the pass).
    ``gaussian`` (MONAI's importance map, floored as a whole) is not separable and keeps one single-channel volume
    of summed weights, divided out by :meth:`normalise_`.

    Args:
        geometry: the grid.
        overlap_mode: one of :data:`OVERLAP_MODES`.
        out_patch: spatial shape of one output patch.
        device: where the windows and normalisers live (the accumulator's device).
        dtype: the accumulator's dtype (:func:`accumulator_dtype`); patches are added in it.
        sigma_scale: the ``gaussian`` window's standard deviation as a fraction of the patch size (one value or
            one per axis), as MONAI's ``sigma_scale``.
        who: the public class named in error messages.
        margin: per axis, the voxels a valid-convolution network drops on each side of the patch (``None``: the
            output patch is a scaled patch).

    Raises:
        ValueError: an unknown mode, an ``out_patch`` of another rank than the grid, one that scales the volume to
            nothing or, with ``margin``, that is not the patch less the margin on each side; a window that is not
            strictly positive (see :func:`~.windows.axis_windows`).

    Allocates per-axis 1-D tensors, the product of the reciprocal sums of all axes but the first (``average``/
    ``hann``), one patch-sized weight (``hann``, ``gaussian``) and, for ``gaussian``, its single-channel volume of
    summed weights.
    """

    def __init__(
        self,
        geometry: GridGeometry,
        overlap_mode: str,
        out_patch: Sequence[int],
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        sigma_scale: float | Sequence[float] = 0.125,
        who: str = "GridInferer",
        margin: Sequence[int] | None = None,
    ) -> None:
        self.overlap_mode = check_overlap_mode(overlap_mode, who)
        self.grid_shape = geometry.grid_shape
        if len(out_patch) != len(geometry.patch_size):
            raise ValueError(
                f"{who}: output patch shape {tuple(out_patch)} does not fit the grid's {geometry.patch_size}."
            )
        self.out_patch = tuple(int(q) for q in out_patch)
        self.device, self.dtype = torch.device("cpu") if device is None else torch.device(device), dtype
        self.crop = overlap_mode == "crop"
        scale, shift = self._placement(geometry.patch_size, margin, who)
        #: per axis, the output start of each patch in padded output coordinates
        self.starts = [[c * q // p + m for c in corners] for corners, (q, p), m in zip(geometry.corners, scale, shift)]
        padded = [s * q // p for s, (q, p) in zip(geometry.padded_shape, scale)]
        #: where the unpadded volume begins in padded output coordinates
        self.offset = [b * q // p for b, (q, p) in zip(geometry.pad_before, scale)]
        #: spatial shape of the output volume
        self.out_shape = tuple(s * q // p for s, (q, p) in zip(geometry.spatial_shape, scale))
        if min(self.out_shape) < 1:
            raise ValueError(f"{who}: output patches of shape {self.out_patch} scale the volume to {self.out_shape}.")
        #: per axis and grid position, ``(lo, hi, start)``: the output range the patch writes (``crop``: owns) and
        #: where the patch begins, in unpadded output coordinates
        self.spans: list[list[tuple[int, int, int]]] = []
        axes = zip(
            geometry.corners, geometry.patch_size, self.out_patch, self.starts, scale, self.offset, self.out_shape
        )
        for corners, p, q, starts, ratio, off, n in axes:
            begin = [s - off for s in starts]
            ranges = self._ownership(corners, p, ratio, off, n) if self.crop else [(b, b + q) for b in begin]
            self.spans.append([(min(max(lo, 0), n), min(max(hi, 0), n), b) for (lo, hi), b in zip(ranges, begin)])
        #: per axis and grid position, the destination and source slices in a whole-volume accumulator
        self._slices = [[(slice(lo, hi), slice(lo - b, hi - b)) for lo, hi, b in spans] for spans in self.spans]
        #: the patch weight (``None``: equal weights, or ``crop``)
        self.weight: torch.Tensor | None = None
        #: ``gaussian``: the reciprocal of the summed weights, as one single-channel volume
        self.inv_norm_volume: torch.Tensor | None = None
        #: ``average``/``hann``: the reciprocal of the summed weights along the first axis, and over all the others
        self.inv_rows: torch.Tensor | None = None
        self.inv_plane: torch.Tensor | None = None
        if self.crop:
            return
        try:
            windows = axis_windows(overlap_mode, self.out_patch, sigma_scale, dtype=torch.float64, device=device)
        except ValueError as err:
            raise ValueError(f"{who}: {err}") from None
        if overlap_mode != "average":
            self.weight = outer_window(windows).to(dtype)
        if overlap_mode == "gaussian":
            self._gaussian_normaliser(geometry, dtype, device)
        else:
            inv = [
                grid_normaliser(w, starts, length)[off : off + n].reciprocal_().to(dtype)
                for w, starts, length, off, n in zip(windows, self.starts, padded, self.offset, self.out_shape)
            ]
            self.inv_rows, self.inv_plane = inv[0], outer_window(inv[1:]) if len(inv) > 1 else None

    def _gaussian_normaliser(self, geometry: GridGeometry, dtype: torch.dtype, device: torch.device | None) -> None:
        """MONAI's importance map floors the product of the axis windows as a whole (at ``max(min, 1e-3)``), which is
        what lets MONAI's outputs be reproduced, but makes the summed weights non-separable: they are summed over
        the grid into one single-channel volume (MONAI keeps the same count map). Allocates that volume."""
        assert self.weight is not None
        self.weight.clamp_(min=max(float(self.weight.min()), 1e-3))
        norm = zeros_volume((1, *self.out_shape), dtype, device)
        self.add_constant(norm, 1.0, list(np.ndindex(*geometry.grid_shape)))
        self.inv_norm_volume = norm.reciprocal_()

    def _placement(
        self, patch: Sequence[int], margin: Sequence[int] | None, who: str
    ) -> tuple[list[tuple[int, int]], list[int]]:
        """Per axis, the ``(num, den)`` that scales input to output coordinates and the shift of a patch's output
        start from its scaled corner."""
        if not margin or not any(margin):
            return list(zip(self.out_patch, patch)), [0] * len(patch)
        expected = tuple(p - 2 * m for p, m in zip(patch, margin))
        if self.out_patch != expected:
            raise ValueError(
                f"{who}: with output_margin={tuple(margin)} the network must return patches of spatial shape "
                f"{expected} for patches of {tuple(patch)}, got {self.out_patch}."
            )
        return [(1, 1)] * len(patch), [int(m) for m in margin]

    @staticmethod
    def _ownership(
        corners: Sequence[int], p: int, ratio: tuple[int, int], offset: int, n: int
    ) -> list[tuple[int, int]]:
        """Per patch on one axis, the ``[lo, hi)`` output range it owns in ``crop`` mode (unpadded coordinates); the
        boundaries between input patches of size ``p`` are scaled by ``ratio`` into output coordinates."""
        num, den = ratio
        cuts = [0] + [b * num // den - offset for b in crop_boundaries(corners, p)] + [n]
        return list(zip(cuts[:-1], cuts[1:]))

    def row_range(self, j: int) -> tuple[int, int]:
        """Output rows ``[lo, hi)`` of the first spatial axis that patches of grid row ``j`` write (maybe empty)."""
        lo, hi, _ = self.spans[0][j]
        return lo, max(lo, hi)

    def add(
        self,
        out: torch.Tensor,
        patches: torch.Tensor,
        grid_index: Sequence[Sequence[int]],
        *,
        base: int = 0,
    ) -> None:
        """Add (blend modes) or copy (``crop``) ``patches`` into ``out`` in place.

        Args:
            out: ``(..., *out_shape)`` accumulator, of :func:`accumulator_dtype`; or, with ``base``, a slab
                ``(..., rows, *out_shape[1:])`` holding output rows ``[base, base + rows)`` of the first spatial axis
                (the parts of the patches outside the slab are left out).
            patches: ``(n, ..., *out_patch)`` on ``out``'s device, in ``out``'s dtype.
            grid_index: ``n`` rows of per-axis patch indices into the grid's corners.
            base: the output row where ``out`` begins along the first spatial axis.

        Allocates nothing (``crop``: one patch-sized temporary only when the dtypes differ).
        """
        top = base + out.shape[out.ndim - len(self.out_shape)]
        for patch, index in zip(patches, grid_index):
            box = self._box(index, base, top)
            if box is None:
                continue
            dst, src = box
            target, values = out[(..., *dst)], patch[(..., *src)]
            if self.crop:
                target.copy_(values)
            elif self.weight is not None:
                target.addcmul_(values, self.weight[src])
            else:
                target.add_(values)

    def add_constant(
        self, out: torch.Tensor, value: float, grid_index: Sequence[Sequence[int]], *, base: int = 0
    ) -> None:
        """Add patches whose every voxel is ``value`` (the patches a region of interest skips, or ones for a sum of
        weights) at ``grid_index`` into ``out`` (a volume or slab, as :meth:`add`). Allocates nothing (the patches
        are one expanded scalar)."""
        if not grid_index:
            return
        channels = out.shape[out.ndim - len(self.out_shape) - 1]
        patches = torch.full((), value, dtype=out.dtype, device=out.device)
        self.add(out, patches.expand(len(grid_index), channels, *self.out_patch), grid_index, base=base)

    def _box(self, index: Sequence[int], base: int, top: int) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
        """Where the patch at grid ``index`` goes in an accumulator holding output rows ``[base, top)``: the
        destination and source slices per spatial axis, or ``None`` when it has no voxel there."""
        dst, src = [], []
        for axis, j in enumerate(index):
            lo, hi, start = self.spans[axis][j]
            if lo >= hi:
                return None
            if axis == 0 and (base > lo or top < hi):  # a slab: the part of the patch in it
                lo, hi = max(lo, base), min(hi, top)
                if lo >= hi:
                    return None
                dst.append(slice(lo - base, hi - base))
                src.append(slice(lo - start, hi - start))
            else:
                to, of = self._slices[axis][j]
                dst.append(slice(to.start - base, to.stop - base) if axis == 0 and base else to)
                src.append(of)
        return tuple(dst), tuple(src)

    def normalise_(self, out: torch.Tensor, *, base: int = 0) -> torch.Tensor:
        """Finish ``out`` (``(..., *out_shape)``, or a slab of it from output row ``base`` as in :meth:`add`) in place
        and return it: divide by the summed weights (``crop`` copies, so it is left as it is).

        ``average``/``hann`` multiply a few rows at a time by the outer product of the reciprocal per-axis sums
        (allocating at most :data:`_NORMALISE_CHUNK` elements for it); ``gaussian`` by its volume of reciprocals.
        """
        rows = out.shape[out.ndim - len(self.out_shape)]
        if self.inv_norm_volume is not None:
            out.mul_(self.inv_norm_volume[:, base : base + rows].to(out.dtype))
        elif self.inv_rows is not None:
            inv_rows = self.inv_rows[base : base + rows].to(out.dtype)
            if self.inv_plane is None:
                return out.mul_(inv_rows)
            plane = self.inv_plane.to(out.dtype)
            step = max(1, _NORMALISE_CHUNK // plane.numel())
            factor = torch.empty((min(step, rows), *plane.shape), dtype=out.dtype, device=out.device)
            shape = (-1, *[1] * plane.ndim)
            for a in range(0, rows, step):
                b = min(a + step, rows)
                torch.mul(inv_rows[a:b].view(shape), plane, out=factor[: b - a])
                out[(..., slice(a, b), *[slice(None)] * plane.ndim)].mul_(factor[: b - a])
        return out
