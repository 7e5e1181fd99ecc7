"""Swapping only ``_target_`` of a MONAI cropper's config for ours works, with MONAI's meaning of its arguments."""

from __future__ import annotations

import copy

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import make_label_map
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import ClassesToIndicesd, FgBgToIndicesd
from test_weighted import assert_frequencies

import monai_patchplug as mpp

SHAPE = (30, 28, 24)


@pytest.fixture
def data() -> dict:
    gen = torch.Generator().manual_seed(0)
    label = make_label_map(SHAPE)
    image = torch.rand((1, *SHAPE), generator=gen) + label
    image[:, :, :, :6] = -1.0  # "air" below the image threshold used by the image_key tests
    prob = torch.zeros((1, *SHAPE))
    prob[0, 10:14, 9:12, 8:16] = 1.0
    return {"image": MetaTensor(image), "label": MetaTensor(label), "prob": MetaTensor(prob)}


def swap(config: dict, target: str):
    """Instantiate MONAI's config and the same config with only ``_target_`` changed."""
    ours = copy.deepcopy(config)
    ours["_target_"] = target
    return ConfigParser({"t": config}).get_parsed_content("t"), ConfigParser({"t": ours}).get_parsed_content("t")


def centre_values(patches, key="label") -> np.ndarray:
    return np.asarray([int(p[key][(0, *[s // 2 for s in p[key].shape[1:]])]) for p in patches])


def test_rand_spatial_crop_samples_swap(data):
    config = {"_target_": "RandSpatialCropSamplesd", "keys": ["image", "label"], "roi_size": [8, -1, 6],
              "num_samples": 3, "random_center": True, "random_size": False, "allow_missing_keys": False,
              "lazy": False}
    theirs, ours = swap(config, "monai_patchplug.UniformSampler")
    expected, got = theirs(data), ours(data)
    assert len(got) == len(expected) == 3
    for e, g in zip(expected, got):
        assert g["image"].shape == e["image"].shape == (1, 8, SHAPE[1], 6)
        assert g["label"].shape == e["label"].shape


def test_random_center_false_is_monai_centre_crop(data):
    config = {"_target_": "RandSpatialCropSamplesd", "keys": ["image"], "roi_size": [7, 8, 5], "num_samples": 2,
              "random_center": False}
    theirs, ours = swap(config, "monai_patchplug.UniformSampler")
    for e, g in zip(theirs(data), ours(data)):
        assert torch.equal(e["image"].as_tensor(), g["image"].as_tensor())


def test_rand_weighted_crop_swap(data):
    config = {"_target_": "RandWeightedCropd", "keys": ["image", "label", "prob"], "w_key": "prob",
              "spatial_size": [6, 6, 6], "num_samples": 50}
    _, ours = swap(config, "monai_patchplug.WeightedSampler")
    patches = ours.set_random_state(0)(data)
    assert len(patches) == 50 and all(p["prob"][0, 3, 3, 3] == 1.0 for p in patches)


def test_num_samples_defaults_to_a_list_with_monai_arguments(data):
    assert isinstance(mpp.WeightedSampler(w_key="prob", spatial_size=6)(data), list)
    assert isinstance(mpp.WeightedSampler(6, "prob")(data), dict)


def test_pos_neg_ratio(data):
    config = {"_target_": "RandCropByPosNegLabeld", "keys": ["image", "label"], "label_key": "label",
              "spatial_size": [6, 6, 6], "pos": 3, "neg": 1, "num_samples": 2000}
    _, ours = swap(config, "monai_patchplug.LabelSampler")
    fg = centre_values(ours.set_random_state(0)(data)) > 0
    assert_frequencies(np.asarray([fg.sum()]), np.asarray([0.75]), len(fg))


def test_pos_neg_image_threshold_restricts_centres(data):
    config = {"_target_": "RandCropByPosNegLabeld", "keys": ["image", "label"], "label_key": "label",
              "spatial_size": [6, 6, 6], "pos": 0, "neg": 1, "num_samples": 300, "image_key": "image",
              "image_threshold": 0.0}
    _, ours = swap(config, "monai_patchplug.LabelSampler")
    patches = ours.set_random_state(0)(data)
    assert (centre_values(patches) == 0).all()
    assert all(float(p["image"][0, 3, 3, 3]) > 0 for p in patches)


def test_pos_neg_with_precomputed_indices(data):
    indexed = FgBgToIndicesd(keys="label", image_key="image", image_threshold=0.0)(dict(data))
    config = {"_target_": "RandCropByPosNegLabeld", "keys": ["image", "label"], "label_key": "label",
              "spatial_size": [6, 6, 6], "pos": 1, "neg": 3, "num_samples": 2000,
              "fg_indices_key": "label_fg_indices", "bg_indices_key": "label_bg_indices"}
    theirs, ours = swap(config, "monai_patchplug.LabelSampler")
    patches = ours.set_random_state(0)(indexed)
    assert "label_fg_indices" not in patches[0] and "label_fg_indices" not in theirs(indexed)[0]
    fg = centre_values(patches) > 0
    assert_frequencies(np.asarray([fg.sum()]), np.asarray([0.25]), len(fg))
    background = [p for p, f in zip(patches, fg) if not f]
    assert all(float(p["image"][0, 3, 3, 3]) > 0 for p in background)  # MONAI thresholds the background only


@pytest.mark.parametrize("with_indices", [False, True])
def test_label_classes_ratios(data, with_indices):
    config = {"_target_": "RandCropByLabelClassesd", "keys": ["image", "label"], "label_key": "label",
              "spatial_size": [5, 5, 5], "ratios": [1, 2, 3, 4], "num_classes": 4, "num_samples": 3000,
              "max_samples_per_class": 10000, "warn": False}
    if with_indices:
        data = ClassesToIndicesd(keys="label", num_classes=4)(dict(data))
        config["indices_key"] = "label_cls_indices"
    _, ours = swap(config, "monai_patchplug.LabelSampler")
    patches = ours.set_random_state(0)(data)
    counts = np.bincount(centre_values(patches), minlength=4)
    assert_frequencies(counts, np.arange(1, 5) / 10, len(patches))
    assert "label_cls_indices" not in patches[0]


def test_allow_smaller_matches_monai_shape(data):
    config = {"_target_": "RandCropByLabelClassesd", "keys": ["image", "label"], "label_key": "label",
              "spatial_size": [40, 6, 6], "num_classes": 4, "num_samples": 2, "allow_smaller": True}
    theirs, ours = swap(config, "monai_patchplug.LabelSampler")
    assert ours(data)[0]["image"].shape == theirs(data)[0]["image"].shape == (1, SHAPE[0], 6, 6)


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [(mpp.UniformSampler, {"roi_size": 8, "random_size": True}, "random_size"),
     (mpp.UniformSampler, {"patch_size": 8, "roi_size": 6}, "not both"),
     (mpp.LabelSampler, {"patch_size": 8, "label_probabilities": {1: 1}, "pos": 1}, "not both"),
     (mpp.LabelSampler, {"patch_size": 8, "ratios": [1, 2], "num_classes": 3}, "num_classes=3"),
     (mpp.LabelSampler, {"patch_size": 8, "pos": 0, "neg": 0}, "both be 0"),
     (mpp.LabelSampler, {"patch_size": 8, "pos": -1}, "pos"),
     (mpp.WeightedSampler, {"patch_size": 8, "probability_map": "a", "w_key": "b"}, "not both")],
)
def test_conflicting_or_unsupported_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_bundle_style_pipeline_with_swapped_sampler(tmp_path):
    affine = np.diag([1.2, 0.9, 2.0, 1.0])
    rng = np.random.RandomState(0)
    label = make_label_map(SHAPE)[0].numpy()
    image = (label.astype(np.float32) * 300 + rng.normal(0, 20, SHAPE)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "i.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "l.nii.gz")
    keys = ["image", "label"]
    config = {
        "transform": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": keys, "image_only": True},
            {"_target_": "EnsureChannelFirstd", "keys": keys},
            {"_target_": "Orientationd", "keys": keys, "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": keys, "pixdim": [1.5, 1.5, 2.0], "mode": ["bilinear", "nearest"]},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -100, "a_max": 1000, "b_min": 0.0,
             "b_max": 1.0, "clip": True},
            {"_target_": "EnsureTyped", "keys": keys},
            {"_target_": "RandCropByPosNegLabeld", "keys": keys, "label_key": "label", "spatial_size": [8, 8, 8],
             "pos": 1, "neg": 1, "num_samples": 4, "image_key": "image", "image_threshold": 0},
        ]},
    }
    parser = ConfigParser(config)
    parser["transform#transforms#6#_target_"] = "monai_patchplug.LabelSampler"
    pipeline = parser.get_parsed_content("transform")
    assert isinstance(pipeline.transforms[-1], mpp.LabelSampler)
    patches = pipeline.set_random_state(0)({"image": str(tmp_path / "i.nii.gz"), "label": str(tmp_path / "l.nii.gz")})
    assert len(patches) == 4 and all(p["image"].shape == (1, 8, 8, 8) for p in patches)
    assert all(p["image"].applied_operations[-1]["class"] == "LabelSampler" for p in patches)
