"""Benchmark volumes larger than memory (issue 15): lazy inputs, streamed outputs, parts.

A ``1x1x1024x1024x512`` float32 input (2 GiB) on disk, as a ``numpy.memmap`` and as a zarr store; 64^3 patches,
overlap 16, hann, batch 4; a 1-channel identity network (``--net conv`` for a small conv net); the output streamed
to a zarr store. Every row runs in a fresh subprocess, which prints its wall time, its peak resident memory above
what it held just before the run (``VmHWM`` after a reset, glibc mapping every large buffer on its own) and the
bytes it read from the input (a zarr input is wrapped in a counting array-like; a memmap is passed as it is, and the
inferer serves its rows from a mapping of the file, counting each row it serves once: its ``bytes_read``). Rows:

- GridInferer, memmap input with the output in memory (the cost of reading lazily), memmap and zarr inputs with
  the output to zarr (lazy in, lazy out: the output store's compression included);
- the same volume in memory (loaded before the timer) through GridInferer and MONAI's SlidingWindowInferer
  (``overlap=0.25`` lays the same grid; gaussian), output in memory;
- parts: the job as 1, 2 and 4 parts, each part its own process with one torch thread and one zarr thread (one
  core), run at the same time (``--cores`` at once), printing the wall time of the whole job, each part's peak and
  the rows run twice;
- sharded (``--rows sharded``; by default on ``1x1x512x512x256``, 256 MiB, unless ``--shape`` is given): 2 ranks,
  each a process with one torch thread in a gloo group, the input in memory on each rank (loaded before the
  baseline, so not counted), the identity (or ``--net``) network, hann. Per rank, the peak of the inference above
  the resident size just before it, for today's design (:class:`GridAggregator` with ``distributed=True``: every
  rank blends its contiguous share of the patches into a full-size accumulator, summed by ``all_reduce``, or
  ``reduce`` onto rank 0) and for ``GridInferer(distributed=True)``, where rank r blends only its part of the rows:
  gathered to every rank, gathered to rank 0 (``dst=0``), or written by each rank into one zarr store
  (``output=``). Also printed: each row's ratio to today's, and the largest absolute difference from a
  single-process ``GridInferer`` run.

Also printed: the floor of a row-streaming design (one input row slab: patch rows x the other axes x C_in; one
output row slab: x C_out; one batch) that the peak is compared with, and, for the zarr input, that floor plus the
codec's least working set (one decoded chunk and its compressed bytes).

Run from the repository root (needs ``pip install -e ".[outofcore]"``)::

    python benchmarks/out_of_core.py                  # 1024x1024x512 (sharded: 512x512x256), identity network
    python benchmarks/out_of_core.py --net conv
    python benchmarks/out_of_core.py --quick          # 128x96x64 (smoke test)
    python benchmarks/out_of_core.py --rows memmap zarr memory    # only these rows (``parts``: the parts table)
    python benchmarks/out_of_core.py --rows memmap-memory memory --repeats 5  # the lazy / in-memory wall ratio
    python benchmarks/out_of_core.py --shape 256 1024 512 --warm-up  # fewer rows; runtime warmed up first
    python benchmarks/out_of_core.py --rows sharded --warm-up        # 2 gloo ranks, 1x1x512x512x256
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import zarr
from inference import _release_and_reset_peak, _status_kib

import monai_patchplug as mpp
from monai_patchplug.inference.distributed import share

PATCH, OVERLAP, BATCH = 64, 16, 4
RUNS = {
    "memmap-memory": "GridInferer, memmap in, output in memory",
    "memmap": "GridInferer, memmap in, zarr out",
    "zarr": "GridInferer, zarr in, zarr out",
    "memory": "GridInferer, in memory",
    "monai": "SlidingWindowInferer, in memory",
}
SHARDED = {
    "allreduce": "today: GridAggregator(distributed=True), all_reduce to every rank",
    "reduce": "today: GridAggregator(distributed=True, dst=0), reduce to rank 0",
    "gather": "GridInferer(distributed=True), rows gathered to every rank",
    "gather-dst": "GridInferer(distributed=True, dst=0), rows gathered to rank 0",
    "output": "GridInferer(distributed=True, output=zarr), each rank writes its rows",
}
WORLD = 2


class Counting:
    """An array-like that counts the bytes read through it, presenting the array's chunks (a zarr store's) as its
    own, so that it is read in chunk-aligned pieces as the store itself would be."""

    def __init__(self, array) -> None:
        self.array, self.shape, self.dtype, self.bytes = array, array.shape, array.dtype, 0
        self.chunks = getattr(array, "chunks", None)

    def __getitem__(self, index):
        block = np.asarray(self.array[index])
        self.bytes += block.nbytes
        return block


def record_sources() -> list:
    """A list that collects every lazy input source the inferer opens from now on in this process (each counts the
    bytes it reads or serves, ``bytes_read``)."""
    from monai_patchplug.inference import inputs

    opened: list = []
    init = inputs.LazySource.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        opened.append(self)

    inputs.LazySource.__init__ = recording_init
    return opened


def network(name: str):
    if name == "identity":
        return lambda x: x
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, 1, 1)).eval()


def make_input(folder: str, shape: tuple[int, ...], store_too: bool = True) -> None:
    """Write the input once as a memmap (``x.npy``) and (``store_too``) a zarr store (``x.zarr``), slab by slab."""
    mm = np.lib.format.open_memmap(f"{folder}/x.npy", mode="w+", dtype=np.float32, shape=(1, 1, *shape))
    store = None
    if store_too:
        store = zarr.open(f"{folder}/x.zarr", mode="w", shape=(1, 1, *shape), chunks=(1, 1, PATCH, 256, 256),
                          dtype="f4")  # fmt: skip
    rng = np.random.default_rng(0)
    for start in range(0, shape[0], PATCH):
        slab = rng.random((1, 1, min(PATCH, shape[0] - start), *shape[1:]), dtype=np.float32)
        mm[:, :, start : start + slab.shape[2]] = slab
        if store is not None:
            store[:, :, start : start + slab.shape[2]] = slab
    mm.flush()


def output_store(folder: str, name: str, shape: tuple[int, ...]) -> zarr.Array:
    """A zarr output whose chunks hold 16 rows: the slabs written (cut where rows of patches begin and end, every
    16 rows here) then fill whole chunks, and no chunk is read back to be rewritten."""
    return zarr.open(f"{folder}/{name}.zarr", mode="w", shape=(1, 1, *shape), chunks=(1, 1, 16, 256, 256),
                     dtype="f4")  # fmt: skip


def _reset() -> int:
    """Hand freed memory back, reset the peak resident size; the resident size now, in KiB."""
    _release_and_reset_peak()
    return _status_kib("VmRSS")


def warm_up(model) -> None:
    """Small runs through the same code paths (lazy in, zarr and array out; in memory), so that the runtime's one-time
    costs (torch's and zarr's thread pools, first-use allocations), which do not grow with the volume, are paid before
    the baseline."""
    small = np.ones((80, 80, 80), np.float32)
    store = zarr.zeros((1, 1, 80, 80, 80), chunks=(1, 1, 16, 40, 40), dtype="f4")
    store[:] = 1.0
    inferer = mpp.GridInferer(PATCH, OVERLAP, "hann", batch_size=BATCH, output=np.zeros((1, 1, 80, 80, 80), "f4"))
    inferer(Counting(store), model)
    mpp.GridInferer(PATCH, OVERLAP, "hann", batch_size=BATCH, output=store)(mpp.lazy_batch(small), model)
    mpp.GridInferer(PATCH, OVERLAP, "hann", batch_size=BATCH)(torch.from_numpy(small)[None, None], model)


def child(which: str, folder: str, net: str, part: str, warm: str = "cold") -> dict:
    """One row, in this (fresh) process (``warm``: after :func:`warm_up`)."""
    if which.startswith("sharded-"):
        return sharded_child(which.removeprefix("sharded-"), folder, net, part, warm)
    model = network(net)
    shape = tuple(np.load(f"{folder}/x.npy", mmap_mode="r").shape[2:])
    result: dict = {}
    if which == "part":  # one core per part: torch's threads and zarr's encoding threads
        torch.set_num_threads(1)
        zarr.config.set({"threading.max_workers": 1})
    with torch.no_grad():
        if warm == "warm":
            warm_up(model)
        if which in ("memmap", "memmap-memory", "zarr", "part"):
            source = np.load(f"{folder}/x.npy", mmap_mode="r") if which != "zarr" else zarr.open(f"{folder}/x.zarr")
            # a memmap is given as it is (served from a mapping of its file: counted by the inferer's source, which
            # counts each row it serves once); a zarr store through a wrapper that counts what it returns
            counted = Counting(source) if which == "zarr" else source
            sources = record_sources()
            k, n = (int(v) for v in part.split("/")) if which == "part" else (0, 1)
            if which == "memmap-memory":
                out = torch.empty((1, 1, *shape))
            else:
                out = (
                    zarr.open(f"{folder}/out.zarr", mode="r+")
                    if which == "part"
                    else output_store(folder, which, shape)
                )
            baseline = _reset()
            start = time.perf_counter()
            kwargs = {"part": (k, n)} if which == "part" else {}
            mpp.GridInferer(PATCH, OVERLAP, "hann", batch_size=BATCH, output=out, **kwargs)(counted, model)
            result["seconds"] = time.perf_counter() - start
            result["read"] = counted.bytes if which == "zarr" else sum(src.bytes_read for src in sources)
        else:
            image = torch.from_numpy(np.load(f"{folder}/x.npy"))
            baseline = _reset()  # the input is in memory already
            start = time.perf_counter()
            if which == "memory":
                mpp.GridInferer(PATCH, OVERLAP, "hann", batch_size=BATCH)(image, model)
            else:
                from monai.inferers import SlidingWindowInferer

                SlidingWindowInferer(PATCH, BATCH, OVERLAP / PATCH, mode="gaussian")(image, model)
            result["seconds"] = time.perf_counter() - start
    result["peak_mib"] = (_status_kib("VmHWM") - baseline) / 1024
    return result


def spawn(
    which: str, folder: str, net: str, part: str = "0/1", warm: bool = False, extra: dict | None = None
) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--child", which, folder, net, part, "warm" if warm else "cold"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", **(extra or {})}  # every large buffer its own mapping
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def todays_design(image: torch.Tensor, model, dst: int | None) -> torch.Tensor | None:
    """Today's sharded design (the one before issue 15, still :class:`GridAggregator`'s ``distributed=True``):
    this rank runs a contiguous, balanced share of the grid's patches (batches of ``BATCH``, cut from the input)
    and blends them into a full-size accumulator, which :meth:`GridAggregator.get_output_tensor` sums over the
    ranks (``all_reduce``, or ``reduce`` onto ``dst``) and normalises. ``(1, C, *spatial)``, or ``None`` off
    ``dst``."""
    sampler = mpp.GridSampler(PATCH, OVERLAP)
    corners = sampler.plan(tuple(image.shape[2:])).corner_array()
    aggregator = mpp.GridAggregator(sampler, "hann", distributed=True, dst=dst)
    mine = corners[share(len(corners), dist.get_rank(), dist.get_world_size())]
    for start in range(0, len(mine), BATCH):
        boxes = mine[start : start + BATCH]
        batch = torch.stack([image[0][(slice(None), *(slice(c, c + PATCH) for c in box))] for box in boxes])
        aggregator.add_batch(model(batch), np.concatenate([boxes, boxes + PATCH], 1))
    result = aggregator.get_output_tensor()
    return None if result is None else result[None]


def sharded_run(which: str, image: torch.Tensor, model, store) -> torch.Tensor | None:
    """One inference of the ``sharded`` group on this rank (``store``: the shared output of ``output``)."""
    if which in ("allreduce", "reduce"):
        return todays_design(image, model, None if which == "allreduce" else 0)
    kwargs = {"dst": 0} if which == "gather-dst" else {"output": store} if which == "output" else {}
    return mpp.GridInferer(PATCH, OVERLAP, "hann", batch_size=BATCH, distributed=True, **kwargs)(image, model)


def sharded_child(which: str, folder: str, net: str, part: str, warm: str) -> dict:
    """One rank of one ``sharded`` row, in this (fresh) process: one torch thread and one zarr thread, a gloo group
    from ``MASTER_ADDR``/``MASTER_PORT``, the input loaded whole before the baseline."""
    rank, world = (int(v) for v in part.split("/"))
    torch.set_num_threads(1)
    zarr.config.set({"threading.max_workers": 1})
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    model = network(net)
    image = torch.from_numpy(np.load(f"{folder}/x.npy"))
    store = zarr.open(f"{folder}/out.zarr", mode="r+") if which == "output" else None
    result: dict = {}
    with torch.no_grad():
        if warm == "warm":  # the same path on a small volume (gloo's, torch's and zarr's first-use costs)
            small = torch.rand((1, 1, 80, 80, 80), generator=torch.Generator().manual_seed(0))
            sharded_run(which, small, model, zarr.open(f"{folder}/warm.zarr", mode="r+") if store is not None else None)
        dist.barrier()
        baseline = _reset()
        start = time.perf_counter()
        volume = sharded_run(which, image, model, store)
        result["seconds"] = time.perf_counter() - start
        result["peak_mib"] = (_status_kib("VmHWM") - baseline) / 1024
    if isinstance(volume, torch.Tensor) and which != "output":
        reference = np.load(f"{folder}/ref.npy", mmap_mode="r")
        result["diff"] = max(float(np.abs(volume[:, :, a : a + PATCH].numpy() - reference[:, :, a : a + PATCH]).max())
                             for a in range(0, volume.shape[2], PATCH))  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()
    return result


def collect(process: subprocess.Popen) -> dict:
    out, err = process.communicate()
    if process.returncode:
        raise RuntimeError(err)
    return json.loads(out.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_tables(args: argparse.Namespace, folder: str, shape: tuple[int, ...]) -> None:
    """The rows of ``RUNS`` and the parts table."""
    make_input(folder, shape)
    gib = 4 * int(np.prod(shape)) / 2**30
    plane = int(np.prod(shape[1:]))
    floor = (PATCH * plane * 4 * 2 + BATCH * 2 * PATCH**3 * 4) / 2**20  # input and output row slabs, one batch
    print(f"# out of core: 1x1x{'x'.join(map(str, shape))} float32 ({gib:.2f} GiB), {PATCH}^3 patches, overlap "
          f"{OVERLAP}, hann, batch {BATCH}, {args.net} network; floor of a row-streaming design {floor:.0f} MiB "
          f"(input row slab + output row slab + one batch)"
          f"{'; the runtime warmed up before each baseline' if args.warm_up else ''}")  # fmt: skip
    print()
    if any(which in args.rows for which in RUNS):
        print("| run | wall (s) | peak RSS above baseline (MiB) | peak / floor | read / input |")
        print("|---|---|---|---|---|")
    chosen = [which for which in RUNS if which in args.rows]
    runs: dict[str, list[dict]] = {which: [] for which in chosen}
    for r in range(args.repeats):  # a fresh process per row and round; the order alternates between rounds
        for which in chosen if r % 2 == 0 else chosen[::-1]:
            runs[which].append(collect(spawn(which, folder, args.net, warm=args.warm_up)))
    for which in chosen:
        r = runs[which]
        seconds, peak = statistics.median(x["seconds"] for x in r), max(x["peak_mib"] for x in r)
        read = f"{r[0]['read'] / (gib * 2**30):.3f}" if "read" in r[0] else ""
        print(f"| {RUNS[which]} | {seconds:.2f} | {peak:.0f} | {peak / floor:.2f} | {read} |")
    print()
    if "memmap-memory" in runs and "memory" in runs:
        ratios = [a["seconds"] / b["seconds"] for a, b in zip(runs["memmap-memory"], runs["memory"])]
        print(f"lazy input (memmap, output in memory) / in-memory GridInferer wall time, paired by round: "
              f"{statistics.median(ratios):.2f} (rounds: {', '.join(f'{x:.2f}' for x in ratios)})")  # fmt: skip
        print()
    if "zarr" in runs:
        chunk_floor(folder, floor, max(x["peak_mib"] for x in runs["zarr"]))
    if "parts" not in args.rows:
        return
    print(f"# parts: each part a process with one torch thread and one zarr thread, {args.cores} at once, into one "
          "zarr store (memmap input); wall time of the whole job")  # fmt: skip
    print()
    print("| parts | wall (s) | vs 1 part | peak RSS per part (MiB) | bytes read / input |")
    print("|---|---|---|---|---|")
    single = None
    for n in (1, 2, 4):
        output_store(folder, "out", shape)
        start = time.perf_counter()
        results = []
        for first in range(0, n, args.cores):
            running = [
                spawn("part", folder, args.net, f"{k}/{n}", args.warm_up)
                for k in range(first, min(n, first + args.cores))
            ]
            results += [collect(p) for p in running]
        wall = time.perf_counter() - start
        single = single or wall
        peaks = "/".join(f"{r['peak_mib']:.0f}" for r in results)
        read = sum(r["read"] for r in results) / (gib * 2**30)
        print(f"| {n} | {wall:.1f} | {wall / single:.2f} | {peaks} | {read:.3f} |")
    print()


def chunk_floor(folder: str, floor: float, peak: float) -> None:
    """Print the floor of a row-streaming design reading a compressed chunked store: the row-streaming floor plus the
    codec's least working set, one decoded input chunk and its compressed bytes (its largest chunk file), and the
    zarr row's peak against it."""
    store = zarr.open(f"{folder}/x.zarr", mode="r")
    decoded = int(np.prod(store.chunks)) * store.dtype.itemsize / 2**20
    files = [os.path.join(d, f) for d, _, names in os.walk(f"{folder}/x.zarr") for f in names if f != "zarr.json"]
    compressed = max(os.path.getsize(f) for f in files) / 2**20
    with_codec = floor + decoded + compressed
    print(f"zarr input: the row-streaming floor plus one decoded chunk ({decoded:.0f} MiB) and its compressed bytes "
          f"({compressed:.0f} MiB) = {with_codec:.0f} MiB; the zarr row's peak is "
          f"{peak / with_codec:.2f}x that")  # fmt: skip
    print()


def sharded_table(args: argparse.Namespace, folder: str, shape: tuple[int, ...]) -> None:
    """The ``sharded`` rows: ``WORLD`` gloo ranks at once, each its own process, per row."""
    make_input(folder, shape, store_too=False)
    model = network(args.net)
    with torch.no_grad():  # the single-process result every row is compared with
        image = torch.from_numpy(np.load(f"{folder}/x.npy"))
        np.save(f"{folder}/ref.npy", mpp.GridInferer(PATCH, OVERLAP, "hann", batch_size=BATCH)(image, model).numpy())
        del image
    # the output's chunks never straddle two ranks' rows (ranks write different chunks at once)
    rows = math.gcd(16, *(share(shape[0], k, WORLD).start for k in range(WORLD)))
    zarr.open(f"{folder}/warm.zarr", mode="w", shape=(1, 1, 80, 80, 80), chunks=(1, 1, 8, 80, 80), dtype="f4")
    mib = 4 * int(np.prod(shape)) / 2**20
    print(f"# sharded: 1x1x{'x'.join(map(str, shape))} float32 ({mib:.0f} MiB; one rank's rows "
          f"{mib / WORLD:.0f} MiB), {PATCH}^3 patches, overlap {OVERLAP}, hann, batch {BATCH}, {args.net} network; "
          f"{WORLD} gloo ranks, each a process with one torch thread, the input in memory on each (loaded before the "
          f"baseline); peak RSS of the inference above the resident size just before it, per rank (r0/r1)"
          f"{'; the same path run on 80^3 before each baseline' if args.warm_up else ''}")  # fmt: skip
    print()
    print("| run | wall (s) | peak above baseline (MiB) | peak / volume | / today's all_reduce | / today's reduce to 0 "
          "| max abs diff vs 1 process |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    results = {}
    for which, label in SHARDED.items():
        if which == "output":
            zarr.open(f"{folder}/out.zarr", mode="w", shape=(1, 1, *shape), chunks=(1, 1, rows, 256, 256),
                      dtype="f4")  # fmt: skip
        extra = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        ranks = [spawn(f"sharded-{which}", folder, args.net, f"{k}/{WORLD}", args.warm_up, extra) for k in range(WORLD)]
        results[which] = r = [collect(p) for p in ranks]
        if which == "output":
            reference, store = np.load(f"{folder}/ref.npy", mmap_mode="r"), zarr.open(f"{folder}/out.zarr", mode="r")
            diff = max(float(np.abs(store[:, :, a : a + PATCH] - reference[:, :, a : a + PATCH]).max())
                       for a in range(0, shape[0], PATCH))  # fmt: skip
            diffs = f"{diff:.1e} (the store)"
        else:
            diffs = "/".join(f"{x['diff']:.1e}" if "diff" in x else "-" for x in r)
        walls = "/".join(f"{x['seconds']:.1f}" for x in r)
        peaks = "/".join(f"{x['peak_mib']:.0f}" for x in r)
        shares = "/".join(f"{x['peak_mib'] / mib:.2f}" for x in r)
        ratios = [  # ours / today's, rank by rank (today's rows come first)
            "/".join(f"{x['peak_mib'] / t['peak_mib']:.2f}" for x, t in zip(r, results[today]))
            if today in results
            else ""
            for today in ("allreduce", "reduce")
        ]
        print(f"| {label} | {walls} | {peaks} | {shares} | {ratios[0]} | {ratios[1]} | {diffs} |")
    print()
    print(
        "(r0/r1: rank 0 / rank 1; peak / volume: in units of the whole output volume. Returning the volume, as "
        "today's all_reduce and a gather to every rank do, costs at least 1.00 volume on each rank, and on dst; a "
        "rank that only sends holds at least its rows; with output= a rank holds about one row of patches' output.)"
    )
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--net", default="identity", choices=("identity", "conv"))
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of the memory table's rows (wall: median; peak: the largest; the lazy / "
                        "in-memory ratio: the median of the rounds' paired ratios)")  # fmt: skip
    groups = [*RUNS, "parts", "sharded"]
    parser.add_argument("--rows", nargs="+", choices=groups, default=groups,
                        help="the rows to run (default: all; parts, sharded: those tables)")  # fmt: skip
    parser.add_argument("--shape", nargs=3, type=int, default=None,
                        help="the input's spatial shape (default: 1024 1024 512; sharded: 512 512 256)")  # fmt: skip
    parser.add_argument("--warm-up", action="store_true",
                        help="pay the runtime's one-time costs (thread pools, first-use allocations) before each "
                        "row's baseline, so that the peak counts only what grows with the volume")  # fmt: skip
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    given = (128, 96, 64) if args.quick else None if args.shape is None else tuple(args.shape)
    folder = tempfile.mkdtemp(prefix="mpp-ooc-")
    try:
        if any(which != "sharded" for which in args.rows):
            memory_tables(args, folder, given or (1024, 1024, 512))
        if "sharded" in args.rows:
            os.makedirs(f"{folder}/sharded")
            sharded_table(args, f"{folder}/sharded", given or (512, 512, 256))
    finally:
        shutil.rmtree(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
