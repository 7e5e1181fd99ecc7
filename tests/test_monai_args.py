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
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import UNet
from monai.transforms import ClassesToIndicesd, FgBgToIndicesd, RandCropByPosNegLabeld
from stats import assert_counts_follow

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
    assert_counts_follow([fg.sum(), (~fg).sum()], [0.75, 0.25])


@pytest.mark.parametrize("target", ["RandCropByPosNegLabeld", "RandCropByLabelClassesd"])
def test_monai_defaults_without_a_mode_argument(data, target):
    """Only MONAI's names, none of pos/neg/ratios/num_classes: MONAI's defaults. RandCropByPosNegLabeld's pos = neg
    = 1 on a single-channel map; RandCropByLabelClassesd's equal odds per channel on a one-hot map."""
    config = {"_target_": target, "keys": ["image", "label"], "label_key": "label", "spatial_size": [5, 5, 5],
              "num_samples": 3000}
    if target == "RandCropByPosNegLabeld":
        patches = swap(config, "monai_patchplug.LabelSampler")[1].set_random_state(0)(data)
        fg = centre_values(patches) > 0
        assert_counts_follow([fg.sum(), (~fg).sum()], [0.5, 0.5])
        return
    one_hot = {**data, "label": MetaTensor(torch.nn.functional.one_hot(data["label"][0].long(), 4).permute(3, 0, 1, 2))}
    patches = swap(config, "monai_patchplug.LabelSampler")[1].set_random_state(0)(one_hot)
    classes = [int(p["label"][(slice(None), 2, 2, 2)].argmax()) for p in patches]
    assert_counts_follow(np.bincount(classes, minlength=4), np.full(4, 0.25))


def test_pos_neg_image_threshold_restricts_centres(data):
    config = {"_target_": "RandCropByPosNegLabeld", "keys": ["image", "label"], "label_key": "label",
              "spatial_size": [6, 6, 6], "pos": 0, "neg": 1, "num_samples": 300, "image_key": "image",
              "image_threshold": 0.0}
    _, ours = swap(config, "monai_patchplug.LabelSampler")
    patches = ours.set_random_state(0)(data)
    assert (centre_values(patches) == 0).all()
    assert all(float(p["image"][0, 3, 3, 3]) > 0 for p in patches)


@pytest.mark.parametrize("pos, neg", [(1, 0), (1, 1)])
def test_pos_neg_image_threshold_restricts_the_background_only(pos, neg):
    """MONAI's ``image_key``: background centres need ``image > image_threshold``, foreground centres do not. Half the
    foreground lies below the threshold, so half the foreground centres do too, in MONAI's draw and ours (a threshold
    applied to the foreground as well would give none). The foreground box lies well inside the valid centres, so
    MONAI's clamping of centres into the border changes no category."""
    label = torch.zeros(1, *SHAPE, dtype=torch.uint8)
    label[0, 8:22, 8:20, 6:18] = 1
    image = torch.ones(1, *SHAPE)
    image[..., :12] = -1.0  # foreground z = 6..11 below the threshold, 12..17 above
    data = {"image": MetaTensor(image), "label": MetaTensor(label)}
    args = {"keys": ["image", "label"], "label_key": "label", "spatial_size": [6, 6, 6], "pos": pos, "neg": neg,
            "num_samples": 1000, "image_key": "image", "image_threshold": 0.0}
    expected = np.asarray([pos / 2, pos / 2, 0, neg]) / (pos + neg)  # fg below, fg above, bg below, bg above
    for sampler in (RandCropByPosNegLabeld(**args), mpp.LabelSampler(**args)):
        patches = sampler.set_random_state(0)(data)
        category = [2 * int(p["label"][0, 3, 3, 3] == 0) + int(p["image"][0, 3, 3, 3] > 0) for p in patches]
        assert_counts_follow(np.bincount(category, minlength=4), expected)


def test_pos_neg_with_precomputed_indices(data):
    indexed = FgBgToIndicesd(keys="label", image_key="image", image_threshold=0.0)(dict(data))
    config = {"_target_": "RandCropByPosNegLabeld", "keys": ["image", "label"], "label_key": "label",
              "spatial_size": [6, 6, 6], "pos": 1, "neg": 3, "num_samples": 2000,
              "fg_indices_key": "label_fg_indices", "bg_indices_key": "label_bg_indices"}
    _, ours = swap(config, "monai_patchplug.LabelSampler")
    theirs, _ = swap({**config, "num_samples": 2}, "monai_patchplug.LabelSampler")  # MONAI copies "prob" into each
    patches = ours.set_random_state(0)(indexed)
    assert "label_fg_indices" not in patches[0] and "label_fg_indices" not in theirs(indexed)[0]
    fg = centre_values(patches) > 0
    assert_counts_follow([fg.sum(), (~fg).sum()], [0.25, 0.75])
    background = [p for p, f in zip(patches, fg) if not f]
    assert all(float(p["image"][0, 3, 3, 3]) > 0 for p in background)  # MONAI thresholds the background only


def test_index_lists_keep_every_valid_centre_and_skip_the_rest(data):
    """Precomputed indices are used as they are, without MONAI's clamping: the first and the last valid centre of
    patches of 6 (3 and S - 3 on each axis) are both drawn, equally often; their neighbours just outside the valid
    range never are."""
    first, last = (3, 3, 3), tuple(s - 3 for s in SHAPE)
    outside = [(2, 3, 3), (3, 3, 2), (SHAPE[0] - 2, *last[1:]), (*last[:2], SHAPE[2] - 2)]
    flat = [int(np.ravel_multi_index(c, SHAPE)) for c in (first, last, *outside)]
    sampler = mpp.LabelSampler(keys="image", label_key="label", spatial_size=6, pos=1, neg=0, num_samples=600,
                               fg_indices_key="fg", bg_indices_key="bg")
    patches = sampler.set_random_state(0)({**data, "fg": np.asarray(flat), "bg": np.asarray([], dtype=np.int64)})
    centres = [tuple((p[mpp.LOCATION][:3] + 3).tolist()) for p in patches]
    assert set(centres) <= {first, last}
    assert_counts_follow([centres.count(first), centres.count(last)], [0.5, 0.5])


def test_precomputed_indices_need_no_label_map(data):
    """As MONAI: with the index lists in the data the label map may be gone (e.g. popped to save memory); the centres
    still come from the lists."""
    indexed = FgBgToIndicesd(keys="label")(dict(data))
    label = indexed.pop("label")
    config = {"_target_": "RandCropByPosNegLabeld", "keys": ["image"], "label_key": "label", "spatial_size": [6, 6, 6],
              "pos": 1, "neg": 0, "num_samples": 50, "fg_indices_key": "label_fg_indices",
              "bg_indices_key": "label_bg_indices", "image_key": "image"}  # MONAI reads the shape from it
    theirs, ours = swap(config, "monai_patchplug.LabelSampler")
    patches = ours.set_random_state(0)(indexed)
    assert patches[0]["image"].shape == theirs(dict(indexed))[0]["image"].shape == (1, 6, 6, 6)
    centres = [p[mpp.LOCATION][:3] + 3 for p in patches]
    assert all(label[(0, *c.tolist())] > 0 for c in centres)


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
    assert_counts_follow(counts, np.arange(1, 5) / 10)
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
     (mpp.UniformSampler, {"patch_size": (8, 8, 8), "roi_size": np.array([8, 8, 6])}, "not both"),
     (mpp.LabelSampler, {"patch_size": 8, "label_probabilities": {1: 1}, "pos": 1}, "not both"),
     (mpp.LabelSampler, {"patch_size": 8, "ratios": [1, 2], "num_classes": 3}, "num_classes=3"),
     (mpp.LabelSampler, {"patch_size": 8, "pos": 0, "neg": 0}, "both be 0"),
     (mpp.LabelSampler, {"patch_size": 8, "pos": -1}, "pos"),
     (mpp.LabelSampler, {"patch_size": 8, "ratios": [1, -2]}, r"ratios must be finite numbers >= 0, got \[1, -2\]"),
     (mpp.WeightedSampler, {"patch_size": 8, "probability_map": "a", "w_key": "b"}, "not both")],
)
def test_conflicting_or_unsupported_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_bad_threshold_and_index_lists_name_the_argument(data):
    with pytest.raises(TypeError, match="image_threshold must be a number, got 'a'"):
        mpp.LabelSampler(6, pos=1, image_threshold="a")
    sampler = mpp.LabelSampler(keys="image", label_key="label", spatial_size=4, pos=1, neg=1,
                               fg_indices_key="fg", bg_indices_key="bg")
    with pytest.raises(ValueError, match=r"list holds 0..20160, outside an image of spatial shape \(30, 28, 24\)"):
        sampler({**data, "fg": np.array([0, 30 * 28 * 24]), "bg": np.array([5])})


def test_one_value_under_both_names_is_no_conflict():
    for ours, theirs in [((8, 8, 6), [8, 8, 6]), (np.array([8, 8, 6]), np.array([8, 8, 6])), (8, 8)]:
        assert mpp.UniformSampler(patch_size=ours, roi_size=theirs).patch_size in ((8, 8, 6), (8, 8, 8))
    assert mpp.UniformSampler(roi_size=-1).patch_size == (-1, -1, -1)  # MONAI's "the image size"
    assert mpp.LabelSampler(6, label_name="seg", label_key="seg").label_name == "seg"


def test_image_key_of_another_shape_is_an_error(data):
    """The image that restricts the centres is not among the cropped keys, so only this check sees its shape."""
    sampler = mpp.LabelSampler(keys="label", label_key="label", spatial_size=4, pos=1, neg=1, image_key="image")
    with pytest.raises(ValueError, match=r"image_key 'image' has spatial shape \(30, 28, 12\), the label map "
                       r"\(30, 28, 24\)"):
        sampler({**data, "image": data["image"][..., :12]})


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


# -- GridInferer in place of SlidingWindowInferer -------------------------------------------------------------------


def small_unet(dims: int):
    torch.manual_seed(0)
    return UNet(dims, 1, 2, (4, 8), (2,), num_res_units=0).eval()


@pytest.mark.parametrize("dims, shape", [(3, (1, 1, 37, 30, 26)), (2, (2, 1, 45, 38))])
@pytest.mark.parametrize("overlap", [0.25, 0.5])
@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_grid_inferer_gives_sliding_window_inferer_output(dims, shape, overlap, mode):
    config = {"_target_": "SlidingWindowInferer", "roi_size": [16] * dims, "sw_batch_size": 3, "overlap": overlap,
              "mode": mode, "sigma_scale": 0.125, "padding_mode": "constant", "cval": 0.0, "progress": False,
              "cache_roi_weight_map": True, "buffer_steps": None}
    theirs, ours = swap(config, "monai_patchplug.GridInferer")
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    net = small_unet(dims)
    calls = {"ours": 0, "theirs": 0}

    def counting(name):
        def run(patches):
            calls[name] += 1
            return net(patches)
        return run

    with torch.no_grad():
        expected, got = theirs(x, counting("theirs")), ours(x, counting("ours"))
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)  # float32 rounding of the blending only
    assert calls["ours"] <= calls["theirs"]


@pytest.mark.parametrize("kwargs", [
    {"roi_size": [16, 16, 16], "overlap": 0.25, "mode": "gaussian", "padding_mode": "constant", "cval": 0.5},
    {"roi_size": [16, -1, 8], "overlap": 0.5},
    {"roi_size": 12, "overlap": [0.5, 0.25, 0.0], "padding_mode": "replicate"},
])
def test_grid_inferer_padding_and_roi_fallback_as_monai(kwargs):
    x = torch.rand(1, 1, 10, 20, 12, generator=torch.Generator().manual_seed(2))
    net = small_unet(3)
    with torch.no_grad():
        expected = SlidingWindowInferer(**kwargs)(x, net)
        got = mpp.GridInferer(**kwargs)(x, net)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"roi_size": 8, "with_coord": True}, ValueError, "with_coord"),
    ({"roi_size": 8, "mode": "hann"}, ValueError, "mode"),
    ({"roi_size": 8, "overlap": 1.0}, ValueError, "fraction"),
    ({"patch_size": 8, "roi_size": 6}, ValueError, "not both"),
    ({"roi_size": 8, "patch_overlap": 2, "overlap": 0.5}, ValueError, "not both"),
    ({"overlap_mode": "hann", "roi_size": 8, "mode": "constant"}, ValueError, "not both"),
    ({"sw_batch_size": 4}, TypeError, "roi_size"),
])
def test_grid_inferer_rejects_conflicting_monai_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        mpp.GridInferer(**kwargs)


def test_bundle_evaluator_with_swapped_inferer_and_invertd(tmp_path):
    """A MONAI evaluation config (load, orient, resample, scale, evaluator with Invertd) with only the inferer's
    ``_target_`` changed gives the same predictions as with SlidingWindowInferer."""
    pytest.importorskip("ignite")
    affine = np.diag([1.2, 0.9, 2.0, 1.0])
    label = make_label_map(SHAPE)[0].numpy()
    image = (label.astype(np.float32) * 300 + np.random.RandomState(0).normal(0, 20, SHAPE)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "i.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "l.nii.gz")
    config = {
        "device": "cpu",
        "network": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                    "channels": [4, 8], "strides": [2], "num_res_units": 0},
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": ["image", "label"], "image_only": True},
            {"_target_": "EnsureChannelFirstd", "keys": ["image", "label"]},
            {"_target_": "Orientationd", "keys": ["image", "label"], "axcodes": "RAS", "labels": None},
            {"_target_": "Spacingd", "keys": ["image", "label"], "pixdim": [1.5, 1.5, 2.0],
             "mode": ["bilinear", "nearest"]},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -100, "a_max": 1000, "b_min": 0.0,
             "b_max": 1.0, "clip": True},
            {"_target_": "EnsureTyped", "keys": ["image", "label"]},
        ]},
        "dataset": {"_target_": "Dataset", "data": [{"image": str(tmp_path / "i.nii.gz"),
                                                      "label": str(tmp_path / "l.nii.gz")}],
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16], "sw_batch_size": 2,
                    "overlap": 0.5, "mode": "gaussian"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
        ]},
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing"},
    }

    def predictions(target: str) -> torch.Tensor:
        parser = ConfigParser(copy.deepcopy(config))
        parser["inferer#_target_"] = target
        torch.manual_seed(0)
        evaluator = parser.get_parsed_content("evaluator")
        evaluator.network.eval()
        evaluator.run()
        return evaluator.state.output[0]["pred"]

    expected, got = predictions("SlidingWindowInferer"), predictions("monai_patchplug.GridInferer")
    assert got.shape == expected.shape == (2, *SHAPE)  # Invertd put the prediction back on the original grid
    assert torch.allclose(got.as_tensor(), expected.as_tensor(), atol=1e-5)
    assert torch.allclose(got.affine, expected.affine)
