"""Benchmark scale-out grid inference: streamed outputs (peak memory) and region-of-interest skipping (time).

(a) Streaming. A 14-channel "identity-like" network (the input times 14 channel weights plus offsets, so the argmax
    varies) on one 1xN^3 float32 volume (N = 320 by default), 64^3 patches, overlap 16, 4 patches per call, hann
    blending (MONAI: overlap 0.25 lays the same grid, gaussian blending). Rows:
    - ``GridInferer`` streaming: ``output=`` a uint8 ``(1, 1, N, N, N)`` tensor, ``postprocess`` = argmax to uint8;
    - ``GridInferer`` in memory: the 14-channel float volume, then argmax to uint8;
    - MONAI ``SlidingWindowInferer``: the 14-channel float volume, then argmax to uint8.
    Each row runs once in its own fresh interpreter (``subprocess``) that builds the input, then runs; "peak RSS" is
    the child's ``ru_maxrss`` (the whole process: interpreter, torch, MONAI, input, run), "run peak" is the peak
    minus the resident size just before the run (``VmHWM - VmRSS``), i.e. what the inference itself adds on top of
    the loaded libraries and the input volume. Ratios are ours / MONAI's.

(b) ROI skipping. A body-like phantom (1xM^3, M = 160: an elliptic cylinder, a patient on a table, in the lower
    part of the field of view; about half the volume is air) through a small 3D conv net (1 -> 8 -> 8 -> 2
    channels), 32^3 patches, overlap 8, 4 per call, hann, with and without ``roi_mask`` = the body. Reported:
    patches run, time spent inside the network and in the whole call (medians of interleaved repeats in one
    process), and the largest absolute difference inside the mask.

Run from the repository root::

    python benchmarks/scale_out.py                 # N = 320 (a few minutes on 2 cores), M = 160
    python benchmarks/scale_out.py --size 192      # a smaller streaming volume
    python benchmarks/scale_out.py --part roi      # one table only (streaming / roi / both)
    python benchmarks/scale_out.py --quick         # tiny volumes, in one process (no memory figures): smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import monai
import torch
from inference import make_network
from monai.inferers import SlidingWindowInferer

import monai_patchplug as mpp

CHANNELS = 14
ROWS = ("GridInferer streaming argmax", "GridInferer in memory + argmax", "SlidingWindowInferer + argmax")


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field in KiB (``VmRSS``, or ``VmHWM``: the peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def identity_like() -> Callable[[torch.Tensor], torch.Tensor]:
    """``(n, 1, ...)`` -> ``(n, 14, ...)``: the input times 14 weights plus 14 offsets (one new output per call)."""
    weight = torch.linspace(-1.0, 1.0, CHANNELS).view(1, CHANNELS, 1, 1, 1)
    offset = torch.linspace(0.0, 0.3, CHANNELS).view(1, CHANNELS, 1, 1, 1)
    return lambda p: torch.addcmul(offset, p.expand(-1, CHANNELS, -1, -1, -1), weight)


def argmax_u8(slab: torch.Tensor) -> torch.Tensor:
    """``(C, ...)`` scores -> ``(1, ...)`` uint8 labels."""
    return slab.argmax(0, keepdim=True).to(torch.uint8)


def streaming_child(row: str, size: int, patch: int, overlap: int, batch: int) -> dict:
    """One row of (a) in this (fresh) process: peak memory and wall time."""
    torch.manual_seed(0)
    image = torch.randn(1, 1, size, size, size)
    net = identity_like()
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    with torch.no_grad():
        if row == ROWS[0]:
            labels = torch.zeros(1, 1, size, size, size, dtype=torch.uint8)
            mpp.GridInferer(patch, overlap, "hann", batch_size=batch, output=labels, postprocess=argmax_u8)(image, net)
        elif row == ROWS[1]:
            labels = mpp.GridInferer(patch, overlap, "hann", batch_size=batch)(image, net).argmax(1, keepdim=True)
            labels = labels.to(torch.uint8)
        else:
            sw = SlidingWindowInferer(patch, sw_batch_size=batch, overlap=overlap / patch, mode="gaussian")
            labels = sw(image, net).argmax(1, keepdim=True).to(torch.uint8)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    checksum = int(labels.to(torch.int64).sum())
    return {"peak": peak / 1024, "run": (_status_kib("VmHWM") - before) / 1024, "seconds": seconds, "sum": checksum}


def streaming_table(size: int, patch: int, overlap: int, batch: int, fresh: bool = True) -> None:
    """(a): one subprocess per row (``fresh=False``: in this process, memory columns meaningless)."""
    results = {}
    for row in ROWS:
        if fresh:
            cmd = [sys.executable, __file__, "--child", row, str(size), str(patch), str(overlap), str(batch)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[row] = json.loads(done.stdout.strip().splitlines()[-1])
        else:
            results[row] = streaming_child(row, size, patch, overlap, batch)
            results[row].update(peak=float("nan"), run=float("nan"))
    monai_row = results[ROWS[2]]
    out_mib = CHANNELS * size**3 * 4 / 2**20
    print(
        f"## (a) streaming: 1x{size}^3 input, {CHANNELS}-channel identity-like net, {patch}^3 patches, overlap "
        f"{overlap}, batch {batch} (the float output alone would be {out_mib:.0f} MiB; input {size**3 * 4 / 2**20:.0f} "
        "MiB)"
    )
    print()
    print("| method | wall (s) | peak RSS (MiB) | ours / MONAI | run peak (MiB) | ours / MONAI |")
    print("|---|---|---|---|---|---|")
    for row in ROWS:
        r = results[row]
        ratio = f"{r['peak'] / monai_row['peak']:.2f}" if row != ROWS[2] else ""
        run_ratio = f"{r['run'] / monai_row['run']:.2f}" if row != ROWS[2] else ""
        print(f"| {row} | {r['seconds']:.3f} | {r['peak']:.0f} | {ratio} | {r['run']:.0f} | {run_ratio} |")
    same = results[ROWS[0]]["sum"] == results[ROWS[1]]["sum"]
    print(f"\nstreamed labels equal the in-memory argmax (label sums): {same}")


def phantom(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A body-like ``(1, 1, M, M, M)`` image and its mask: a patient lying on a table, i.e. an elliptic cylinder along
    the first axis filling the lower part of the field of view (about half the volume), soft-tissue noise in air."""
    axes = [torch.linspace(-1, 1, size) for _ in range(3)]
    _, y, x = torch.meshgrid(*axes, indexing="ij")
    body = ((y + 0.3) / 0.65) ** 2 + (x / 0.97) ** 2 <= 1
    generator = torch.Generator().manual_seed(0)
    image = torch.where(body, 1.0 + 0.2 * torch.randn(body.shape, generator=generator), torch.zeros(()))
    return image[None, None], body.to(torch.uint8)


def roi_table(size: int, patch: int, overlap: int, batch: int, repeats: int) -> None:
    """(b): with and without ``roi_mask``, interleaved repeats in this process."""
    net = make_network("conv")
    image, mask = phantom(size)
    network_time = {"full": 0.0, "roi": 0.0}
    patches = {"full": 0, "roi": 0}
    current = ["full"]

    def timed(p: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = net(p)
        network_time[current[0]] += time.perf_counter() - start
        patches[current[0]] += len(p)
        return out

    inferers = {
        "full": mpp.GridInferer(patch, overlap, "hann", batch_size=batch),
        "roi": mpp.GridInferer(patch, overlap, "hann", batch_size=batch, roi_mask=mask),
    }
    totals: dict[str, list[float]] = {"full": [], "roi": []}
    nets: dict[str, list[float]] = {"full": [], "roi": []}
    outputs = {}
    with torch.no_grad():
        for _ in range(repeats):
            for key, inferer in inferers.items():
                current[0] = key
                network_time[key], patches[key] = 0.0, 0
                start = time.perf_counter()
                outputs[key] = inferer(image, timed)
                totals[key].append(time.perf_counter() - start)
                nets[key].append(network_time[key])
    inside = mask.bool().expand_as(outputs["full"])
    diff = float((outputs["full"] - outputs["roi"])[inside].abs().max())
    air = 1 - float(mask.float().mean())
    total = inferers["full"].geometry((size,) * 3).num_patches
    print(
        f"## (b) ROI skipping: 1x{size}^3 body phantom ({air:.0%} air), conv net 1->8->8->2, {patch}^3 patches, "
        f"overlap {overlap}, batch {batch}, medians of {repeats}"
    )
    print()
    print("| run | patches run | network time (s) | whole call (s) | network time / full | patches / full |")
    print("|---|---|---|---|---|---|")
    for key in ("full", "roi"):
        net_s, call_s = statistics.median(nets[key]), statistics.median(totals[key])
        net_ratio = net_s / statistics.median(nets["full"])
        print(
            f"| {'roi_mask' if key == 'roi' else 'no mask'} | {patches[key]} / {total} | {net_s:.2f} | {call_s:.2f} | "
            f"{net_ratio:.2f} | {patches[key] / total:.2f} |"
        )
    print(f"\nmax |difference| inside the mask: {diff:.3g}; skipped patches: {1 - patches['roi'] / total:.0%}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny volumes (smoke test)")
    parser.add_argument("--size", type=int, default=320, help="streaming volume size N (default 320)")
    parser.add_argument("--roi-size", type=int, default=160, help="phantom size M (default 160)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--part", choices=["streaming", "roi", "both"], default="both", help="which table to run")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        row, *numbers = args.child
        print(json.dumps(streaming_child(row, *map(int, numbers))))
        return 0
    print(
        f"# scale-out grid inference; torch {torch.__version__}, MONAI {monai.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.machine()}"
    )
    print()
    if args.quick:
        streaming_table(48, 16, 4, 4, fresh=False)
        print()
        roi_table(32, 12, 2, 4, 1)
    else:
        if args.part in ("streaming", "both"):
            streaming_table(args.size, 64, 16, 4)
            print()
        if args.part in ("roi", "both"):
            roi_table(args.roi_size, 32, 8, 4, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
