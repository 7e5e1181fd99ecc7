"""MONAI's keyword arguments for our samplers, so that swapping only ``_target_`` in a bundle config works.

Each alias is resolved once, in ``__init__``; our names stay canonical. Giving both names of one argument with
different values (for sizes: different resolved sizes) is an error, never a silent choice.
"""

from __future__ import annotations

from numbers import Integral
from typing import Any

import numpy as np

from .._shapes import resolve_patch_size, spec_length

__all__ = ["pick", "pick_size", "size_and_fill", "monai_num_samples"]


def pick(ours_name: str, ours: Any, monai_name: str, theirs: Any) -> Any:
    """The value of an argument given under our name or MONAI's (``None`` means not given).

    Raises:
        ValueError: both names are given with different values.
    """
    if ours is not None and theirs is not None and not _same(ours, theirs):
        raise ValueError(f"give {ours_name}={ours!r} or MONAI's {monai_name}={theirs!r}, not both.")
    return ours if ours is not None else theirs


def _same(a: Any, b: Any) -> bool:
    """Equal values, whether given as numbers, sequences or arrays (``(4, 4)``, ``[4, 4]``, ``np.array([4, 4])``)."""
    try:
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    except (TypeError, ValueError):
        return bool(a == b)


def _resolved(size: Any, max_ndim: int) -> dict[int, tuple[int, ...]]:
    """``{spatial ndim: patch size}`` for the image ranks ``1 .. max_ndim`` that ``size`` fits; ``{}`` if it is no
    valid size."""
    out = {}
    for ndim in range(1, max_ndim + 1):
        try:
            out[ndim] = resolve_patch_size(size, ndim)
        except (TypeError, ValueError):
            continue
    return out


def _same_size(a: Any, b: Any) -> bool:
    """Whether two patch-size specs give the same patch on every image they both fit (``8`` and ``(8, 8, 8)``, ``8``
    and ``(8, 8)``), and fit one image at least; specs that are no valid size compare by value."""
    max_ndim = max(spec_length(a) or 1, spec_length(b) or 1)
    ra, rb = _resolved(a, max_ndim), _resolved(b, max_ndim)
    if not ra or not rb:
        return _same(a, b)
    common = ra.keys() & rb.keys()
    return bool(common) and all(ra[ndim] == rb[ndim] for ndim in common)


def pick_size(ours_name: str, ours: Any, monai_name: str, theirs: Any) -> Any:
    """A patch size given under our name or MONAI's; the same size spelt two ways (``8`` and ``(8, 8, 8)``) is no
    conflict, and then the more explicit one (a sequence) is kept.

    Raises:
        ValueError: both names are given with sizes that differ.
    """
    if ours is None or theirs is None:
        return ours if ours is not None else theirs
    if not _same_size(ours, theirs):
        raise ValueError(f"give {ours_name}={ours!r} or MONAI's {monai_name}={theirs!r}, not both.")
    return theirs if isinstance(ours, Integral) and not isinstance(theirs, Integral) else ours


def size_and_fill(patch_size: Any, monai_name: str, monai_size: Any) -> tuple[Any, bool]:
    """``(patch size, fill_non_positive)``: MONAI's size keeps MONAI's meaning of values <= 0 (the image size).

    Raises:
        ValueError: ``patch_size`` and MONAI's size are both given and differ (see :func:`pick_size`).
    """
    size = pick_size("patch_size", patch_size, monai_name, monai_size)
    return size, patch_size is None and monai_size is not None


def monai_num_samples(num_samples: int | None, used_monai_args: bool) -> int | None:
    """MONAI's croppers return a list even for one sample (``num_samples=1`` by default): keep that when configured
    with MONAI's arguments, so a swapped-in sampler feeds the same pipeline."""
    return 1 if num_samples is None and used_monai_args else num_samples
