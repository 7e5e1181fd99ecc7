# %% [markdown]
# # Migrating from TorchIO and from MONAI
#
# ## From TorchIO, line by line
#
# | TorchIO | monai_patchplug |
# |---|---|
# | `subject = tio.Subject(t1=tio.ScalarImage("t1.nii.gz"), seg=tio.LabelMap("seg.nii.gz"))` | `subject = Compose([LoadImaged(["t1", "seg"], image_only=True), EnsureChannelFirstd(["t1", "seg"])])({"t1": "t1.nii.gz", "seg": "seg.nii.gz"})` |
# | `tio.UniformSampler(64)` | `mpp.UniformSampler(64)` |
# | `tio.WeightedSampler(64, "prob")` | `mpp.WeightedSampler(64, "prob")` |
# | `tio.LabelSampler(64, "seg", {0: 1, 1: 3})` | `mpp.LabelSampler(64, "seg", {0: 1, 1: 3})` |
# | `patch = next(sampler(subject))` (a generator) | `patch = sampler(subject)` (one dict); `num_samples=N` for a list |
# | `patch["t1"][tio.DATA]` | `patch["t1"]` (a `MetaTensor`, affine moved to the patch) |
# | `patch[tio.LOCATION]` | `patch[mpp.LOCATION]` (same `[i0, j0, k0, i1, j1, k1]`) |
# | `tio.Queue(subjects, max_length, samples_per_volume, sampler, num_workers=4)` + `SubjectsLoader(queue, num_workers=0)` | `mpp.PatchQueue(data, max_length, samples_per_volume, sampler, transform=...)` + `DataLoader(queue, num_workers=4)` |
# | `tio.GridSampler(subject, 64, 16)` | `mpp.GridSampler(64, 16)(subject)` (the sampler is made before the subject) |
# | `tio.GridAggregator(grid_sampler, overlap_mode="hann")` | `mpp.GridAggregator(grid_sampler, overlap_mode="hann")` |
# | `aggregator.add_batch(pred, locations)`; `aggregator.get_output_tensor()` | the same |
#
# The sampling statistics are TorchIO's (same centre/corner convention, same label and weight semantics), so a
# migrated training keeps its patch distribution. What changes: subjects are MONAI data dicts, samplers are MONAI
# transforms (seeded by `set_random_state`, composable, cacheable), and the queue samples in the DataLoader's
# workers instead of its own.
#
# ## From MONAI
#
# | MONAI | monai_patchplug | semantic difference |
# |---|---|---|
# | `RandSpatialCropSamplesd(keys, roi_size, num_samples)` | `UniformSampler(keys=..., roi_size=..., num_samples=...)` | none (`random_size=True` is rejected) |
# | `RandWeightedCropd(keys, w_key, spatial_size, num_samples)` | `WeightedSampler(w_key=..., spatial_size=..., ...)` | MONAI clamps centres near the border into the image; we ignore map mass where no patch can be centred |
# | `RandCropByPosNegLabeld(keys, label_key, spatial_size, pos, neg, ...)` | `LabelSampler(label_key=..., pos=..., neg=..., ...)` | centres are not clamped |
# | `RandCropByLabelClassesd(keys, label_key, spatial_size, ratios, num_classes, ...)` | `LabelSampler(label_key=..., ratios=..., num_classes=..., ...)` | centres are not clamped; absent classes skipped silently |
# | `SlidingWindowInferer(roi_size, sw_batch_size, overlap, mode)` | `GridInferer(roi_size=..., sw_batch_size=..., overlap=..., mode=...)` | none: the same grid and weights; `with_coord=True` is rejected |
#
# Every MONAI argument name is accepted, so a bundle changes only `_target_`. The cells below check it.

# %%
import numpy as np
import torch
from monai.bundle import ConfigParser
from tutorial_data import load_subject, patch_size

subject = load_subject()
P = list(patch_size())

# %% [markdown]
# ### A MONAI cropper config with only `_target_` changed
#
# Memory: MONAI's multi-sample croppers give every sample a deep copy of each entry they do not crop, while ours
# share it. The subject also holds the grey-matter map `gm`, a full-size float volume (33 MiB at full size): left
# in, MONAI's `RandCropByLabelClassesd` would copy it into each of its 400 samples, about 13 GiB in all, more than
# a 16 GB laptop has to spare. So only the cropped keys go in here; in your own pipelines, drop (or crop) what the
# patches do not need before a MONAI cropper.

# %%
cropped = {key: subject[key] for key in ("image", "label")}
config = {
    "_target_": "RandCropByLabelClassesd",
    "keys": ["image", "label"],
    "label_key": "label",
    "spatial_size": P,
    "ratios": [0.1, 0.2, 0.4, 0.3],
    "num_classes": 4,
    "num_samples": 400,
}
theirs = ConfigParser({"c": config}).get_parsed_content("c").set_random_state(0)
ours = ConfigParser({"c": {**config, "_target_": "monai_patchplug.LabelSampler"}}).get_parsed_content("c")
ours.set_random_state(0)
half = np.asarray(P) // 2
for name, sampler in (("MONAI", theirs), ("ours", ours)):
    patches = sampler(cropped)
    labels = [int(p["label"][(0, *half)]) for p in patches]
    print(f"{name:>5}: centre-label frequencies {np.round(np.bincount(labels, minlength=4) / len(labels), 3)}")
print("requested:", np.round(np.asarray(config["ratios"]) / sum(config["ratios"]), 3))

# %% [markdown]
# ### A SlidingWindowInferer config with only `_target_` changed

# %%
inferer_config = {"_target_": "SlidingWindowInferer", "roi_size": P, "sw_batch_size": 4, "overlap": 0.25,
                  "mode": "gaussian"}
theirs = ConfigParser({"i": inferer_config}).get_parsed_content("i")
ours = ConfigParser({"i": {**inferer_config, "_target_": "monai_patchplug.GridInferer"}}).get_parsed_content("i")
conv = torch.nn.Conv3d(1, 2, 3, padding=1)
with torch.no_grad():
    difference = (ours(subject["image"][None], conv) - theirs(subject["image"][None], conv)).abs().max()
print(f"max |GridInferer - SlidingWindowInferer| = {float(difference):.1e}")
