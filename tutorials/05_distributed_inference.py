# %% [markdown]
# # Sharded grid inference of one volume over `torch.distributed`
#
# One large volume, several processes: with a process group initialised and `distributed=True`, rank `r` of `w`
# computes part `(r, w)` of the output: a contiguous, balanced range of rows of the first spatial axis, from the
# patches that reach it (a patch on the boundary between two parts runs on both ranks). No rank ever holds the whole
# accumulator: with `output=` every rank writes its own rows into the shared store; without it, the rows are gathered
# so that every rank gets the output a single process would compute (with `dst=r`, only rank `r` does; the others get
# `None`).
#
# Run it on the CPU with two processes (gloo):
#
#     torchrun --nproc_per_node=2 tutorials/05_distributed_inference.py
#
# or on its own (`python tutorials/05_distributed_inference.py`), which makes a process group of one. On GPUs, use
# the `nccl` backend and put each rank's network and inputs on `cuda:<local rank>`. Always give the process group a
# `timeout`: a rank that never arrives (or sees another volume) then ends in an error instead of a hang.
#
# This file is a percent-format script (open it as a notebook with jupytext). It draws no figures.

# %%
import datetime
import os

import torch
import torch.distributed as dist

import monai_patchplug as mpp

if "RANK" not in os.environ:  # started without torchrun: a group of one process
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
rank, world = dist.get_rank(), dist.get_world_size()
print(f"rank {rank} of {world}")

# %% [markdown]
# ## The same volume and network on every rank
# Each rank must see the same input shape (checked before any network call: a `ValueError` on every rank
# otherwise). A small 3D conv net stands in for a segmentation model.

# %%
torch.manual_seed(0)
image = torch.randn(1, 1, 64, 56, 48)
net = torch.nn.Sequential(
    torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, 3, 3, padding=1)
).eval()


class Counting(torch.nn.Module):
    """Counts the patches this rank runs."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.patches = inner, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.patches += len(x)
        return self.inner(x)


# %% [markdown]
# ## Sharded, then single-process, inference

# %%
counting = Counting(net)
sharded_inferer = mpp.GridInferer(patch_size=24, patch_overlap=8, overlap_mode="hann", batch_size=4, distributed=True)
with torch.no_grad():
    sharded = sharded_inferer(image, counting)
    single = mpp.GridInferer(patch_size=24, patch_overlap=8, overlap_mode="hann", batch_size=4)(image, net)
total = sharded_inferer.geometry(image.shape[2:]).num_patches
print(f"rank {rank}: ran {counting.patches} of {total} patches (those whose output reaches its part's rows)")
difference = float((sharded - single).abs().max())
print(f"rank {rank}: sharded output {tuple(sharded.shape)}, max |sharded - single process| = {difference:.2e}")
assert difference < 1e-5, difference

# %% [markdown]
# ## Only one rank needs the result: `dst`
# `dst=0` gathers the rows onto rank 0 only (`torch.distributed.gather`); the others return `None` and can go on to
# the next volume. Combine it with `roi_mask` to skip the patches outside the body as well.

# %%
mask = torch.zeros(64, 56, 48, dtype=torch.uint8)
mask[8:56, 10:40, 6:42] = 1
with torch.no_grad():
    on_zero = mpp.GridInferer(24, 8, "hann", batch_size=4, roi_mask=mask, distributed=True, dst=0)(image, net)
    reference = mpp.GridInferer(24, 8, "hann", batch_size=4, roi_mask=mask)(image, net)
if rank == 0:
    difference = float((on_zero - reference).abs().max())
    print(f"rank 0: max |dst output - single process| = {difference:.2e} (summation order: float rounding)")
    assert difference < 1e-5, difference
else:
    print(f"rank {rank}: got {on_zero}")

dist.destroy_process_group()
