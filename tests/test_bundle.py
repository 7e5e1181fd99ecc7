"""The MONAI bundle in tutorials/bundle trains and infers on the 4x-downsampled tutorial data, writing only to tmp;
its segmentation is checked against a reference inference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from conftest import reference_hann_blend
from monai.networks.nets import UNet

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
    assert_prediction_is_the_reference(np.asarray(prediction.dataobj), image, tmp_path / "models" / "model.pt")


def assert_prediction_is_the_reference(prediction: np.ndarray, image: nib.Nifti1Image, checkpoint: Path) -> None:
    """The bundle's segmentation is the argmax of a reference inference: the trained UNet (as in inference.json) on
    the min-max scaled volume, every 16^3 patch of the grid with overlap 8 blended with the closed-form Hann window
    (``conftest.reference_hann_blend``). Voxels whose two best classes are within 1e-4 may go either way."""
    net = UNet(spatial_dims=3, in_channels=1, out_channels=4, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    net.load_state_dict(state.get("model", state))
    volume = np.asarray(image.dataobj, dtype=np.float32)
    volume = (volume - volume.min()) / (volume.max() - volume.min())
    with torch.no_grad():
        logits = reference_hann_blend(torch.from_numpy(volume)[None, None], net.eval(), 16, 8)[0]
    top2 = np.sort(logits, axis=0)[-2:]
    clear = top2[1] - top2[0] > 1e-4
    expected = logits.argmax(0)
    assert len(np.unique(expected)) > 1  # the comparison tells a real prediction from a constant one
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(prediction[clear], expected[clear])
