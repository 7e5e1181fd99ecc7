"""Our overlap modes as MONAI :class:`~monai.inferers.Merger` subclasses, for :class:`~monai.inferers.PatchInferer`.

MONAI's ``PatchInferer`` cuts an image with a splitter (``SlidingWindowSplitter``, ``WSISlidingWindowSplitter`` for
whole-slide images read tile by tile), runs the network, and hands every output patch with its start corner to a
merger: ``merger.aggregate(values, location)`` per patch, then ``merger.finalize()``. The classes here blend those
patches as :class:`~monai_patchplug.GridInferer` does, but for patches at any locations: nothing assumes a regular
grid, and on a regular grid the result is :class:`~monai_patchplug.GridInferer`'s to float rounding.

Common to all of them:

- A location is the patch's start corner in the output's voxels (``PatchInferer`` scales the splitter's corner by the
  network's output/input size ratio). Patches may stick out of the output on any side (a splitter that pads, a
  negative ``offset``): the part outside is left out. Voxels that no patch reaches are 0.
- Only the ``cropped_shape`` part of ``merged_shape`` is kept (the rest is the splitter's padding, which
  ``finalize`` would crop away): the output is allocated at its final size, at the first ``aggregate``, on ``device``
  (default: the first patch's device).
- ``finalize`` returns the output tensor itself (no copy); calling it again returns the same tensor, and
  ``aggregate`` after it raises.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any, ClassVar

import numpy as np
import torch
from monai.inferers import Merger

from .blend import accumulator_dtype
from .options import check_device
from .windows import axis_windows, grid_normaliser, outer_window

__all__ = ["CropMerger", "GaussianMerger", "HannMerger"]

TypeBox = tuple[tuple[slice, ...], tuple[slice, ...]]


def _check_shape(shape: Any, name: str, who: str) -> tuple[int, ...]:
    """``shape`` as a tuple of positive Python ints with a batch, a channel and at least one spatial dim."""
    if isinstance(shape, torch.Tensor | np.ndarray):
        shape = shape.tolist()
    if isinstance(shape, str) or not isinstance(shape, Sequence):
        raise TypeError(f"{who}: {name} must be a sequence of ints (B, C, *spatial), got {shape!r}.")
    if any(isinstance(v, bool | np.bool_) or not isinstance(v, Integral) for v in shape):
        raise TypeError(f"{who}: {name} must hold ints, got {tuple(shape)!r}.")
    out = tuple(int(v) for v in shape)
    if len(out) < 3 or min(out) < 1:
        raise ValueError(
            f"{who}: {name} must be (B, C, *spatial) with at least one spatial dim and every size >= 1, got {out}."
        )
    return out


def _check_dtype(dtype: Any, who: str, floating: bool) -> torch.dtype | None:
    """``dtype`` (``None`` stays ``None``); a blending merger needs a floating dtype."""
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{who}: value_dtype must be None or a torch.dtype, got {dtype!r}.")
    if floating and not dtype.is_floating_point:
        raise TypeError(f"{who}: value_dtype must be a floating dtype to hold weighted sums, got {dtype}.")
    return dtype


class _PatchMerger(Merger):
    """What our mergers share: argument checks, the output allocated at its cropped size, boxes clipped to it.

    Subclasses implement :meth:`_prepare` (allocate what they keep besides the output), :meth:`_add` (one patch) and
    :meth:`_finish` (normalise the output in place).
    """

    who: ClassVar[str] = "Merger"
    #: whether the output holds weighted sums (then ``value_dtype`` must be floating)
    blends: ClassVar[bool] = True

    def __init__(
        self,
        merged_shape: Sequence[int],
        cropped_shape: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        value_dtype: torch.dtype | None = None,
    ) -> None:
        merged = _check_shape(merged_shape, "merged_shape", self.who)
        cropped = merged if cropped_shape is None else _check_shape(cropped_shape, "cropped_shape", self.who)
        if len(cropped) != len(merged) or cropped[:2] != merged[:2] or any(c > m for c, m in zip(cropped, merged)):
            raise ValueError(
                f"{self.who}: cropped_shape {cropped} must have merged_shape's {merged} batch and channel sizes and "
                "no spatial size above it."
            )
        super().__init__(merged_shape=merged, cropped_shape=cropped, device=check_device(device, "device", self.who))
        self.value_dtype = _check_dtype(value_dtype, self.who, floating=self.blends)
        self.spatial_shape = cropped[2:]
        #: the output, ``cropped_shape``; allocated by the first :meth:`aggregate`
        self.values: torch.Tensor | None = None

    def aggregate(self, values: torch.Tensor, location: Sequence[int]) -> None:
        """Add one output patch whose first voxel is at ``location``.

        Args:
            values: ``(B, C, *patch)``: ``B`` and ``C`` as ``merged_shape``'s; any patch size, any dtype (cast to the
                output's), any device (moved to the output's).
            location: the patch's start corner, one int per spatial dim; the patch may reach outside the output.

        Raises:
            ValueError: after :meth:`finalize`; a patch whose rank, batch or channel size does not fit, a location
                of another length.
            TypeError: ``values`` not a tensor, a location that is not a sequence of ints.

        The first call allocates the output (and what the merger keeps besides it, see the class).
        """
        if self.is_finalized:
            raise ValueError(f"{self.who} is already finalized; create a new one to aggregate more patches.")
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"{self.who}: values must be a torch.Tensor (B, C, *spatial), got {type(values).__name__}.")
        if values.ndim != len(self.cropped_shape) or tuple(values.shape[:2]) != self.cropped_shape[:2]:
            raise ValueError(
                f"{self.who}: values of shape {tuple(values.shape)} do not fit merged_shape {self.merged_shape} "
                "(same rank, batch and channel sizes expected)."
            )
        corner = self._location(location)
        if self.values is None:
            self._allocate(values)
        assert self.values is not None
        values = values.to(device=self.values.device, dtype=self.values.dtype)
        self._add(values, corner, tuple(values.shape[2:]))

    def finalize(self) -> torch.Tensor:
        """Normalise the output in place and return it, ``cropped_shape``; later calls return the same tensor.

        Returns:
            The output (zeros of ``value_dtype``, or float32, when nothing was aggregated).
        """
        if not self.is_finalized:
            if self.values is None:
                dtype = self.value_dtype or torch.float32
                self.values = torch.zeros(self.cropped_shape, dtype=dtype, device=self.device)
            else:
                self._finish(self.values)
            self.is_finalized = True
        return self.values

    def _location(self, location: Any) -> tuple[int, ...]:
        """``location`` as a tuple of Python ints, one per spatial dim."""
        if isinstance(location, torch.Tensor | np.ndarray):
            location = location.tolist()
        if isinstance(location, str) or not isinstance(location, Sequence):
            raise TypeError(f"{self.who}: location must be a sequence of ints, got {location!r}.")
        if any(isinstance(v, bool | np.bool_) or not isinstance(v, Integral) for v in location):
            raise TypeError(f"{self.who}: location must hold ints, got {tuple(location)!r}.")
        if len(location) != len(self.spatial_shape):
            raise ValueError(
                f"{self.who}: location {tuple(location)} must have one value per spatial dim of {self.spatial_shape}."
            )
        return tuple(int(v) for v in location)

    def _allocate(self, first: torch.Tensor) -> None:
        """Allocate the output on ``device`` (default ``first``'s) in ``value_dtype`` (default from ``first``)."""
        self.device = first.device if self.device is None else self.device
        dtype = self.value_dtype or self._default_dtype(first.dtype)
        self.values = torch.zeros(self.cropped_shape, dtype=dtype, device=self.device)
        self._prepare()

    def _box(self, corner: Sequence[int], shape: Sequence[int]) -> TypeBox | None:
        """Destination (in the output) and source (in the patch) slices of a patch at ``corner``, clipped to the
        output; ``None`` when no voxel of the patch is inside."""
        dst, src = [], []
        for start, size, length in zip(corner, shape, self.spatial_shape):
            lo, hi = max(start, 0), min(start + size, length)
            if lo >= hi:
                return None
            dst.append(slice(lo, hi))
            src.append(slice(lo - start, hi - start))
        return tuple(dst), tuple(src)

    def _default_dtype(self, dtype: torch.dtype) -> torch.dtype:
        raise NotImplementedError

    def _prepare(self) -> None:
        raise NotImplementedError

    def _add(self, values: torch.Tensor, corner: tuple[int, ...], shape: tuple[int, ...]) -> None:
        raise NotImplementedError

    def _finish(self, values: torch.Tensor) -> None:
        raise NotImplementedError


class _WindowMerger(_PatchMerger):
    """Weighted mean of the patches, each weighted by a window (the outer product of 1-D windows of its size)."""

    mode: ClassVar[str] = "hann"

    def __init__(
        self,
        merged_shape: Sequence[int],
        cropped_shape: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        value_dtype: torch.dtype | None = None,
        sigma_scale: float | Sequence[float] = 0.125,
    ) -> None:
        super().__init__(merged_shape, cropped_shape, device, value_dtype)
        self.sigma_scale = sigma_scale
        #: per patch shape: the patch weight, and its 1-D windows when the weight is their outer product
        self._weights: dict[tuple[int, ...], tuple[torch.Tensor, list[torch.Tensor] | None]] = {}
        #: every aggregated patch: (corner, shape)
        self._patches: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def _default_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return accumulator_dtype(self.mode, dtype)

    def _prepare(self) -> None:
        pass

    def _weight(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """The weight of a patch of ``shape`` in the output's dtype and device (built once per shape; one
        patch-sized tensor), and its 1-D float64 windows when the weight is separable."""
        if shape not in self._weights:
            assert self.values is not None
            try:
                windows = axis_windows(self.mode, shape, self.sigma_scale, dtype=torch.float64, device=self.device)
            except ValueError as err:
                raise ValueError(f"{self.who}: {err}") from None
            weight = outer_window(windows).to(self.values.dtype)
            self._weights[shape] = (weight, self._floor(weight, windows))
        return self._weights[shape]

    def _floor(self, weight: torch.Tensor, windows: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Adjust ``weight`` in place as the mode needs; the windows when it stays their outer product."""
        return windows

    def _add(self, values: torch.Tensor, corner: tuple[int, ...], shape: tuple[int, ...]) -> None:
        assert self.values is not None
        weight, _ = self._weight(shape)
        self._patches.append((corner, shape))
        box = self._box(corner, shape)
        if box is not None:
            dst, src = box
            self.values[(..., *dst)].addcmul_(values[(..., *src)], weight[src])

    def _finish(self, values: torch.Tensor) -> None:
        """Divide by the summed weights: per axis on a full regular grid of one patch shape with a separable weight
        (two in-place passes over the output, 1-D normalisers only), else through a single-channel volume of summed
        weights built from the recorded patches (allocated here, freed on return)."""
        axes = self._grid_axes()
        if axes is not None:
            self._divide_separably(values, axes)
        else:
            norm = torch.zeros((1, 1, *self.spatial_shape), dtype=values.dtype, device=values.device)
            for corner, shape in self._patches:
                box = self._box(corner, shape)
                if box is not None:
                    norm[(..., *box[0])].add_(self._weights[shape][0][box[1]])
            values.div_(norm.clamp_(min=torch.finfo(norm.dtype).tiny))  # no patch: 0 / tiny = 0
        self._patches, self._weights = [], {}

    def _grid_axes(self) -> list[list[int]] | None:
        """Per axis, the sorted patch starts when the patches are exactly the Cartesian product of them (each once),
        all of one shape with a separable weight; else ``None``."""
        shapes = {shape for _, shape in self._patches}
        if len(shapes) != 1 or self._weights[next(iter(shapes))][1] is None:
            return None
        corners = {corner for corner, _ in self._patches}
        axes = [sorted({corner[i] for corner in corners}) for i in range(len(self.spatial_shape))]
        if len(corners) != len(self._patches) or len(corners) != math.prod(len(a) for a in axes):
            return None
        return axes

    def _divide_separably(self, values: torch.Tensor, axes: list[list[int]]) -> None:
        """Multiply ``values`` by the reciprocal of the grid's summed weights, the outer product of per-axis sums."""
        shape = self._patches[0][1]
        windows = self._weights[shape][1]
        assert windows is not None
        inverse = []
        for window, starts, length in zip(windows, axes, self.spatial_shape):
            lo, hi = min(starts[0], 0), max(starts[-1] + window.shape[0], length)
            sums = grid_normaliser(window, [s - lo for s in starts], hi - lo)[-lo : length - lo]
            inv = torch.where(sums > 0, sums.reciprocal(), torch.zeros_like(sums))  # no patch: 0
            inverse.append(inv.to(values.dtype))
        values.mul_(inverse[0].reshape(-1, *[1] * (len(inverse) - 1)))
        if len(inverse) > 1:
            values.mul_(outer_window(inverse[1:]))


class HannMerger(_WindowMerger):
    """Weighted mean of the patches, weighted by the separable Hann window (``GridInferer``'s ``"hann"`` mode).

    Each patch is multiplied by its weight (the outer product of :func:`~.windows.hann_window` per axis, strictly
    positive at the patch border) and added to the output; :meth:`finalize` divides by the summed weights. On a
    regular grid it equals ``GridInferer(overlap_mode="hann")`` to float rounding.

    What it keeps: the output (``cropped_shape``, ``value_dtype``), one patch weight per distinct patch shape, and
    the list of patch corners. No count or weight volume while patches come in: at :meth:`finalize`, when the
    patches form a full regular grid (every combination of the per-axis starts once, one patch shape), the summed
    weights are the outer product of per-axis sums (1-D vectors, two in-place passes over the output); otherwise a
    single-channel volume of summed weights (``(1, 1, *spatial)``, the output's dtype) is built from the recorded
    corners, used and freed. MONAI's ``AvgMerger`` keeps a full ``(B, C, *merged)`` count volume throughout.

    Args:
        merged_shape: ``(B, C, *spatial)`` covered by the patches (``PatchInferer`` passes it).
        cropped_shape: the part of it, from the origin, that :meth:`finalize` returns (``PatchInferer`` passes the
            unpadded shape); ``None``: all of ``merged_shape``. Only this part is allocated.
        device: where the output lives; ``None``: the first patch's device.
        value_dtype: a floating dtype for the output; ``None``: float32 (float64 for float64 or wide integer
            patches), never half precision.

    Raises:
        TypeError: a shape or location that is not a sequence of ints, a ``value_dtype`` that is not a floating
            ``torch.dtype``, a ``device`` that is neither a string nor a ``torch.device``.
        ValueError: a shape without batch, channel and spatial dims or with a size below 1, a ``cropped_shape``
            that does not fit in ``merged_shape``, a device torch does not know; patches that do not fit (see
            :meth:`aggregate`).

    Example:
        >>> import torch
        >>> from monai.inferers import PatchInferer, SlidingWindowSplitter
        >>> from monai_patchplug import HannMerger
        >>> inferer = PatchInferer(SlidingWindowSplitter(patch_size=8, overlap=4), merger_cls=HannMerger)
        >>> image = torch.rand(1, 1, 16, 20)
        >>> torch.allclose(inferer(image, lambda x: 2 * x), 2 * image)
        True
    """

    who: ClassVar[str] = "HannMerger"
    mode: ClassVar[str] = "hann"

    def __init__(
        self,
        merged_shape: Sequence[int],
        cropped_shape: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        value_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(merged_shape, cropped_shape, device, value_dtype)


class GaussianMerger(_WindowMerger):
    """Weighted mean of the patches, weighted by MONAI's Gaussian importance map (``GridInferer``'s ``"gaussian"``).

    The weight is the outer product of per-axis Gaussians (:func:`~.windows.gaussian_window`, standard deviation
    ``sigma_scale`` times the patch size), floored as a whole at ``max(its minimum, 1e-3)`` as MONAI's
    ``compute_importance_map`` does. On a regular grid it equals ``GridInferer(overlap_mode="gaussian")`` to float
    rounding.

    What it keeps: as :class:`HannMerger`. The floor makes the weight non-separable (unless it changes nothing), so
    :meth:`finalize` builds the single-channel volume of summed weights (``(1, 1, *spatial)``), as ``GridInferer``
    keeps one for this mode.

    Args:
        merged_shape: as :class:`HannMerger`.
        cropped_shape: as :class:`HannMerger`.
        device: as :class:`HannMerger`.
        value_dtype: as :class:`HannMerger`.
        sigma_scale: the Gaussian's standard deviation as a fraction of the patch size, one positive number or one
            per spatial dim (MONAI's ``sigma_scale``).

    Raises:
        TypeError, ValueError: as :class:`HannMerger`; a ``sigma_scale`` that is not positive numbers, one per
            spatial dim (or one); at the first patch, a Gaussian so narrow that it underflows to zero.

    Example:
        >>> import torch
        >>> from monai.inferers import PatchInferer, SlidingWindowSplitter
        >>> from monai_patchplug import GaussianMerger
        >>> inferer = PatchInferer(
        ...     SlidingWindowSplitter(patch_size=8, overlap=4), merger_cls=GaussianMerger, sigma_scale=0.25
        ... )
        >>> image = torch.rand(1, 1, 16, 20)
        >>> torch.allclose(inferer(image, lambda x: x + 1), image + 1)
        True
    """

    who: ClassVar[str] = "GaussianMerger"
    mode: ClassVar[str] = "gaussian"

    def __init__(
        self,
        merged_shape: Sequence[int],
        cropped_shape: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        value_dtype: torch.dtype | None = None,
        sigma_scale: float | Sequence[float] = 0.125,
    ) -> None:
        super().__init__(merged_shape, cropped_shape, device, value_dtype, sigma_scale=sigma_scale)
        values = [sigma_scale] if isinstance(sigma_scale, Real) else sigma_scale
        if isinstance(values, torch.Tensor | np.ndarray):
            values = values.tolist()
        ndim = len(self.spatial_shape)
        if (
            isinstance(values, str)
            or not isinstance(values, Sequence)
            or len(values) not in (1, ndim)
            or any(isinstance(v, bool) or not isinstance(v, Real) or not 0 < v < math.inf for v in values)
        ):
            raise ValueError(
                f"{self.who}: sigma_scale must be a positive number or one per spatial dim ({ndim}), "
                f"got {sigma_scale!r}."
            )

    def _floor(self, weight: torch.Tensor, windows: list[torch.Tensor]) -> list[torch.Tensor] | None:
        if float(weight.min()) >= 1e-3:  # MONAI's floor max(min, 1e-3) changes nothing
            return windows
        weight.clamp_(min=1e-3)
        return None


class CropMerger(_PatchMerger):
    """Each output voxel from one patch: the one in which it lies deepest (``GridInferer``'s ``"crop"`` mode).

    The rule, for patches anywhere: a voxel takes the value of the patch in which it lies furthest from the patch's
    nearest face (so the network saw the most context around it); among patches where it lies equally deep, of the
    patch whose centre is nearest in the sum of per-axis distances; a voxel exactly midway between two centres along
    an axis goes to the patch whose centre comes after it along that axis; a tie that remains (two patches of one
    size at one location, say) goes to the patch aggregated first.

    On a regular grid this is exactly ``GridInferer(overlap_mode="crop")``, which gives each voxel, along each axis
    separately, to the patch whose centre is nearest (patches at corners ``a < b`` hand over at ``(a + b + P) // 2``):
    that patch is at least as near along every axis as any other, hence at least as deep and strictly nearer in the
    sum, midpoints included. Values are copied, never mixed: an identity network is reconstructed exactly.

    Implementation: one single-channel ``int32`` map holds, per voxel, the score of the patch that wrote it (the
    rule above as one integer, smaller is better); a patch overwrites the voxels where its score is smaller. The
    score of a voxel depends only on its offset in the patch, so it is built once per patch shape.

    What it keeps: the output (``cropped_shape``, ``value_dtype``: default the patches' dtype, so integer outputs
    stay integers), the ``int32`` score map (``cropped_shape``'s spatial size, one channel), one score tensor per
    distinct patch shape; per patch, a patch-sized boolean mask while it is written.

    Args:
        merged_shape: as :class:`HannMerger`.
        cropped_shape: as :class:`HannMerger`.
        device: as :class:`HannMerger`.
        value_dtype: the output's dtype; ``None``: the first patch's.

    Raises:
        TypeError, ValueError: as :class:`HannMerger` (any ``value_dtype`` is accepted); a patch longer than
            :meth:`max_patch_size` along an axis (the score would overflow ``int32``).

    Example:
        >>> import torch
        >>> from monai.inferers import PatchInferer, SlidingWindowSplitter
        >>> from monai_patchplug import CropMerger
        >>> inferer = PatchInferer(SlidingWindowSplitter(patch_size=8, overlap=3), merger_cls=CropMerger)
        >>> image = torch.arange(13 * 18).reshape(1, 1, 13, 18)
        >>> torch.equal(inferer(image, lambda x: x), image)
        True
    """

    who: ClassVar[str] = "CropMerger"
    blends: ClassVar[bool] = False

    def __init__(
        self,
        merged_shape: Sequence[int],
        cropped_shape: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        value_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(merged_shape, cropped_shape, device, value_dtype)
        #: per voxel, the score of the patch that wrote it (``int32`` max: none yet); allocated with the output
        self.scores: torch.Tensor | None = None
        self._patch_scores: dict[tuple[int, ...], torch.Tensor] = {}

    @staticmethod
    def max_patch_size(ndim: int) -> int:
        """The longest patch axis whose scores fit ``int32`` in ``ndim`` spatial dims (18918 in 3D, 23170 in 2D)."""
        return math.isqrt((2**31 - 1) // (2 * ndim))

    def _default_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype

    def _prepare(self) -> None:
        self.scores = torch.full(
            self.spatial_shape, torch.iinfo(torch.int32).max, dtype=torch.int32, device=self.device
        )

    def _score(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Score of each voxel of a patch of ``shape`` (``int32``; one patch-sized tensor, built once per shape).

        Per axis, with the doubled offset from the centre ``s = 2 i + 1 - P`` and ``d = |s|``: the doubled depth is
        ``P - 1 - d`` and the axis term ``2 d + (s > 0)`` (the ``+1`` makes the later patch win a midpoint). The
        score is ``(L - 1 - min depth) * M + sum of axis terms`` with ``L`` = :meth:`max_patch_size` and
        ``M = 2 ndim L``, which orders by depth first and by the sum second.
        """
        if shape not in self._patch_scores:
            ndim, limit = len(shape), self.max_patch_size(len(shape))
            if max(shape) > limit:
                raise ValueError(f"{self.who}: patches of shape {shape} exceed the largest supported size {limit}.")
            depth: torch.Tensor | None = None
            term: torch.Tensor | None = None
            for axis, size in enumerate(shape):
                view = [1] * ndim
                view[axis] = size
                s = 2 * torch.arange(size, dtype=torch.int64, device=self.device) + 1 - size
                d = s.abs()
                axis_depth, axis_term = (size - 1 - d).reshape(view), (2 * d + (s > 0)).reshape(view)
                depth = axis_depth if depth is None else torch.minimum(depth, axis_depth)
                term = axis_term if term is None else term + axis_term
            assert depth is not None and term is not None
            self._patch_scores[shape] = ((limit - 1 - depth) * (2 * ndim * limit) + term).to(torch.int32)
        return self._patch_scores[shape]

    def _add(self, values: torch.Tensor, corner: tuple[int, ...], shape: tuple[int, ...]) -> None:
        assert self.values is not None and self.scores is not None
        score = self._score(shape)
        box = self._box(corner, shape)
        if box is None:
            return
        dst, src = box
        held, mine = self.scores[dst], score[src]
        wins = mine < held
        target = self.values[(..., *dst)]
        torch.where(wins, values[(..., *src)], target, out=target)
        torch.minimum(held, mine, out=held)

    def _finish(self, values: torch.Tensor) -> None:
        self.scores, self._patch_scores = None, {}
