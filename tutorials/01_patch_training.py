# %% [markdown]
# # Patch-based training with monai_patchplug
#
# Train a small 3D UNet on patches of a real brain MRI: the MNI152 2009 T1 template and its grey/white-matter
# probability maps, which ship inside the `nilearn` wheel (`pip install --no-deps nilearn`). A 4-class tissue
# label map is made by thresholding the maps. We compare the three random samplers, check that `LabelSampler`
# delivers the requested label frequencies, feed patches through a MONAI `DataLoader` and a `PatchQueue`, and
# train for a few iterations on the queue's batches.
#
# This file is a percent-format script: run it with `python tutorials/01_patch_training.py`, or open it as a
# notebook with jupytext. The test suite runs it with `MPP_TUTORIAL_FAST=1` (4x smaller volume).

# %%
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from monai.data import DataLoader, Dataset, list_data_collate
from monai.losses import DiceCELoss
from monai.transforms import Compose, RandFlipd
from tutorial_data import CHECKPOINT, FAST, TISSUES, load_subject, patch_size, save_figure, seeded, small_unet

import monai_patchplug as mpp

seeded(0)
subject = load_subject()
P = patch_size()
print({key: tuple(value.shape) for key, value in subject.items()}, "patch size", P)

# %% [markdown]
# ## Three samplers, one call each
# Every sampler is a MONAI dictionary transform. `num_samples=N` returns a list of N patch dicts, each with the
# cropped arrays and `LOCATION` = `[i0, j0, k0, i1, j1, k1]`.

# %%
n = 60 if FAST else 400
samplers = {
    "UniformSampler": mpp.UniformSampler(P, num_samples=n),
    "WeightedSampler (GM map)": mpp.WeightedSampler(P, "gm", num_samples=n),
    "LabelSampler": mpp.LabelSampler(P, "label", {0: 0.1, 1: 0.2, 2: 0.4, 3: 0.3}, num_samples=n),
}
centres = {}
for name, sampler in samplers.items():
    patches = sampler.set_random_state(0)(subject)
    centres[name] = np.stack([p[mpp.LOCATION][:3].numpy() + np.asarray(P) // 2 for p in patches])
    print(f"{name:<26} first location {patches[0][mpp.LOCATION].tolist()}")

# %%
label = subject["label"][0].numpy()
mid = label.shape[2] // 2
fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
for ax, (name, c) in zip(axes, centres.items()):
    ax.imshow(label[:, :, mid].T, origin="lower", cmap="gray", vmin=0, vmax=3)
    ax.scatter(c[:, 0], c[:, 1], s=6, c="tab:orange", alpha=0.7)
    ax.set_title(f"{name}\n{len(c)} patch centres (all slices)")
    ax.axis("off")
save_figure(fig, "01_sampled_centres.png")

# %% [markdown]
# ## Requested vs obtained centre labels
# `LabelSampler` draws the centre's label with probability p_L / sum(p) over the labels present, then a voxel of
# that label uniformly. The bar chart compares the request with what a large draw obtained.

# %%
requested = {0: 0.1, 1: 0.2, 2: 0.4, 3: 0.3}
many = mpp.LabelSampler(P, "label", requested, num_samples=400 if FAST else 4000).set_random_state(1)(subject)
obtained = np.bincount([int(label[tuple(p[mpp.LOCATION][:3].numpy() + np.asarray(P) // 2)]) for p in many],
                       minlength=4) / len(many)
fig, ax = plt.subplots(figsize=(6.5, 3.6))
x = np.arange(4)
ax.bar(x - 0.2, [requested[k] / sum(requested.values()) for k in range(4)], 0.4, label="requested")
ax.bar(x + 0.2, obtained, 0.4, label="obtained")
ax.set_xticks(x, [TISSUES[k] for k in range(4)], rotation=15)
ax.set_ylabel("fraction of patch centres")
ax.legend()
save_figure(fig, "01_label_frequencies.png")
print("obtained:", np.round(obtained, 3))

# %% [markdown]
# ## In a MONAI pipeline
# The sampler sits at the end of a `Compose` like any cropper; `list_data_collate` flattens the per-volume lists
# into one batch, and the DataLoader workers draw the patches.

# %%
train_transform = Compose([
    mpp.LabelSampler(P, "label", requested, keys=["image", "label"], num_samples=4),
    RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
])
dataset = Dataset([subject] * 4, transform=train_transform)
loader = DataLoader(dataset, batch_size=2, num_workers=0 if FAST else 2, collate_fn=list_data_collate)
batch = next(iter(loader))
print("batch image", tuple(batch["image"].shape), "locations", tuple(batch[mpp.LOCATION].shape))

# %% [markdown]
# ## PatchQueue: batches that mix volumes
# With many volumes, a `PatchQueue` loads, transforms and samples in the DataLoader's workers and shuffles the
# patches of several volumes in a bounded buffer, so each batch mixes subjects. Here four "volumes" (the template
# and its left-right mirror, twice) give 8 patches each per epoch.

# %%
volumes = [subject, {k: v.flip(1) for k, v in subject.items()}] * 2
queue = mpp.PatchQueue(
    volumes,
    max_length=16,
    samples_per_volume=8,
    sampler=mpp.LabelSampler(P, "label", requested, keys=["image", "label"]),
    shuffle=True,
    seed=0,
)
queue_loader = DataLoader(queue, batch_size=4, num_workers=0 if FAST else 2)
queue.set_epoch(0)
print(f"{len(queue)} patches per epoch;", sum(len(b["image"]) for b in queue_loader), "delivered")

# %% [markdown]
# ## Training a small UNet
# A few iterations of Dice + cross-entropy on the queue's label-sampled patches: enough to see the loss fall.
# The weights are saved for the inference tutorial.

# %%
model = small_unet()
loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
iterations = 3 if FAST else 60
losses = []
step = 0
while step < iterations:
    queue.set_epoch(step)
    for batch in queue_loader:
        optimizer.zero_grad()
        loss = loss_fn(model(batch["image"].as_tensor()), batch["label"].long().as_tensor())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        step += 1
        if step == iterations:
            break
print(f"loss: first {losses[0]:.3f}, last {losses[-1]:.3f}")
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(losses)
ax.set_xlabel("iteration")
ax.set_ylabel("Dice + CE loss")
save_figure(fig, "01_training_loss.png")
CHECKPOINT.parent.mkdir(exist_ok=True)
torch.save(model.state_dict(), CHECKPOINT)
print("saved", CHECKPOINT.name)
