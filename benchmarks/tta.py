"""Benchmark test-time mirroring, ensembles and half-precision accumulators (issue 14).

Ours: one ``GridInferer(mirror_axes=(0, 1, 2))`` call over a list of networks, which gathers and blends the grid once.
The anchor is what a MONAI user writes today: a loop of ``SlidingWindowInferer`` runs, one per flip and per model,
each on the flipped input, its output flipped back and summed into a running total (then divided). Same grid
(64^3 patches, overlap 32 = MONAI's overlap 0.5), batch 4, hann vs MONAI's gaussian, on 1x192^3 under
``torch.no_grad()``.

Rows:
- speed, 8 mirrorings x 1 model, identity (2-channel) and conv networks: median seconds over interleaved rounds (the
  order alternates), the paired ratio loop / ours, and a floor: the bare operations of any design that gathers the
  grid once (stack a batch; per flip, flip it, run the network, flip the output back, add it to a running sum;
  ``addcmul_`` the sum into a zeroed output), which bounds what gathering once can gain over the loop;
- memory, 8 mirrorings x 3 models (identity networks): peak resident memory above input + output, each in a fresh
  subprocess after a warm-up on a small volume (as ``benchmarks/inference.py`` measures it), against one batch of
  patches (network input + output) and against the working set of one batch (DESIGN.md 6e: its input, the flipped
  copy being run, the network's output and the per-patch running mean);
- half precision: a conv net whose output is cast to float16 (what an autocast network returns), accumulated in
  float32 (today's rule) vs ``accumulate_dtype=torch.float16``: the accumulator's bytes, the extra peak memory and the
  largest error relative to the float32 network's largest logit.

Run from the repository root::

    python benchmarks/tta.py               # 192^3, 3 rounds
    python benchmarks/tta.py --quick       # 1x32^3, 16^3 patches, 1 round (smoke test)
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from inference import _release_and_reset_peak, _status_kib, bare_ops_runner, make_network, paired_ratio
from monai.inferers import SlidingWindowInferer

import monai_patchplug as mpp

AXES = (0, 1, 2)


def monai_loop(image: torch.Tensor, networks: list, patch: int, overlap: int, batch: int) -> torch.Tensor:
    """What a MONAI user writes today: one sliding-window run per flip and per model, summed, then divided."""
    inferer = SlidingWindowInferer(patch, sw_batch_size=batch, overlap=overlap / patch, mode="gaussian")
    flips = [s for k in range(len(AXES) + 1) for s in itertools.combinations(AXES, k)]
    total = None
    for network in networks:
        for flip in flips:
            dims = [2 + a for a in flip]
            out = inferer(image.flip(dims) if dims else image, network)
            out = out.flip(dims) if dims else out
            total = out if total is None else total.add_(out)
            del out
    return total.div_(len(networks) * len(flips))


def ours(image: torch.Tensor, networks: list, patch: int, overlap: int, batch: int, **kwargs) -> torch.Tensor:
    """One GridInferer call: the grid is gathered and blended once for every flip and model."""
    inferer = mpp.GridInferer(patch, overlap, "hann", batch_size=batch, mirror_axes=AXES, **kwargs)
    return inferer(image, networks if len(networks) > 1 else networks[0])


def bare_mirrored(network: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    """The bare operations any gather-once design must run per batch: for every flip, flip the batch, run the
    network, flip its output back and add it to a running sum (the first result is the sum). No scaling, no checks."""
    flips = [s for k in range(1, len(AXES) + 1) for s in itertools.combinations(AXES, k)]

    def run(batch: torch.Tensor) -> torch.Tensor:
        total = network(batch)
        for flip in flips:
            dims = [2 + a for a in flip]
            total.add_(network(batch.flip(dims)).flip(dims))
        return total

    return run


def timed(run: Callable[[], torch.Tensor]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def speed(net: str, size: int, patch: int, overlap: int, batch: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per run of ours, the MONAI loop and the floor (``bare_mirrored`` inside ``bare_ops_runner``: stack,
    mirrored network, ``addcmul_`` into a zeroed output), interleaved over rounds in alternating order."""
    torch.manual_seed(1)
    image = torch.randn(1, 1, size, size, size)
    networks = [make_network(net)]
    runs = {"ours": lambda: ours(image, networks, patch, overlap, batch),
            "loop": lambda: monai_loop(image, networks, patch, overlap, batch),
            "floor": bare_ops_runner(bare_mirrored(networks[0]), image, patch, overlap, batch)}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for run in runs.values():
            run()  # warm-up
        for r in range(repeats):
            for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
                times[name].append(timed(runs[name]))
    return times


def child(which: str, size: int, patch: int, overlap: int, batch: int) -> None:
    """Print the extra peak RSS (MiB) of one run after a warm-up, and (half rows) the accumulator's MiB and the
    output (float32 network's max logit error)."""
    torch.manual_seed(1)
    models = 3 if which in ("ours3", "loop3") else 1
    networks = [make_network("identity") for _ in range(models)] if models == 3 else [make_network("conv")]
    conv = networks[0]
    if which.startswith("half"):  # a network with float16 outputs, as under autocast
        networks = [lambda x: conv(x).half()]
    kwargs = {"accumulate_dtype": torch.float16} if which in ("half16", "float16") else {}

    def run(image: torch.Tensor) -> torch.Tensor:
        if which.startswith("loop"):
            return monai_loop(image, networks, patch, overlap, batch)
        return ours(image, networks, patch, overlap, batch, **kwargs)

    with torch.no_grad():
        run(torch.randn(1, 1, 2 * patch, 2 * patch, 2 * patch))
        image = torch.randn(1, 1, size, size, size)
        _release_and_reset_peak()
        before = _status_kib("VmRSS")
        out = run(image)
        extra = (_status_kib("VmHWM") - before) / 1024
        result = [extra, out.element_size() * out.numel() / 2**20]
        if which.startswith("half") or which == "float16":
            reference = ours(image, [conv], patch, overlap, batch)  # the float32 network, float32 accumulator
            result.append(float((out.float() - reference).abs().max() / reference.abs().max()))
    print(" ".join(str(v) for v in result))


def in_child(which: str, args: argparse.Namespace) -> list[float]:
    cmd = [sys.executable, __file__, "--child", which] + (["--quick"] if args.quick else [])
    env = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # every large buffer its own mapping: RSS = live memory
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if done.returncode:
        raise RuntimeError(done.stderr)
    return [float(v) for v in done.stdout.split()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size, patch, overlap, batch = (32, 16, 8, 4) if args.quick else (192, 64, 32, 4)
    if args.child:
        child(args.child, size, patch, overlap, batch)
        return 0
    repeats = 1 if args.quick else args.repeats
    input_mib, output_mib = size**3 * 4 / 2**20, 2 * size**3 * 4 / 2**20
    batch_mib = batch * 3 * patch**3 * 4 / 2**20
    # DESIGN.md 6e: one batch's working set = its input (1 channel), the flipped copy being run (1), the network's
    # output (2) and the per-patch running mean (2)
    working_mib = batch * 6 * patch**3 * 4 / 2**20
    print(f"# mirroring and ensembles: 1x{size}^3, {patch}^3 patches, overlap {overlap}, batch {batch}, 8 mirrorings; "
          f"{repeats} rounds; torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print()
    print("| network | models | ours (s) | MONAI loop (s) | floor (s) | loop / ours | loop / floor |")
    print("|---|---|---|---|---|---|---|")
    for net in ("identity", "conv"):
        t = speed(net, size, patch, overlap, batch, repeats)
        print(f"| {net} | 1 | {statistics.median(t['ours']):.3f} | {statistics.median(t['loop']):.3f} | "
              f"{statistics.median(t['floor']):.3f} | {paired_ratio(t['loop'], t['ours']):.2f}x | "
              f"{paired_ratio(t['loop'], t['floor']):.2f}x |")  # fmt: skip
    print()
    print(f"# memory above input ({input_mib:.0f} MiB) + output ({output_mib:.0f} MiB), 8 mirrorings x 3 identity "
          f"models, fresh process each; one batch of patches (input + output) = {batch_mib:.0f} MiB; the working set "
          f"of one batch (input, flipped copy, output, running mean) = {working_mib:.0f} MiB")  # fmt: skip
    print()
    print("| method | extra peak (MiB) | minus output (MiB) | in batches of patches | in working sets of one batch |")
    print("|---|---|---|---|---|")
    for name, which in (("GridInferer", "ours3"), ("MONAI loop", "loop3")):
        extra = in_child(which, args)[0] - output_mib
        shares = f"{extra / batch_mib:.1f} | {extra / working_mib:.1f}"
        print(f"| {name} | {extra + output_mib:.0f} | {extra:.0f} | {shares} |")
    print()
    print("# half precision: conv net with float16 output (as under autocast), 8 mirrorings; error relative to the "
          "float32 network's largest logit")  # fmt: skip
    print()
    print("| accumulator | accumulator (MiB) | extra peak (MiB) | max error / max logit |")
    print("|---|---|---|---|")
    for name, which in (("float32 (default)", "half32"), ("float16 (accumulate_dtype)", "half16")):
        extra, out_mib, error = in_child(which, args)
        print(f"| {name} | {out_mib:.0f} | {extra:.0f} | {error:.1e} |")
    print()
    print("# the same conv net with float32 outputs, accumulated in float16 (the result is returned in float32)")
    print()
    print("| accumulator | returned (MiB) | extra peak (MiB) | max error / max logit |")
    print("|---|---|---|---|")
    extra, out_mib, error = in_child("float16", args)
    print(f"| float16 (accumulate_dtype), float32 network | {out_mib:.0f} | {extra:.0f} | {error:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
