"""LabelSampler: the label at the patch centre is drawn with the requested probabilities."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from numbers import Real
from typing import Any

import numpy as np
import torch

from .._shapes import TypeSpatialShape, host_array, is_array
from .base import PatchSampler, valid_region
from .weighted import draw_from_weights, no_mass_message, row_sums

__all__ = ["LabelSampler", "parse_label_probabilities"]



def _is_integer(value: torch.Tensor | np.ndarray) -> bool:
    dtype = value.dtype
    if isinstance(dtype, torch.dtype):
        return not dtype.is_floating_point and not dtype.is_complex
    return np.issubdtype(dtype, np.integer) or dtype == np.bool_


def _label_value(key: Any) -> int:
    """A label key as an int; JSON configs give ``"1"`` for ``1``."""
    if isinstance(key, str):
        try:
            return int(key.strip())
        except ValueError:
            raise ValueError(f"label_probabilities: label {key!r} is not an integer.") from None
    if isinstance(key, (bool, np.bool_)) or not isinstance(key, Real) or not float(key).is_integer():
        raise ValueError(f"label_probabilities: label {key!r} is not an integer.")
    return int(key)


def parse_label_probabilities(label_probabilities: Mapping[Any, Any]) -> dict[int, float]:
    """Check and normalise ``{label: probability}`` (labels as ints, probabilities as floats, unnormalised).

    Raises:
        TypeError: not a mapping, or a probability that is not a number.
        ValueError: a label that is not an integer, a duplicate label, a negative or non-finite probability, or all
            probabilities zero.
    """
    if not isinstance(label_probabilities, Mapping):
        raise TypeError(f"label_probabilities must be a dict {{label: probability}}, got {label_probabilities!r}.")
    out: dict[int, float] = {}
    for key, p in label_probabilities.items():
        label = _label_value(key)
        if label in out:
            raise ValueError(f"label_probabilities: label {label} is given twice ({label_probabilities!r}).")
        if isinstance(p, (bool, np.bool_)) or not isinstance(p, Real):
            raise TypeError(f"label_probabilities: probability of label {label} must be a number, got {p!r}.")
        if not math.isfinite(p) or p < 0:
            raise ValueError(f"label_probabilities: probability of label {label} must be finite and >= 0, got {p!r}.")
        out[label] = float(p)
    if not out or sum(out.values()) <= 0:
        raise ValueError(f"label_probabilities must have a positive probability, got {label_probabilities!r}.")
    return out


class LabelSampler(PatchSampler):
    """Draw patches whose centre label follows the given probabilities.

    P(centre has label L) = p_L / sum of p over the labels present on valid centres; within a label every voxel is
    equally likely (so each voxel of L gets p_L / count_L). Labels absent from the valid centres are skipped.
    A single-channel map holds label values (any integer or float dtype); a multi-channel map is one-hot and a
    label is a channel index. ``label_probabilities=None`` makes every foreground voxel equally likely (single
    channel: value > 0; one-hot: non-zero in any channel but 0).

    Args:
        patch_size: as :class:`~monai_patchplug.PatchSampler`.
        label_name: key of the label map. ``None``: the first entry holding an integer or bool image, else
            ``"label"``.
        label_probabilities: ``{label: probability}``, unnormalised; string keys (JSON) are read as ints.
        keys, num_samples, allow_missing_keys, lazy: as :class:`~monai_patchplug.PatchSampler`.

    Raises:
        TypeError, ValueError: on bad ``label_probabilities`` (see :func:`parse_label_probabilities`).
        ValueError: at call time, when none of the labels is present on valid centres or a one-hot map lacks a
            requested channel.
    """

    def __init__(
        self,
        patch_size: TypeSpatialShape,
        label_name: Hashable | None = None,
        label_probabilities: Mapping[Any, float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(patch_size, **kwargs)
        self.label_name = label_name
        self.label_probabilities = (
            None if label_probabilities is None else parse_label_probabilities(label_probabilities)
        )

    @property
    def requires_current_data(self) -> bool:
        """The draw reads the label values, so a lazy pipeline must apply pending operations first."""
        return True

    def map_key(self, data: Mapping[Hashable, Any]) -> Hashable:
        """``label_name``, or the first integer-typed image of ``data`` (else ``"label"``) when it is ``None``.

        Raises:
            KeyError: ``label_name`` is ``None`` and no entry qualifies.
        """
        if self.label_name is not None:
            return self.label_name
        for key, value in data.items():
            if is_array(value) and value.ndim in (3, 4) and _is_integer(value):
                return key
        if "label" in data:
            return "label"
        raise KeyError(f"LabelSampler: label_name=None and no integer-typed image in the data (keys: {list(data)!r}).")

    def _label_masks(self, labels: np.ndarray) -> list[tuple[Any, float, np.ndarray]]:
        """``(label, probability, mask)`` for each label with a positive probability; masks are bool volumes."""
        one_hot = labels.shape[0] > 1
        if self.label_probabilities is None:
            mask = (labels[1:] != 0).any(0) if one_hot else labels[0] > 0
            return [("foreground", 1.0, mask)]
        out = []
        for label, p in self.label_probabilities.items():
            if p <= 0:
                continue
            if one_hot:
                if not 0 <= label < labels.shape[0]:
                    raise ValueError(
                        f"LabelSampler: label {label} is not a channel of the one-hot map of shape "
                        f"{tuple(labels.shape)}."
                    )
                out.append((label, p, labels[label] != 0))
            else:
                out.append((label, p, labels[0] == label))
        return out

    def draw_corners(
        self, data: Mapping[Hashable, Any], spatial_shape: tuple[int, ...], patch_size: tuple[int, ...], n: int
    ) -> np.ndarray:
        """Corners of ``n`` patches: labels drawn first, then a voxel of each label uniformly.

        Allocates one bool mask over the valid-centre region, and its row counts, per label with a positive
        probability.
        """
        key = self.map_key(data)
        labels = valid_region(host_array(data[key]), patch_size)
        candidates = []
        for label, p, mask in self._label_masks(labels):
            rows = row_sums(mask)
            if bool(rows.any()):
                candidates.append((label, p, mask, rows))
        if not candidates:
            raise ValueError(self._absent_message(data[key], key, patch_size))
        probs = np.asarray([c[1] for c in candidates], dtype=np.float64)
        chosen = self.R.choice(len(candidates), size=n, p=probs / probs.sum())
        corners = np.empty((n, len(patch_size)), dtype=np.int64)
        for index, (_, _, mask, rows) in enumerate(candidates):
            where = np.flatnonzero(chosen == index)
            if where.size:
                corners[where] = draw_from_weights(mask, where.size, self.R, rows=rows)
        return corners

    def _absent_message(self, label_map: Any, key: Hashable, patch_size: tuple[int, ...]) -> str:
        """Error text when no wanted label lies on a valid centre: absent altogether, or only near the border."""
        full = host_array(label_map)
        what = "no foreground" if self.label_probabilities is None else f"none of the labels {self._wanted()}"
        if not any(bool(mask.any()) for _, _, mask in self._label_masks(full)):
            present = np.unique(full[0]).tolist() if full.shape[0] == 1 else f"{full.shape[0]} one-hot channels"
            return f"LabelSampler: label map {key!r} holds {what} (it holds {present})."
        return no_mass_message(f"LabelSampler: label map {key!r} has {what}", patch_size)

    def _wanted(self) -> list[int]:
        return [label for label, p in (self.label_probabilities or {}).items() if p > 0]
