"""Pure 1-D blending windows and the separable normaliser of a regular grid.

A patch's N-D weight is the outer product of one 1-D window per axis. Over a Cartesian grid of patches, the sum of
those weights at a voxel is the product of per-axis sums, so dividing by it needs only one 1-D normaliser per axis,
never a full-volume count or weight map.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = ["constant_window", "hann_window", "gaussian_window", "outer_window", "grid_normaliser"]


def constant_window(size: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> torch.Tensor:
    """Equal weights: ``size`` ones (allocates them)."""
    return torch.ones(size, dtype=dtype, device=device)


def hann_window(size: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> torch.Tensor:
    """Hann window strictly positive at the edges: ``sin^2(pi (n + 1) / (size + 1))`` for ``n = 0 ... size - 1``.

    It is the Hann window of length ``size + 2`` without its two zero end points, symmetric about the centre.
    Computed in float64, returned in ``dtype`` (allocates ``size`` values).
    """
    n = torch.arange(1, size + 1, dtype=torch.float64, device=device)
    return torch.sin(n * (math.pi / (size + 1))).square_().to(dtype)


def gaussian_window(
    size: int,
    sigma_scale: float = 0.125,
    floor: float = 1e-3,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Gaussian centred on the window (like MONAI's importance map on one axis), floored relative to its peak.

    Args:
        size: number of weights.
        sigma_scale: the standard deviation as a fraction of ``size``.
        floor: weights below ``floor * max`` are raised to it, so every weight is strictly positive.
        dtype, device: of the result.

    Returns:
        ``exp(-(n - (size - 1) / 2)^2 / (2 (sigma_scale size)^2))`` clamped below at ``floor`` times its maximum.
        Computed in float64; allocates ``size`` values.

    Raises:
        ValueError: a non-positive ``sigma_scale`` or a ``floor`` outside ``(0, 1]``.
    """
    if not sigma_scale > 0:
        raise ValueError(f"sigma_scale must be positive, got {sigma_scale!r}.")
    if not 0 < floor <= 1:
        raise ValueError(f"floor must be in (0, 1], got {floor!r}.")
    x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    w = torch.exp(-0.5 * (x / (sigma_scale * size)) ** 2)
    return w.clamp_(min=floor * float(w.max())).to(dtype)


#: The 1-D window of each blending overlap mode.
WINDOWS: dict[str, Callable[..., torch.Tensor]] = {
    "average": constant_window,
    "hann": hann_window,
    "gaussian": gaussian_window,
}


def axis_windows(
    mode: str,
    sizes: Sequence[int],
    sigma_scale: float | Sequence[float] = 0.125,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> list[torch.Tensor]:
    """The 1-D window of blending ``mode`` for each axis of a patch of ``sizes``.

    ``sigma_scale`` (one value or one per axis) is used by ``"gaussian"`` only, as MONAI's ``sigma_scale``.
    Allocates ``sum(sizes)`` values.

    Raises:
        ValueError: ``sigma_scale`` with a number of values that does not fit ``sizes``, or a window that is not
            finite and strictly positive everywhere (e.g. a gaussian so narrow that it underflows to zero).
    """
    sigmas = [float(v) for v in np.ravel(sigma_scale)]
    if len(sigmas) == 1:
        sigmas = sigmas * len(sizes)
    if len(sigmas) != len(sizes):
        raise ValueError(f"sigma_scale {sigma_scale!r} does not fit a patch of {len(sizes)} dimensions.")
    if mode == "gaussian":
        windows = [gaussian_window(q, sigma_scale=s, dtype=dtype, device=device) for q, s in zip(sizes, sigmas)]
    else:
        windows = [WINDOWS[mode](q, dtype=dtype, device=device) for q in sizes]
    for axis, w in enumerate(windows):
        if not bool(torch.isfinite(w).all()) or not bool((w > 0).all()):
            raise ValueError(
                f"the {mode!r} window of axis {axis} (size {sizes[axis]}, sigma_scale {sigmas[axis]}) has values that "
                "are not finite and strictly positive, so the blend would divide by zero; use a larger sigma_scale."
            )
    return windows


def outer_window(windows: Sequence[torch.Tensor]) -> torch.Tensor:
    """N-D weight of one patch: the outer product of its 1-D windows (allocates one patch-sized tensor)."""
    out = windows[0]
    for w in windows[1:]:
        out = out.unsqueeze(-1) * w
    return out


def grid_normaliser(window: torch.Tensor, starts: Sequence[int], length: int) -> torch.Tensor:
    """Per-voxel sum of ``window`` placed at each of ``starts`` along an axis of ``length`` voxels.

    Args:
        window: the 1-D window (``Q`` weights).
        starts: where each patch starts on the axis; ``0 <= start <= length - Q``.
        length: the axis length.

    Returns:
        A float64 tensor of ``length`` sums (0 where no patch reaches), on ``window``'s device. Allocates it and one
        ``(len(starts), Q)`` index tensor.
    """
    q = window.shape[0]
    index = torch.as_tensor(list(starts), dtype=torch.int64, device=window.device)[:, None]
    index = index + torch.arange(q, device=window.device)
    out = torch.zeros(length, dtype=torch.float64, device=window.device)
    return out.index_add_(0, index.reshape(-1), window.to(torch.float64).repeat(len(starts)))
