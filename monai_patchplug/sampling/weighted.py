"""WeightedSampler and the hierarchical draw from a non-negative weight map that LabelSampler reuses."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np

from .._shapes import TypeSpatialShape, host_array, is_lazy, read_box
from .base import PatchSampler, valid_region
from .monai_args import monai_num_samples, pick, size_and_fill

__all__ = ["WeightedSampler", "row_sums", "draw_from_weights"]


def _check_real(weights: np.ndarray) -> None:
    """Raise ``TypeError`` for complex weights (reads only the dtype)."""
    if np.issubdtype(weights.dtype, np.complexfloating):
        raise TypeError(f"weights must be real, got dtype {weights.dtype}.")


def row_sums(weights: np.ndarray) -> np.ndarray:
    """Sums of ``weights`` along its last axis, shape ``weights.shape[:-1]``, in an accumulator that cannot wrap.

    bool/uint8 maps sum in int32 and other integers of up to 32 bits in int64 (exact); 64-bit integers sum in float64
    (an int64 sum wraps). float16/float32 maps sum in float32 (a row is short, so float32 keeps its mass), again in
    float64 when a float32 sum overflows (finite weights near float32's maximum); float64 maps sum in float64, where
    a row of values near float64's maximum can still overflow to ``inf`` (:func:`draw_from_weights` then rescales).
    Allocates only the result, never a converted volume.

    Raises:
        TypeError: complex weights.
    """
    if weights.dtype == np.bool_:
        weights = weights.view(np.uint8)
    _check_real(weights)
    if np.issubdtype(weights.dtype, np.floating):
        if weights.dtype.itemsize < 8:
            with np.errstate(over="ignore"):
                sums = weights.sum(-1, dtype=np.float32)
            if np.isfinite(sums).all():
                return sums
        with np.errstate(over="ignore"):
            return weights.sum(-1, dtype=np.float64)
    if weights.dtype.itemsize >= 8:
        return weights.sum(-1, dtype=np.float64)
    return weights.sum(-1, dtype=np.int32 if weights.dtype == np.uint8 else np.int64)


def _scaled_to_unit_max(weights: np.ndarray) -> np.ndarray:
    """A float64 copy of floating ``weights`` times the power of two that brings their maximum into ``[0.5, 1)``.

    Exact for every value but those below the maximum by more than float64's range (~1e-308 of it), which become 0.
    """
    _, exponent = math.frexp(float(weights.max()))
    return np.ldexp(weights, -exponent, dtype=np.float64)


def _inverse_cdf(masses: np.ndarray, n: int, rng: np.random.RandomState) -> np.ndarray:
    """``n`` indices into 1-D ``masses`` (finite, >= 0), each with probability proportional to its mass.

    The float64 CDF is built from the masses divided by their maximum, so it neither overflows nor wraps; a uniform
    ``u`` in ``(0, total]`` is matched to the first CDF entry ``>= u``, which never lands on a zero mass. Allocates the
    CDF (float64, one per mass) and the ``n`` indices.

    Raises:
        ValueError: if there is no positive mass.
    """
    peak = float(masses.max()) if masses.size else 0.0
    if not peak > 0:
        raise ValueError("the weights have no positive mass.")
    cdf = np.cumsum(np.divide(masses, peak, dtype=np.float64))
    u = (1.0 - rng.random_sample(n)) * cdf[-1]
    return np.minimum(np.searchsorted(cdf, u, side="left"), cdf.size - 1)


def draw_from_weights(
    weights: np.ndarray, n: int, rng: np.random.RandomState, rows: np.ndarray | None = None
) -> np.ndarray:
    """Draw ``n`` voxel indices of ``weights`` (any spatial rank >= 1) with probability proportional to the weight.

    Rank >= 2, hierarchical inverse-CDF: every axis but the last indexes a row (a 4-D map of shape ``(A, B, C, D)``
    has ``A * B * C`` rows of length ``D``); a float64 CDF over the row sums picks the rows, then a float64 CDF within
    each picked row picks the voxel. Rank 1 (a signal) is a single row: one float64 CDF over the weights picks the
    voxel. Both CDFs are built from values divided by their maximum, so no sum overflows or wraps whatever the dtype and
    range of the weights (huge float64 values, int64 values near 2**63). The cost is one pass over the map plus
    ``O(rows + n * row_length)``: it allocates the row sums, their scaled CDF and the ``n`` picked rows (rank 1: a
    float64 CDF of the signal's length), and no full-volume copy, except for float64 weights so large that a row sum
    overflows float64 (beyond ~1e308 / row_length): those are first scaled into a float64 copy by a power of two. The
    distribution is exact up to float64 rounding of the CDFs.

    Args:
        weights: finite, non-negative weights, any real or bool dtype; a strided view is fine.
        n: how many indices to draw (with replacement).
        rng: the ``numpy.random.RandomState`` that drives the draw (a transform's ``self.R``).
        rows: ``row_sums(weights)`` if the caller already has it (unused for rank 1).

    Returns:
        ``(n, weights.ndim)`` int64 indices.

    Raises:
        TypeError: complex weights.
        ValueError: if the weights have no positive mass.
    """
    if weights.dtype == np.bool_:
        weights = weights.view(np.uint8)
    if weights.ndim == 1:
        _check_real(weights)
        return _inverse_cdf(weights, n, rng)[:, None].astype(np.int64)
    if rows is None:
        rows = row_sums(weights)
    if np.issubdtype(rows.dtype, np.floating) and not np.isfinite(rows).all():
        weights = _scaled_to_unit_max(weights)
        rows = row_sums(weights)
    flat_rows = _inverse_cdf(rows.ravel(), n, rng)
    row_index = np.unravel_index(flat_rows, weights.shape[:-1])
    picked = weights[row_index]
    within = np.cumsum(np.divide(picked, picked.max(1, keepdims=True), dtype=np.float64), axis=1)
    v = (1.0 - rng.random_sample(n)) * within[:, -1]
    cols = np.minimum((within < v[:, None]).sum(1), weights.shape[-1] - 1)
    return np.stack([*row_index, cols], 1).astype(np.int64)


def _check_weights(weights: np.ndarray, key: Hashable) -> float:
    """The largest weight, after rejecting complex, negative, NaN and infinite weights (a min and a max pass).

    Raises:
        TypeError: complex weights.
        ValueError: negative, NaN or infinite weights.
    """
    if weights.dtype == np.bool_:
        return float(weights.any())
    if np.issubdtype(weights.dtype, np.complexfloating):
        raise TypeError(
            f"WeightedSampler: probability map {key!r} is complex ({weights.dtype}); weights must be real and >= 0 "
            "(e.g. store its magnitude, x.abs())."
        )
    lo, hi = float(weights.min()), float(weights.max())
    if math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"probability map {key!r} contains NaN.")
    if lo < 0:
        raise ValueError(f"probability map {key!r} has negative values (min {lo}); probabilities must be >= 0.")
    if math.isinf(hi):
        raise ValueError(f"probability map {key!r} contains infinite values.")
    return hi


def no_mass_message(what: str, patch_size: tuple[int, ...]) -> str:
    """Why a map that has mass has none on valid centres, and how much padding makes every voxel a valid centre.

    Only for a map whose mass lies entirely outside the valid centres (padding would then help).
    """
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
    is used; it may have any real dtype (64-bit integers and float64 values near float64's maximum included: the sums
    are scaled, so they neither wrap nor overflow) and need not be normalised.

    Args:
        patch_size: as :class:`~monai_patchplug.PatchSampler`.
        probability_map: key of the map in the data dict (cropped like the images when ``keys=None``).
        spatial_size: MONAI's name for ``patch_size`` (``RandWeightedCropd``); values <= 0 take the image size.
        w_key: MONAI's name for ``probability_map``.
        kwargs: ``keys``, ``num_samples``, ``allow_missing_keys``, ``lazy``, ``copy``, ``allow_smaller``, as
            :class:`~monai_patchplug.PatchSampler`. With MONAI's arguments, ``num_samples`` defaults to 1 (a list).

    Raises:
        TypeError: no map key; at call time, a complex map.
        ValueError: ``patch_size`` and ``spatial_size`` giving different sizes; at call time, a map with negative,
            NaN or infinite values, whose channel 0 is all zero, or whose mass lies only outside the valid centres
            (the message then says how much padding makes every voxel a valid centre).
        KeyError: at call time, if the map key is missing.

    Example:
        >>> import torch
        >>> from monai_patchplug import LOCATION, WeightedSampler
        >>> prob = torch.zeros(1, 9, 9)
        >>> prob[0, 4, 6] = 1.0  # all the mass on one voxel: every patch is centred on it
        >>> sampler = WeightedSampler(patch_size=3, probability_map="prob").set_random_state(seed=0)
        >>> patch = sampler({"image": torch.rand(1, 9, 9), "prob": prob})
        >>> patch["image"].shape, patch[LOCATION]
        (torch.Size([1, 3, 3]), tensor([3, 5, 6, 8]))
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
        """Corners of ``n`` centres drawn from channel 0 of the map.

        Allocates what :func:`draw_from_weights` does: the row sums and ``n`` rows, not a volume (but for float64
        maps whose values are near float64's maximum, see there). A map that is an array-like (see
        :func:`~monai_patchplug._shapes.is_lazy`) has its channel 0 read whole into memory: the draw needs it.

        Raises:
            TypeError: a complex map.
            ValueError: negative, NaN or infinite values; no mass in channel 0; mass only outside the valid centres.
        """
        prob = data[self.probability_map]
        if is_lazy(prob):  # an array-like: channel 0 is read whole (the draw needs every value)
            prob = read_box(prob, (slice(0, 1),) + (slice(None),) * (len(prob.shape) - 1))
        weights = host_array(prob)[0]
        peak = _check_weights(weights, self.probability_map)
        if peak == 0:
            raise ValueError(self._zero_message(data[self.probability_map]))
        try:
            return draw_from_weights(valid_region(weights, patch_size), n, self.R)
        except ValueError:
            raise ValueError(
                no_mass_message(f"WeightedSampler: probability map {self.probability_map!r} has no mass", patch_size)
            ) from None

    def _zero_message(self, prob: Any) -> str:
        """Error text for a map whose channel 0 is all zero, naming the other channels that have mass, if any."""
        text = f"WeightedSampler: probability map {self.probability_map!r} has no mass: channel 0 is all zero."
        full = host_array(prob)
        if full.shape[0] > 1:
            others = [c for c in range(1, full.shape[0]) if full[c].any()]
            text += f" Only channel 0 of its {full.shape[0]} channels is read"
            text += f"; channels {others} have mass: store the one to sample from alone." if others else "."
        return text
