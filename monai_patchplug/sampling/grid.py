"""GridSampler: every patch of a regular grid over a subject, for inference.

The grid itself (corners, padding) is pure geometry in :mod:`monai_patchplug.grid`; the sampler records the grid of
its last call so that a :class:`~monai_patchplug.GridAggregator` made before any subject can read it later.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import SpatialCrop
from monai.transforms.croppad.functional import pad_func
from monai.utils import TraceKeys

from .._shapes import TypeSpatialShape, is_lazy, resolve_patch_size
from .._shapes import spatial_shape as _spatial_shape
from ..grid import (
    GridGeometry,
    TypePaddingMode,
    check_overlap_fits,
    check_pad_fits,
    check_padding_mode,
    make_grid,
    resolve_overlap,
)
from .base import PatchSampler
from .crop import read_volume

__all__ = ["GridSampler"]


class GridSampler(PatchSampler):
    """Every patch of a regular grid over a subject, as a list of patch dicts (a MONAI dictionary transform).

    Per axis the corners are ``0, P-O, 2(P-O), ...`` and always a last corner ``S-P``, so every voxel is covered. Each
    patch dict holds the cropped images, the subject's other entries and ``LOCATION``, the patch box in the
    coordinates of the (possibly padded) grid, which is what :class:`~monai_patchplug.GridAggregator` expects. The
    sampler draws nothing; it records the :attr:`geometry` of its last call.

    Args:
        patch_size: an int or one int per spatial dim, for images of any spatial rank >= 1. The image's rank
            decides: an int is that size on each of its axes. Values beyond the image's rank must be 1 and are dropped
            (TorchIO's 2-D convention: ``(64, 64, 1)`` on a ``(C, H, W)`` image).
        patch_overlap: an int or one int per spatial dim, ``0 <= overlap < patch_size``; values beyond the image's
            rank must be 0 and are dropped.
        keys, allow_missing_keys, lazy: as :class:`~monai_patchplug.PatchSampler`.
        padding_mode: ``None`` (no padding; a patch larger than the image is an error), a numpy/torch pad mode name,
            or a number (constant padding with that value). When given, every side is padded by ``overlap // 2``
            (and more where the image is smaller than the patch) before the grid is laid; the aggregator crops the
            padding away again.

    Raises:
        TypeError, ValueError: a bad ``patch_size``, ``patch_overlap`` or ``padding_mode``.

    Example:
        >>> import torch
        >>> from monai_patchplug import LOCATION, GridSampler
        >>> sampler = GridSampler(patch_size=4, patch_overlap=2)
        >>> patches = sampler({"image": torch.rand(1, 6, 8), "id": "s01"})
        >>> len(patches), sampler.num_patches, patches[0]["image"].shape
        (6, 6, torch.Size([1, 4, 4]))
        >>> [patch[LOCATION].tolist() for patch in patches]  # corners 0, 2 on axis 0 and 0, 2, 4 on axis 1
        [[0, 0, 4, 4], [0, 2, 4, 6], [0, 4, 4, 8], [2, 0, 6, 4], [2, 2, 6, 6], [2, 4, 6, 8]]
    """

    def __init__(
        self,
        patch_size: TypeSpatialShape,
        patch_overlap: TypeSpatialShape = 0,
        *,
        keys: KeysCollection | None = None,
        padding_mode: TypePaddingMode = None,
        allow_missing_keys: bool = False,
        lazy: bool = False,
    ) -> None:
        super().__init__(patch_size, keys=keys, allow_missing_keys=allow_missing_keys, lazy=lazy)
        check_overlap_fits(patch_size, patch_overlap)
        self.patch_overlap = patch_overlap
        self.padding_mode = padding_mode
        self._pad = check_padding_mode(padding_mode)
        self._geometry: GridGeometry | None = None

    @property
    def geometry(self) -> GridGeometry | None:
        """The grid of the last call (or :meth:`plan`), ``None`` before any."""
        return self._geometry

    @property
    def num_patches(self) -> int:
        """Number of patches of the last call's grid.

        Raises:
            RuntimeError: before the first call.
        """
        if self._geometry is None:
            raise RuntimeError("GridSampler.num_patches is known after the sampler has been called on a subject.")
        return self._geometry.num_patches

    def plan(self, spatial_shape: Sequence[int]) -> GridGeometry:
        """Lay this sampler's grid over a volume of ``spatial_shape`` and record it as the last call's geometry.

        Useful where the sampler runs in DataLoader workers but the aggregator lives in the main process.

        Returns:
            The :class:`GridGeometry`. Allocates only small tuples.

        Raises:
            ValueError: a patch larger than the volume without ``padding_mode``, or a bad overlap.
        """
        shape = tuple(int(s) for s in spatial_shape)
        size = resolve_patch_size(self._patch_size, len(shape))
        overlap = resolve_overlap(self.patch_overlap, size)
        if self._pad is None and any(p > s for p, s in zip(size, shape)):
            raise ValueError(
                f"GridSampler: patch_size {size} is larger than the image's spatial shape {shape}; pass a "
                "padding_mode (e.g. padding_mode=0) or pad the image first."
            )
        self._geometry = make_grid(shape, size, overlap, pad_border=self._pad is not None)
        return self._geometry

    def randomize(self, data: Mapping[Hashable, Any]) -> None:
        """Select the keys and lay the grid over their shape (nothing is random)."""
        self._keys = self._image_keys(data)
        geometry = self.plan(_spatial_shape(data[self._keys[0]]))
        self._size = geometry.patch_size
        self._corners = geometry.corner_array()

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> list[dict[Hashable, Any]]:
        """Every patch of the grid over ``data``.

        Args:
            data: the subject dict; never modified.
            lazy: override ``self.lazy`` for the crops of this call.

        Returns:
            The list of patch dicts in grid order (last axis fastest). Allocates the patches and, when padding, one
            padded copy of each cropped key. From an array-like (see :func:`~monai_patchplug._shapes.is_lazy`) only
            the patch boxes are read, but with ``padding_mode`` and a padded grid, which reads it whole once.

        Raises:
            KeyError: a requested key is missing.
            ValueError: no image, keys of different spatial shapes, a patch larger than the image without
                ``padding_mode``, or a ``reflect``/``circular`` pad larger than the image.
        """
        d = dict(data)
        self.randomize(d)
        geometry = self._geometry
        assert geometry is not None
        if geometry.is_padded and self._pad is not None:
            mode, kwargs = self._pad
            check_pad_fits(mode, geometry)
            info = self.get_transform_info()
            for key in self._keys:
                img = d[key]
                if is_lazy(img):  # padding needs the volume: an array-like is read whole, once
                    img = read_volume(img)
                img = img if isinstance(img, torch.Tensor) else torch.as_tensor(img)
                d[key] = pad_func(img, geometry.pad_widths, info, mode, lazy=False, **kwargs)
        return self.crop_patches(d, self._keys, self._corners, self._size, self.lazy if lazy is None else lazy)

    def grid(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        """Same as calling the sampler: every patch of the grid over ``data``."""
        return self(data)

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Pad each patch back to the full image, then remove the grid's own padding (when it padded).

        Allocates the full-size images.
        """
        d = super().inverse(data)
        for key, value in d.items():
            if isinstance(value, MetaTensor) and value.applied_operations:
                record = value.applied_operations[-1]
                if self._transforms_match(record) and "padded" in record.get(TraceKeys.EXTRA_INFO, {}):
                    d[key] = _unpad(value)
        return d


def _unpad(img: MetaTensor) -> MetaTensor:
    """Crop away the padding recorded by the sampler's last ``pad_func`` record, popping it."""
    record = img.applied_operations[-1]
    padded = record[TraceKeys.EXTRA_INFO]["padded"][1:]
    out = MetaTensor(img.as_tensor(), meta=dict(img.meta), applied_operations=list(img.applied_operations[:-1]))
    crop = SpatialCrop(roi_start=[a for a, _ in padded], roi_end=[s - b for s, (_, b) in zip(out.shape[1:], padded)])
    with crop.trace_transform(False):
        return crop(out)  # type: ignore[return-value]
