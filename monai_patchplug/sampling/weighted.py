"""WeightedSampler and the hierarchical draw from a non-negative weight map that LabelSampler reuses."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np

from .._shapes import TypeSpatialShape, host_array
from .base import PatchSampler, valid_region
from .monai_args import monai_num_samples, pick, size_and_fill

__all__ = ["WeightedSampler", "row_sums", "draw_from_weights"]


def row_sums(weights: np.ndarray) -> np.ndarray:
    """Sums of ``weights`` along its last axis, shape ``weights.shape[:-1]``.

    Floating maps sum in float32 (float64 maps in float64; a row is short, so float32 keeps its mass), again in
    float64 when a float32 sum overflows (finite weights near float32's maximum), bool/uint8 maps in int32 and other
    integers in int64. Allocates only the result, never a converted volume.
    """
    if weights.dtype == np.bool_:
        weights = weights.view(np.uint8)
    if np.issubdtype(weights.dtype, np.floating):
        if weights.dtype != np.float64:
            with np.errstate(over="ignore"):
                sums = weights.sum(-1, dtype=np.float32)
            if np.isfinite(sums).all():
                return sums
        return weights.sum(-1, dtype=np.float64)
    return weights.sum(-1, dtype=np.int32 if weights.dtype == np.uint8 else np.int64)


def draw_from_weights(
    weights: np.ndarray, n: int, rng: np.random.RandomState, rows: np.ndarray | None = None
) -> np.ndarray:
    """Draw ``n`` voxel indices of ``weights`` (any spatial rank >= 2) with probability proportional to the weight.

    Hierarchical inverse-CDF: a float64 CDF over the row sums (one number per row along the last axis) picks the
    rows, then a float64 CDF within each picked row picks the voxel. This is one pass over the map plus
    ``O(rows + n * row_length)``; no full-volume cumulative sum or float64 copy is made. A uniform ``u`` in
    ``(0, total]`` is matched to the first CDF entry ``>= u``, which never lands on a zero weight.

    Args:
        weights: non-negative weights, any real or bool dtype, a strided view is fine.
        n: how many indices to draw (with replacement).
        rng: the ``numpy.random.RandomState`` that drives the draw (a transform's ``self.R``).
        rows: ``row_sums(weights)`` if the caller already has it.

    Returns:
        ``(n, weights.ndim)`` int64 indices.

    Raises:
        ValueError: if the weights have no positive mass.
    """
    if rows is None:
        rows = row_sums(weights)
    cdf = np.cumsum(rows.ravel(), dtype=np.float64)
    total = float(cdf[-1])
    if not total > 0:
        raise ValueError("the weights have no positive mass.")
    u = (1.0 - rng.random_sample(n)) * total
    flat_rows = np.minimum(np.searchsorted(cdf, u, side="left"), cdf.size - 1)
    row_index = np.unravel_index(flat_rows, weights.shape[:-1])
    picked = weights[row_index]
    within = np.cumsum(picked.view(np.uint8) if picked.dtype == np.bool_ else picked, axis=1, dtype=np.float64)
    v = (1.0 - rng.random_sample(n)) * within[:, -1]
    cols = np.minimum((within < v[:, None]).sum(1), weights.shape[-1] - 1)
    return np.stack([*row_index, cols], 1).astype(np.int64)


def _check_weights(weights: np.ndarray, key: Hashable) -> None:
    """Reject negative, NaN and infinite weights (a min and a max pass; no temporary volume)."""
    if weights.dtype == np.bool_:
        return
    lo, hi = float(weights.min()), float(weights.max())
    if math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"probability map {key!r} contains NaN.")
    if lo < 0:
        raise ValueError(f"probability map {key!r} has negative values (min {lo}); probabilities must be >= 0.")
    if math.isinf(hi):
        raise ValueError(f"probability map {key!r} contains infinite values.")


def no_mass_message(what: str, patch_size: tuple[int, ...]) -> str:
    """Why a map has no mass on valid centres, and how much padding makes every voxel a valid centre."""
    before = tuple(p // 2 for p in patch_size)
    after = tuple((p - 1) // 2 for p in patch_size)
    return (
        f"{what} on the valid patch centres: for patch_size {patch_size} a centre must be at least {before} voxels "
        f"from the start and {after} from the end of each axis, and all the mass lies closer to the border. Pad the "
        f"image by {before} before and {after} after each axis (e.g. monai.transforms.BorderPadd or SpatialPadd) to "
        "make every voxel a valid centre."
    )


class WeightedSampler(PatchSampler):
    """Draw patches whose centre has probability proportional to a probability map stored in the data.

    The centre ``c`` of a patch of size ``P`` has corner ``c - P // 2``. Only valid centres (``P//2 ... S-1-(P-1)//2``
    on each axis) can be drawn: mass outside them is ignored, never clamped into the border. Channel 0 of the map
    is used; it may have any real dtype and need not be normalised.

    Args:
        patch_size: as :class:`~monai_patchplug.PatchSampler`.
        probability_map: key of the map in the data dict (cropped like the images when ``keys=None``).
        spatial_size: MONAI's name for ``patch_size`` (``RandWeightedCropd``); values <= 0 take the image size.
        w_key: MONAI's name for ``probability_map``.
        kwargs: ``keys``, ``num_samples``, ``allow_missing_keys``, ``lazy``, ``copy``, ``allow_smaller``, as
            :class:`~monai_patchplug.PatchSampler`. With MONAI's arguments, ``num_samples`` defaults to 1 (a list).

    Raises:
        TypeError: no map key.
        ValueError: at call time, for a map with negative, NaN or infinite values, or without mass on valid centres.
        KeyError: at call time, if the map key is missing.
    """

    def __init__(
        self,
        patch_size: TypeSpatialShape | None = None,
        probability_map: Hashable | None = None,
        *,
        spatial_size: TypeSpatialShape | None = None,
        w_key: Hashable | None = None,
        **kwargs: Any,
    ) -> None:
        size, fill = size_and_fill(patch_size, "spatial_size", spatial_size)
        monai = spatial_size is not None or w_key is not None
        kwargs["num_samples"] = monai_num_samples(kwargs.get("num_samples"), monai)
        super().__init__(size, fill_non_positive=fill, **kwargs)
        probability_map = pick("probability_map", probability_map, "w_key", w_key)
        if probability_map is None:
            raise TypeError("probability_map (or MONAI's w_key) must name the key of the probability map.")
        self.probability_map = probability_map

    @property
    def requires_current_data(self) -> bool:
        """The draw reads the map's values, so a lazy pipeline must apply pending operations first."""
        return True

    def map_key(self, data: Mapping[Hashable, Any]) -> Hashable:
        """The probability map's key."""
        return self.probability_map

    def draw_corners(
        self, data: Mapping[Hashable, Any], spatial_shape: tuple[int, ...], patch_size: tuple[int, ...], n: int
    ) -> np.ndarray:
        """Corners of ``n`` centres drawn from channel 0 of the map. Allocates the row sums, not a volume."""
        weights = host_array(data[self.probability_map])[0]
        _check_weights(weights, self.probability_map)
        try:
            return draw_from_weights(valid_region(weights, patch_size), n, self.R)
        except ValueError:
            raise ValueError(
                no_mass_message(f"probability map {self.probability_map!r} has no mass", patch_size)
            ) from None
