"""Benchmark patch-based training input: monai_patchplug.PatchQueue vs. TorchIO's Queue.

Writes synthetic NIfTI volumes (1x160x160x160: a smooth float32 image and a uint8 label map with a blob of label 1)
to a temporary directory, then measures patches per second of one full epoch (every volume visited, 8 label-sampled
64^3 patches per volume, batch 4) through each library's recommended loop, with the same 2 worker processes:

- ours: ``PatchQueue`` in ``monai.data.DataLoader(num_workers=2)``: loading, sampling and collation in the workers
  (a second row keeps every NIfTI header field in the patches' metadata, ``meta_keys=None``, to show its cost);
- TorchIO: ``tio.Queue(num_workers=2)`` in ``tio.SubjectsLoader(num_workers=0)``: loading in the queue's workers,
  sampling and collation in the main process (TorchIO requires ``num_workers=0`` for the outer loader).

Both use the same queue length (``--max-length``) and label probabilities {0: 1, 1: 2}, and load the same dtypes
(float32 image, uint8 label: ``LoadImaged(dtype=None)`` keeps the files' types, as TorchIO does). Each epoch is
timed from creating the loader's iterator to its last batch (worker start-up included, as in training without
persistent workers); after one warm-up epoch each, epochs alternate between the libraries and the median is reported.
TorchIO is optional: without it its row is skipped with a note.

``--store`` measures training from disk instead (issue 16): the same cases written as ``.nii.gz`` and ``.nii``, and
prepared once by ``PatchStore`` (chunked lz4 zarr + label index); rows: ``PatchQueue`` + ``LoadLazyd(dtype=None)``
on the store (only the patches are read, straight from the chunk files; the label index draws the centres), the same
with the reads through ``zarr.Array`` (paired, to show the direct reader's gain), a floor (:class:`FloorPatches`:
the same ``DataLoader`` settings and number of patches over a dataset that reads nothing and yields ready-made
patches of the same structure, ``MetaTensor`` s with PatchQueue's default kept metadata: the memory a worker needs for
the DataLoader alone), TorchIO's Queue and MONAI (``Dataset`` + ``LoadImaged(dtype=None)`` +
``RandCropByLabelClassesd``) on the ``.nii.gz`` and the ``.nii`` files (``--only-store``: our two rows and the
floor). It prints patches/s, a worker's peak RSS and its peak private memory
(its unique set size, USS) above their values before its first volume (see :class:`RecordRSS`), each also in
batches of patches against issue 16's target (at most 4 batches above the baseline; the buffer of ``--max-length``
patches of a volume on disk holds locations, read when yielded, so it costs no voxels), one batch of patches, the
store's size against the ``.nii.gz`` files, and after the table the queue's peak RSS and USS above baseline minus the
floor's.

Run from the repository root::

    python benchmarks/patch_queue.py             # 8 volumes of 160^3, .nii, 5 epochs each
    python benchmarks/patch_queue.py --gz        # gzip-compressed .nii.gz files
    python benchmarks/patch_queue.py --quick     # 4 volumes of 24^3, 8^3 patches, 1 epoch each
    python benchmarks/patch_queue.py --store --volumes 16 --shape 256 256 192 --epochs 3   # issue 16's figure
"""

from __future__ import annotations

import argparse
import gc
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import monai
import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.data import DataLoader, MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from monai.utils import MetaKeys, TraceKeys
from torch.utils.data import IterableDataset, get_worker_info

import monai_patchplug as mpp

LABEL_PROBS = {0: 1, 1: 2}
KEYS = ["image", "label"]


def write_volumes(root: Path, n: int, shape: tuple[int, int, int], suffix: str) -> list[dict[str, str]]:
    """Write ``n`` image/label pairs; returns MONAI-style dicts of file names."""
    files = []
    grid = torch.meshgrid(*(torch.linspace(-1.0, 1.0, s) for s in shape), indexing="ij")
    for i in range(n):
        gen = torch.Generator().manual_seed(i)
        coarse = torch.randn(1, 1, *(max(s // 16, 2) for s in shape), generator=gen)
        image = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=False)[0, 0]
        centre = (torch.rand(3, generator=gen) - 0.5).tolist()
        blob = sum((g - c) ** 2 for g, c in zip(grid, centre)) < 0.25**2
        label = blob.to(torch.uint8).numpy()
        image = (image + blob.float()).numpy().astype(np.float32)
        item = {}
        for key, array in (("image", image), ("label", label)):
            path = root / f"{key}{i}{suffix}"
            nib.save(nib.Nifti1Image(array, np.eye(4)), path)
            item[key] = str(path)
        files.append(item)
    return files


def ours(files: list[dict[str, str]], args: argparse.Namespace, **options: Any) -> Callable[[], Iterable]:
    """A fresh epoch of PatchQueue batches per call; ``options`` go to PatchQueue."""
    transform = Compose([LoadImaged(KEYS, image_only=True, dtype=None), EnsureChannelFirstd(KEYS)])
    sampler = mpp.LabelSampler(args.patch, "label", LABEL_PROBS, keys=KEYS)
    queue = mpp.PatchQueue(files, args.max_length, args.samples, sampler, transform=transform, seed=0, **options)
    loader = DataLoader(queue, batch_size=args.batch, num_workers=args.workers)
    epochs = iter(range(10**9))

    def epoch() -> Iterable:
        queue.set_epoch(next(epochs))
        return loader

    return epoch


def theirs(tio: ModuleType, files: list[dict[str, str]], args: argparse.Namespace) -> Callable[[], Iterable]:
    """A fresh epoch of TorchIO Queue batches per call."""
    subjects = [tio.Subject(image=tio.ScalarImage(f["image"]), label=tio.LabelMap(f["label"])) for f in files]
    sampler = tio.LabelSampler(args.patch, "label", LABEL_PROBS)
    queue = tio.Queue(tio.SubjectsDataset(subjects), args.max_length, args.samples, sampler, num_workers=args.workers)
    loader = tio.SubjectsLoader(queue, batch_size=args.batch, num_workers=0)
    return lambda: loader


def run_epoch(make_epoch: Callable[[], Iterable]) -> tuple[float, int]:
    """Seconds for one epoch and the number of patches it gave."""
    start = time.perf_counter()
    count = 0
    for batch in make_epoch():
        count += int(batch["image"]["data"].shape[0] if isinstance(batch["image"], dict) else batch["image"].shape[0])
    return time.perf_counter() - start, count


class RecordRSS:
    """A transform that adds the worker's memory so far (bytes) to the data dict (collated with the patches).

    ``rss``: the peak RSS since the worker's baseline (``VmHWM``, reset to the current RSS at the baseline, so a
    peak the forked worker had before it, e.g. at fork, does not count); ``rss_above``: that minus the worker's RSS
    before its first volume (the interpreter's baseline); ``private_above``: the peak of its unique set size (USS:
    ``Private_Clean`` + ``Private_Dirty`` of ``/proc/self/smaps_rollup``, the pages no other process maps: what the
    worker added, copy-on-write copies of its parent's pages included; sampled every 50 ms by a thread, ~2 ms a
    read) minus its USS at that baseline. RSS also counts the pages of the parent (library code, the parent's heap)
    that a forked worker maps again, shared with its parent: RSS above baseline overstates what the worker adds, and
    may understate it when the worker reuses the parent's freed heap.
    """

    def __init__(self, transform: Callable[[Any], Any]) -> None:
        self.transform, self.base, self.private_base, self.private_peak = transform, None, 0, 0

    def __call__(self, item: Any) -> Any:
        if self.base is None:  # this worker's RSS before its first volume: the interpreter's baseline
            reset_peak_rss()
            self.base, self.private_base = current_rss(), private_memory()
            self.private_peak = self.private_base
            threading.Thread(target=self._sample, daemon=True).start()
        out = self.transform(item)
        if isinstance(out, dict):
            top = peak_rss_since_reset()
            private = max(self.private_peak, private_memory()) - self.private_base
            out = {**out, "rss": top, "rss_above": top - self.base, "private_above": private}
        return out

    def _sample(self) -> None:
        while True:
            self.private_peak = max(self.private_peak, private_memory())
            time.sleep(0.05)


def private_memory() -> int:
    """This process's unique set size now: pages no other process maps (bytes; Linux ``/proc``, else 0)."""
    try:
        lines = Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]
        fields = dict(line.split(":", 1) for line in lines)
        return sum(int(fields[k].split()[0]) * 1024 for k in ("Private_Clean", "Private_Dirty"))
    except (OSError, KeyError, ValueError):
        return 0


def reset_peak_rss() -> None:
    """Reset this process's peak RSS (``VmHWM``) to its RSS now (Linux ``/proc/self/clear_refs``; else nothing)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_since_reset() -> int:
    """This process's peak RSS since :func:`reset_peak_rss` (bytes; ``VmHWM``, else ``ru_maxrss``: since start)."""
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    """This process's resident set size now (bytes; Linux ``/proc``, else the peak so far)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss(batch: Any) -> tuple[int, int, int]:
    """The largest ``(rss, rss_above, private_above)`` recorded in a batch, each its own maximum (0s when none)."""
    if not isinstance(batch, dict) or "rss" not in batch:
        return 0, 0, 0
    return tuple(int(torch.as_tensor(batch[k]).max()) for k in ("rss", "rss_above", "private_above"))


OURS = "PatchQueue + LoadLazyd, prepared store"
OURS_ZARR = "PatchQueue + LoadLazyd, prepared store, zarr reads"


def zarr_reads(item: dict) -> dict:
    """Read the store's arrays through ``zarr.Array`` instead of the direct chunk reader (for the paired row)."""
    import zarr

    for key in KEYS:
        item[key].array = zarr.open_array(str(item[key].array.path), mode="r")
    return item


FLOOR = "floor: DataLoader over ready-made patches (reads nothing)"


class FloorPatches(IterableDataset):
    """The floor of a worker's memory: the store rows' patches, without reading anything (the ``--store`` floor row).

    Each worker takes every ``num_workers``-th case, as PatchQueue does, and freezes its inherited objects
    (``gc.freeze``, as PatchQueue's workers do). It keeps PatchQueue's schedule with a buffer of ``max_length`` that
    holds no patches, only the record each buffered patch will carry: per case, it yields (making each patch then)
    until the case's ``samples`` patches fit, calls ``record`` (a :class:`RecordRSS`, where PatchQueue loads the
    volume; the "volume" it wraps is an empty dict, so the baseline is taken before the first case, as in the store
    rows) and buffers ``samples`` patches carrying it; it empties the buffer at the end. So the memory is recorded at
    the same points of the stream as in the store rows. A patch has the structure of PatchQueue's with its default
    ``meta_keys``: ``MetaTensor`` s ``"label"`` (uint8) and ``"image"`` (float32) of ``(1, patch, patch, patch)``, new
    memory each, written (``fill_``), with the kept meta entries and one ``applied_operations`` record, and the
    ``LOCATION`` entry, an int64 ``(6,)`` tensor.
    """

    def __init__(self, files: list[dict[str, str]], shape: tuple[int, ...], args: argparse.Namespace) -> None:
        self.files, self.shape, self.patch, self.samples = files, shape, args.patch, args.samples
        self.max_length = args.max_length
        self.record = RecordRSS(lambda index: {})

    def __len__(self) -> int:
        return len(self.files) * self.samples

    def __iter__(self) -> Iterable[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            gc.freeze()
        rng = np.random.default_rng(worker)
        pending: list[tuple[int, int, dict]] = []  # (case, patch number, record) of each buffered patch, oldest first
        for index in range(len(self.files))[worker::num_workers]:
            drawn, record = 0, None
            while drawn < self.samples:
                chunk = min(self.samples - drawn, self.max_length)
                while len(pending) > self.max_length - chunk:
                    yield self.ready_made(*pending.pop(0), rng)
                if record is None:  # PatchQueue loads the volume here, once room is made
                    record = self.record(index)
                pending.extend((index, drawn + i, record) for i in range(chunk))
                drawn += chunk
        while pending:
            yield self.ready_made(*pending.pop(0), rng)

    def ready_made(self, index: int, number: int, record: dict, rng: np.random.Generator) -> dict[str, Any]:
        """Patch ``number`` of case ``index`` at a random corner, with ``record``'s entries."""
        corner = rng.integers(0, np.maximum(np.asarray(self.shape) - self.patch, 0) + 1)
        return {**self.patch_dict(index, number, corner), **record}

    def patch_dict(self, index: int, number: int, corner: np.ndarray) -> dict[str, Any]:
        """One ready-made patch of case ``index`` at ``corner``."""
        size = np.full(len(self.shape), self.patch)
        location = torch.as_tensor(np.concatenate([corner, corner + size]), dtype=torch.int64)
        cropped = [int(v) for pair in zip(corner, np.asarray(self.shape) - corner - size) for v in pair]
        patch: dict[str, Any] = {}
        for key, dtype in (("label", torch.uint8), ("image", torch.float32)):
            data = torch.empty((1, *size.tolist()), dtype=dtype).fill_(1)
            affine = torch.eye(4, dtype=torch.float64)
            affine[:3, 3] = torch.as_tensor(corner, dtype=torch.float64)
            meta = {
                MetaKeys.AFFINE: affine,
                MetaKeys.ORIGINAL_AFFINE: np.eye(4),
                MetaKeys.SPATIAL_SHAPE: np.asarray(self.shape),
                MetaKeys.SPACE: "RAS",
                MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
                "filename_or_obj": self.files[index][key],
                "patch_index": number,
                "crop_center": corner + size // 2,
                mpp.LOCATION: location.clone(),
            }
            operation = {
                TraceKeys.CLASS_NAME: "LabelSampler", TraceKeys.ID: id(self), TraceKeys.TRACING: True,
                TraceKeys.DO_TRANSFORM: True, TraceKeys.ORIG_SIZE: tuple(self.shape), TraceKeys.LAZY: False,
                TraceKeys.EXTRA_INFO: {"cropped": cropped},
            }  # fmt: skip
            patch[key] = MetaTensor(data, meta=meta, applied_operations=[operation])
        patch[mpp.LOCATION] = location
        return patch


def store_loops(
    files_gz: list, files_nii: list, prepared: list, shape: tuple[int, ...], args: argparse.Namespace, tio: Any
) -> dict:
    """The loops compared in ``--store`` mode: ours on the prepared store, the floor, TorchIO and MONAI on the files."""
    from monai.data import Dataset
    from monai.transforms import RandCropByLabelClassesd

    sampler = mpp.LabelSampler(args.patch, "label", LABEL_PROBS, keys=KEYS)
    loops: dict[str, Callable[[], Iterable]] = {}
    for name, load in (
        (OURS, mpp.LoadLazyd(KEYS, dtype=None)),
        (OURS_ZARR, Compose([mpp.LoadLazyd(KEYS, dtype=None), zarr_reads])),
    ):
        queue = mpp.PatchQueue(prepared, args.max_length, args.samples, sampler, transform=RecordRSS(load), seed=0)
        loops[name] = lambda q=queue: DataLoader(q, batch_size=args.batch, num_workers=args.workers)
    floor = FloorPatches(files_gz, shape, args)
    loops[FLOOR] = lambda: DataLoader(floor, batch_size=args.batch, num_workers=args.workers)
    if args.only_store:
        return loops
    for suffix, files in ((".nii.gz", files_gz), (".nii", files_nii)):
        crop = RandCropByLabelClassesd(
            KEYS, "label", [args.patch] * 3, ratios=[LABEL_PROBS[0], LABEL_PROBS[1]], num_classes=2,
            num_samples=args.samples,
        )  # fmt: skip
        load = Compose([RecordRSS(Compose([LoadImaged(KEYS, image_only=True, dtype=None), EnsureChannelFirstd(KEYS)])),
                        crop])  # fmt: skip
        dataset = Dataset(files, load)
        monai_loader = DataLoader(dataset, batch_size=args.batch // args.samples or 1, num_workers=args.workers)
        loops[f"MONAI Dataset + LoadImaged + RandCropByLabelClassesd, {suffix}"] = lambda ml=monai_loader: ml
        if tio is not None:
            loops[f"TorchIO {tio.__version__} Queue, {suffix}"] = theirs(tio, files, args)
    return loops


def run_store(args: argparse.Namespace, tio: Any) -> int:
    """``--store``: time the loops of :func:`store_loops` in interleaved rounds and print the table."""
    shape = tuple(args.shape) if args.shape else (args.size,) * 3
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files_gz = write_volumes(root, args.volumes, shape, ".nii.gz")
        files_nii = write_volumes(root, args.volumes, shape, ".nii")
        start = time.perf_counter()
        prepared = mpp.PatchStore(root / "store", chunks=args.chunks, workers=args.workers, progress=False)(
            files_gz, KEYS, "label"
        )
        prepare_s = time.perf_counter() - start
        store_bytes = sum(p.stat().st_size for p in (root / "store").rglob("*") if p.is_file())
        gz_bytes = sum(Path(f[k]).stat().st_size for f in files_gz for k in KEYS)
        import zarr  # imported before the workers fork, as the loaders' own modules are

        if args.zarr_threads:  # zarr's reader threads per worker (default: one per core); 1 was faster on 2 cores
            zarr.config.set({"threading.max_workers": args.zarr_threads})

        loops = store_loops(files_gz, files_nii, prepared, shape, args, tio)
        baseline = current_rss()
        times: dict[str, list[float]] = {name: [] for name in loops}
        peaks: dict[str, tuple[int, ...]] = dict.fromkeys(loops, (0, 0, 0))
        expected = args.volumes * args.samples
        for round_index in range(1 + args.epochs):
            names = list(loops) if round_index % 2 == 0 else list(loops)[::-1]
            for name in names:
                begin, count = time.perf_counter(), 0
                for batch in loops[name]():
                    count += int(batch["image"]["data"].shape[0] if isinstance(batch["image"], dict) else
                                 batch["image"].shape[0])  # fmt: skip
                    peaks[name] = tuple(map(max, peaks[name], peak_rss(batch)))
                if count != expected:
                    raise RuntimeError(f"{name}: {count} patches in an epoch, expected {expected}.")
                if round_index:
                    times[name].append(time.perf_counter() - begin)
    batch_mib = args.batch * args.patch**3 * 5 / 2**20  # float32 image + uint8 label
    buffer_mib = batch_mib / args.batch * args.max_length
    target_mib = 4 * batch_mib  # issue 16: a worker's peak memory above its baseline, at most 4 batches of patches
    print(
        f"{args.volumes} cases 1x{'x'.join(map(str, shape))} (float32 image, uint8 label), LabelSampler {args.patch}^3 "
        f"{LABEL_PROBS}, {args.samples} patches/case, batch {args.batch}, {args.workers} workers; median of "
        f"{args.epochs} epochs of {expected} patches (after 1 warm-up, order alternating); queue length "
        f"{args.max_length}, zarr reader threads {args.zarr_threads or 'default'}\n"
    )
    ratio = store_bytes / gz_bytes
    print(f"store: {store_bytes / 2**20:.1f} MiB vs .nii.gz {gz_bytes / 2**20:.1f} MiB ({ratio:.2f}x), "
          f"chunks {args.chunks}^3, prepared in {prepare_s:.1f} s; one batch of patches {batch_mib:.1f} MiB, "
          f"a worker's buffer of {args.max_length} patches {buffer_mib:.1f} MiB if read at once (PatchQueue reads a "
          "patch of a volume on disk when yielding it); "
          f"parent process RSS when the workers fork {baseline / 2**20:.0f} MiB; a worker's baseline is its RSS before "
          "its first volume")  # fmt: skip
    print(f"target (issue 16): a worker's peak above its baseline <= 4 batches = {target_mib:.1f} MiB\n")
    ours_s = statistics.median(times[OURS])
    print("| loop | s / epoch | patches / s | ours faster by | peak RSS of a worker (MiB) | its USS above baseline "
          "(MiB) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, values in times.items():
        seconds = statistics.median(values)
        top, above, private = (v / 2**20 for v in peaks[name])
        peak = f"{top:.0f} ({above:.0f} above its baseline: {above / batch_mib:.1f} batches)" if top else "n/a"
        private = f"{private:.0f} ({private / batch_mib:.1f} batches, target <= 4)" if top else "n/a"
        print(f"| {name} | {seconds:.2f} | {expected / seconds:.1f} | {seconds / ours_s:.2f}x | {peak} | {private} |")
    (_, queue_above, queue_private), (_, floor_above, floor_private) = peaks[OURS], peaks[FLOOR]
    above, private = (queue_above - floor_above) / 2**20, (queue_private - floor_private) / 2**20
    print(f"\n{OURS} minus the floor: peak RSS above baseline {above:+.1f} MiB ({above / batch_mib:+.1f} batches), "
          f"USS above baseline {private:+.1f} MiB ({private / batch_mib:+.1f} batches)")  # fmt: skip
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 volumes of 24^3, 8^3 patches, 1 epoch (smoke test)")
    parser.add_argument("--volumes", type=int, default=8)
    parser.add_argument("--size", type=int, default=160, help="volume edge length")
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8, help="patches per volume")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=32, help="queue length (ours: per worker)")
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs per library (after 1 warm-up)")
    parser.add_argument("--gz", action="store_true", help="write .nii.gz instead of .nii")
    parser.add_argument("--store", action="store_true", help="training from disk: a prepared store vs the files")
    parser.add_argument("--shape", type=int, nargs=3, default=None, help="volume shape (default: --size cubed)")
    parser.add_argument("--only-store", action="store_true", help="--store: only our two rows (for iterating)")
    parser.add_argument("--chunks", type=int, default=32, help="--store: chunk edge of the prepared store")
    parser.add_argument(
        "--zarr-threads", type=int, default=1, help="--store: zarr reader threads per worker (0: zarr's)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.volumes, args.size, args.patch, args.samples, args.epochs = 4, 24, 8, 4, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import torchio as tio
    except ImportError:
        tio = None
    if args.store:
        return run_store(args, tio)
    shape = (args.size,) * 3
    with tempfile.TemporaryDirectory() as tmp:
        files = write_volumes(Path(tmp), args.volumes, shape, ".nii.gz" if args.gz else ".nii")
        loops = {
            "monai_patchplug PatchQueue": ours(files, args),
            "monai_patchplug PatchQueue, meta_keys=None": ours(files, args, meta_keys=None),
        }
        if tio is not None:
            loops[f"TorchIO {tio.__version__} Queue"] = theirs(tio, files, args)
        warmups = 0 if args.quick else 1
        times: dict[str, list[float]] = {name: [] for name in loops}
        expected = args.volumes * args.samples
        for round_index in range(warmups + args.epochs):
            for name, make_epoch in loops.items():
                seconds, count = run_epoch(make_epoch)
                if count != expected:
                    raise RuntimeError(f"{name}: {count} patches in an epoch, expected {expected}.")
                if round_index >= warmups:
                    times[name].append(seconds)

    print(
        f"Python {platform.python_version()}, torch {torch.__version__}, MONAI {monai.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.machine()}"
    )
    print(
        f"{args.volumes} volumes 1x{'x'.join(map(str, shape))} ({'.nii.gz' if args.gz else '.nii'}), LabelSampler "
        f"{args.patch}^3 {LABEL_PROBS}, {args.samples} patches/volume, batch {args.batch}, {args.workers} workers, "
        f"queue length {args.max_length}; median of {args.epochs} epochs of {expected} patches\n"
    )
    base = statistics.median(times["monai_patchplug PatchQueue"])
    print("| queue | s / epoch | patches / s | PatchQueue speed-up |")
    print("|---|---|---|---|")
    for name, values in times.items():
        seconds = statistics.median(values)
        print(f"| {name} | {seconds:.2f} | {expected / seconds:.1f} | {seconds / base:.2f}x |")
    if tio is None:
        print("\nTorchIO is not installed: its row is skipped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
