"""Swapped-in rows: the same MONAI argument sets given to MONAI's components and to ours, timed in one run.

A bundle that replaces only ``_target_`` keeps MONAI's arguments; this measures what that swap buys. Each row
builds the MONAI component and ours from one kwargs dict (ours accepts MONAI's names), then times both in
interleaved rounds (median). Run: ``python benchmarks/swapped.py [--repeats N] [--quick]``.
"""

from __future__ import annotations

import argparse
import platform

import monai
import torch
from monai.inferers import SlidingWindowInferer
from monai.transforms import RandCropByLabelClassesd, RandCropByPosNegLabeld, RandSpatialCropSamplesd, RandWeightedCropd
from sampling import KEYS, load_ours, make_subject, time_calls

mpp = load_ours()


def sampler_rows(shape: tuple[int, int, int], size: int) -> list[tuple[str, type, type, dict]]:
    """(name, MONAI class, our class, MONAI kwargs) for each cropper row."""
    common = {"keys": KEYS, "num_samples": 16}
    return [
        ("RandSpatialCropSamplesd", RandSpatialCropSamplesd, mpp.UniformSampler,
         {**common, "roi_size": [size] * 3, "random_size": False}),
        ("RandWeightedCropd", RandWeightedCropd, mpp.WeightedSampler,
         {**common, "w_key": "prob", "spatial_size": [size] * 3}),
        ("RandCropByPosNegLabeld", RandCropByPosNegLabeld, mpp.LabelSampler,
         {**common, "label_key": "label", "spatial_size": [size] * 3, "pos": 1, "neg": 1, "image_key": "image",
          "image_threshold": 0.0}),
        ("RandCropByLabelClassesd", RandCropByLabelClassesd, mpp.LabelSampler,
         {**common, "label_key": "label", "spatial_size": [size] * 3, "ratios": [0.1, 0.8, 0.4, 0.6],
          "num_classes": 4}),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="tiny volumes, 3 repeats (smoke test)")
    args = parser.parse_args()
    shape, size, repeats = ((48, 48, 32), 16, 3) if args.quick else ((256, 256, 160), 64, args.repeats)
    subject = make_subject(shape)
    print(f"### Swapped `_target_`: MONAI's arguments, MONAI's component vs ours (median of {repeats})\n")
    print("| component (MONAI arguments) | MONAI (s) | ours (s) | MONAI/ours |")
    print("|---|---|---|---|")
    for name, theirs_cls, ours_cls, kwargs in sampler_rows(shape, size):
        theirs, ours = theirs_cls(**kwargs), ours_cls(**kwargs)
        theirs.set_random_state(0)
        ours.set_random_state(0)
        t = time_calls({"theirs": lambda f=theirs: f(subject), "ours": lambda f=ours: f(subject)}, repeats)
        print(f"| {name} (16 x {size}^3 from 1x{'x'.join(map(str, shape))}) | {t['theirs']:.4g} | "
              f"{t['ours']:.4g} | {t['theirs'] / t['ours']:.1f}x |")
    image = torch.rand(1, 1, *([48] * 3 if args.quick else [192] * 3))
    roi = 16 if args.quick else 64
    for mode in ("constant", "gaussian"):
        kwargs = {"roi_size": [roi] * 3, "sw_batch_size": 4, "overlap": 0.5, "mode": mode}
        theirs, ours = SlidingWindowInferer(**kwargs), mpp.GridInferer(**kwargs)

        def network(patches: torch.Tensor) -> torch.Tensor:
            return torch.cat([patches, patches], 1)

        calls = {"theirs": lambda f=theirs: f(image, network), "ours": lambda f=ours: f(image, network)}
        with torch.no_grad():
            t = time_calls(calls, repeats)
        print(f"| SlidingWindowInferer mode={mode} ({roi}^3, overlap 0.5, batch 4, 2-channel identity on "
              f"1x{image.shape[2]}^3) | {t['theirs']:.4g} | {t['ours']:.4g} | {t['theirs'] / t['ours']:.1f}x |")
    print(f"\nMachine: torch {torch.__version__}, monai {monai.__version__}, {torch.get_num_threads()} torch threads, "
          f"{platform.platform()}")


if __name__ == "__main__":
    main()
