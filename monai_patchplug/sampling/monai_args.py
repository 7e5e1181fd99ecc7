"""MONAI's keyword arguments for our samplers, so that swapping only ``_target_`` in a bundle config works.

Each alias is resolved once, in ``__init__``; our names stay canonical. Giving both names of one argument with
different values is an error, never a silent choice.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["pick", "size_and_fill", "monai_num_samples"]


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


def size_and_fill(patch_size: Any, monai_name: str, monai_size: Any) -> tuple[Any, bool]:
    """``(patch size, fill_non_positive)``: MONAI's size keeps MONAI's meaning of values <= 0 (the image size)."""
    size = pick("patch_size", patch_size, monai_name, monai_size)
    return size, patch_size is None and monai_size is not None


def monai_num_samples(num_samples: int | None, used_monai_args: bool) -> int | None:
    """MONAI's croppers return a list even for one sample (``num_samples=1`` by default): keep that when configured
    with MONAI's arguments, so a swapped-in sampler feeds the same pipeline."""
    return 1 if num_samples is None and used_monai_args else num_samples
