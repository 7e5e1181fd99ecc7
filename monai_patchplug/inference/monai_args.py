"""MONAI ``SlidingWindowInferer`` arguments for :class:`~monai_patchplug.GridInferer`.

A bundle that swaps only the ``_target_`` of its inferer keeps MONAI's arguments and MONAI's defaults (overlap
0.25, ``mode="constant"``, padding only for inputs smaller than the window); :func:`sliding_window_settings`
turns both argument sets into one set of our settings, once, in ``__init__``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..grid import TypePaddingMode, check_overlap_fits, check_padding_mode
from ..sampling.monai_args import pick, pick_size

__all__ = ["InfererSettings", "sliding_window_settings", "overlap_from_fraction"]

#: MONAI's blend modes as our overlap modes.
MONAI_MODES = {"constant": "average", "gaussian": "gaussian"}


@dataclass(frozen=True)
class InfererSettings:
    """What :class:`~monai_patchplug.GridInferer` runs with, whichever argument names it was given."""

    patch_size: Any
    #: integer overlap spec, or ``None`` when ``overlap_fraction`` is used
    patch_overlap: Any
    #: MONAI's fractional overlap per axis (scan interval ``int(P * (1 - f))``), or ``None``
    overlap_fraction: tuple[float, ...] | None
    overlap_mode: str
    batch_size: int
    #: ``(mode, pad kwargs)`` for padding, or ``None`` (zero padding of inputs smaller than the patch only)
    pad: tuple[str, dict[str, Any]] | None
    #: pad every side by ``overlap // 2`` (our ``padding_mode``); MONAI pads only inputs smaller than the window
    pad_border: bool
    #: values <= 0 of the patch size take the input's size (MONAI's ``roi_size``)
    fill_non_positive: bool
    sigma_scale: float | Sequence[float]
    cpu_thresh: int | None


def _fractions(overlap: float | Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(v) for v in np.ravel(overlap))
    if not values or any(not 0 <= v < 1 for v in values):
        raise ValueError(f"overlap must be a fraction in [0, 1) (or one per spatial dim), got {overlap!r}.")
    return values


def overlap_from_fraction(fraction: Sequence[float], patch_size: Sequence[int], padded_shape: Sequence[int]) -> tuple:
    """Integer overlap per axis that lays MONAI's grid: scan interval ``max(int(P * (1 - f)), 1)``, or ``P`` (one
    window) where the window spans the (padded) input.

    Raises:
        ValueError: a number of fractions that does not fit ``patch_size``.
    """
    values = list(fraction) * len(patch_size) if len(fraction) == 1 else list(fraction)
    if len(values) != len(patch_size):
        raise ValueError(f"overlap {tuple(fraction)} does not fit a patch of {len(patch_size)} dimensions.")
    out = []
    for f, p, s in zip(values, patch_size, padded_shape):
        interval = p if p >= s else max(int(p * (1 - f)), 1)
        out.append(p - interval)
    return tuple(out)


def sliding_window_settings(*args: Any, **kwargs: Any) -> InfererSettings:
    """Resolve our arguments and MONAI's into :class:`InfererSettings` (see :func:`_resolve`); every error names
    ``GridInferer``, whichever helper raised it.

    Raises:
        TypeError, ValueError: as :func:`_resolve`, the message starting with ``"GridInferer: "``.
    """
    try:
        return _resolve(*args, **kwargs)
    except (TypeError, ValueError) as err:
        message = str(err)
        if message.startswith("GridInferer:"):
            raise
        raise type(err)(f"GridInferer: {message}") from None


def _resolve(
    patch_size: Any,
    patch_overlap: Any,
    overlap_mode: str | None,
    batch_size: int | None,
    padding_mode: TypePaddingMode,
    *,
    roi_size: Any = None,
    sw_batch_size: int | None = None,
    overlap: float | Sequence[float] | None = None,
    mode: str | None = None,
    sigma_scale: float | Sequence[float] = 0.125,
    cval: float = 0.0,
    cpu_thresh: int | None = None,
    with_coord: bool = False,
) -> InfererSettings:
    """Resolve our arguments and MONAI's into :class:`InfererSettings`.

    MONAI's style is on when any of ``roi_size``, ``sw_batch_size``, ``overlap`` or ``mode`` is given: then the
    defaults are MONAI's (overlap 0.25, ``mode="constant"`` i.e. ``average``, ``padding_mode="constant"`` with
    ``cval`` for inputs smaller than the window, no border padding).

    Raises:
        ValueError: one setting given under both names with different values (one size spelt two ways, ``8`` and
            ``(8, 8, 8)``, is one value), an unknown ``mode``, an overlap
            fraction outside ``[0, 1)``, ``with_coord=True`` (the network would need the window coordinates, which
            this inferer does not pass), or a bad size/overlap/batch size/padding mode.
    """
    if with_coord:
        raise ValueError("with_coord=True is not supported: GridInferer calls network(patches, *args, **kwargs).")
    monai_style = any(v is not None for v in (roi_size, sw_batch_size, overlap, mode))
    size = pick_size("patch_size", patch_size, "roi_size", roi_size)
    if size is None:
        raise TypeError("GridInferer: patch_size (or MONAI's roi_size) is required.")
    batch = pick("batch_size", batch_size, "sw_batch_size", sw_batch_size)
    batch = 1 if batch is None else batch
    if isinstance(batch, bool) or not isinstance(batch, int | np.integer) or batch < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch!r}.")
    if mode is not None and mode not in MONAI_MODES:
        raise ValueError(f"mode must be one of {tuple(MONAI_MODES)}, got {mode!r}.")
    blend = pick("overlap_mode", overlap_mode, "mode", None if mode is None else MONAI_MODES[mode])
    blend = blend if blend is not None else ("average" if monai_style else "hann")
    if patch_overlap is not None and overlap is not None:
        raise ValueError(f"give patch_overlap={patch_overlap!r} (voxels) or MONAI's overlap={overlap!r}, not both.")
    fraction = _fractions(overlap if overlap is not None else 0.25) if monai_style and patch_overlap is None else None
    voxels = None if fraction is not None else (0 if patch_overlap is None else patch_overlap)
    if voxels is not None and roi_size is None:
        check_overlap_fits(size, voxels)
    if monai_style:
        pad = check_padding_mode(cval if (padding_mode or "constant") == "constant" else padding_mode)
        pad_border = False
    else:
        pad = check_padding_mode(padding_mode)
        pad_border = pad is not None
    return InfererSettings(
        patch_size=size,
        patch_overlap=voxels,
        overlap_fraction=fraction,
        overlap_mode=blend,
        batch_size=int(batch),
        pad=pad,
        pad_border=pad_border,
        fill_non_positive=roi_size is not None and patch_size is None,
        sigma_scale=sigma_scale,
        cpu_thresh=cpu_thresh,
    )
