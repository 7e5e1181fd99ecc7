"""PatchStore: prepare cases once (NIfTI -> chunked, compressed zarr arrays plus a label index) for patch reads.

Each case gets a folder ``<store>/<case>/`` holding one zarr array per key (channel-first, chunks near the patch
size, Blosc-lz4 by default), the label index beside the label array (``<label>.zarr.index.npz``, see
:mod:`monai_patchplug.label_index`) and, written last and atomically, a JSON done-marker naming the sources, shapes
and settings. A case whose marker matches is skipped; a case without one (a killed run) or whose sources or settings
changed is written again. Everything is data (zarr, JSON, ``.npz``), never pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .label_index import LabelIndex, check_max_runs, index_path

__all__ = ["PatchStore"]

_FORMAT = 1
_MARKER = "done.json"
_NIFTI_SUFFIXES = (".nii.gz", ".nii", ".npy", ".img.gz", ".img")


def _require_zarr() -> Any:
    try:
        import zarr
    except ImportError:
        raise ImportError(
            "PatchStore needs zarr: pip install 'monai_patchplug[outofcore]' (or pip install zarr)."
        ) from None
    return zarr


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in _NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _json_meta(meta: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The metadata kept in a zarr array's attributes: JSON values only (affines as lists)."""
    out: dict[str, Any] = {"filename_or_obj": source, "space": "RAS"}
    for key in ("affine", "original_affine", "spatial_shape", "pixdim"):
        if key in meta:
            value = meta[key]
            value = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
            out[key] = value.tolist()
    channel = meta.get("original_channel_dim", float("nan"))
    out["original_channel_dim"] = None if isinstance(channel, float) and np.isnan(channel) else int(channel)
    return out


def _storage_dtype(array: np.ndarray, is_label: bool) -> np.dtype:
    """float64 -> float32 (``LoadImaged``'s default); a label map of whole numbers -> the narrowest integer type."""
    if is_label and array.size and (array.dtype.kind in "iub" or np.all(array == np.round(array))):
        lo, hi = int(array.min()), int(array.max())
        return np.result_type(np.min_scalar_type(lo), np.min_scalar_type(hi))
    return np.dtype(np.float32) if array.dtype == np.float64 else array.dtype


def _atomic_json(path: Path, payload: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class PatchStore:
    """Convert cases to chunked, compressed zarr arrays plus a label index, once; then train from them with
    :class:`~monai_patchplug.LoadLazyd`, which reads only the patches.

    Args:
        folder: where the store lives (created if needed); one sub-folder per case.
        chunks: chunk edge (an int) or one per spatial axis; a chunk is one channel. Half the patch size or so: a
            patch then touches ~27 small chunks, faster to read than ~8 chunks of the patch size (less decompressed
            beyond the patch: a 64^3 float32 patch in ~1.7 ms from 32^3 chunks, ~2.1 ms from 48^3, ~3.3 ms from
            64^3). Clipped to the image.
        codec: the Blosc compressor: ``"lz4"`` (default: the fastest to read) or ``"zstd"`` (~10% smaller, ~1.4x
            slower to read), with byte shuffle. :class:`~monai_patchplug.LoadLazyd` reads either layout by decoding
            the chunk files under a patch directly (:class:`~monai_patchplug.chunks.ChunkReader`; ~6x faster than
            zarr's own selection, ~10 ms for that patch), without zarr.
        clevel: compression level.
        workers: processes preparing cases in parallel (``concurrent.futures``); ``None``: ``os.cpu_count()``; ``1``:
            in this process.
        progress: show a progress bar (needs ``tqdm``; silently none without it).
        max_runs_per_label: cap on the runs the label index keeps per label (``None``: all, the exact index); see
            :meth:`~monai_patchplug.LabelIndex.build`: an approximation, as nnU-Net's cap (a label's voxels are then
            drawn from a seeded random subset of its runs). Part of a case's settings: a case prepared with another
            cap is prepared again.

    Raises:
        ValueError: bad ``chunks``, ``clevel``, ``workers`` or ``max_runs_per_label`` (below 1).
        TypeError: ``max_runs_per_label`` neither ``None`` nor an int.

    Example:
        >>> import os
        >>> import tempfile
        >>> import numpy as np
        >>> from monai.transforms import Compose
        >>> from monai_patchplug import LabelSampler, LoadLazyd, PatchStore
        >>> folder = tempfile.TemporaryDirectory()
        >>> label = np.zeros((12, 12, 12), dtype=np.uint8)
        >>> label[4:8, 4:8, 4:8] = 1
        >>> np.save(os.path.join(folder.name, "image.npy"), np.random.default_rng(0).random((12, 12, 12)))
        >>> np.save(os.path.join(folder.name, "label.npy"), label)
        >>> files = [{"image": os.path.join(folder.name, "image.npy"), "label": os.path.join(folder.name, "label.npy")}]
        >>> store = PatchStore(os.path.join(folder.name, "store"), chunks=6, workers=1, progress=False)
        >>> files = store(files, keys=["image", "label"], label_key="label")  # a case already prepared is skipped
        >>> os.path.basename(files[0]["label"])
        'label.zarr'
        >>> LoadLazyd("label")(files[0])["label"].label_index.counts()  # the index written beside the label array
        {1: 64}
        >>> train = Compose([LoadLazyd(["image", "label"]), LabelSampler(6, "label", {0: 1, 1: 2}, num_samples=2)])
        >>> [tuple(patch["image"].shape) for patch in train(files[0])]  # reads the chunks under each patch
        [(1, 6, 6, 6), (1, 6, 6, 6)]
        >>> folder.cleanup()
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        chunks: int | Sequence[int] = 32,
        codec: str = "lz4",
        clevel: int = 3,
        workers: int | None = None,
        progress: bool = True,
        max_runs_per_label: int | None = None,
    ) -> None:
        sizes = [chunks] if isinstance(chunks, int) else list(chunks)
        if not sizes or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in sizes):
            raise ValueError(f"PatchStore: chunks must be a positive int or positive ints, got {chunks!r}.")
        if isinstance(clevel, bool) or not isinstance(clevel, int) or not 0 <= clevel <= 9:
            raise ValueError(f"PatchStore: clevel must be an int in 0..9, got {clevel!r}.")
        if codec not in ("lz4", "zstd"):
            raise ValueError(f"PatchStore: codec must be 'lz4' or 'zstd', got {codec!r}.")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ValueError(f"PatchStore: workers must be None or a positive int, got {workers!r}.")
        self.folder, self.chunks, self.codec, self.clevel = Path(folder), chunks, codec, clevel
        self.workers, self.progress = workers, progress
        self.max_runs_per_label = check_max_runs(max_runs_per_label, "PatchStore")

    def case_name(self, item: Mapping[str, Any], keys: Sequence[str]) -> str:
        """The case's folder name: the first key's file stem plus a short hash of its full path (unique, stable)."""
        source = str(Path(str(item[keys[0]])).resolve())
        return f"{_stem(source)}_{hashlib.sha1(source.encode()).hexdigest()[:8]}"

    def __call__(
        self, files: Sequence[Mapping[str, Any]], keys: Sequence[str], label_key: str | None = None
    ) -> list[dict[str, Any]]:
        """Prepare every case not yet prepared; return the items with ``keys`` pointing at the store's arrays.

        Args:
            files: MONAI-style items (dicts of file names); never modified.
            keys: the keys whose files are converted; other entries are copied unchanged.
            label_key: the key of the label map, indexed for :class:`~monai_patchplug.LabelSampler` (``None``: none).

        Returns:
            New dicts, one per item, in order. Reads each case to prepare whole (one case per worker at a time).

        Raises:
            ValueError: ``keys`` empty or ``label_key`` not among them.
            RuntimeError: cases that failed (a missing or corrupt file), each named with its file and error, after
                the other cases are done.
        """
        keys = [keys] if isinstance(keys, str) else list(keys)
        if not keys or (label_key is not None and label_key not in keys):
            raise ValueError(f"PatchStore: keys must be non-empty and hold label_key, got {keys!r}, {label_key!r}.")
        self.folder.mkdir(parents=True, exist_ok=True)
        jobs = [(dict(item), self.folder / self.case_name(item, keys)) for item in files]
        errors = self._run(jobs, keys, label_key)
        if errors:
            raise RuntimeError(f"PatchStore: {len(errors)} case(s) failed:\n" + "\n".join(errors))
        return [{**item, **{k: str(case / f"{k}.zarr") for k in keys}} for item, case in jobs]

    def _run(self, jobs: list[tuple[dict, Path]], keys: list[str], label_key: str | None) -> list[str]:
        """Prepare the cases, in parallel where ``workers`` allows; return one message per failed case."""
        settings = self._settings(keys, label_key)
        args = [(item, case, keys, label_key, settings) for item, case in jobs]
        workers = min(self.workers or os.cpu_count() or 1, len(args))
        errors: list[str] = []
        if workers <= 1:
            results = map(_prepare_case_safely, args)
            return [e for e in _progress(results, len(args), self.progress) if e]
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = pool.map(_prepare_case_safely, args)
            errors = [e for e in _progress(results, len(args), self.progress) if e]
        return errors

    def _settings(self, keys: list[str], label_key: str | None) -> dict[str, Any]:
        chunks = [self.chunks] if isinstance(self.chunks, int) else list(self.chunks)
        return {
            "format": _FORMAT,
            "keys": keys,
            "label_key": label_key,
            "chunks": chunks,
            "codec": self.codec,
            "clevel": self.clevel,
            "max_runs_per_label": self.max_runs_per_label,
        }

    @staticmethod
    def is_prepared(case: str | os.PathLike) -> bool:
        """Whether ``case`` (a case folder) holds a done-marker (it was written to the end)."""
        return (Path(case) / _MARKER).exists()


def _progress(results: Any, total: int, show: bool) -> Any:
    if show:
        try:
            from tqdm.auto import tqdm

            return tqdm(results, total=total, desc="PatchStore", unit="case")
        except ImportError:
            pass
    return results


def _sources(item: Mapping[str, Any], keys: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for key in keys:
        path = Path(str(item[key]))
        stat = path.stat()
        out[key] = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return out


def _prepare_case_safely(args: tuple) -> str | None:
    """:func:`_prepare_case`, an error turned into a message naming the case and its files."""
    item, case, keys, label_key, settings = args
    try:
        _prepare_case(item, case, keys, label_key, settings)
    except Exception as error:  # noqa: BLE001 - reported per case, after the others are done
        files = ", ".join(f"{k}={str(item.get(k))!r}" for k in keys)
        return f"  case {case.name!r} ({files}): {type(error).__name__}: {error}"
    return None


def _prepare_case(item: dict, case: Path, keys: list[str], label_key: str | None, settings: dict) -> None:
    """Write one case's arrays, label index and (last, atomically) its marker; skip it when the marker matches."""
    missing = [f"{k}={item[k]!r}" for k in keys if k not in item or not Path(str(item[k])).exists()]
    if missing:
        raise FileNotFoundError(f"missing file(s): {', '.join(missing)}")
    marker = case / _MARKER
    expected = {**settings, "sources": _sources(item, keys)}
    if marker.exists():
        try:
            done = json.loads(marker.read_text())
        except ValueError:
            done = None
        if done is not None and {k: done.get(k) for k in expected} == expected:
            return
        marker.unlink()
    case.mkdir(parents=True, exist_ok=True)
    shapes = {}
    for key in keys:
        shapes[key] = _write_array(str(item[key]), case / f"{key}.zarr", key == label_key, settings)
    _atomic_json(marker, {**expected, "shapes": shapes})


def _write_array(source: str, target: Path, is_label: bool, settings: dict) -> list[int]:
    """Load ``source`` as ``LoadImaged`` + ``EnsureChannelFirstd`` would, write it as a chunked zarr array with its
    metadata (and, for the label, its index, built from the loaded array slab by slab: no copy of it). Returns the
    channel-first shape. Allocates the loaded case."""
    from monai.transforms import LoadImage

    zarr = _require_zarr()
    image = LoadImage(image_only=True, ensure_channel_first=True, dtype=None)(source)
    array = image.numpy() if hasattr(image, "numpy") else np.asarray(image)
    array = array.astype(_storage_dtype(array, is_label), copy=False)
    edges = settings["chunks"] * (array.ndim - 1) if len(settings["chunks"]) == 1 else settings["chunks"]
    chunks = (1, *[min(int(c), int(s)) for c, s in zip(edges, array.shape[1:])])
    codec = zarr.codecs.BloscCodec(cname=settings["codec"], clevel=settings["clevel"], shuffle="shuffle")
    out = zarr.create_array(
        str(target), shape=array.shape, chunks=chunks, dtype=array.dtype, compressors=codec, overwrite=True
    )
    out[...] = array
    out.attrs["meta"] = _json_meta(getattr(image, "meta", {}), source)
    sidecar = index_path(target)
    if is_label and array.shape[0] == 1:
        LabelIndex.build(array, channel_first=True, max_runs_per_label=settings["max_runs_per_label"]).save(sidecar)
    else:
        sidecar.unlink(missing_ok=True)
    return [int(s) for s in array.shape]
