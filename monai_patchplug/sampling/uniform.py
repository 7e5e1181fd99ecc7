"""UniformSampler: every valid patch corner equally likely."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np

from .base import PatchSampler

__all__ = ["UniformSampler"]


class UniformSampler(PatchSampler):
    """Draw patches whose corner is uniform over every valid position, the patch equal to the image included.

    Only the image shape is read, so the draw works on MONAI lazy (pending) shapes. Arguments as
    :class:`~monai_patchplug.PatchSampler`.

    Example::

        patch = UniformSampler(patch_size=64)({"t1": t1, "seg": seg})   # patch["t1"].shape == (1, 64, 64, 64)
    """

    def draw_corners(
        self, data: Mapping[Hashable, Any], spatial_shape: tuple[int, ...], patch_size: tuple[int, ...], n: int
    ) -> np.ndarray:
        """``n`` corners, each axis independently uniform on ``[0, S - P]``; allocates only the ``(n, ndim)`` array."""
        high = np.asarray(spatial_shape, dtype=np.int64) - np.asarray(patch_size, dtype=np.int64) + 1
        return self.R.randint(0, high, size=(n, len(spatial_shape))).astype(np.int64)
