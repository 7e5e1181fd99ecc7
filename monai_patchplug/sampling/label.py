"""LabelSampler: the label at the patch centre is drawn with the requested probabilities."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch

from .._shapes import TypeSpatialShape, host_array, is_array
from .base import PatchSampler, valid_region
from .monai_args import monai_num_samples, pick, size_and_fill
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


def _check_pos_neg(pos: float, neg: float) -> tuple[float, float]:
    for name, value in (("pos", pos), ("neg", neg)):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
    if pos + neg == 0:
        raise ValueError("pos and neg must not both be 0.")
    return float(pos), float(neg)


class _Candidate:
    """One class of centres (a label, or MONAI's foreground/background) and how to draw corners from it.

    Either a bool ``mask`` over the valid-centre region (corners are its indices) or precomputed ``corners``
    (MONAI's index lists, already restricted to valid centres).
    """

    def __init__(self, name: Any, p: float, mask: np.ndarray | None = None, corners: np.ndarray | None = None):
        self.name, self.p, self.mask, self.corners = name, p, mask, corners
        self.rows = None if mask is None else row_sums(mask)

    @property
    def present(self) -> bool:
        return bool(self.rows.any()) if self.rows is not None else len(self.corners) > 0

    def draw(self, k: int, rng: np.random.RandomState) -> np.ndarray:
        if self.mask is not None:
            return draw_from_weights(self.mask, k, rng, rows=self.rows)
        return self.corners[rng.randint(0, len(self.corners), size=k)]


class LabelSampler(PatchSampler):
    """Draw patches whose centre label follows the given probabilities.

    P(centre has label L) = p_L / sum of p over the labels present on valid centres; within a label every voxel is
    equally likely (so each voxel of L gets p_L / count_L). Labels absent from the valid centres are skipped.
    A single-channel map holds label values (any integer or float dtype); a multi-channel map is one-hot and a
    label is a channel index. ``label_probabilities=None`` makes every foreground voxel equally likely (single
    channel: value > 0; one-hot: non-zero in any channel but 0).

    MONAI's arguments (``RandCropByPosNegLabeld``, ``RandCropByLabelClassesd``) are accepted with their meaning:
    ``pos``/``neg`` draw foreground (as above) vs background in that ratio; ``ratios``/``num_classes`` are label
    probabilities for labels (or one-hot channels) ``0 .. num_classes - 1``; with MONAI's names
    (``spatial_size``/``label_key``) and none of these, MONAI's defaults: ``pos = neg = 1`` for a single-channel map
    (``RandCropByPosNegLabeld``), every channel equally likely for a one-hot map (``RandCropByLabelClassesd``);
    ``image_key`` restricts centres to voxels where some channel of that image is ``> image_threshold``, as MONAI's
    index maps do: the background only with ``pos``/``neg``, every class with ``ratios``;
    ``fg_indices_key``/``bg_indices_key``/``indices_key`` name precomputed flat index lists in the data
    (``FgBgToIndicesd``, ``ClassesToIndicesd``), used instead of the label map and not copied to the patches.
    Unlike MONAI, centres are never clamped into the border: an index that is not a valid centre is skipped.

    Args:
        patch_size: as :class:`~monai_patchplug.PatchSampler`.
        label_name: key of the label map. ``None``: the first entry holding an integer or bool image, else
            ``"label"``.
        label_probabilities: ``{label: probability}``, unnormalised; string keys (JSON) are read as ints.
        spatial_size: MONAI's name for ``patch_size``; values <= 0 take the image size.
        label_key: MONAI's name for ``label_name``.
        pos, neg: MONAI's foreground/background ratio (each defaults to 1 once one of them, or an fg/bg indices
            key, is given).
        ratios, num_classes: MONAI's class ratios (``ratios=None``: equal over ``num_classes``).
        image_key, image_threshold: MONAI's restriction of centres to ``image > image_threshold``.
        fg_indices_key, bg_indices_key, indices_key: MONAI's precomputed index lists.
        max_samples_per_class: MONAI's cap on index-list length, a memory knob; no effect here (no index lists are
            built; every voxel of a class stays equally likely, which is what the cap approximates).
        warn: MONAI's option to warn about absent classes; absent classes are skipped silently either way.
        kwargs: ``keys``, ``num_samples``, ``allow_missing_keys``, ``lazy``, ``copy``, ``allow_smaller``, as
            :class:`~monai_patchplug.PatchSampler`. With MONAI's arguments, ``num_samples`` defaults to 1 (a list).

    Raises:
        TypeError, ValueError: on bad ``label_probabilities`` (see :func:`parse_label_probabilities`), bad
            ``pos``/``neg``, negative ``ratios`` or ones whose length differs from ``num_classes``, an
            ``image_threshold`` that is not a number, or arguments of two modes at once (``label_probabilities``,
            ``pos``/``neg``, ``ratios``).
        ValueError: at call time, when none of the labels is present on valid centres, a one-hot map lacks a
            requested channel, an ``image_key`` image has another spatial shape than the label map, or an index
            list points outside the image.
    """

    def __init__(
        self,
        patch_size: TypeSpatialShape | None = None,
        label_name: Hashable | None = None,
        label_probabilities: Mapping[Any, float] | None = None,
        *,
        spatial_size: TypeSpatialShape | None = None,
        label_key: Hashable | None = None,
        pos: float | None = None,
        neg: float | None = None,
        ratios: Sequence[float] | None = None,
        num_classes: int | None = None,
        image_key: Hashable | None = None,
        image_threshold: float = 0.0,
        fg_indices_key: Hashable | None = None,
        bg_indices_key: Hashable | None = None,
        indices_key: Hashable | None = None,
        max_samples_per_class: int | None = None,
        warn: bool = True,
        **kwargs: Any,
    ) -> None:
        size, fill = size_and_fill(patch_size, "spatial_size", spatial_size)
        pos_neg_mode = any(v is not None for v in (pos, neg, fg_indices_key, bg_indices_key))
        class_mode = any(v is not None for v in (ratios, num_classes, indices_key))
        modes = [
            name
            for name, on in (
                ("label_probabilities", label_probabilities is not None),
                ("pos/neg", pos_neg_mode),
                ("ratios/num_classes", class_mode),
            )
            if on
        ]
        if len(modes) > 1:
            raise ValueError(f"LabelSampler: give one of {' or '.join(modes)}, not both.")
        monai = spatial_size is not None or label_key is not None or pos_neg_mode or class_mode
        kwargs["num_samples"] = monai_num_samples(kwargs.get("num_samples"), monai)
        #: MONAI's names without a mode argument: MONAI's defaults (see :meth:`_classes`)
        self.monai_defaults = monai and not modes
        super().__init__(size, fill_non_positive=fill, **kwargs)
        self.label_name = pick("label_name", label_name, "label_key", label_key)
        self.pos_neg = (  # MONAI's defaults: pos = neg = 1
            _check_pos_neg(1.0 if pos is None else pos, 1.0 if neg is None else neg)
            if pos_neg_mode or self.monai_defaults
            else None
        )
        if class_mode and label_probabilities is None and (ratios is not None or num_classes is not None):
            label_probabilities = _class_ratios(ratios, num_classes)
        self.label_probabilities = (
            None if label_probabilities is None else parse_label_probabilities(label_probabilities)
        )
        if isinstance(image_threshold, bool) or not isinstance(image_threshold, Real):
            raise TypeError(f"image_threshold must be a number, got {image_threshold!r}.")
        self.image_key, self.image_threshold = image_key, float(image_threshold)
        self.fg_indices_key, self.bg_indices_key, self.indices_key = fg_indices_key, bg_indices_key, indices_key
        self.max_samples_per_class, self.warn = max_samples_per_class, warn

    @property
    def requires_current_data(self) -> bool:
        """The draw reads the label values, so a lazy pipeline must apply pending operations first."""
        return True

    def consumed_keys(self) -> tuple[Hashable, ...]:
        """MONAI's index-list keys: read by the draw, not copied to the patches (as MONAI pops them)."""
        return tuple(k for k in (self.fg_indices_key, self.bg_indices_key, self.indices_key) if k is not None)

    def map_key(self, data: Mapping[Hashable, Any]) -> Hashable | None:
        """``label_name``, or the first integer-typed image of ``data`` (else ``"label"``) when it is ``None``; ``None``
        when the label map is absent but MONAI's index lists are there (as MONAI, which then needs no label map).

        Raises:
            KeyError: ``label_name`` is ``None`` and no entry qualifies.
        """
        if self.label_name is not None:
            if self.label_name not in data and self._index_lists(data) is not None:
                return None
            return self.label_name
        for key, value in data.items():
            if is_array(value) and value.ndim in (3, 4) and _is_integer(value):
                return key
        if "label" in data:
            return "label"
        if self._index_lists(data) is not None:
            return None
        raise KeyError(f"LabelSampler: label_name=None and no integer-typed image in the data (keys: {list(data)!r}).")

    def _classes(self, labels: np.ndarray) -> list[tuple[Any, float, np.ndarray]]:
        """``(name, probability, mask)`` for each class with a positive probability; masks are bool volumes."""
        one_hot = labels.shape[0] > 1
        if self.label_probabilities is None:
            if self.monai_defaults and one_hot:  # RandCropByLabelClassesd: every channel equally likely
                return [(label, 1.0, labels[label] != 0) for label in range(labels.shape[0])]
            foreground = (labels[1:] != 0).any(0) if one_hot else labels[0] > 0
            if self.pos_neg is None:
                return [("foreground", 1.0, foreground)]
            return [("foreground", self.pos_neg[0], foreground), ("background", self.pos_neg[1], ~foreground)]
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

    def _candidates(
        self, data: Mapping[Hashable, Any], spatial_shape: tuple[int, ...], patch_size: tuple[int, ...]
    ) -> list[_Candidate]:
        """The classes to draw from, each restricted to valid centres (and to the image threshold, if asked)."""
        lists = self._index_lists(data)
        if lists is not None:
            return [
                _Candidate(name, p, corners=_valid_corners(idx, spatial_shape, patch_size)) for name, p, idx in lists
            ]
        labels = valid_region(host_array(data[self.map_key(data)]), patch_size)
        inside = None
        if self.image_key is not None:
            image = host_array(data[self.image_key])
            if tuple(image.shape[1:]) != tuple(spatial_shape):
                raise ValueError(
                    f"LabelSampler: image_key {self.image_key!r} has spatial shape {tuple(image.shape[1:])}, the label "
                    f"map {tuple(spatial_shape)}."
                )
            inside = (valid_region(image, patch_size) > self.image_threshold).any(0)
        return [
            _Candidate(name, p, mask=mask if inside is None or name == "foreground" else mask & inside)
            for name, p, mask in self._classes(labels)
        ]

    def _index_lists(self, data: Mapping[Hashable, Any]) -> list[tuple[Any, float, Any]] | None:
        """MONAI's precomputed ``(name, probability, flat indices)`` when the data holds them, else ``None``."""
        if self.pos_neg is not None and self.fg_indices_key in data and self.bg_indices_key in data:
            return [
                ("foreground", self.pos_neg[0], data[self.fg_indices_key]),
                ("background", self.pos_neg[1], data[self.bg_indices_key]),
            ]
        if self.indices_key is not None and self.indices_key in data:
            lists = data[self.indices_key]
            probs = self.label_probabilities or dict.fromkeys(range(len(lists)), 1.0)
            return [(label, p, lists[label]) for label, p in probs.items() if p > 0 and label < len(lists)]
        return None

    def draw_corners(
        self, data: Mapping[Hashable, Any], spatial_shape: tuple[int, ...], patch_size: tuple[int, ...], n: int
    ) -> np.ndarray:
        """Corners of ``n`` patches: classes drawn first, then a voxel of each class uniformly.

        Allocates one bool mask over the valid-centre region, and its row counts, per class with a positive
        probability (with MONAI's index lists: the valid corners of each list instead).
        """
        candidates = [c for c in self._candidates(data, spatial_shape, patch_size) if c.present]
        if not candidates:
            key = self.map_key(data)
            raise ValueError(self._absent_message(data[key], key, patch_size))
        probs = np.asarray([c.p for c in candidates], dtype=np.float64)
        chosen = self.R.choice(len(candidates), size=n, p=probs / probs.sum())
        corners = np.empty((n, len(patch_size)), dtype=np.int64)
        for index, candidate in enumerate(candidates):
            where = np.flatnonzero(chosen == index)
            if where.size:
                corners[where] = candidate.draw(where.size, self.R)
        return corners

    def _absent_message(self, label_map: Any, key: Hashable, patch_size: tuple[int, ...]) -> str:
        """Error text when no wanted label lies on a valid centre: absent altogether, or only near the border."""
        full = host_array(label_map)
        what = "no foreground" if self.label_probabilities is None else f"none of the labels {self._wanted()}"
        if self.pos_neg is not None:
            what = "no voxel to draw from (foreground or background)"
        if not any(bool(mask.any()) for _, _, mask in self._classes(full)):
            present = np.unique(full[0]).tolist() if full.shape[0] == 1 else f"{full.shape[0]} one-hot channels"
            return f"LabelSampler: label map {key!r} holds {what} (it holds {present})."
        return no_mass_message(f"LabelSampler: label map {key!r} has {what}", patch_size)

    def _wanted(self) -> list[int]:
        return [label for label, p in (self.label_probabilities or {}).items() if p > 0]


def _class_ratios(ratios: Sequence[float] | None, num_classes: int | None) -> dict[int, float]:
    """MONAI's ``ratios``/``num_classes`` as label probabilities ``{0: r0, 1: r1, ...}``."""
    if ratios is None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, Integral) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int when ratios is None, got {num_classes!r}.")
        return dict.fromkeys(range(int(num_classes)), 1.0)
    ratios = list(ratios)
    if num_classes is not None and len(ratios) != num_classes:
        raise ValueError(f"ratios {ratios!r} must have num_classes={num_classes} values.")
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, Real) or not math.isfinite(r) or r < 0:
            raise ValueError(f"ratios must be finite numbers >= 0, got {ratios!r}.")
    return dict(enumerate(ratios))


def _valid_corners(indices: Any, spatial_shape: tuple[int, ...], patch_size: tuple[int, ...]) -> np.ndarray:
    """Corners of the patches centred on flat ``indices`` of the full image, keeping only valid centres."""
    flat = host_array(indices).ravel().astype(np.int64)
    size = math.prod(spatial_shape)
    if flat.size and not (0 <= flat.min() and flat.max() < size):
        raise ValueError(
            f"LabelSampler: index list holds {int(flat.min())}..{int(flat.max())}, outside an image of spatial shape "
            f"{tuple(spatial_shape)} ({size} voxels)."
        )
    centres = np.stack(np.unravel_index(flat, spatial_shape), 1)
    corners = centres - np.asarray(patch_size) // 2
    ok = ((corners >= 0) & (corners <= np.asarray(spatial_shape) - np.asarray(patch_size))).all(1)
    return corners[ok]
