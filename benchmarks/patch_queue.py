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

Run from the repository root::

    python benchmarks/patch_queue.py             # 8 volumes of 160^3, .nii, 5 epochs each
    python benchmarks/patch_queue.py --gz        # gzip-compressed .nii.gz files
    python benchmarks/patch_queue.py --quick     # 4 volumes of 24^3, 8^3 patches, 1 epoch each
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
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
from monai.data import DataLoader
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

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
    queue = tio.Queue(
        tio.SubjectsDataset(subjects), args.max_length, args.samples, sampler, num_workers=args.workers
    )
    loader = tio.SubjectsLoader(queue, batch_size=args.batch, num_workers=0)
    return lambda: loader


def run_epoch(make_epoch: Callable[[], Iterable]) -> tuple[float, int]:
    """Seconds for one epoch and the number of patches it gave."""
    start = time.perf_counter()
    count = 0
    for batch in make_epoch():
        count += int(batch["image"]["data"].shape[0] if isinstance(batch["image"], dict) else batch["image"].shape[0])
    return time.perf_counter() - start, count


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
