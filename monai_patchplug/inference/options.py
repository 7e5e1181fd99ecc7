"""Argument checks shared by :class:`~monai_patchplug.GridInferer` and :class:`~monai_patchplug.GridAggregator`.

One rule: a wrong type is a ``TypeError``, a wrong value a ``ValueError``, and every message names the public
class, the argument and what it got.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch

__all__ = [
    "ScaleOut",
    "check_accumulate_dtype",
    "check_device",
    "check_ensemble",
    "check_margin",
    "check_mirror_axes",
    "check_scale_out",
]


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
    streamed_shards: bool = False,
) -> ScaleOut:
    """Check the scale-out options of ``who`` (the public class named in the messages).

    Args:
        who: ``"GridInferer"`` or ``"GridAggregator"``.
        output, postprocess, roi_mask, fill_value, distributed, process_group, dst: the front end's options.
        mask_key: whether ``roi_mask`` may name a keyword argument of the call (the inferer's calls have them).
        streamed_shards: whether sharding may stream (the inferer shards by parts of the output's rows).

    Returns:
        The checked :class:`ScaleOut`.

    Raises:
        TypeError: a ``postprocess`` that is not callable, a ``fill_value`` that is not a real number, a
            ``roi_mask`` given as a key where there is no call to take it from, a ``distributed`` that is not a bool.
        ValueError: a ``dst`` that is not a non-negative rank, streaming combined with sharding (where it is not
            ``streamed_shards``).
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
    if options.streaming and options.sharded and not streamed_shards:
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


#: the accumulator dtypes a caller may choose
ACCUMULATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _int_tuple(value: Any, name: str, who: str) -> tuple[int, ...]:
    """``value`` (an int or a sequence of ints) as a tuple of non-negative ints.

    Raises:
        TypeError: a value that is not an integer.
        ValueError: a negative value.
    """
    values = (value,) if isinstance(value, Integral) else tuple(value) if isinstance(value, Sequence) else None
    if values is None or any(isinstance(v, bool | np.bool_) or not isinstance(v, Integral) for v in values):
        raise TypeError(f"{who}: {name} must be an int or a sequence of ints, got {value!r}.")
    if any(v < 0 for v in values):
        raise ValueError(f"{who}: {name} must hold non-negative ints, got {value!r}.")
    return tuple(int(v) for v in values)


def check_mirror_axes(mirror_axes: Any, who: str) -> tuple[int, ...]:
    """The spatial axes to mirror (``()`` for ``None``); their range is checked against the input at the call.

    Raises:
        TypeError: not a sequence of ints.
        ValueError: a negative or repeated axis.
    """
    if mirror_axes is None:
        return ()
    if isinstance(mirror_axes, Integral):
        raise TypeError(f"{who}: mirror_axes must be a sequence of spatial axes (e.g. (0, 1, 2)), got {mirror_axes!r}.")
    axes = _int_tuple(mirror_axes, "mirror_axes", who)
    if len(set(axes)) != len(axes):
        raise ValueError(f"{who}: mirror_axes must not repeat an axis, got {tuple(mirror_axes)}.")
    return axes


def check_accumulate_dtype(accumulate_dtype: Any, who: str) -> torch.dtype | None:
    """``None`` (the default rule) or one of :data:`ACCUMULATE_DTYPES` (also by name, e.g. ``"float16"``).

    Raises:
        TypeError: neither a dtype nor a name.
        ValueError: a dtype that is not float16, bfloat16 or float32.
    """
    if accumulate_dtype is None:
        return None
    dtype = getattr(torch, accumulate_dtype, None) if isinstance(accumulate_dtype, str) else accumulate_dtype
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{who}: accumulate_dtype must be a torch dtype, got {accumulate_dtype!r}.")
    if dtype not in ACCUMULATE_DTYPES:
        raise ValueError(f"{who}: accumulate_dtype must be one of {ACCUMULATE_DTYPES} or None, got {dtype}.")
    return dtype


def check_margin(output_margin: Any, who: str) -> tuple[int, ...]:
    """The valid-convolution margin: one int (every axis) or one per spatial axis.

    Raises:
        TypeError, ValueError: as :func:`_int_tuple`.
    """
    return _int_tuple(output_margin, "output_margin", who)


def check_ensemble(
    network: Any, ensemble_weights: Any, sw_device: Any, who: str
) -> tuple[list[Callable[..., Any]], list[float], list[torch.device | None]]:
    """The networks of a call (one, or a list/tuple/``nn.ModuleList``), their weights and devices.

    Args:
        network: the call's network argument.
        ensemble_weights: ``None`` (equal) or one non-negative number per network, not all zero.
        sw_device: ``None``, one device for all, or one per network.
        who: the public class named in the messages.

    Raises:
        TypeError: a network that is not callable.
        ValueError: an empty list of networks, weights or devices that do not match the networks.
    """
    networks = list(network) if isinstance(network, list | tuple | torch.nn.ModuleList) else [network]
    if not networks:
        raise ValueError(f"{who}: the list of networks is empty.")
    for net in networks:
        if not callable(net):
            raise TypeError(f"{who}: every network must be callable, got {type(net).__name__}.")
    weights = [1.0] * len(networks) if ensemble_weights is None else list(np.ravel(ensemble_weights))
    if len(weights) != len(networks) or any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"{who}: ensemble_weights must be one non-negative number per network ({len(networks)}), not all zero, "
            f"got {ensemble_weights!r}."
        )
    devices = list(sw_device) if isinstance(sw_device, list | tuple) else [sw_device] * len(networks)
    if len(devices) != len(networks):
        raise ValueError(
            f"{who}: sw_device has {len(devices)} devices for {len(networks)} networks; give one per network."
        )
    return networks, [float(w) for w in weights], devices
