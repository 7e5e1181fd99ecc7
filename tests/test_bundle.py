"""The MONAI bundle in tutorials/bundle trains and infers on the 4x-downsampled tutorial data, writing only to tmp."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "tutorials" / "bundle"


def run(*args: str) -> subprocess.CompletedProcess:
    """Run ``python *args`` from the repository root and check that it exits with 0."""
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def bundle_run(config: str, **overrides) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` (the README's command) on one of the bundle's configs."""
    kwargs = {"config_file": str(BUNDLE / "configs" / config), "meta_file": str(BUNDLE / "configs" / "metadata.json"),
              **overrides}
    return run("-m", "monai.bundle", "run", *(f"--{key}={value}" for key, value in kwargs.items()))


def test_bundle_trains_then_infers(tmp_path):
    data = tmp_path / "data"
    run("tutorials/bundle/scripts/prepare_data.py", "--data_dir", str(data), "--fast")
    image = nib.load(data / "mni152_t1.nii.gz")
    assert image.shape == (50, 59, 48)
    np.testing.assert_allclose(np.diag(image.affine)[:3], 4.0)  # the 4x stride is in the voxel size

    small = {"bundle_root": str(tmp_path), "patch_size": 16, "sw_batch_size": 64}
    bundle_run("train.json", **small, epochs=1, iterations=2, num_samples=2, val_interval=1)
    assert (tmp_path / "models" / "model.pt").stat().st_size > 10_000

    out = tmp_path / "predictions"
    done = bundle_run("inference.json", **small, output_dir=str(out))
    assert "weights: " + str(tmp_path / "models" / "model.pt") in done.stdout
    prediction = nib.load(out / "mni152_t1_seg.nii.gz")
    assert prediction.shape == image.shape
    np.testing.assert_allclose(prediction.affine, image.affine)
    values = np.unique(np.asarray(prediction.dataobj))
    assert set(values.tolist()) <= {0, 1, 2, 3}
