"""LabelSampler: the label at the patch centre is drawn with the requested probabilities."""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch

from .._shapes import TypeSpatialShape, host_array, image_entries, is_lazy
from ..label_index import index_classes
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

    A label map that is an array-like (e.g. from :class:`~monai_patchplug.LoadLazyd`) has its valid-centre region read
    once per call; one that carries a :class:`~monai_patchplug.LabelIndex` (``label_map.label_index``, attached by
    ``LoadLazyd`` for cases prepared by :class:`~monai_patchplug.PatchStore`) is not read at all: foreground labels are
    drawn from the index's runs clipped to the valid centres and background centres as uniform valid centres rejected
    when the index holds them, which is the same law (single-channel maps, without ``image_key``).

    Args:
        patch_size: as :class:`~monai_patchplug.PatchSampler`.
        label_name: key of the label map. ``None``: the first image entry (see
            :func:`~monai_patchplug._shapes.image_entries`) of an integer or bool dtype, else ``"label"``.
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
        warn: with ``pos``/``neg``, warn when the foreground or the background is wanted (probability > 0) but has no
            valid centre, before every patch is drawn from the class that has one (as ``RandCropByPosNegLabeld``,
            also when the class present has probability 0). Other modes skip absent labels silently.
        kwargs: ``keys``, ``num_samples``, ``allow_missing_keys``, ``lazy``, ``copy``, ``allow_smaller``, as
            :class:`~monai_patchplug.PatchSampler`. With MONAI's arguments, ``num_samples`` defaults to 1 (a list).

    Raises:
        TypeError, ValueError: on bad ``label_probabilities`` (see :func:`parse_label_probabilities`), bad
            ``pos``/``neg``, negative ``ratios`` or ones whose length differs from ``num_classes``, an
            ``image_threshold`` that is not a number, arguments of two modes at once (``label_probabilities``,
            ``pos``/``neg``, ``ratios``), or ``patch_size`` and ``spatial_size`` giving different sizes.
        ValueError: at call time, when none of the labels is present on valid centres (the message says whether
            they are absent, excluded by ``image_threshold``, or only near the border), a one-hot map lacks a
            requested channel, an ``image_key`` image has another spatial shape than the label map, or an index
            list is not integer or points outside the image.

    Warns:
        UserWarning: with ``pos``/``neg`` and ``warn=True``, when a wanted class has no valid centre (see ``warn``).

    Example:
        >>> import torch
        >>> from monai_patchplug import LOCATION, LabelSampler
        >>> label = torch.zeros(1, 12, 12, dtype=torch.uint8)
        >>> label[0, 2:5, 6:9] = 1  # a small foreground blob
        >>> sampler = LabelSampler(patch_size=4, label_name="label", label_probabilities={0: 1, 1: 3}, num_samples=4)
        >>> patches = sampler.set_random_state(seed=0)({"image": torch.rand(1, 12, 12), "label": label})
        >>> patches[0]["image"].shape, patches[0][LOCATION]
        (torch.Size([1, 4, 4]), tensor([1, 4, 5, 8]))
        >>> [int(patch["label"][0, 2, 2]) for patch in patches]  # the label at each patch's centre
        [1, 1, 1, 1]
        >>> sampler = LabelSampler(4, "label", {1: 1}, num_samples=20)  # label 1 only
        >>> all(patch["label"][0, 2, 2] == 1 for patch in sampler({"image": torch.rand(1, 12, 12), "label": label}))
        True
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
        for key in image_entries(data):
            if _is_integer(data[key]):
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
            out.append((label, p, labels[label] != 0 if one_hot else labels[0] == label))
        return out

    def _check_channels(self, labels: np.ndarray, key: Hashable) -> None:
        """A one-hot map must hold a channel for every label with a positive probability.

        Raises:
            ValueError: a wanted label is not a channel of ``labels`` (the full map).
        """
        if labels.shape[0] == 1:
            return
        for label in self._wanted():
            if not 0 <= label < labels.shape[0]:
                raise ValueError(
                    f"LabelSampler: label {label} is not a channel of the one-hot label map {key!r} of shape "
                    f"{tuple(labels.shape)}."
                )

    def _inside(self, data: Mapping[Hashable, Any], patch_size: tuple[int, ...] | None = None) -> np.ndarray | None:
        """Where some channel of ``image_key`` exceeds ``image_threshold`` (on valid centres when ``patch_size`` is
        given, else everywhere); ``None`` without ``image_key``."""
        if self.image_key is None:
            return None
        image = data[self.image_key]
        image = valid_region(image, patch_size) if patch_size is not None else host_array(image)
        return (host_array(image) > self.image_threshold).any(0)

    def _restrict(self, name: Any, mask: np.ndarray, inside: np.ndarray | None) -> np.ndarray:
        """``mask`` limited to ``inside`` where MONAI's index maps do it: every class but the foreground (with pos/neg:
        the background only, as ``FgBgToIndicesd``; with ratios: every class, as ``ClassesToIndicesd``)."""
        if inside is None or name == "foreground":
            return mask
        return mask & inside

    def _candidates(
        self, data: Mapping[Hashable, Any], spatial_shape: tuple[int, ...], patch_size: tuple[int, ...]
    ) -> list[Any]:
        """The classes to draw from, each restricted to valid centres (and to the image threshold, if asked)."""
        lists = self._index_lists(data)
        if lists is not None:
            return [
                _Candidate(name, p, corners=_valid_corners(idx, spatial_shape, patch_size, source))
                for name, p, source, idx in lists
            ]
        indexed = self._indexed_classes(data, spatial_shape, patch_size)
        if indexed is not None:
            return indexed
        key = self.map_key(data)
        full = data[key] if is_lazy(data[key]) else host_array(data[key])  # an array-like: valid region read below
        self._check_channels(full, key)
        if self.image_key is not None:
            image_shape = tuple(int(v) for v in data[self.image_key].shape[1:])
            if image_shape != tuple(spatial_shape):
                raise ValueError(
                    f"LabelSampler: image_key {self.image_key!r} has spatial shape {image_shape}, the label "
                    f"map {tuple(spatial_shape)}."
                )
        inside = self._inside(data, patch_size)
        return [
            _Candidate(name, p, mask=self._restrict(name, mask, inside))
            for name, p, mask in self._classes(valid_region(full, patch_size))
        ]

    def _indexed_classes(
        self, data: Mapping[Hashable, Any], spatial_shape: tuple[int, ...], patch_size: tuple[int, ...]
    ) -> list[Any] | None:
        """The classes from the label map's persistent :class:`~monai_patchplug.label_index.LabelIndex` (a lazy
        single-channel map opened with one, e.g. by :class:`~monai_patchplug.LoadLazyd`), so no voxel of the map is
        read; ``None`` when there is no index or ``image_key`` is set (the threshold needs the image)."""
        label_map = data.get(self.map_key(data))
        index = getattr(label_map, "label_index", None) if is_lazy(label_map) else None
        if index is None or self.image_key is not None or label_map.shape[0] != 1:
            return None
        return index_classes(index, self.label_probabilities, self.pos_neg, spatial_shape, patch_size)

    def _index_lists(self, data: Mapping[Hashable, Any]) -> list[tuple[Any, float, str, Any]] | None:
        """MONAI's precomputed ``(name, probability, where from, flat indices)`` when the data holds them, else
        ``None``; ``where from`` names the argument and key for messages."""
        if self.pos_neg is not None and self.fg_indices_key in data and self.bg_indices_key in data:
            return [
                ("foreground", self.pos_neg[0], f"fg_indices_key {self.fg_indices_key!r}", data[self.fg_indices_key]),
                ("background", self.pos_neg[1], f"bg_indices_key {self.bg_indices_key!r}", data[self.bg_indices_key]),
            ]
        if self.indices_key is not None and self.indices_key in data:
            lists = data[self.indices_key]
            probs = self.label_probabilities or dict.fromkeys(range(len(lists)), 1.0)
            return [
                (label, p, f"indices_key {self.indices_key!r}[{label}]", lists[label])
                for label, p in probs.items()
                if p > 0 and label < len(lists)
            ]
        return None

    def draw_corners(
        self, data: Mapping[Hashable, Any], spatial_shape: tuple[int, ...], patch_size: tuple[int, ...], n: int
    ) -> np.ndarray:
        """Corners of ``n`` patches: classes drawn first, then a voxel of each class uniformly.

        Allocates one bool mask over the valid-centre region, and its row counts, per class with a positive
        probability (with MONAI's index lists: the valid corners of each list instead).
        """
        candidates = self._candidates(data, spatial_shape, patch_size)
        present = [c for c in candidates if c.present]
        if not present:
            raise ValueError(self._absent_message(data, patch_size))
        probs = np.asarray([c.p for c in present], dtype=np.float64)
        pos_neg = [c.name for c in candidates] == ["foreground", "background"]  # not MONAI's one-hot default
        if pos_neg and len(present) < len(candidates):
            missing = [c.name for c in candidates if not c.present and c.p > 0]
            if missing and self.warn:
                warnings.warn(
                    f"LabelSampler: no {missing[0]} voxel on the valid patch centres, so pos={self.pos_neg[0]:g}, "
                    f"neg={self.pos_neg[1]:g} cannot be kept: drawing every patch from the {present[0].name} (as "
                    "MONAI's RandCropByPosNegLabeld does).",
                    stacklevel=4,
                )
            probs = np.ones(len(present))
        chosen = self.R.choice(len(present), size=n, p=probs / probs.sum())
        corners = np.empty((n, len(patch_size)), dtype=np.int64)
        for index, candidate in enumerate(present):
            where = np.flatnonzero(chosen == index)
            if where.size:
                corners[where] = candidate.draw(where.size, self.R)
        return corners

    def _absent_message(self, data: Mapping[Hashable, Any], patch_size: tuple[int, ...]) -> str:
        """Error text when no wanted class has a valid centre, saying why: empty index lists, classes absent from the
        label map, classes excluded by ``image_threshold``, or classes only near the border (then: pad).

        Runs on the error path only; allocates a bool mask of the full map per class.
        """
        lists = self._index_lists(data)
        if lists is not None:
            if not lists:
                return (
                    f"LabelSampler: no sampling location available: indices_key {self.indices_key!r} holds "
                    f"{len(data[self.indices_key])} index lists, none for the labels {self._wanted()}."
                )
            sources = ", ".join(source for _, _, source, _ in lists)
            if all(np.size(host_array(idx)) == 0 for _, _, _, idx in lists):
                return f"LabelSampler: no sampling location available: the index lists ({sources}) are all empty."
            return no_mass_message(f"LabelSampler: the index lists ({sources}) hold no index", patch_size)
        key = self.map_key(data)
        full = host_array(data[key])
        what = "no foreground" if self.label_probabilities is None else f"none of the labels {self._wanted()}"
        if self.pos_neg is not None:
            what = "no voxel to draw from (foreground or background)"
        classes = [(name, mask) for name, _, mask in self._classes(full) if mask.any()]
        if not classes:
            present = np.unique(full[0]).tolist() if full.shape[0] == 1 else f"{full.shape[0]} one-hot channels"
            return f"LabelSampler: label map {key!r} holds {what} (it holds {present})."
        inside = self._inside(data)
        if inside is not None and not any(self._restrict(name, mask, inside).any() for name, mask in classes):
            peak = float(host_array(data[self.image_key]).max())
            names = ", ".join(_class_text(name) for name, _ in classes)
            return (
                f"LabelSampler: label map {key!r} has {what}: its {names} voxels all "
                f"lie where image_key {self.image_key!r} is <= image_threshold={self.image_threshold:g} (the image's "
                f"largest value is {peak:g}), and MONAI's index maps keep only voxels above it. Lower image_threshold "
                "or leave out image_key."
            )
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


def _class_text(name: Any) -> str:
    """A class for messages: ``"label 3"`` for a label value or channel, else its name (``"background"``)."""
    return f"label {name}" if isinstance(name, int) else str(name)


def _valid_corners(
    indices: Any, spatial_shape: tuple[int, ...], patch_size: tuple[int, ...], source: str
) -> np.ndarray:
    """Corners of the patches centred on flat ``indices`` of the full image, keeping only valid centres.

    Args:
        indices: a flat index list (array, tensor or sequence of ints); empty is fine.
        spatial_shape: the image's spatial shape the indices refer to.
        patch_size: the patch size.
        source: the argument and key the list comes from, for messages (``"fg_indices_key 'fg'"``).

    Returns:
        ``(k, ndim)`` int64 corners, one per index that is a valid centre.

    Raises:
        ValueError: a non-empty list that is not of an integer dtype (a float index would be truncated), or an index
            outside the image.
    """
    values = host_array(indices).ravel()
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise ValueError(
            f"LabelSampler: {source}: index lists must hold integer flat indices, got dtype {values.dtype} (first "
            f"value {values[0].item()!r})."
        )
    flat = values.astype(np.int64)
    size = math.prod(spatial_shape)
    if flat.size and not (0 <= flat.min() and flat.max() < size):
        raise ValueError(
            f"LabelSampler: {source}: index list holds {int(flat.min())}..{int(flat.max())}, outside an image of "
            f"spatial shape {tuple(spatial_shape)} ({size} voxels)."
        )
    centres = np.stack(np.unravel_index(flat, spatial_shape), 1)
    corners = centres - np.asarray(patch_size) // 2
    ok = ((corners >= 0) & (corners <= np.asarray(spatial_shape) - np.asarray(patch_size))).all(1)
    return corners[ok]
