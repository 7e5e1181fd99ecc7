"""Benchmark patch sampling: monai_patchplug vs. MONAI vs. TorchIO.

Measures the wall-clock cost of one sampler call that draws 16 patches of 64^3
from a synthetic 1x256x256x160 subject (image, uint8 label map with labels 0..3,
probability map), for uniform, weighted and label-balanced sampling. Each row is
the median of N repeats (after 2 warm-ups) of ``time.perf_counter``. Per-call
preparation (index / CDF computation) is counted for every library, since none
of them is given precomputed indices.

A second table shows how our per-call cost scales with ``num_samples``
(1, 16, 64). TorchIO is an optional extra: without it its column is skipped.

Run from the repository root::

    python benchmarks/sampling.py             # full size, 15 repeats
    python benchmarks/sampling.py --repeats 5 --threads 1
    python benchmarks/sampling.py --quick     # 1x64x64x48, 16^3 patches, 3 repeats
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import monai
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import RandCropByLabelClassesd, RandSpatialCropSamplesd, RandWeightedCropd

KEYS = ["image", "label", "prob"]
LABEL_PROBS = {0: 0.1, 1: 0.8, 2: 0.4, 3: 0.6}
KINDS = ["uniform", "weighted", "label"]
WARMUPS = 2


def make_subject(shape: tuple[int, int, int], seed: int = 0) -> dict[str, MetaTensor]:
    """Synthetic subject: smooth image, nested-blob label map (0..3), blob probability map."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 1, *(max(s // 16, 2) for s in shape), generator=gen)
    image = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=False)[0]
    grid = torch.meshgrid(*(torch.linspace(-1.0, 1.0, s) for s in shape), indexing="ij")

    def dist2(center: tuple[float, float, float]) -> torch.Tensor:
        return sum((g - c) ** 2 for g, c in zip(grid, center))

    label = torch.zeros(shape, dtype=torch.uint8)
    label[dist2((0.2, -0.1, 0.0)) < 0.3**2] = 1  # outer blob
    label[dist2((0.25, -0.05, 0.05)) < 0.12**2] = 2  # nested inside label 1
    label[dist2((-0.5, 0.4, -0.3)) < 0.1**2] = 3  # small separate blob
    image = image + 0.5 * label.float()
    prob = torch.exp(-dist2((0.1, 0.0, 0.0)) / (2 * 0.35**2))
    prob = torch.clamp(prob - 0.05, min=0.0)  # exactly zero far from the blob centre
    return {
        "image": MetaTensor(image.float()),
        "label": MetaTensor(label[None]),
        "prob": MetaTensor(prob[None].float()),
    }


def time_calls(fns: dict[Any, Callable[[], Any]], repeats: int) -> dict[Any, float]:
    """Median wall-clock seconds of each ``fn()`` over ``repeats`` runs, after warm-ups.

    The calls are interleaved (one round runs every ``fn`` once), so background load or allocator state drifting
    during the run hits every row alike instead of whichever happened to be timed at that moment.
    """
    for _ in range(WARMUPS):
        for fn in fns.values():
            fn()
    times: dict[Any, list[float]] = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(ts) for key, ts in times.items()}


def load_ours() -> ModuleType:
    """Import monai_patchplug, falling back to the repository checkout."""
    try:
        import monai_patchplug
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import monai_patchplug
    return monai_patchplug


def load_torchio() -> ModuleType | None:
    try:
        import torchio
    except ImportError:
        return None
    return torchio


def ours_calls(pp: ModuleType, data: dict, patch: int, n: int) -> dict[str, Callable[[], Any]]:
    samplers = {
        "uniform": pp.UniformSampler(patch, num_samples=n),
        "weighted": pp.WeightedSampler(patch, "prob", num_samples=n),
        "label": pp.LabelSampler(patch, "label", LABEL_PROBS, num_samples=n),
    }
    for s in samplers.values():
        s.set_random_state(0)
    return {k: (lambda s=s: s(data)) for k, s in samplers.items()}


def monai_calls(data: dict, patch: int, n: int) -> dict[str, Callable[[], Any]]:
    ratios = [LABEL_PROBS[c] for c in sorted(LABEL_PROBS)]
    roi = (patch,) * 3  # RandWeightedCropd rejects an int spatial_size (ensure_tuple, not _rep)
    transforms = {
        "uniform": RandSpatialCropSamplesd(KEYS, roi_size=roi, num_samples=n, random_size=False),
        "weighted": RandWeightedCropd(KEYS, w_key="prob", spatial_size=roi, num_samples=n),
        "label": RandCropByLabelClassesd(
            KEYS,
            label_key="label",
            spatial_size=roi,
            ratios=ratios,
            num_classes=len(ratios),
            num_samples=n,
        ),
    }
    for t in transforms.values():
        t.set_random_state(0)
    return {k: (lambda t=t: t(data)) for k, t in transforms.items()}


def torchio_calls(tio: ModuleType, data: dict, patch: int, n: int) -> dict[str, Callable[[], Any]]:
    torch.manual_seed(0)  # TorchIO samplers draw from torch's global RNG
    subject = tio.Subject(
        image=tio.ScalarImage(tensor=data["image"].as_tensor()),
        label=tio.LabelMap(tensor=data["label"].as_tensor()),
        prob=tio.ScalarImage(tensor=data["prob"].as_tensor()),
    )
    samplers = {
        "uniform": tio.UniformSampler(patch),
        "weighted": tio.WeightedSampler(patch, "prob"),
        "label": tio.LabelSampler(patch, "label", LABEL_PROBS),
    }
    return {k: (lambda s=s: list(itertools.islice(s(subject), n))) for k, s in samplers.items()}


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per row (default 15)")
    parser.add_argument("--quick", action="store_true", help="tiny volume / patches, 3 repeats (smoke test)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    shape, patch, repeats = ((64, 64, 48), 16, 3) if args.quick else ((256, 256, 160), 64, args.repeats)
    n = 16
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    pp, tio = load_ours(), load_torchio()
    data = make_subject(shape)
    libs: dict[str, dict[str, Callable[[], Any]]] = {
        "ours": ours_calls(pp, data, patch, n),
        "MONAI": monai_calls(data, patch, n),
    }
    if tio is not None:
        libs["TorchIO"] = torchio_calls(tio, data, patch, n)
    else:
        print("note: torchio is not installed; skipping the TorchIO column\n")
    times = time_calls({(lib, k): fn for lib, calls in libs.items() for k, fn in calls.items()}, repeats)

    others = [lib for lib in libs if lib != "ours"]
    header = ["sampler"] + [f"{lib} (s)" for lib in libs] + [f"{lib}/ours" for lib in others]
    rows = [
        [k] + [f"{times[lib, k]:.4g}" for lib in libs] + [f"{times[lib, k] / times['ours', k]:.1f}x" for lib in others]
        for k in KINDS
    ]
    size = "x".join(map(str, (1, *shape)))
    print(f"### {n} patches of {patch}^3 per call from a {size} subject (median of {repeats})\n")
    print(markdown_table(header, rows))

    counts = [1, 16, 64]
    scaling = time_calls({(c, k): fn for c in counts for k, fn in ours_calls(pp, data, patch, c).items()}, repeats)
    rows = [[k] + [f"{scaling[c, k]:.4g}" for c in counts] + [f"{scaling[64, k] / scaling[1, k]:.1f}x"] for k in KINDS]
    print(f"\n### ours: seconds per call vs. num_samples ({patch}^3 patches)\n")
    print(markdown_table(["sampler"] + [f"n={c} (s)" for c in counts] + ["64/1"], rows))

    tio_version = f", torchio {tio.__version__}" if tio is not None else ""
    print(
        f"\nMachine: torch {torch.__version__}, monai {monai.__version__}{tio_version}, "
        f"{torch.get_num_threads()} torch threads, {platform.platform()} "
        f"({platform.machine()}, Python {platform.python_version()})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
