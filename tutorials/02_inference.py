# %% [markdown]
# # Inference with GridInferer
#
# `GridInferer` is a MONAI `Inferer`: it goes wherever `SlidingWindowInferer` goes (an evaluator, a bundle
# config, a plain function call). Here it segments the MNI152 template with the UNet trained in tutorial 01
# (an untrained one if that tutorial has not been run), compares the three overlap modes, checks that MONAI's
# arguments give MONAI's output, and measures time and memory against `SlidingWindowInferer`.

# %%
import matplotlib

matplotlib.use("Agg")
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from tutorial_data import FAST, load_subject, load_trained_unet, patch_size, save_figure

import monai_patchplug as mpp

subject = load_subject()
image = subject["image"][None]  # (1, 1, H, W, D): a batch of one
model, trained = load_trained_unet()
P = patch_size()
overlap = P[0] // 4
print("input", tuple(image.shape), "| trained UNet:", trained, "| patch", P, "overlap", overlap)


def network(patches: torch.Tensor) -> torch.Tensor:
    """Class probabilities of the UNet."""
    return torch.softmax(model(patches), dim=1)


# %% [markdown]
# ## The three overlap modes
# `crop` keeps, for every voxel, the patch whose centre is nearest: exact for pointwise networks, but a CNN's
# borders differ between neighbouring patches, so seams appear on the patch boundaries. `average` blends the
# overlaps with equal weights, `hann` with a separable Hann window that fades out at the patch edges: the seams
# disappear. None of them keeps a weight or count map: the normaliser is separable.

# %%
outputs = {}
with torch.no_grad():
    for mode in ("crop", "average", "hann"):
        inferer = mpp.GridInferer(P, overlap, overlap_mode=mode, batch_size=4)
        outputs[mode] = inferer(image, network)[0]
mid = image.shape[-1] // 2
fig, axes = plt.subplots(2, 3, figsize=(12, 7.5))
for col, mode in enumerate(outputs):
    axes[0, col].imshow(outputs[mode][2, :, :, mid].T, origin="lower", cmap="magma", vmin=0, vmax=1)
    axes[0, col].set_title(f"{mode}: P(grey matter)")
    seams = (outputs[mode] - outputs["hann"]).abs().amax(0)[:, :, mid] if mode != "hann" else None
    if seams is None:
        gradient = np.abs(np.diff(outputs[mode][2, :, :, mid].numpy(), axis=0))
        axes[1, col].imshow(gradient.T, origin="lower", cmap="gray")
        axes[1, col].set_title("hann: |d/dx|, no seams")
    else:
        axes[1, col].imshow(seams.T, origin="lower", cmap="viridis")
        axes[1, col].set_title(f"|{mode} - hann|: seams")
for ax in axes.ravel():
    ax.axis("off")
save_figure(fig, "02_overlap_modes.png")

# %% [markdown]
# ## A drop-in for SlidingWindowInferer
# Given MONAI's arguments, `GridInferer` lays MONAI's grid and blends with MONAI's importance map, so swapping
# the class (or only `_target_` in a config) keeps the numbers.

# %%
monai_args = {"roi_size": list(P), "sw_batch_size": 4, "overlap": 0.5, "mode": "gaussian"}
with torch.no_grad():
    theirs = SlidingWindowInferer(**monai_args)(image, network)
    ours = mpp.GridInferer(**monai_args)(image, network)
print(f"max |GridInferer - SlidingWindowInferer| = {float((ours - theirs).abs().max()):.2e}")


# %% [markdown]
# ## Time and memory against MONAI
# Peak memory is read from the kernel (`VmHWM`, reset before each run) and reported above the output volume's own
# size; the time is the median of a few runs (one run at full size, where a UNet pass takes a while on a CPU).

# %%
def peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def measure(inferer, repeats: int = 3 if FAST else 1) -> tuple[float, float]:
    """(median seconds, peak MiB above the output) of ``inferer(image, network)``."""
    times, extra = [], []
    for _ in range(repeats):
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset the peak to the current resident size
        start_peak = peak_rss_mib()
        begin = time.perf_counter()
        with torch.no_grad():
            out = inferer(image, network)
        times.append(time.perf_counter() - begin)
        extra.append(max(peak_rss_mib() - start_peak - out.numel() * out.element_size() / 2**20, 0.0))
        del out
    return float(np.median(times)), float(np.median(extra))


runs = {
    "GridInferer hann": mpp.GridInferer(P, P[0] // 2, "hann", batch_size=4),
    "GridInferer average": mpp.GridInferer(P, P[0] // 2, "average", batch_size=4),
    "SlidingWindowInferer gaussian": SlidingWindowInferer(P, 4, 0.5, mode="gaussian"),
    "SlidingWindowInferer constant": SlidingWindowInferer(P, 4, 0.5, mode="constant"),
}
table = {name: measure(inferer) for name, inferer in runs.items()}
print("| inferer | time (s) | peak above output (MiB) |\n|---|---|---|")
for name, (seconds, mib) in table.items():
    print(f"| {name} | {seconds:.3f} | {mib:.1f} |")
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
names = [n.replace("Inferer ", "Inferer\n") for n in table]
axes[0].bar(names, [t for t, _ in table.values()], color=["tab:blue", "tab:blue", "tab:gray", "tab:gray"])
axes[0].set_ylabel("seconds")
axes[1].bar(names, [m for _, m in table.values()], color=["tab:blue", "tab:blue", "tab:gray", "tab:gray"])
axes[1].set_ylabel("peak MiB above the output")
for ax in axes:
    ax.tick_params(axis="x", labelsize=7)
save_figure(fig, "02_time_memory.png")

# %% [markdown]
# ## Segmentation quality
# Dice of the `hann` prediction per tissue class against the thresholded label map (meaningful only after
# tutorial 01 trained the network; a few iterations give a rough segmentation).

# %%
prediction = outputs["hann"].argmax(0)
label = subject["label"][0].as_tensor().long()
dice = {c: float(2 * ((prediction == c) & (label == c)).sum() / ((prediction == c).sum() + (label == c).sum()))
        for c in range(4)}
print("Dice per class:", {c: round(d, 3) for c, d in dice.items()}, "(fast mode)" if FAST else "")
