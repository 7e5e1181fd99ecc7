"""PatchQueue: patch-based training that loads, transforms and samples in the DataLoader's workers.

Each epoch a permutation of the volumes (the same on every rank and worker: it depends on ``seed`` and the epoch
only) is dealt to the ranks, then to the workers of each rank. A worker loads its volumes one after the other,
samples their patches and keeps them in a shuffle buffer of at most ``max_length`` patches, from which it yields
random patches, so the batches it collates mix several volumes. Every patch's randomness (transform and sampler)
is seeded from ``(seed, epoch, position of the volume in the epoch)``, so the patches of an epoch do not depend on
the number of workers or ranks.
"""

from __future__ import annotations

import gc
import math
import os
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from copy import deepcopy
from numbers import Integral
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from monai.data import CacheDataset, MetaTensor
from monai.data.utils import set_rnd
from monai.transforms import Compose
from monai.utils import ImageMetaKey, MetaKeys, ensure_tuple
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ._shapes import LOCATION, is_lazy
from .sampling.base import PatchDraw, PatchSampler
from .sampling.grid import GridSampler

__all__ = ["PatchQueue"]

Patch = dict[Hashable, Any]


class _Unread(NamedTuple):
    """A patch drawn from a volume on disk but not read yet: all that reading it needs (see ``PatchQueue._read``)."""

    volume: Mapping[Hashable, Any]  # the volume's dict: open array-likes and its other entries, no voxels
    index: int  # the volume's index in ``data`` (for error messages)
    keys: tuple[Hashable, ...]
    corner: np.ndarray  # (1, ndim)
    size: tuple[int, ...]
    number: int  # the patch's number within its volume (``patch_index``)


#: Metadata a patch keeps by default: geometry, source file and the patch's own entries (enough for ``SaveImaged`` and
#: ``Invertd``, whose record is ``applied_operations``, kept apart from the meta dict).
DEFAULT_META_KEYS = (
    MetaKeys.AFFINE,
    MetaKeys.ORIGINAL_AFFINE,
    MetaKeys.SPATIAL_SHAPE,
    MetaKeys.SPACE,
    MetaKeys.ORIGINAL_CHANNEL_DIM,
    ImageMetaKey.FILENAME_OR_OBJ,
    "patch_index",
    "crop_center",
    LOCATION,
)


def _count(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"PatchQueue: {name} must be an int >= {minimum}, got {value!r}.")
    return int(value)


def _check_data(data: Any) -> None:
    """``data`` must hold items by index and have a length (a list, a tuple, a 1-D array, a map-style dataset).

    Raises:
        TypeError: a string or bytes (a sequence of characters), a dict (one volume, or a mapping that is no list of
            items), ``None`` or another object without items by index and a length.
    """
    indexed = hasattr(type(data), "__getitem__") and hasattr(type(data), "__len__")
    one_axis = not isinstance(data, np.ndarray) or data.ndim == 1
    if indexed and one_axis and not isinstance(data, (str, bytes, Mapping)):
        return
    hint = ""
    if isinstance(data, Mapping):
        hint = " For one volume, pass a list holding its dict: [data]."
    elif isinstance(data, (str, bytes, os.PathLike)):
        hint = " For one file, pass a list of dicts: [{'image': path}]."
    raise TypeError(
        "PatchQueue: data must be a sequence of items (e.g. a list of dicts of file names) or a map-style dataset, "
        f"got {type(data).__name__} {_short_repr(data)}.{hint}"
    )


def _short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _resolve_ranks(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)``: the explicit pair, else torch.distributed's if initialised, else ``(0, 1)``."""
    if (rank is None) != (world_size is None):
        raise ValueError(f"PatchQueue: give both rank and world_size or neither (got {rank!r}, {world_size!r}).")
    if rank is None:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    world_size = _count(world_size, "world_size", 1)
    rank = _count(rank, "rank", 0)
    if rank >= world_size:
        raise ValueError(f"PatchQueue: rank must be in [0, world_size), got rank={rank}, world_size={world_size}.")
    return rank, world_size


class PatchQueue(IterableDataset):
    """An iterable dataset of patches for ``monai.data.DataLoader``: loading, transforms and sampling in its workers.

    Each epoch visits every volume once across the ranks (each rank its share, see ``even_divisible``) and yields
    ``samples_per_volume`` patches from it, or the volume's own ``num_samples_key`` entry. A worker keeps the
    patches in a buffer of at most ``max_length`` patches and yields random ones (``shuffle=True``), so a batch
    mixes the volumes in its worker's buffer; ``shuffle=False`` yields the volumes in index order and each volume's
    patches in the order drawn.

    Example:
        In-memory volumes here; typically ``data`` lists file names, ``transform`` loads them and the loader has
        ``num_workers > 0``, so loading and sampling run in its workers:

        >>> import torch
        >>> from monai.data import DataLoader
        >>> from monai_patchplug import LOCATION, LabelSampler, PatchQueue
        >>> label = torch.zeros(1, 16, 16, 16, dtype=torch.uint8)
        >>> label[0, 4:12, 4:12, 4:12] = 1
        >>> volumes = [{"image": torch.rand(1, 16, 16, 16), "label": label} for _ in range(3)]
        >>> sampler = LabelSampler(8, "label", {0: 1, 1: 2})
        >>> queue = PatchQueue(volumes, max_length=8, samples_per_volume=4, sampler=sampler, seed=0)
        >>> loader = DataLoader(queue, batch_size=4, num_workers=0)
        >>> len(queue)  # patches per epoch
        12
        >>> for epoch in range(2):
        ...     queue.set_epoch(epoch)  # other volume order and patches each epoch
        ...     for batch in loader:
        ...         pass  # train on batch["image"], batch["label"]
        >>> batch["image"].shape, batch["label"].shape, batch[LOCATION].shape
        (torch.Size([4, 1, 8, 8, 8]), torch.Size([4, 1, 8, 8, 8]), torch.Size([4, 6]))

    Memory: for volumes in memory, each worker holds at most ``max_length`` patches (buffer and the patches being
    sampled together, the patches being contiguous copies, never views of a volume) plus the one volume it is
    sampling; for volumes on disk (see below) the buffer holds patch locations, not voxels. The DataLoader adds the
    patches of the batch it is assembling and ``prefetch_factor`` collated batches per worker. A worker freezes
    the objects it inherits from its parent on its first epoch (``gc.freeze``), so its garbage collections do not
    copy the parent's memory into it (copy-on-write) and inherited objects are not collected in the worker. An entry
    of the volume's dict that is an array but not cropped by the sampler (not in its ``keys``) is shared by the
    volume's patches and stays alive with them.

    Ranks: the epoch's permutation is dealt round-robin. With ``even_divisible=False`` (default) the ranks partition
    the volumes exactly (no duplicate, no loss) and their epochs differ by at most one volume when the number of
    volumes does not divide evenly; ``even_divisible=True`` repeats the first volumes of the permutation so every
    rank visits the same number of volumes (as ``torch.utils.data.DistributedSampler`` pads). Per-volume patch counts
    that differ make the ranks' patch counts differ either way. Ranks whose epochs differ in length make DDP's
    collective calls wait for each other at the end: train with ``even_divisible=True`` (or a number of volumes that
    ``world_size`` divides), validate with the exact partition.

    Workers: each of the DataLoader's workers takes every ``num_workers``-th volume of its rank's share and collates
    its own batches, so an epoch may end with one partial batch per worker (all patches are still delivered, unless
    the loader has ``drop_last=True``).

    Volumes on disk: with :class:`~monai_patchplug.LoadLazyd` as ``transform`` (cases prepared by
    :class:`~monai_patchplug.PatchStore`, or uncompressed files) a volume is opened, not loaded. When every entry the
    sampler crops is such an array-like (see :func:`~monai_patchplug._shapes.is_lazy`; tensors and numpy arrays in
    memory are not), the buffer keeps each drawn patch as its location (the volume's open handles, the corner, the
    size) and the patch is read only when it is yielded: the same patches, in the same order, as reading them at once.
    A worker then holds one patch being read, plus the DataLoader's batch being assembled and its prefetched batches,
    whatever ``max_length`` (and the open files of the volumes in its buffer, and what the sampler's draw reads, e.g.
    a label map's valid region without a label index), never a volume. An error reading such a patch is raised when
    it is yielded, naming its volume.

    Metadata: every tensor of a batch crosses from a worker to the main process through its own shared-memory file, so
    the dozens of reader entries a ``MetaTensor`` carries (a NIfTI header's fields, each collated to a tensor) cost
    more than the patches themselves; by default patches keep only ``DEFAULT_META_KEYS`` (``meta_keys=None`` keeps
    all).

    Args:
        data: a sequence of items (typically dicts of file names) that ``transform`` loads, or any map-style dataset
            (e.g. a ``monai.data.CacheDataset`` holding the deterministic part of the pipeline), whose items
            ``transform`` (if given) continues. Each item must end up a dict of channel-first arrays.
        max_length: the most patches a worker holds. Larger values mix more volumes per batch; any value works with
            any ``samples_per_volume`` (a volume with more patches is sampled in chunks of ``max_length``).
        samples_per_volume: patches per volume and epoch, unless the volume's item holds ``num_samples_key``.
        sampler: a random :class:`~monai_patchplug.PatchSampler` (uniform, weighted, label). It is deep-copied and
            set to make eager ``copy=True`` patches; its ``num_samples`` is set per call.
        transform: applied to each item in the worker (a MONAI ``Compose`` of ``LoadImaged``..., any callable, or a
            sequence of callables, composed).
        shuffle: shuffle the volumes each epoch and yield random patches of the buffer; ``False``: index order.
        seed: seeds the volume permutation, the transforms, the sampler and the buffer: the same seed and epoch give
            the same patches in the same order for the same number of workers (and the same patches for any number
            of workers). ``None``: the permutation uses seed 0 (identical on every rank, like ``DistributedSampler``),
            everything else fresh randomness from torch's generator (reproducible under
            ``monai.utils.set_determinism``).
        cache: build a ``monai.data.CacheDataset`` of ``data`` and ``transform`` (at construction, in this process),
            so the transform's deterministic prefix runs once and the rest runs per epoch in the workers. ``data``
            must then be a sequence; to tune the cache, pass your own ``CacheDataset`` as ``data`` instead.
        even_divisible: pad the epoch with repeated volumes so every rank visits the same number of volumes.
        rank, world_size: this process's rank and the number of ranks; both or neither. Neither: read from
            ``torch.distributed`` at construction when it is initialised, else a single rank.
        num_samples_key: key of an item that overrides ``samples_per_volume`` for that volume (an int >= 0; 0 skips
            the volume); ``None`` disables overrides. Read from ``data`` (or a dataset's ``data`` attribute) at
            construction, so ``len`` is known without loading; the entry itself does not reach the patches.
        meta_keys: the entries of each cropped ``MetaTensor``'s meta dict that patches keep (one key or several);
            ``None``: all of them. A patch none of whose keys is in the meta dict (e.g. ``meta_keys=()``) keeps
            ``patch_index`` alone, since MONAI's ``list_data_collate`` cannot batch empty meta dicts. Entries the
            sampler does not crop are the volume's own and keep theirs.

    Raises:
        ValueError: empty ``data``, a count that is not a positive int, a bad override, an invalid rank, or
            ``cache=True`` with a dataset as ``data``.
        TypeError: ``data`` is not a sequence of items or a map-style dataset (a string, a dict, ``None``), or
            ``sampler`` is not a random PatchSampler.
    """

    def __init__(
        self,
        data: Sequence[Any] | Dataset,
        max_length: int,
        samples_per_volume: int,
        sampler: PatchSampler,
        *,
        transform: Callable[[Any], Any] | Sequence[Callable[[Any], Any]] | None = None,
        shuffle: bool = True,
        seed: int | None = None,
        cache: bool = False,
        even_divisible: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        num_samples_key: Hashable | None = "num_samples",
        meta_keys: str | Sequence[str] | None = DEFAULT_META_KEYS,
    ) -> None:
        if not isinstance(sampler, PatchSampler) or isinstance(sampler, GridSampler):
            raise TypeError(
                "PatchQueue: sampler must be a random PatchSampler (UniformSampler, WeightedSampler, LabelSampler), "
                f"got {type(sampler).__name__}."
            )
        _check_data(data)
        if len(data) == 0:
            raise ValueError("PatchQueue: data is empty; give at least one volume.")
        self.max_length = _count(max_length, "max_length", 1)
        self.samples_per_volume = _count(samples_per_volume, "samples_per_volume", 1)
        self.seed = None if seed is None else _count(seed, "seed", 0)
        self.shuffle = bool(shuffle)
        self.even_divisible = bool(even_divisible)
        self.rank, self.world_size = _resolve_ranks(rank, world_size)
        self.sampler = deepcopy(sampler)
        self.sampler.copy, self.sampler.lazy = True, False  # buffered patches must not keep their volume alive
        self.num_samples_key = num_samples_key
        self.meta_keys = None if meta_keys is None else ensure_tuple(meta_keys)
        if cache:
            if isinstance(data, Dataset):
                raise ValueError("PatchQueue: cache=True needs a sequence as data; a dataset caches on its own.")
            data, transform = CacheDataset(data, transform, progress=False), None
        self.data = data
        self.transform = Compose(transform) if transform is not None and not callable(transform) else transform
        self.counts = np.asarray([self._volume_count(i) for i in range(len(data))], dtype=np.int64)
        # shared memory, so set_epoch reaches persistent workers too
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled or deep-copied: put the epoch back in shared memory, so the copy's workers see ``set_epoch``."""
        self.__dict__.update(state)
        if not self._epoch.is_shared():
            self._epoch.share_memory_()

    # -- epochs and partition --------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch set by :meth:`set_epoch` (0 at first)."""
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` from the next iteration on; call it before each epoch, on every rank.

        As with ``DistributedSampler.set_epoch``, without it every epoch repeats epoch 0's volume order (and, with a
        ``seed``, its patches). The value lives in shared memory, so workers started earlier
        (``persistent_workers=True``) see it.

        Raises:
            ValueError: ``epoch`` is not an int >= 0.
        """
        self._epoch.fill_(_count(epoch, "epoch", 0))

    def epoch_order(self, epoch: int | None = None) -> np.ndarray:
        """The volume indices of an epoch, all ranks together; rank ``r`` visits ``order[r::world_size]``.

        Args:
            epoch: the epoch; ``None`` for the current one.

        Returns:
            An int64 array: a permutation of the volume indices (``shuffle=True``, seeded by ``seed`` or 0 and the
            epoch), else ``0..n-1``; with ``even_divisible``, extended by its first entries to a multiple of
            ``world_size``.
        """
        n = len(self.data)
        epoch = self.epoch if epoch is None else epoch
        order = np.random.default_rng([self.seed or 0, epoch]).permutation(n) if self.shuffle else np.arange(n)
        if self.even_divisible:
            order = np.resize(order, math.ceil(n / self.world_size) * self.world_size)
        return order.astype(np.int64)

    def __len__(self) -> int:
        """Patches this rank yields in the current epoch, all workers together."""
        return int(self.counts[self.epoch_order()[self.rank :: self.world_size]].sum())

    # -- iteration -------------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Patch]:
        """Yield this worker's patches of the current epoch.

        Loads one volume at a time (applying ``transform``), samples its patches into the buffer and yields patches
        from the buffer whenever the next volume's patches would not fit; empties the buffer at the end. Patches of a
        volume on disk are buffered as locations and read when yielded.

        Yields:
            Patch dicts as the sampler makes them (copies, with ``LOCATION`` and the volume's other entries).

        Raises:
            RuntimeError: loading, transforming or sampling a volume failed; the message names the volume's index and
                its file names, and the original error is chained.
            TypeError: the transform did not return a dict.
        """
        epoch = self.epoch
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            _freeze_inherited_objects()
        entropy = self.seed if self.seed is not None else int(torch.randint(2**62, ()))
        rng = np.random.default_rng([entropy, epoch, self.rank, worker]) if self.shuffle else None
        order = self.epoch_order(epoch)
        positions = range(self.rank, len(order), self.world_size)[worker::num_workers]
        buffer: list[Patch | _Unread] = []
        for position in positions:
            index = int(order[position])
            remaining = int(self.counts[index])
            if remaining == 0:
                continue
            transform_seed, sampler_seed = np.random.SeedSequence([entropy, epoch, position]).generate_state(2)
            volume = None
            drawn = 0
            while drawn < remaining:
                chunk = min(remaining - drawn, self.max_length)
                while len(buffer) > self.max_length - chunk:
                    yield self._read(_pop(buffer, rng))
                if volume is None:  # loaded once room is made, so the yielded patches can go first
                    volume = self._load(index, int(transform_seed))
                    self.sampler.set_random_state(seed=int(sampler_seed))
                buffer.extend(self._sample(volume, index, chunk, drawn))
                drawn += chunk
            del volume
        while buffer:
            yield self._read(_pop(buffer, rng))

    def _load(self, index: int, seed: int) -> Mapping[Hashable, Any]:
        """Item ``index`` of ``data`` through ``transform``, their random parts seeded with ``seed``."""
        try:
            dataset_transform = getattr(self.data, "transform", None)
            if isinstance(self.data, Dataset) and dataset_transform is not None:
                set_rnd(dataset_transform, seed)
            item = self.data[index]
            if self.transform is not None:
                set_rnd(self.transform, seed + 1)
                item = self.transform(item)
        except Exception as err:
            raise RuntimeError(
                f"PatchQueue: loading volume {index} ({self._describe(index)}) failed: {type(err).__name__}: {err}"
            ) from err
        if not isinstance(item, Mapping):
            raise TypeError(
                f"PatchQueue: volume {index} ({self._describe(index)}) must become a dict of arrays, got "
                f"{type(item).__name__}; leave multi-sample crops out of the transform (the sampler draws the patches)."
            )
        if self.num_samples_key is not None and self.num_samples_key in item:  # read already; not for the patches
            item = {k: v for k, v in item.items() if k != self.num_samples_key}
        return item

    def _sample(self, volume: Mapping[Hashable, Any], index: int, n: int, first: int = 0) -> list[Patch | _Unread]:
        """``n`` patches of ``volume`` from the sampler, numbered from ``first`` (a volume with more patches than
        ``max_length`` is sampled in chunks): independent copies with their meta cut to ``meta_keys``, or, when every
        entry to crop is an array-like on disk, their locations, read by :meth:`_read` when yielded.

        Raises:
            RuntimeError: the draw or a crop failed; names the volume and chains the error.
        """
        self.sampler.num_samples = n
        try:
            drawn = self.sampler.draw(volume)
            if _deferrable(volume, drawn):
                return [
                    _Unread(volume, index, drawn.keys, drawn.corners[i : i + 1], drawn.size, first + i)
                    for i in range(len(drawn.corners))
                ]
            patches = self.sampler.crop_drawn(volume, drawn)
        except Exception as err:
            raise self._sampling_error(index, err) from err
        return self._finish(patches, volume, first)

    def _read(self, item: Patch | _Unread) -> Patch:
        """The patch to yield: ``item`` itself, or the patch an unread location stands for, read now (only its box
        of each key) and numbered as :meth:`_sample` numbers its patches.

        Raises:
            RuntimeError: reading the patch failed; names the volume and chains the error.
        """
        if not isinstance(item, _Unread):
            return item
        try:
            patches = self.sampler.crop_patches(item.volume, item.keys, item.corner, item.size)
        except Exception as err:
            raise self._sampling_error(item.index, err) from err
        return self._finish(patches, item.volume, item.number)[0]

    def _finish(self, patches: list[Patch], volume: Mapping[Hashable, Any], first: int) -> list[Patch]:
        """Number ``patches`` from ``first`` and cut their meta to ``meta_keys``, in place; entries the sampler does
        not crop are the volume's own and left as they are. Returns ``patches``."""
        for patch in patches:
            for key, value in patch.items():
                if not isinstance(value, MetaTensor) or value is volume.get(key):
                    continue
                if first and "patch_index" in value.meta:
                    value.meta["patch_index"] += first
                if self.meta_keys is not None:
                    value.meta = _kept_meta(value.meta, self.meta_keys)
        return patches

    def _sampling_error(self, index: int, err: Exception) -> RuntimeError:
        """The error for a failed draw or crop of volume ``index``: its index, its files and the cause."""
        return RuntimeError(
            f"PatchQueue: sampling volume {index} ({self._describe(index)}) failed: {type(err).__name__}: {err}"
        )

    # -- volumes -------------------------------------------------------------------------------------------------------
    def _raw_item(self, index: int) -> Any:
        """The undecoded item ``index``: from ``data``, or a dataset's ``data`` sequence; ``None`` if unknown."""
        if not isinstance(self.data, Dataset):
            return self.data[index]
        source = getattr(self.data, "data", None)
        if isinstance(source, Sequence) and len(source) == len(self.data):
            return source[index]
        return None

    def _describe(self, index: int) -> str:
        """Text naming volume ``index`` for messages: its file names (string and path entries), else its index."""
        item = self._raw_item(index)
        if isinstance(item, (str, os.PathLike)):
            return os.fspath(item)
        if isinstance(item, Mapping):
            files = {k: os.fspath(v) for k, v in item.items() if isinstance(v, (str, os.PathLike))}
            if files:
                return ", ".join(f"{k}={v}" for k, v in files.items())
        return f"item {index} of the data"

    def _volume_count(self, index: int) -> int:
        item = self._raw_item(index)
        if self.num_samples_key is None or not isinstance(item, Mapping) or self.num_samples_key not in item:
            return self.samples_per_volume
        try:
            return _count(item[self.num_samples_key], repr(self.num_samples_key), 0)
        except ValueError as err:
            raise ValueError(f"{err} (volume {index}: {self._describe(index)})") from None


_FROZEN_IN: list[int] = []  # the pid of the worker process whose inherited objects are frozen


def _freeze_inherited_objects() -> None:
    """In a forked worker, once per process: move every object alive now (the parent's, inherited copy-on-write) to
    the garbage collector's permanent generation (``gc.freeze``), so the worker's collections never write to their
    pages. A full collection otherwise touches every tracked object and copies the parent's pages holding them into
    the worker (281 MiB for a parent holding a million small dicts, measured). Those objects are then never collected
    in this worker (the parent still collects its own). Allocates nothing."""
    if _FROZEN_IN != [os.getpid()]:
        gc.freeze()
        _FROZEN_IN[:] = [os.getpid()]


def _deferrable(volume: Mapping[Hashable, Any], drawn: PatchDraw) -> bool:
    """Whether the patches of a draw can be read later: there are some, and every key to crop is an array-like read
    box by box (buffering their locations then keeps no voxels; one in memory would keep its volume alive)."""
    return len(drawn.corners) > 0 and all(is_lazy(volume[key]) for key in drawn.keys)


def _kept_meta(meta: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The entries of ``meta`` named in ``keys``; ``patch_index`` alone when none is there (collation needs one)."""
    kept = {k: meta[k] for k in keys if k in meta}
    if not kept and "patch_index" in meta:
        kept["patch_index"] = meta["patch_index"]
    return kept


def _pop(buffer: list[Patch | _Unread], rng: np.random.Generator | None) -> Patch | _Unread:
    """Remove and return a random entry of ``buffer`` (O(1)), or its oldest one when ``rng`` is None."""
    if rng is None:
        return buffer.pop(0)
    i = int(rng.integers(len(buffer)))
    buffer[i], buffer[-1] = buffer[-1], buffer[i]
    return buffer.pop()
