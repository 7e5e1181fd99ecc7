"""The samplers inside MONAI: Compose, Dataset/CacheDataset, DataLoader workers, Invertd, ConfigParser, lazy."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import box_slices, make_label_map
from monai.bundle import ConfigParser
from monai.data import CacheDataset, DataLoader, Dataset, MetaTensor, list_data_collate, set_track_meta
from monai.transforms import Compose, EnsureChannelFirstd, Invertd, LoadImaged, SpatialPadd
from monai.utils import set_determinism
from stats import assert_counts_follow

import monai_patchplug as mpp

SHAPE = (20, 18, 14)


@pytest.fixture(scope="module")
def nifti_files(tmp_path_factory) -> list[dict[str, str]]:
    """Three small image/label NIfTI pairs with a non-trivial affine."""
    root = tmp_path_factory.mktemp("nifti")
    affine = np.diag([1.5, 2.0, 2.5, 1.0])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    files = []
    for i in range(3):
        rng = np.random.RandomState(i)
        image = rng.rand(*SHAPE).astype(np.float32) + i
        label = make_label_map(SHAPE)[0].numpy()
        nib.save(nib.Nifti1Image(image, affine), root / f"img{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / f"seg{i}.nii.gz")
        files.append({"image": str(root / f"img{i}.nii.gz"), "label": str(root / f"seg{i}.nii.gz")})
    return files


def loading() -> list:
    return [LoadImaged(keys=["image", "label"], image_only=True), EnsureChannelFirstd(keys=["image", "label"])]


def label_pipeline(num_samples: int = 4) -> Compose:
    sampler = mpp.LabelSampler(8, "label", {0: 1, 3: 1}, keys=["image", "label"], num_samples=num_samples)
    return Compose([*loading(), sampler])


def batch_locations(loader) -> list[np.ndarray]:
    return [batch[mpp.LOCATION].numpy() for batch in loader]


def test_dataloader_two_workers_collates_and_follows_label_probabilities(nifti_files):
    """12 volumes of 200 patches drawn in two workers: labels 0 and 3 at the centre with 1/2 each (within the
    interval that a correct sampler leaves with probability 1e-6, see ``stats``)."""
    set_determinism(seed=0)
    dataset = Dataset(nifti_files * 4, transform=label_pipeline(200))
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=list_data_collate)
    centre_labels = []
    for batch in loader:
        assert batch["image"].shape[1:] == (1, 8, 8, 8) and batch[mpp.LOCATION].shape[1] == 6
        assert isinstance(batch["image"], MetaTensor) and batch["image"].meta["patch_index"].shape[0] == len(
            batch["image"]
        )
        centre_labels += batch["label"][:, 0, 4, 4, 4].int().tolist()
    counts = np.bincount(centre_labels, minlength=4)
    assert len(centre_labels) == 12 * 200 and counts[1] == counts[2] == 0
    assert_counts_follow(counts[[0, 3]], [0.5, 0.5])
    set_determinism(seed=None)


def test_worker_seeding_makes_runs_reproducible(nifti_files):
    def run(seed):
        set_determinism(seed=seed)
        loader = DataLoader(Dataset(nifti_files * 2, transform=label_pipeline()), batch_size=2, num_workers=2)
        return batch_locations(loader)

    first, again, other = run(1), run(1), run(2)
    set_determinism(seed=None)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_compose_set_random_state_reaches_the_sampler(nifti_files):
    def run(seed):
        return [p[mpp.LOCATION].tolist() for p in label_pipeline().set_random_state(seed)(nifti_files[0])]

    assert run(5) == run(5) and run(5) != run(6)


def test_cache_dataset_caches_the_prefix_and_samples_anew(nifti_files):
    dataset = CacheDataset(nifti_files, transform=label_pipeline(2), cache_rate=1.0, num_workers=0, progress=False)
    cached = dataset._cache[0]["image"].clone()
    epoch1 = [p[mpp.LOCATION].tolist() for p in dataset[0]]
    epoch2 = [p[mpp.LOCATION].tolist() for p in dataset[0]]
    assert epoch1 != epoch2
    assert torch.equal(dataset._cache[0]["image"], cached)
    for patch in dataset[0]:
        assert torch.equal(patch["image"].as_tensor(), cached.as_tensor()[box_slices(patch[mpp.LOCATION])])


def test_invertd_puts_a_patch_prediction_back(nifti_files):
    pipeline = Compose([*loading(), mpp.UniformSampler((8, 6, 5), keys=["image", "label"], num_samples=2)])
    full = Compose(loading())(nifti_files[1])["image"]
    invert = Invertd(keys="pred", transform=pipeline, orig_keys="image", nearest_interp=False)
    for patch in pipeline.set_random_state(0)(nifti_files[1]):
        patch["pred"] = MetaTensor(torch.stack([patch["image"][0] * 2, -patch["image"][0]]))
        restored = invert(patch)["pred"]
        assert restored.shape == (2, *SHAPE)
        box = box_slices(patch[mpp.LOCATION])
        expected = torch.zeros(2, *SHAPE)
        expected[0][box[1:]] = full[0][box[1:]] * 2
        expected[1][box[1:]] = -full[0][box[1:]]
        assert torch.allclose(restored.as_tensor(), expected)
        assert torch.allclose(restored.affine, full.affine)


def test_bundle_config_with_json_label_probabilities(nifti_files):
    text = json.dumps({
        "sampler": {
            "_target_": "monai_patchplug.LabelSampler",
            "patch_size": [8, 8, 8],
            "label_name": "label",
            "label_probabilities": {0: 0, 2: 1},
            "keys": ["image", "label"],
            "num_samples": 3,
        }
    })
    parser = ConfigParser(json.loads(text))
    sampler = parser.get_parsed_content("sampler")
    assert isinstance(sampler, mpp.LabelSampler) and sampler.label_probabilities == {0: 0.0, 2: 1.0}
    patches = sampler(Compose(loading())(nifti_files[0]))
    assert [int(p["label"][0, 4, 4, 4]) for p in patches] == [2, 2, 2]


def test_untracked_meta_gives_plain_tensors(subject):
    set_track_meta(False)
    try:
        patch = mpp.WeightedSampler(6, "prob")(subject)
    finally:
        set_track_meta(True)
    assert type(patch["image"]) is torch.Tensor
    assert torch.equal(patch["image"], subject["image"].as_tensor()[box_slices(patch[mpp.LOCATION])])


@pytest.mark.parametrize("sampler_cls", [mpp.UniformSampler, mpp.LabelSampler])
def test_lazy_pipeline_matches_eager(nifti_files, sampler_cls):
    def run(lazy):
        extra = {"label_name": "label", "label_probabilities": {1: 1}} if sampler_cls is mpp.LabelSampler else {}
        sampler = sampler_cls(10, keys=["image", "label"], num_samples=2, **extra)
        pad = SpatialPadd(keys=["image", "label"], spatial_size=(24, 24, 24))
        return Compose([*loading(), pad, sampler], lazy=lazy).set_random_state(3)(nifti_files[2])

    for eager, lazy in zip(run(False), run(True)):
        assert torch.equal(eager[mpp.LOCATION], lazy[mpp.LOCATION])
        assert torch.allclose(eager["image"].as_tensor(), lazy["image"].as_tensor())
        assert torch.allclose(eager["image"].affine, lazy["image"].affine)
