"""Argument checks shared by :class:`~monai_patchplug.GridInferer` and :class:`~monai_patchplug.GridAggregator`.

One rule: a wrong type is a ``TypeError``, a wrong value a ``ValueError``, and every message names the public
class, the argument and what it got.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real
from typing import Any

import numpy as np
import torch

__all__ = ["ScaleOut", "check_device", "check_scale_out"]


@dataclass(frozen=True)
class ScaleOut:
    """The scale-out options of a front end, checked: streaming (``output``/``postprocess``), a region of interest
    (``roi_mask``, ``fill_value``) and sharding (``distributed``/``process_group``, ``dst``)."""

    output: Any
    postprocess: Callable[[torch.Tensor], Any] | None
    roi_mask: Any
    fill_value: float
    distributed: bool
    process_group: Any
    dst: int | None

    @property
    def streaming(self) -> bool:
        """Whether finished slabs go to a destination instead of one in-memory volume."""
        return self.output is not None or self.postprocess is not None

    @property
    def sharded(self) -> bool:
        """Whether the patches are shared out over a process group."""
        return self.distributed or self.process_group is not None


def check_scale_out(
    who: str,
    output: Any = None,
    postprocess: Any = None,
    roi_mask: Any = None,
    fill_value: Any = 0.0,
    distributed: Any = False,
    process_group: Any = None,
    dst: Any = None,
    *,
    mask_key: bool = True,
) -> ScaleOut:
    """Check the scale-out options of ``who`` (the public class named in the messages).

    Args:
        who: ``"GridInferer"`` or ``"GridAggregator"``.
        output, postprocess, roi_mask, fill_value, distributed, process_group, dst: the front end's options.
        mask_key: whether ``roi_mask`` may name a keyword argument of the call (the inferer's calls have them).

    Returns:
        The checked :class:`ScaleOut`.

    Raises:
        TypeError: a ``postprocess`` that is not callable, a ``fill_value`` that is not a real number, a
            ``roi_mask`` given as a key where there is no call to take it from, a ``distributed`` that is not a bool.
        ValueError: a ``dst`` that is not a non-negative rank, streaming combined with sharding.
    """
    if postprocess is not None and not callable(postprocess):
        raise TypeError(f"{who}: postprocess must be callable, got {type(postprocess).__name__}.")
    if dst is not None and (isinstance(dst, bool) or not isinstance(dst, int | np.integer) or dst < 0):
        raise ValueError(f"{who}: dst must be None or a rank (a non-negative int), got {dst!r}.")
    if isinstance(fill_value, bool | np.bool_) or not isinstance(fill_value, Real):
        raise TypeError(f"{who}: fill_value must be a real number, got {fill_value!r} ({type(fill_value).__name__}).")
    if not isinstance(distributed, bool | np.bool_):
        raise TypeError(f"{who}: distributed must be a bool, got {distributed!r}.")
    if isinstance(roi_mask, str) and not mask_key:
        raise TypeError(
            f"{who}: roi_mask must be a tensor or array (the aggregator sees no data dict); pass subject[key]."
        )
    options = ScaleOut(output, postprocess, roi_mask, float(fill_value), bool(distributed), process_group, dst)
    if options.streaming and options.sharded:
        raise ValueError(
            f"{who}: output=/postprocess= (streaming) cannot be combined with distributed inference; use "
            "dst=<rank> and postprocess the returned volume on that rank."
        )
    return options


def check_device(device: Any, name: str, who: str) -> torch.device | None:
    """``device`` as a ``torch.device`` (``None`` stays ``None``).

    Raises:
        TypeError: neither a string nor a ``torch.device``.
        ValueError: a string torch does not know, or the ``meta`` device (it holds no data to return).
    """
    if device is None:
        return None
    if not isinstance(device, str | torch.device):
        raise TypeError(f"{who}: {name} must be None, a string or a torch.device, got {device!r}.")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"{who}: {name}={device!r} is not a device torch knows ({err}).") from None
    if resolved.type == "meta":
        raise ValueError(f"{who}: {name}='meta' holds no data; use 'cpu' or an accelerator.")
    return resolved
