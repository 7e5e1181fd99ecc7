"""Opening images without reading them: a channel-first lazy view and the ``LoadLazyd`` transform.

:class:`LazyVolume` presents an array-like (nibabel's ``dataobj``, a ``numpy.memmap``, a ``zarr.Array``, an
``h5py.Dataset``) as a channel-first ``(C, *spatial)`` array carrying the metadata ``LoadImaged`` +
``EnsureChannelFirstd`` would give; the samplers read from it only the boxes they crop (see
:func:`~monai_patchplug._shapes.is_lazy`). :class:`LoadLazyd` opens files into such views.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.image_reader import NibabelReader, NumpyReader
from monai.transforms import MapTransform

from .chunks import ChunkReader
from .label_index import LabelIndex, index_path

__all__ = ["LazyVolume", "LoadLazyd", "open_lazy"]

_NIFTI = (".nii", ".nii.gz", ".img", ".hdr", ".img.gz")


class LazyVolume:
    """A channel-first ``(C, *spatial)`` view of an array-like that reads only the boxes it is indexed with.

    Args:
        array: anything with ``shape``, ``dtype`` and ``__getitem__`` over a tuple of slices.
        meta: metadata as ``LoadImaged`` gives it (``affine``, ``original_affine``, ``spatial_shape``,
            ``filename_or_obj``, ...); kept as given, ``affine`` as a float64 tensor. ``None``: empty.
        channel_dim: the channel axis of ``array``; ``None``: it has none (one channel is added in front).
        dtype: the dtype boxes are cast to when read (``LoadImaged``'s default is float32); ``None``: the array's.
        label_index: a :class:`~monai_patchplug.label_index.LabelIndex` of this (label) volume, which
            :class:`~monai_patchplug.LabelSampler` then draws from without reading the map.

    Raises:
        TypeError: ``array`` lacks ``shape``, ``dtype`` or ``__getitem__``.
        ValueError: ``channel_dim`` outside the array's axes.

    Example:
        >>> import numpy as np
        >>> import torch
        >>> from monai_patchplug import LOCATION, LazyVolume, UniformSampler
        >>> array = np.arange(8 * 10, dtype=np.int16).reshape(8, 10)  # e.g. a np.memmap or nibabel's img.dataobj
        >>> volume = LazyVolume(array, {"affine": np.eye(3)}, dtype=np.float32)
        >>> volume
        LazyVolume(shape=(1, 8, 10), dtype=float32, source='ndarray')
        >>> volume[0, 2:4, 3:5]  # reads only this box
        array([[23., 24.],
               [33., 34.]], dtype=float32)
        >>> patch = UniformSampler(patch_size=4).set_random_state(seed=0)({"image": volume})  # reads the patch only
        >>> i0, j0, i1, j1 = patch[LOCATION].tolist()
        >>> patch["image"].shape, torch.equal(patch["image"].as_tensor(), torch.from_numpy(volume[:, i0:i1, j0:j1]))
        (torch.Size([1, 4, 4]), True)
    """

    def __init__(
        self,
        array: Any,
        meta: Mapping[str, Any] | None = None,
        *,
        channel_dim: int | None = None,
        dtype: Any = None,
        label_index: LabelIndex | None = None,
    ) -> None:
        if not all(hasattr(array, name) for name in ("shape", "dtype", "__getitem__")):
            raise TypeError(f"LazyVolume: array must have shape, dtype and slicing, got {type(array).__name__}.")
        shape = [int(s) for s in array.shape]
        if channel_dim is not None and not -len(shape) <= channel_dim < len(shape):
            raise ValueError(f"LazyVolume: channel_dim {channel_dim} is outside the array's {len(shape)} axes.")
        self.array = array
        self.channel_dim = None if channel_dim is None else channel_dim % len(shape)
        channels = 1 if self.channel_dim is None else shape.pop(self.channel_dim)
        self.shape = (channels, *shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(array.dtype if dtype is None else dtype)
        self.meta = dict(meta or {})
        if "affine" in self.meta:
            self.meta["affine"] = torch.as_tensor(np.asarray(self.meta["affine"], dtype=np.float64))
        self.applied_operations: list = []
        self.label_index = label_index

    @property
    def affine(self) -> torch.Tensor:
        """The voxel-to-world affine (identity when the metadata has none)."""
        default = torch.eye(min(self.ndim - 1, 3) + 1, dtype=torch.float64)
        return self.meta.get("affine", default)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        name = self.meta.get("filename_or_obj", type(self.array).__name__)
        return f"LazyVolume(shape={self.shape}, dtype={self.dtype}, source={name!r})"

    def __getitem__(self, index: Any) -> np.ndarray:
        """Read ``self[index]`` (ints and slices over ``(C, *spatial)``) from the wrapped array: only that box.

        Returns:
            A numpy array of its own in ``self.dtype``. Allocates the box (from a
            :class:`~monai_patchplug.chunks.ChunkReader`: the box, decoded into it, and one chunk; from another
            array-like: the box as read, and its copy in ``self.dtype``).
        """
        index = index if isinstance(index, tuple) else (index,)
        if any(i is Ellipsis for i in index):
            at = index.index(Ellipsis)
            index = index[:at] + (slice(None),) * (self.ndim - len(index) + 1) + index[at + 1 :]
        index = tuple(index) + (slice(None),) * (self.ndim - len(index))
        if len(index) != self.ndim or not all(isinstance(i, slice | int | np.integer) for i in index):
            raise IndexError(f"LazyVolume: index {index!r} must be ints and slices over {self.ndim} axes.")
        keep = [isinstance(i, slice) for i in index]
        boxes = tuple(i if isinstance(i, slice) else slice(int(i), int(i) + 1 or None) for i in index)
        channels, spatial = boxes[0], boxes[1:]
        c, direct = self.channel_dim, isinstance(self.array, ChunkReader)
        if c is None:
            block = np.asarray(self.array[spatial])[None][channels]
        else:
            where = (*spatial[:c], channels, *spatial[c:])
            block = np.moveaxis(self.array.read(where, self.dtype) if direct else np.asarray(self.array[where]), c, 0)
        if not direct or block.dtype != self.dtype:  # decoded into a box of its own in self.dtype: no copy needed
            block = np.array(block, dtype=self.dtype)  # a copy of its own (a memmap's box must not hold the file)
        return block[tuple(slice(None) if k else 0 for k in keep)]

    def read(self) -> MetaTensor | torch.Tensor:
        """Read the whole volume: a MetaTensor with this view's metadata. Allocates the volume."""
        return MetaTensor(torch.from_numpy(self[:]), meta=dict(self.meta))


class _HeaderOnlyNibabelReader(NibabelReader):
    """MONAI's NIfTI reader whose ``get_data`` returns nibabel's unread ``dataobj`` instead of reading the voxels,
    so the metadata is exactly ``LoadImaged``'s."""

    def _get_array_data(self, img: Any, filename: Any) -> Any:
        return img.dataobj


def _nifti(path: Path, dtype: Any) -> LazyVolume:
    reader = _HeaderOnlyNibabelReader()
    proxy, meta = reader.get_data(reader.read(str(path)))
    meta["filename_or_obj"] = str(path)
    if len(proxy.shape) > 4:
        raise ValueError(f"LoadLazyd: {str(path)!r} has {len(proxy.shape)} axes; at most 3 spatial and 1 channel.")
    channel_dim = None if np.isnan(float(meta["original_channel_dim"])) else int(meta["original_channel_dim"])
    return LazyVolume(proxy, meta, channel_dim=channel_dim, dtype=dtype)


def _npy(path: Path, dtype: Any) -> LazyVolume:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    _, meta = NumpyReader().get_data(array)  # reads the shape only
    meta["filename_or_obj"] = str(path)
    return LazyVolume(array, meta, dtype=dtype)


def _zarr(path: Path, dtype: Any) -> LazyVolume:
    """A zarr array as a view: through a :class:`~monai_patchplug.chunks.ChunkReader` (chunk files decoded directly)
    when its layout allows, else through ``zarr.open_array``."""
    array: Any = ChunkReader.open(path)
    if array is None:
        try:
            import zarr
        except ImportError:
            raise ImportError(
                f"LoadLazyd: opening {str(path)!r} needs zarr: pip install 'monai_patchplug[outofcore]'."
            ) from None
        array = zarr.open_array(str(path), mode="r")
    meta = dict(array.attrs.get("meta", {}))
    if meta.get("original_channel_dim", 0) is None:
        meta["original_channel_dim"] = float("nan")
    meta.setdefault("filename_or_obj", str(path))
    for key in ("original_affine", "spatial_shape", "pixdim"):
        if key in meta:
            meta[key] = np.asarray(meta[key])
    return LazyVolume(array, meta, channel_dim=0, dtype=dtype)


def open_lazy(path: str | os.PathLike, dtype: Any = np.float32, label_index: bool = True) -> LazyVolume:
    """Open a file as a :class:`LazyVolume` without reading a voxel.

    NIfTI (``.nii``, ``.nii.gz``; via nibabel, with ``LoadImaged``'s metadata): a 3-D image gets a channel in front;
    a 4-D one's last axis is the channel (as ``EnsureChannelFirstd`` does). ``.npy``: memory-mapped, a channel added
    in front (as ``LoadImaged`` + ``EnsureChannelFirstd`` do for an array without channel). ``.zarr``: a
    channel-first array as :class:`~monai_patchplug.PatchStore` writes it, its metadata from the array's attributes;
    its boxes are decoded from the chunk files directly (:class:`~monai_patchplug.chunks.ChunkReader`) when its layout
    allows (zarr format 3, bytes + blosc/zstd or no codec: what ``PatchStore`` writes), else read by zarr.

    Args:
        path: the file (or zarr directory).
        dtype: the dtype boxes are read as (``LoadImaged``'s default float32); ``None`` keeps the file's.
        label_index: attach the label index stored beside the file (``<path>.index.npz``), if there is one.

    Returns:
        The view. Reads the header (and the label index, if any); allocates no voxel.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a format it does not open, or a file it cannot parse (the message names the file).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"LoadLazyd: no such file: {str(path)!r}.")
    name = path.name.lower()
    try:
        if name.endswith(_NIFTI):
            volume = _nifti(path, dtype)
        elif name.endswith(".npy"):
            volume = _npy(path, dtype)
        elif name.endswith(".zarr") or (path / "zarr.json").exists() or (path / ".zarray").exists():
            volume = _zarr(path, dtype)
        else:
            raise ValueError(f"LoadLazyd: cannot open {str(path)!r} lazily: expected .nii, .nii.gz, .npy or .zarr.")
    except (ValueError, ImportError):
        raise
    except Exception as error:  # noqa: BLE001 - a corrupt file: say which
        raise ValueError(f"LoadLazyd: cannot read {str(path)!r}: {type(error).__name__}: {error}") from error
    sidecar = index_path(path)
    if label_index and sidecar.exists():
        volume.label_index = LabelIndex.load(sidecar)
    return volume


class LoadLazyd(MapTransform):
    """Open the files under ``keys`` as channel-first :class:`LazyVolume` views, reading no voxel.

    Stands in for ``LoadImaged(keys, image_only=True)`` + ``EnsureChannelFirstd(keys)``: each entry becomes a
    ``(C, *spatial)`` view (see :func:`open_lazy` for the shape per format) whose ``meta`` holds what ``LoadImaged``
    gives (``affine``, ``original_affine``, ``spatial_shape``, ``filename_or_obj``, the NIfTI header fields), so the
    samplers after it (:class:`~monai_patchplug.LabelSampler`, ...) return the same patches and metadata as from the
    loaded images, reading only the patch boxes. Transforms that need the whole image (intensity scaling, resampling)
    must come after the sampler, or use ``LoadImaged``.

    Uncompressed ``.nii`` and ``.npy`` files are read in place (only the bytes of each box). A ``.nii.gz`` cannot be
    read box by box: every read decompresses the file up to the box, so patches from one cost about a whole load
    each; a warning says so. Convert such cases once with :class:`~monai_patchplug.PatchStore` (chunked, compressed
    zarr plus a label index) and load the store's files instead.

    Args:
        keys: the keys holding file names.
        dtype: the dtype patches are read as (``LoadImaged``'s default float32); ``None`` keeps the file's.
        label_index: attach the label index stored beside a file (``<file>.index.npz``, written by
            :class:`~monai_patchplug.PatchStore`), so :class:`~monai_patchplug.LabelSampler` draws without reading the
            label map.
        allow_missing_keys: skip absent keys.

    Raises:
        FileNotFoundError, ValueError: at call time, as :func:`open_lazy`; the message names the file.

    Example:
        >>> import os
        >>> import tempfile
        >>> import numpy as np
        >>> from monai.transforms import Compose
        >>> from monai_patchplug import LabelSampler, LoadLazyd
        >>> folder = tempfile.TemporaryDirectory()
        >>> label = np.zeros((12, 12, 12), dtype=np.uint8)
        >>> label[4:8, 4:8, 4:8] = 1
        >>> np.save(os.path.join(folder.name, "image.npy"), np.random.default_rng(0).random((12, 12, 12)))
        >>> np.save(os.path.join(folder.name, "label.npy"), label)
        >>> item = {"image": os.path.join(folder.name, "image.npy"), "label": os.path.join(folder.name, "label.npy")}
        >>> LoadLazyd(["image", "label"])(item)["image"]  # opened, not read
        LazyVolume(shape=(1, 12, 12, 12), dtype=float32, source='...image.npy')
        >>> train = Compose([LoadLazyd(["image", "label"]), LabelSampler(6, "label", {0: 1, 1: 2}, num_samples=2)])
        >>> [tuple(patch["image"].shape) for patch in train(item)]  # reads the two patches only
        [(1, 6, 6, 6), (1, 6, 6, 6)]
        >>> folder.cleanup()
    """

    def __init__(
        self,
        keys: KeysCollection,
        dtype: Any = np.float32,
        label_index: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.dtype, self.label_index = dtype, bool(label_index)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Open every key's file; other entries are kept. Returns a new dict; ``data`` is not modified."""
        d = dict(data)
        for key in self.key_iterator(d):
            path = d[key]
            if str(path).lower().endswith((".gz",)):
                warnings.warn(
                    f"LoadLazyd: {str(path)!r} is gzip-compressed: reading a patch decompresses the file up to it, "
                    "so each patch costs about a whole load. Convert the cases once with monai_patchplug.PatchStore.",
                    stacklevel=2,
                )
            d[key] = open_lazy(path, self.dtype, self.label_index)
        return d
