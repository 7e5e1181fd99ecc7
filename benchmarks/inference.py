"""Benchmark grid inference: monai_patchplug vs. MONAI SlidingWindowInferer vs. TorchIO GridSampler + GridAggregator.

One 1x192^3 float32 volume, 64^3 patches, overlap 32 (MONAI: overlap=0.5, which lays the same grid), 4 patches per
network call, two networks:

(a) a 2-channel identity network (``cat([x, x])``), so the time is the patching and aggregation cost;
(b) a small 3D conv net (1 -> 8 -> 8 -> 2 channels), a realistic share of network time.

Times: every configuration is built in one process, warmed up once, then timed in N interleaved rounds (each round
runs every row once, so machine noise hits all rows alike) under ``torch.no_grad()``; medians of
``time.perf_counter``; ratios compare rows of the same network in this run. Memory: each configuration runs once more
in its own subprocess, where "extra peak" is the peak resident size (``VmHWM``; ``ru_maxrss`` would
include the parent's peak) minus the resident size just before the run, and
"minus output" subtracts the output volume (2 x 192^3 float32 = 54 MiB). TorchIO is optional: without it its rows
are skipped with a note.

Run from the repository root::

    python benchmarks/inference.py               # 192^3, 3 rounds, one memory subprocess per row
    python benchmarks/inference.py --repeats 7
    python benchmarks/inference.py --quick       # 1x24^3, 12^3 patches, 1 repeat, no memory column (smoke test)
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import monai
import torch
from monai.inferers import SlidingWindowInferer

import monai_patchplug as mpp

# (library, our mode / MONAI mode / TorchIO mode), in table order; the label pairs rows that do the same blending
METHODS = [
    ("GridInferer", "hann"),
    ("SlidingWindowInferer", "gaussian"),
    ("torchio", "hann"),
    ("GridInferer", "average"),
    ("SlidingWindowInferer", "constant"),
    ("torchio", "average"),
    ("GridInferer", "crop"),
]
NETS = ["identity", "conv"]
HAS_TORCHIO = importlib.util.find_spec("torchio") is not None


def make_network(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The benchmark's networks: ``identity`` (1 -> 2 channels, no compute) or a small conv net (1 -> 2)."""
    if name == "identity":
        return lambda x: torch.cat([x, x], 1)
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv3d(8, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv3d(8, 2, 1),
    ).eval()


def make_runner(
    library: str, mode: str, network: Callable, image: torch.Tensor, patch: int, overlap: int, batch: int
) -> Callable[[], torch.Tensor]:
    """A no-argument function that runs one full inference of ``image`` (``(1, 1, *spatial)``)."""
    if library == "GridInferer":
        inferer = mpp.GridInferer(patch, overlap, mode, batch_size=batch)
        return lambda: inferer(image, network)
    if library == "SlidingWindowInferer":
        sw = SlidingWindowInferer(patch, sw_batch_size=batch, overlap=overlap / patch, mode=mode)
        return lambda: sw(image, network)
    import torchio as tio

    subject = tio.Subject(t1=tio.ScalarImage(tensor=image[0]))

    def run() -> torch.Tensor:
        sampler = tio.inference.GridSampler(subject, patch, overlap)
        aggregator = tio.inference.GridAggregator(sampler, overlap_mode=mode)
        for batch_ in torch.utils.data.DataLoader(sampler, batch_size=batch, collate_fn=_torchio_collate):
            aggregator.add_batch(network(batch_[0]), batch_[1])
        return aggregator.get_output_tensor()

    return run


def _torchio_collate(patches: list) -> tuple[torch.Tensor, torch.Tensor]:
    import torchio as tio

    return torch.stack([p["t1"][tio.DATA] for p in patches]), torch.stack([p[tio.LOCATION] for p in patches])


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field in KiB (``VmRSS``, or ``VmHWM``: the peak, reset by ``exec``)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def build(library: str, mode: str, net: str, size: int, patch: int, overlap: int, batch: int) -> Callable:
    """The volume, network and runner of one configuration (same seeded volume for every row)."""
    torch.manual_seed(1)
    image = torch.randn(1, 1, size, size, size)
    return make_runner(library, mode, make_network(net), image, patch, overlap, batch)


def time_interleaved(runners: dict, repeats: int) -> dict:
    """Median seconds per runner; rounds interleave the runners so machine noise hits every row alike."""
    times: dict = {key: [] for key in runners}
    with torch.no_grad():
        for run in runners.values():
            run()  # warm-up
        for _ in range(repeats):
            for key, run in runners.items():
                start = time.perf_counter()
                run()
                times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) for key, t in times.items()}


def peak_extra_mib(library: str, mode: str, net: str, size: int, patch: int, overlap: int, batch: int) -> float:
    """One run in this process: peak RSS minus the RSS just before it, in MiB (meaningful in a fresh process)."""
    run = build(library, mode, net, size, patch, overlap, batch)
    with torch.no_grad():
        before = _status_kib("VmRSS")
        run()
    return max(_status_kib("VmHWM") - before, 0) / 1024


def in_child(library: str, mode: str, net: str) -> float:
    """:func:`peak_extra_mib` in a fresh interpreter."""
    cmd = [sys.executable, __file__, "--child", library, mode, net]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny volume, 1 repeat, in-process (smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=3, metavar=("LIBRARY", "MODE", "NET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    size, patch, overlap, batch = (24, 12, 4, 4) if args.quick else (192, 64, 32, 4)
    if args.child:
        print(peak_extra_mib(*args.child, size, patch, overlap, batch))
        return 0
    repeats = 1 if args.quick else args.repeats
    print(
        f"# grid inference: 1x{size}^3, {patch}^3 patches, overlap {overlap}, batch {batch}; "
        f"{repeats} repeats; torch {torch.__version__}, MONAI {monai.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.machine()}"
    )
    if not HAS_TORCHIO:
        print("# TorchIO is not installed (pip install torchio): its rows are skipped.")
    out_mib = 2 * size**3 * 4 / 2**20
    print(f"# extra peak: peak RSS minus RSS before the run (1-channel input; output alone: {out_mib:.1f} MiB)")
    print()
    header = (
        "| network | method | mode | median (s) | MONAI / ours | TorchIO / ours | extra peak (MiB) | minus output |"
    )
    print(header)
    print("|---|---|---|---|---|---|---|---|")
    for net in NETS:
        methods = [(lib, mode) for lib, mode in METHODS if lib != "torchio" or HAS_TORCHIO]
        runners = {key: build(*key, net, size, patch, overlap, batch) for key in methods}
        medians = time_interleaved(runners, repeats)
        del runners
        memory = {key: float("nan") if args.quick else in_child(*key, net) for key in methods}
        pairs = {"hann": ("gaussian", "hann"), "average": ("constant", "average"), "crop": ("constant", "average")}
        for library, mode in methods:
            median, ratio_monai, ratio_tio = medians[library, mode], "", ""
            if library == "GridInferer":
                m, t = pairs[mode]
                ratio_monai = f"{medians['SlidingWindowInferer', m] / median:.2f}x"
                if ("torchio", t) in medians:
                    ratio_tio = f"{medians['torchio', t] / median:.2f}x"
            extra = memory[library, mode]
            print(
                f"| {net} | {library} | {mode} | {median:.3f} | {ratio_monai} | {ratio_tio} | "
                f"{extra:.0f} | {extra - out_mib:.0f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
