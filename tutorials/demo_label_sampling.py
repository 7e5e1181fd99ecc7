"""Label-focused patch sampling in a few lines: the demo the README's first command runs.

It makes a 3D phantom (an image and a 4-label segmentation), draws patches with ``LabelSampler`` inside a MONAI
``Compose``, prints a few patch locations and compares the label found at the patch centres with the requested
probabilities. Run: ``python tutorials/demo_label_sampling.py [--samples N]``.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, ScaleIntensityd

import monai_patchplug as mpp

REQUESTED = {0: 0.1, 1: 0.8, 2: 0.4, 3: 0.6}


def make_phantom(shape: tuple[int, int, int] = (96, 96, 64), seed: int = 0) -> dict:
    """A noisy image and nested ellipsoids labelled 1 (outer) to 3 (inner), as channel-first MetaTensors."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    radius = np.sqrt(((grid / np.array([0.8, 0.6, 0.7])[:, None, None, None]) ** 2).sum(0))
    label = np.select([radius < 0.25, radius < 0.5, radius < 0.9], [3, 2, 1], 0).astype(np.uint8)
    image = label * 100.0 + np.random.RandomState(seed).normal(0, 20, shape)
    return {"image": MetaTensor(image[None].astype(np.float32)), "label": MetaTensor(label[None]), "id": "phantom"}


def main(samples: int) -> None:
    """Draw ``samples`` 32^3 patches and print locations and centre-label frequencies."""
    sampler = mpp.LabelSampler(32, "label", REQUESTED, keys=["image", "label"], num_samples=samples)
    pipeline = Compose([ScaleIntensityd(keys="image"), sampler]).set_random_state(seed=0)
    patches = pipeline(make_phantom())
    print(f"{len(patches)} patches of shape {tuple(patches[0]['image'].shape)}; the first five locations:")
    for patch in patches[:5]:
        print("  ", patch[mpp.LOCATION].tolist())
    centre = [int(p["label"][0, 16, 16, 16]) for p in patches]
    counts = np.bincount(centre, minlength=len(REQUESTED))
    total = sum(REQUESTED.values())
    print("\nlabel  requested  obtained")
    for label, p in REQUESTED.items():
        print(f"{label:>5}  {p / total:>9.3f}  {counts[label] / len(patches):>8.3f}")
    batch = torch.stack([p["image"] for p in patches[:4]])
    print(f"\na batch of four image patches: {tuple(batch.shape)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000, help="number of patches to draw")
    main(parser.parse_args().samples)
