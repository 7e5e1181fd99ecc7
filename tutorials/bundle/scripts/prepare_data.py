"""Write the tutorial data as NIfTI files for the bundle: the MNI152 T1, its 4-class tissue map and a datalist.

The volumes come from ``tutorials/tutorial_data.py`` (the MNI152 2009 template shipped in the nilearn wheel): the T1
scaled to [0, 1] (float32) and the label map (uint8: 0 background, 1 CSF / partial volume, 2 grey matter, 3 white
matter). ``dataset.json`` lists them in the Medical Segmentation Decathlon layout (``training``, ``validation``,
``testing``) that the bundle's configs read with ``monai.data.load_decathlon_datalist``. There is one subject, so all
three lists hold the same volume: the bundle shows the mechanics, not generalisation.

Usage, from the repository root::

    python tutorials/bundle/scripts/prepare_data.py [--data_dir tutorials/bundle/data] [--fast]

``--fast`` (or ``MPP_TUTORIAL_FAST=1``) writes the 4x-downsampled volume (50x59x48 voxels of 4 mm) instead of the
full 197x233x189 one.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

TUTORIALS = Path(__file__).resolve().parents[2]
IMAGE, LABEL = "mni152_t1.nii.gz", "mni152_tissues.nii.gz"


def prepare(data_dir: Path, fast: bool) -> None:
    """Write the T1, the tissue map and ``dataset.json`` into ``data_dir``."""
    os.environ["MPP_TUTORIAL_FAST"] = "1" if fast else "0"  # read by tutorial_data when it is imported
    sys.path.insert(0, str(TUTORIALS))
    subject = importlib.import_module("tutorial_data").load_subject()
    affine = subject["image"].affine.numpy()
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, key, dtype in ((IMAGE, "image", np.float32), (LABEL, "label", np.uint8)):
        array = subject[key][0].numpy().astype(dtype)
        nib.save(nib.Nifti1Image(array, affine), data_dir / name)
        print(f"wrote {data_dir / name}: {array.shape} {array.dtype}")
    case = {"image": IMAGE, "label": LABEL}
    datalist = {"training": [case], "validation": [case], "testing": [{"image": IMAGE}]}
    path = data_dir / "dataset.json"
    path.write_text(json.dumps(datalist, indent=2) + "\n")
    print(f"wrote {path}")


def main() -> None:
    """Parse the command line and write the data."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", type=Path, default=TUTORIALS / "bundle" / "data",
                        help="output folder, the bundle's `dataset_dir` (default: tutorials/bundle/data)")
    parser.add_argument("--fast", action="store_true", default=os.environ.get("MPP_TUTORIAL_FAST", "") == "1",
                        help="write the 4x-downsampled volume (default: MPP_TUTORIAL_FAST=1 in the environment)")
    args = parser.parse_args()
    prepare(args.data_dir, args.fast)


if __name__ == "__main__":
    main()
