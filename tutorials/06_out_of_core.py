# %% [markdown]
# # A volume larger than memory: lazy input, a zarr output, four parts on Dask, and a resumed part
#
# `GridInferer` reads an array-like input (`zarr.Array`, `numpy.memmap`, `h5py.Dataset`, a dask array) one row of
# patches at a time and streams the output slab by slab into a store, so its memory stays near one row of input
# and output patches, whatever the volume. The same job splits into parts (`part=(k, n)`): each part runs the
# patches that reach its rows of the output's first axis and writes only those rows, with no communication, so any
# engine can run them; `resume=` records finished slabs so a killed part redoes only what it had left.
#
# Needs the optional extras: `pip install -e ".[outofcore]"` (zarr, dask.distributed). By default the volume is
# 1x1x1024^3 float32 (4 GiB, written to a temporary folder first); `MPP_TUTORIAL_FAST=1` (the test suite) uses 64^3,
# and `MPP_TUTORIAL_SIZE=512` any other size. This file is a percent-format script (open it as a notebook with
# jupytext). It draws no figures.

# %%
import os
import resource
import shutil
import tempfile
import time

import dask
import numpy as np
import torch
import zarr
from dask.distributed import Client, LocalCluster
from tutorial_data import FAST

import monai_patchplug as mpp

SIZE = 64 if FAST else int(os.environ.get("MPP_TUTORIAL_SIZE", "1024"))
PATCH, OVERLAP, PARTS = (16, 4, 4) if FAST else (64, 16, 4)
ROWS = SIZE // (2 * PARTS)  # zarr chunk rows: part boundaries fall on chunk boundaries (parts never share a chunk)
workdir = tempfile.mkdtemp(prefix="mpp-out-of-core-")
torch.set_num_threads(1 if FAST else torch.get_num_threads())


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# %% [markdown]
# ## The input: a zarr store written slab by slab
# A smooth pattern of the coordinates stands in for a CT; it is never in memory as a whole.

# %%
image = zarr.open(f"{workdir}/ct.zarr", mode="w", shape=(1, 1, SIZE, SIZE, SIZE), chunks=(1, 1, ROWS, SIZE, SIZE),
                  dtype="f4")  # fmt: skip
axis = np.linspace(0, 4 * np.pi, SIZE, dtype=np.float32)
for start in range(0, SIZE, ROWS):
    rows = axis[start : start + ROWS, None, None]
    image[0, 0, start : start + ROWS] = np.sin(rows) * np.cos(axis[None, :, None]) + np.sin(2 * axis[None, None, :])
input_gib = SIZE**3 * 4 / 2**30
print(f"input (1, 1, {SIZE}, {SIZE}, {SIZE}) float32: {input_gib:.3f} GiB on disk as zarr")

# %% [markdown]
# ## The network and what is kept
# A two-class network and an argmax: the store holds uint8 labels, the float scores exist one slab at a time.

# %%
torch.manual_seed(0)
network = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 2, 1)).eval()


def argmax(scores: torch.Tensor) -> torch.Tensor:
    return scores.argmax(0, keepdim=True).to(torch.uint8)


def new_labels(name: str) -> zarr.Array:
    return zarr.open(f"{workdir}/{name}.zarr", mode="w", shape=(1, 1, SIZE, SIZE, SIZE),
                     chunks=(1, 1, ROWS, SIZE, SIZE), dtype="u1")  # fmt: skip


def inferer(**kwargs) -> mpp.GridInferer:
    return mpp.GridInferer(PATCH, OVERLAP, "hann", batch_size=4, postprocess=argmax, **kwargs)


# %% [markdown]
# ## One process
# The peak memory of the process stays a small fraction of the input: the rows of patches being read, the slabs
# of scores being blended and one batch.

# %%
one = new_labels("one")
before, start = peak_rss_mib(), time.perf_counter()
with torch.no_grad():
    inferer(output=one)(image, network)
print(f"one process: {time.perf_counter() - start:.1f} s, peak RSS {peak_rss_mib():.0f} MiB "
      f"(was {before:.0f} MiB before; the input is {input_gib * 1024:.0f} MiB)")  # fmt: skip
print(f"label fractions: {np.bincount(one[0, 0, ::4, ::4, ::4].ravel(), minlength=2) / (SIZE // 4) ** 3}")


# %% [markdown]
# ## Four parts on a Dask cluster, into one store
# Each task opens the stores itself and runs one part; they run in any order or at once.


# %%
def run_part(k: int, store: str, resume: str) -> int:
    """One part, as a Dask task (or a SLURM array job, or a torchrun rank) would run it."""
    torch.set_num_threads(1)
    source = zarr.open(f"{workdir}/ct.zarr", mode="r")
    labels = zarr.open(store, mode="r+")
    with torch.no_grad():
        inferer(output=labels, part=(k, PARTS), resume=resume)(source, network)
    return k


parts = new_labels("parts")
# forked workers: a script (not an importable module) cannot be re-imported by spawned ones
dask.config.set({"distributed.worker.multiprocessing-method": "fork"})
with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
    with Client(cluster) as client:
        done = client.gather(client.map(run_part, range(PARTS), store=f"{workdir}/parts.zarr",
                                        resume=f"{workdir}/parts.done"))  # fmt: skip
equal = all(np.array_equal(one[0, 0, i : i + ROWS], parts[0, 0, i : i + ROWS]) for i in range(0, SIZE, ROWS))
print(f"{PARTS} parts on Dask ({sorted(done)}): equal to the single run: {equal}")
assert equal

# %% [markdown]
# ## A job killed two thirds in, then resumed
# A network that fails after a number of batches stands in for a killed job. The rerun, with the same `resume`
# folder, runs only the patches of the slabs that were not finished (a slab is finished, and marked, once every
# patch reaching it was blended; the rows of patches at the edge of what was done run again).


# %%
class Dies(torch.nn.Module):
    """The network, failing after ``limit`` calls; counts its calls."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.calls = limit, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > self.limit:
            raise RuntimeError("killed")
        return network(x)


full = Dies(limit=10**9)
with torch.no_grad():
    inferer(output=new_labels("full"))(image, full)
killed = new_labels("killed")
first = Dies(limit=full.calls * 2 // 3)
try:
    with torch.no_grad():
        inferer(output=killed, resume=f"{workdir}/killed.done")(image, first)
except RuntimeError as error:
    print(f"the job stopped after {first.calls - 1} of its {full.calls} network calls: {error}")
again = Dies(limit=10**9)
with torch.no_grad():
    inferer(output=killed, resume=f"{workdir}/killed.done")(image, again)
resumed_equal = all(np.array_equal(one[0, 0, i : i + ROWS], killed[0, 0, i : i + ROWS]) for i in range(0, SIZE, ROWS))
print(f"resumed: {again.calls} network calls instead of {full.calls}; equal to the single run: {resumed_equal}")
assert resumed_equal and again.calls < full.calls

shutil.rmtree(workdir)
