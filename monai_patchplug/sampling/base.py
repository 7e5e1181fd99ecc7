"""PatchSampler: the MONAI dictionary transform that every sampler is.

It selects the keys to crop, checks that they share one spatial shape, asks the subclass for the patch corners
(all ``num_samples`` drawn together from ``self.R``), crops every key at each corner and records the box.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from copy import deepcopy
from typing import Any, NamedTuple

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, LazyTransform, MapTransform, Randomizable
from monai.transforms.traits import MultiSampleTrait
from monai.utils import TransformBackends, ensure_tuple

from .._shapes import (
    LOCATION,
    TypeSpatialShape,
    fill_patch_size,
    host_array,
    image_entries,
    is_array,
    is_lazy,
    location_tensor,
    parse_spatial_shape,
    read_box,
    resolve_patch_size,
    spec_length,
)
from .._shapes import spatial_shape as _spatial_shape
from .crop import crop_box, crop_source, read_crop, translated_affines, uncrop

__all__ = ["PatchDraw", "PatchSampler"]


class PatchDraw(NamedTuple):
    """One draw of a sampler, before anything is cropped: what :meth:`PatchSampler.crop_patches` needs.

    Attributes:
        keys: the keys to crop, in the order the sampler crops them.
        corners: ``(n, ndim)`` int64 patch corners; empty when there is nothing to crop (``allow_missing_keys`` and
            none of the keys in the data).
        size: the patch size, one int per spatial dim (``()`` when there is nothing to crop).
    """

    keys: tuple[Hashable, ...]
    corners: np.ndarray
    size: tuple[int, ...]


def _check_num_samples(num_samples: int | None) -> int | None:
    if num_samples is None:
        return None
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)):
        raise TypeError(f"num_samples must be None or a positive int, got {num_samples!r}.")
    if num_samples < 1:
        raise ValueError(f"num_samples must be None or a positive int, got {num_samples!r}.")
    return int(num_samples)


class PatchSampler(Randomizable, MapTransform, InvertibleTransform, LazyTransform, MultiSampleTrait):
    """Base class of the random patch samplers: a MONAI ``Randomizable`` dictionary transform.

    Calling it on a data dict (``{"image": (C, *spatial), "label": ..., other entries}``) returns one patch dict
    (``num_samples=None``, TorchIO's ``patch = sampler(subject)``) or a list of ``num_samples`` patch dicts (MONAI's
    multi-sample convention, flattened by ``list_data_collate``). Each patch dict holds the cropped arrays, the
    other entries of the input, and ``LOCATION``: ``2 * ndim`` values, ``[i0, j0, k0, i1, j1, k1]`` in 3-D,
    ``[i0, i1]`` for a 1-D signal.

    Subclasses implement :meth:`draw_corners`. Randomness comes only from ``self.R``; inputs are never modified.

    Entries may also be array-likes (``shape``, ``dtype`` and ``__getitem__`` with a tuple of slices:
    ``numpy.memmap``, ``zarr.Array``, ``h5py.Dataset``, :class:`~monai_patchplug.LazyVolume` from
    :class:`~monai_patchplug.LoadLazyd`): only the patch boxes are read from them (plus what a map-driven draw needs:
    the valid-centre region of a label map without a :class:`~monai_patchplug.LabelIndex`, channel 0 of a weight
    map), and each patch is the MetaTensor (affine, crop record for ``Invertd``) the same image in memory gives. Such
    patches are read eagerly, also under ``lazy=True``.

    Args:
        patch_size: an int or one int per spatial dim; images of any spatial rank >= 1 (a ``(C, S)`` signal, a
            ``(C, H, W, D, T)`` volume). The image's rank decides: an int is that size on each of its axes, so one
            sampler serves every rank. Values beyond the image's rank must be 1 and are dropped (TorchIO's 2-D
            convention: ``(64, 64, 1)`` on a ``(C, H, W)`` image).
        keys: keys to crop. ``None``: the image entries (see :func:`~monai_patchplug._shapes.image_entries`: arrays
            with a channel and 2 or more spatial dims, or ``(C, S)`` signals when there is none), which must share one
            spatial shape; other entries are copied to every patch.
        num_samples: ``None`` for one patch dict, or the number of patch dicts to return as a list.
        allow_missing_keys: with explicit ``keys``, skip keys that are absent instead of raising ``KeyError``.
        lazy: queue the crops as pending operations (MONAI lazy resampling) instead of executing them.
        copy: make each patch a contiguous copy. By default a patch is a view of the input's memory, as MONAI's
            croppers return it: collation (``list_data_collate``) then makes the one copy. The sampler never writes
            to its input either way, but an in-place edit of a view reaches the input: pass ``copy=True`` when patches
            are edited in place or kept while the volume should be freed.
        allow_smaller: MONAI's option: on an axis where the image is smaller than the patch, the patch takes the
            image's size instead of raising.
        fill_non_positive: MONAI's ``spatial_size`` convention: a value <= 0 takes the image's size on that axis
            (set by the samplers when MONAI's ``roi_size``/``spatial_size`` is given).

    Raises:
        TypeError, ValueError: on a bad ``patch_size`` or ``num_samples``.

    Example:
        A sampler that always takes the patch at the origin; the base class crops every image entry, copies the
        others and records the box:

        >>> import numpy as np
        >>> import torch
        >>> from monai_patchplug import LOCATION, PatchSampler
        >>> class OriginSampler(PatchSampler):
        ...     def draw_corners(self, data, spatial_shape, patch_size, n):
        ...         return np.zeros((n, len(spatial_shape)), dtype=np.int64)
        >>> patch = OriginSampler(patch_size=2)({"image": torch.arange(16.0).reshape(1, 4, 4), "id": "s01"})
        >>> patch["image"].shape, patch[LOCATION], patch["id"]
        (torch.Size([1, 2, 2]), tensor([0, 0, 2, 2]), 's01')
        >>> patch["image"].as_tensor()
        tensor([[[0., 1.],
                 [4., 5.]]])
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        patch_size: TypeSpatialShape | None,
        *,
        keys: KeysCollection | None = None,
        num_samples: int | None = None,
        allow_missing_keys: bool = False,
        lazy: bool = False,
        copy: bool = False,
        allow_smaller: bool = False,
        fill_non_positive: bool = False,
    ) -> None:
        if patch_size is None:
            raise TypeError(f"{type(self).__name__}: patch_size is required.")
        self.fill_non_positive = bool(fill_non_positive)
        checked = fill_patch_size(patch_size, None) if self.fill_non_positive else patch_size
        count = spec_length(checked)
        if count == 0:
            raise ValueError(f"{type(self).__name__}: patch_size must be an int or ints, got {patch_size!r}.")
        resolve_patch_size(checked, count or 1)
        self._patch_size = patch_size
        self.allow_smaller = bool(allow_smaller)
        self.keys: tuple[Hashable, ...] | None = None if keys is None else ensure_tuple(keys)
        if self.keys is not None and not self.keys:
            raise ValueError("keys must be None or non-empty.")
        self.allow_missing_keys = allow_missing_keys
        self.num_samples = _check_num_samples(num_samples)
        self.copy = bool(copy)
        LazyTransform.__init__(self, lazy=lazy)
        self._keys: list[Hashable] = []
        self._size: tuple[int, ...] = ()
        self._corners = np.zeros((0, 3), dtype=np.int64)

    @property
    def patch_size(self) -> tuple[int, ...]:
        """The patch size as given: an int as a 3-tuple, else the given values as a tuple of ints. What is cropped
        depends on the image's rank (an int is that size on each of its axes; see the class docstring)."""
        if isinstance(self._patch_size, Sequence) or is_array(self._patch_size):
            return tuple(int(v) for v in np.asarray(self._patch_size).ravel())
        if self.fill_non_positive and int(self._patch_size) <= 0:  # MONAI's roi_size=-1: the image size per axis
            return (int(self._patch_size),) * 3
        return parse_spatial_shape(self._patch_size)

    # -- what a subclass provides -------------------------------------------------------------------------------
    def map_key(self, data: Mapping[Hashable, Any]) -> Hashable | None:
        """The key of ``data`` whose array drives the draw (a weight or label map), or ``None``."""
        return None

    def draw_corners(
        self, data: Mapping[Hashable, Any], spatial_shape: tuple[int, ...], patch_size: tuple[int, ...], n: int
    ) -> np.ndarray:
        """Draw ``n`` patch corners (``(n, ndim)`` int64, each in ``[0, spatial_shape - patch_size]``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement draw_corners().")

    def consumed_keys(self) -> tuple[Hashable, ...]:
        """Keys the draw reads that are not copied to the patches (e.g. MONAI's index lists)."""
        return ()

    # -- MONAI transform protocol ---------------------------------------------------------------------------------
    def randomize(self, data: Mapping[Hashable, Any]) -> None:
        """Check ``data``, then draw this call's patch corners from ``self.R`` and keep them for :meth:`__call__`."""
        self._keys = self._image_keys(data, none_ok=self.allow_missing_keys)
        map_key = self.map_key(data)
        if map_key is None and not self._keys:  # allow_missing_keys, and none of the keys is there
            self._size, self._corners = (), np.zeros((0, 3), dtype=np.int64)
            return
        shape = _spatial_shape(data[map_key if map_key is not None else self._keys[0]])
        self._size = self._fit_patch_size(shape)
        self._corners = self.draw_corners(data, shape, self._size, self.num_samples or 1)

    def __call__(
        self, data: Mapping[Hashable, Any], lazy: bool | None = None
    ) -> dict[Hashable, Any] | list[dict[Hashable, Any]]:
        """Draw and crop the patches of one subject.

        Args:
            data: the subject dict; never modified.
            lazy: override ``self.lazy`` for this call.

        Returns:
            One patch dict (``num_samples=None``) or a list of ``num_samples`` patch dicts (see
            :meth:`crop_patches` for what is allocated). With ``allow_missing_keys`` and none of ``keys`` in the
            data, the data uncropped (as MONAI's croppers return it).

        Raises:
            TypeError: ``data`` is not a dict (e.g. a bare tensor).
            KeyError: a requested key (or the map key) is missing.
            ValueError: no image, keys of different spatial shapes, a patch larger than the image, or a map the
                subclass cannot draw from.
        """
        if not isinstance(data, Mapping):
            hint = " Wrap the image in a dict, e.g. sampler({'image': img})." if is_array(data) else ""
            raise TypeError(
                f"{type(self).__name__}: data must be a dict of channel-first arrays ({{'image': (C, *spatial), "
                f"...}}), got {type(data).__name__}.{hint}"
            )
        d = dict(data)
        patches = self.crop_drawn(d, self.draw(d), self.lazy if lazy is None else lazy)
        return patches if self.num_samples is not None else patches[0]

    def draw(self, data: Mapping[Hashable, Any]) -> PatchDraw:
        """Check ``data`` and draw this call's patch corners from ``self.R``, reading no patch.

        What :meth:`__call__` does before cropping (it calls this), for a caller that crops later: passing the
        result to :meth:`crop_drawn` gives the patches ``__call__`` gives for the same random state; passing its rows
        one at a time to :meth:`crop_patches` gives the same patches, except that each is numbered 0
        (``patch_index``). Reads only what the draw needs (a label or weight map).

        Args:
            data: the subject dict; never modified.

        Returns:
            The keys to crop, the ``(num_samples or 1, ndim)`` corners and the patch size.

        Raises:
            KeyError, ValueError: as :meth:`__call__`.
        """
        self.randomize(data)
        return PatchDraw(tuple(self._keys), self._corners, self._size)

    def crop_drawn(
        self, data: Mapping[Hashable, Any], drawn: PatchDraw, lazy: bool = False
    ) -> list[dict[Hashable, Any]]:
        """The patches of a :meth:`draw` of ``data``, always as a list.

        Args:
            data: the subject dict the draw was made from; never modified.
            drawn: the draw.
            lazy: queue the crops as pending operations instead of executing them.

        Returns:
            :meth:`crop_patches` of the draw's corners; when there is nothing to crop (``allow_missing_keys`` and
            none of the keys in the data), the data as it is, once per sample, as MONAI's croppers return it.
        """
        if len(drawn.corners):
            return self.crop_patches(data, drawn.keys, drawn.corners, drawn.size, lazy)
        return [_entries_for_a_patch(data) for _ in range(self.num_samples or 1)]

    def crop_patches(
        self,
        data: Mapping[Hashable, Any],
        keys: Sequence[Hashable],
        corners: np.ndarray,
        size: tuple[int, ...],
        lazy: bool = False,
    ) -> list[dict[Hashable, Any]]:
        """One patch dict per corner: ``keys`` cropped (with metadata and inverse record), ``LOCATION`` set.

        Entries that are not cropped are deep-copied per patch, except arrays, which are shared (a full volume is
        not duplicated ``len(corners)`` times). Allocates the patch dicts, their metadata and, with ``self.copy``,
        the patch arrays; otherwise the patches are views of ``data``'s arrays.
        """
        info = self.get_transform_info()
        corners = np.asarray(corners, dtype=np.int64)
        sources = {key: data[key] if is_lazy(data[key]) else crop_source(data[key]) for key in keys}
        affines = {
            key: translated_affines(src.affine, corners) if isinstance(src, MetaTensor) else None
            for key, src in sources.items()
        }
        dropped = set(keys) | set(self.consumed_keys())
        others = {k: v for k, v in data.items() if k not in dropped}
        centres = corners + np.asarray(size, dtype=np.int64) // 2
        patches = []
        for index, corner in enumerate(corners.tolist()):
            patch = _entries_for_a_patch(others)
            location = location_tensor(corner, size)
            for key, src in sources.items():
                affine = None if affines[key] is None else affines[key][index]
                if is_lazy(src):  # read the box only; nothing to defer under lazy=True
                    out = read_crop(src, corner, size, info)
                else:
                    out = crop_box(src, corner, size, info, lazy=lazy, affine=affine, copy=self.copy)
                if isinstance(out, MetaTensor):
                    out.meta["patch_index"] = index
                    out.meta["crop_center"] = centres[index].copy()
                    out.meta[LOCATION] = location.clone()
                patch[key] = out
            patch[LOCATION] = location
            patches.append(patch)
        return patches

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Pad every MetaTensor whose most recent operation is this sampler's crop back to the full image.

        Used by ``monai.transforms.Invertd``/``Compose.inverse``; entries cropped by another transform are left as
        they are. Allocates the padded images.
        """
        d = dict(data)
        for key, value in d.items():
            if isinstance(value, MetaTensor) and value.applied_operations:
                if self._transforms_match(value.applied_operations[-1]):
                    d[key] = uncrop(value)
        return d

    # -- key selection and checks ----------------------------------------------------------------------------------
    def _image_keys(self, data: Mapping[Hashable, Any], none_ok: bool = False) -> list[Hashable]:
        """Keys to crop, the map key (if any) first; checks they exist and share one spatial shape. With
        ``none_ok``, explicit keys of which none is in ``data`` (and no map key) give ``[]`` instead of an error."""
        map_key = self.map_key(data)
        if map_key is not None and map_key not in data:
            raise KeyError(f"{type(self).__name__}: key {map_key!r} not in the data (keys: {list(data)!r}).")
        if self.keys is None:
            keys = image_entries(data)
            if not keys:
                raise ValueError(
                    f"{type(self).__name__}: no image in the data: expected channel-first arrays (C, *spatial) "
                    f"with at least one spatial dim; keys: {list(data)!r}."
                )
        else:
            missing = [k for k in self.keys if k not in data]
            if missing and not self.allow_missing_keys:
                raise KeyError(
                    f"{type(self).__name__}: key {missing[0]!r} not in the data (keys: {list(data)!r}); "
                    "pass allow_missing_keys=True to skip absent keys."
                )
            keys = [k for k in self.keys if k in data]
            if not keys and map_key is None and not none_ok:
                raise ValueError(f"{type(self).__name__}: none of keys {self.keys!r} is in the data.")
        if map_key is not None:
            keys = [map_key] + [k for k in keys if k != map_key]
        for key in keys:
            value = data[key]
            if not (is_array(value) or is_lazy(value)) or len(value.shape) < 2:
                got = tuple(value.shape) if is_array(value) or is_lazy(value) else type(value).__name__
                raise ValueError(
                    f"{type(self).__name__}: data[{key!r}] must be a channel-first (C, *spatial) array with at least "
                    f"one spatial dim, got {got}."
                )
        shapes = {k: _spatial_shape(data[k]) for k in keys}
        if len(set(shapes.values())) > 1:
            hint = " Pass keys=[...] to crop only some entries." if self.keys is None else ""
            raise ValueError(f"{type(self).__name__}: spatial shapes differ between keys: {shapes!r}.{hint}")
        if map_key is not None and self.keys is not None and map_key not in self.keys:
            keys.remove(map_key)
        return keys

    def _fit_patch_size(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        spec = fill_patch_size(self._patch_size, shape) if self.fill_non_positive else self._patch_size
        size = resolve_patch_size(spec, len(shape))
        if self.allow_smaller:
            size = tuple(min(p, s) for p, s in zip(size, shape))
        if any(p > s for p, s in zip(size, shape)):
            raise ValueError(
                f"{type(self).__name__}: patch_size {size} is larger than the image's spatial shape {shape}; "
                "pad the image first (e.g. monai.transforms.SpatialPadd)."
            )
        return size

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> PatchSampler:
        """Seed ``self.R`` (as every MONAI ``Randomizable``); returns ``self``."""
        super().set_random_state(seed=seed, state=state)
        return self


def valid_region(img: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """View (no copy) of channel-indexed ``img``'s voxels that are valid patch centres: ``P//2 ... S-1-(P-1)//2``.

    Index ``i`` of the view on an axis is the patch corner ``i`` on that axis. From an array-like (see
    :func:`~monai_patchplug._shapes.is_lazy`) only that region is read, into a numpy array of its own.
    """
    slices = tuple(slice(p // 2, s - (p - 1) // 2) for p, s in zip(patch_size, img.shape[-len(patch_size) :]))
    if is_lazy(img):  # an array-like: read that region only
        leading = (slice(None),) * (len(img.shape) - len(patch_size))
        return host_array(read_box(img, (*leading, *slices)))
    return img[(..., *slices)]


def _entries_for_a_patch(entries: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
    """``entries`` for one patch: arrays shared (a full volume is not duplicated per patch), the rest deep-copied."""
    return {k: v if is_array(v) or is_lazy(v) else deepcopy(v) for k, v in entries.items()}
