"""UniformSampler: every valid patch corner equally likely."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from .._shapes import TypeSpatialShape
from .base import PatchSampler
from .monai_args import monai_num_samples, size_and_fill

__all__ = ["UniformSampler"]


class UniformSampler(PatchSampler):
    """Draw patches whose corner is uniform over every valid position, the patch equal to the image included.

    Only the image shape is read, so the draw works on MONAI lazy (pending) shapes.

    Args:
        patch_size: as :class:`~monai_patchplug.PatchSampler`.
        roi_size: MONAI's name for ``patch_size`` (``RandSpatialCropSamplesd``); values <= 0 take the image size.
        random_center: MONAI's option: ``False`` takes the centre crop (corner ``S // 2 - P // 2``) every time.
        random_size: MONAI's option; only ``False`` is supported (patches of one call share one size).
        max_roi_size: MONAI's option, used only with ``random_size=True``; accepted and has no effect.
        kwargs: ``keys``, ``num_samples``, ``allow_missing_keys``, ``lazy``, ``copy``, ``allow_smaller``, as
            :class:`~monai_patchplug.PatchSampler`. With MONAI's ``roi_size``, ``num_samples`` defaults to 1 (a
            list), as in MONAI.

    Raises:
        ValueError: ``random_size=True``, or both ``patch_size`` and ``roi_size`` giving different sizes (``8`` and
            ``(8, 8, 8)`` are one size).

    Example:
        >>> import torch
        >>> from monai_patchplug import LOCATION, UniformSampler
        >>> subject = {"t1": torch.rand(1, 10, 10, 10), "seg": torch.zeros(1, 10, 10, 10), "id": "s01"}
        >>> patch = UniformSampler(patch_size=4)(subject)  # one patch dict
        >>> patch["t1"].shape, patch["seg"].shape, patch["id"]
        (torch.Size([1, 4, 4, 4]), torch.Size([1, 4, 4, 4]), 's01')
        >>> sampler = UniformSampler(patch_size=4, num_samples=2).set_random_state(seed=0)
        >>> [patch[LOCATION] for patch in sampler(subject)]  # a list of 2; [i0, j0, k0, i1, j1, k1] each
        [tensor([4, 5, 0, 8, 9, 4]), tensor([3, 3, 3, 7, 7, 7])]
    """

    def __init__(
        self,
        patch_size: TypeSpatialShape | None = None,
        *,
        roi_size: TypeSpatialShape | None = None,
        random_center: bool = True,
        random_size: bool = False,
        max_roi_size: Sequence[int] | int | None = None,
        **kwargs: Any,
    ) -> None:
        if random_size:
            raise ValueError(
                "random_size=True (MONAI's random patch size) is not supported: the patches of one call share one "
                "size; use a fixed roi_size/patch_size."
            )
        size, fill = size_and_fill(patch_size, "roi_size", roi_size)
        kwargs["num_samples"] = monai_num_samples(kwargs.get("num_samples"), roi_size is not None)
        super().__init__(size, fill_non_positive=fill, **kwargs)
        self.random_center = bool(random_center)
        self.max_roi_size = max_roi_size

    def draw_corners(
        self, data: Mapping[Hashable, Any], spatial_shape: tuple[int, ...], patch_size: tuple[int, ...], n: int
    ) -> np.ndarray:
        """``n`` corners, each axis independently uniform on ``[0, S - P]`` (or the centre crop with
        ``random_center=False``); allocates only the ``(n, ndim)`` array."""
        shape = np.asarray(spatial_shape, dtype=np.int64)
        size = np.asarray(patch_size, dtype=np.int64)
        if not self.random_center:
            return np.tile(shape // 2 - size // 2, (n, 1))
        return self.R.randint(0, shape - size + 1, size=(n, len(spatial_shape))).astype(np.int64)
