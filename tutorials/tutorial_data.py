"""Data and model shared by the tutorials: the MNI152 2009 template that ships inside the nilearn wheel.

``pip install --no-deps nilearn`` brings a real T1 and real grey/white-matter probability maps (197x233x189, 1 mm).
The files are found without importing nilearn. ``MPP_TUTORIAL_FAST=1`` (set by the test suite) downsamples the
volumes 4x and shortens training so that every tutorial runs in seconds; ``MPP_TUTORIAL_FIGURES`` redirects the
figures (the tests write them to a temporary folder, leaving the committed ones alone).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.networks.nets import UNet
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, ScaleIntensityd, ScaleIntensityRanged

FAST = os.environ.get("MPP_TUTORIAL_FAST", "") == "1"
FIGURES = Path(os.environ.get("MPP_TUTORIAL_FIGURES", Path(__file__).resolve().parent / "figures"))
#: Where tutorial 01 saves the trained UNet for the inference tutorial (not committed).
CHECKPOINT = Path(__file__).resolve().parent / "outputs" / ("unet_fast.pt" if FAST else "unet.pt")
TISSUES = {0: "background", 1: "CSF / partial volume", 2: "grey matter", 3: "white matter"}


def mni_files() -> dict[str, str]:
    """Paths of the MNI152 T1 and GM/WM probability maps inside the installed nilearn package."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise RuntimeError("the tutorials need the MNI152 template from nilearn: pip install --no-deps nilearn")
    data = Path(spec.origin).parent / "datasets" / "data"
    name = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
    return {key: str(data / name.format(key)) for key in ("t1", "gm", "wm")}


def load_subject() -> dict:
    """The template as a MONAI data dict: ``image`` (T1 scaled to [0, 1]), ``gm`` map and a 4-class ``label``.

    The GM/WM maps are stored as 0-255 and scaled to probabilities. Labels by thresholding: 3 white matter
    (WM >= 0.5), 2 grey matter (GM >= 0.5), 1 the rest of the brain (T1 > 0: CSF and partial volume),
    0 background.
    """
    load = Compose([
        LoadImaged(keys=["image", "gm", "wm"], image_only=True),
        EnsureChannelFirstd(keys=["image", "gm", "wm"]),
        ScaleIntensityd(keys="image"),
        ScaleIntensityRanged(keys=["gm", "wm"], a_min=0, a_max=255, b_min=0, b_max=1),
    ])
    files = mni_files()
    data = load({"image": files["t1"], "gm": files["gm"], "wm": files["wm"]})
    if FAST:
        data = {k: v[:, ::4, ::4, ::4] for k, v in data.items()}
        for volume in data.values():
            volume.affine = volume.affine @ torch.diag(torch.tensor([4.0, 4.0, 4.0, 1.0], dtype=torch.float64))
    t1, gm, wm = (data[k].as_tensor() for k in ("image", "gm", "wm"))
    label = torch.zeros_like(t1, dtype=torch.uint8)
    label[t1 > 0] = 1
    label[gm >= 0.5] = 2
    label[wm >= 0.5] = 3
    return {
        "image": data["image"],
        "gm": data["gm"],
        "label": MetaTensor(label, meta=dict(data["image"].meta)),
    }


def patch_size() -> tuple[int, int, int]:
    """Training patch size for the current mode."""
    return (16, 16, 16) if FAST else (48, 48, 48)


def small_unet() -> UNet:
    """A small 3D UNet: T1 in, 4 tissue classes out."""
    return UNet(spatial_dims=3, in_channels=1, out_channels=4, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)


def load_trained_unet() -> tuple[UNet, bool]:
    """The UNet trained by tutorial 01 (``(model, True)``), or an untrained one (``(model, False)``) if absent."""
    model = small_unet()
    if CHECKPOINT.exists():
        model.load_state_dict(torch.load(CHECKPOINT, weights_only=True))
    return model.eval(), CHECKPOINT.exists()


def save_figure(fig, name: str) -> Path:
    """Write a matplotlib figure to ``tutorials/figures/`` and return its path."""
    FIGURES.mkdir(exist_ok=True)
    path = FIGURES / name
    fig.savefig(path, dpi=90 if FAST else 110, bbox_inches="tight")
    return path


def seeded(seed: int = 0) -> None:
    """Seed numpy and torch for a reproducible tutorial run."""
    np.random.seed(seed)
    torch.manual_seed(seed)
