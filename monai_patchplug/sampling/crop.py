"""Cropping a channel-first image to a box, keeping MONAI's metadata and inverse record.

The box is recorded exactly as ``monai.transforms.croppad.functional.crop_func`` records it (``extra_info.cropped``,
affine moved to the box origin), so ``Invertd`` pads a patch-shaped prediction back. The eager path builds that
record directly instead of deep-copying the whole metadata per patch, which is where most of a crop's time went.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import BorderPad
from monai.transforms.croppad.functional import crop_func
from monai.utils import TraceKeys

__all__ = ["crop_box", "uncrop"]


def _box_slices(corner: Sequence[int], size: Sequence[int]) -> tuple[slice, ...]:
    return (slice(None),) + tuple(slice(int(c), int(c) + int(s)) for c, s in zip(corner, size))


def _copy_meta(meta: dict) -> dict:
    """Shallow copy of a meta dict whose arrays are copied, so a later in-place edit never reaches the source."""
    out = {}
    for key, value in meta.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().clone()
        elif isinstance(value, np.ndarray):
            value = value.copy()
        out[key] = value
    return out


def _translated_affine(affine: torch.Tensor, corner: Sequence[int]) -> torch.Tensor:
    """``affine @ translate(corner)`` for an affine of any spatial rank (missing axes shift by 0)."""
    rank = affine.shape[-1] - 1
    shift = torch.zeros(rank, dtype=torch.float64)
    n = min(rank, len(corner))
    shift[:n] = torch.as_tensor(list(corner[:n]), dtype=torch.float64)
    out = affine.detach().to(dtype=torch.float64, device="cpu", copy=True)
    out[:rank, rank] += out[:rank, :rank] @ shift
    return out


def crop_box(
    img: torch.Tensor | np.ndarray,
    corner: Sequence[int],
    size: Sequence[int],
    transform_info: dict[str, Any],
    lazy: bool = False,
) -> torch.Tensor:
    """Crop ``img`` (channel-first) to the box starting at ``corner`` with extent ``size``.

    Args:
        img: ``(C, *spatial)`` tensor, MetaTensor or numpy array; never modified.
        corner: start of the box, one int per spatial dim (inside the image).
        size: extent of the box, one int per spatial dim.
        transform_info: the calling transform's ``get_transform_info()``, recorded for inversion.
        lazy: queue the crop as a pending operation instead of executing it (MetaTensor only).

    Returns:
        A contiguous copy of the box (never a view of ``img``): a MetaTensor with the input's metadata, the affine
        moved to the box origin and the crop appended to ``applied_operations`` while metadata is tracked, else
        a plain tensor. Allocates the patch and, for a MetaTensor, a shallow copy of its meta dict.
    """
    slices = _box_slices(corner, size)
    tracing = get_track_meta() and transform_info.get(TraceKeys.TRACING, True)
    fast = isinstance(img, MetaTensor) and not img.pending_operations and not lazy and tracing
    if not fast:
        out = crop_func(img if isinstance(img, torch.Tensor) else torch.as_tensor(img), slices, lazy, transform_info)
        return out if lazy else out.clone(memory_format=torch.contiguous_format)
    full = [int(s) for s in img.shape[1:]]
    patch = img.as_tensor()[slices].clone(memory_format=torch.contiguous_format)
    info = dict(transform_info)
    info[TraceKeys.ORIG_SIZE] = tuple(full)
    info[TraceKeys.LAZY] = False
    cropped = []
    for c, s, o in zip(corner, size, full):
        cropped += [int(c), o - int(c) - int(s)]
    info[TraceKeys.EXTRA_INFO] = {"cropped": cropped}
    meta = _copy_meta(img.meta)
    meta["affine"] = _translated_affine(img.affine, corner)
    return MetaTensor(patch, meta=meta, applied_operations=[*img.applied_operations, info])


def uncrop(img: MetaTensor) -> MetaTensor:
    """Pad a cropped MetaTensor back to the size it was cropped from, popping the crop record.

    Args:
        img: a MetaTensor whose most recent applied operation is a crop recorded by :func:`crop_box`
            (its channel count may differ from the cropped image's, e.g. a prediction).

    Returns:
        The image zero-padded to the original spatial size, affine restored. Allocates the padded image.
    """
    record = img.applied_operations[-1]
    out = MetaTensor(img.as_tensor(), meta=dict(img.meta), applied_operations=list(img.applied_operations[:-1]))
    pad = BorderPad(record[TraceKeys.EXTRA_INFO]["cropped"])
    with pad.trace_transform(False):
        return pad(out)  # type: ignore[return-value]
