"""Benchmark grid inference: monai_patchplug vs. MONAI SlidingWindowInferer vs. TorchIO GridSampler + GridAggregator.

One 1x192^3 float32 volume, 64^3 patches, overlap 32 (MONAI: overlap=0.5, which lays the same grid), 4 patches per
network call, two networks:

(a) a 2-channel identity network (``cat([x, x])``), so the time is the patching and aggregation cost;
(b) a small 3D conv net (1 -> 8 -> 8 -> 2 channels), a realistic share of network time.

With the identity network a "bare torch ops" row runs only the torch calls that any implementation holding one
batch of patches makes: stack each batch into a buffer, call the network, ``addcmul_`` each output patch into the
output with one weight tensor that stays in cache. It is the floor of the blending modes for such a design (ours
adds the weights per grid position, the checks and the metadata), and it shows how far the blending modes can
get against the anchors on the machine at hand.

Times: every configuration is built in one process, warmed up once, then timed in N interleaved rounds (each round runs
every row once, so machine noise hits all rows alike) under ``torch.no_grad()``; medians of ``time.perf_counter``; a
ratio is the median over rounds of the anchor's time over ours in the same round. Memory: each configuration runs once
more in its own subprocess. It first runs the same configuration on a small volume (so code pages, thread pools and
lazily built state are in place, as in any process that has run inference before), hands freed heap memory back (glibc
``malloc_trim``) and resets the peak (``/proc/self/clear_refs``); "extra peak" is then the peak resident size
(``VmHWM``) during the full-size run minus the resident size just before it, and "minus output" subtracts the output
volume (2 x 192^3 float32 = 54 MiB). The subprocesses run with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then maps every
buffer of 64 KiB or more on its own and unmaps it when freed, so the resident size counts the buffers alive, not what
the allocator kept on its free lists (without it, rows move by multiples of the network's 8 MiB output from run to run).
One batch of patches, the network's input and output (4 x 1 x 64^3 and 4 x 2 x 64^3 float32), is 12 MiB. TorchIO is
optional: without it its rows are skipped with a note.

A second table, the *cohort* scenario, measures inference the way an evaluator or a cohort script runs it: a cohort of
``--cohort`` volumes of distinct shapes (seeded, each axis within +-10% of 192), each inferred once with every output
kept by the caller, then a second pass over the same cohort (outputs kept too), plus the *cold first call* (the first
inference of the process, on one more distinct shape, before the passes). Each method runs in a fresh subprocess per
round (so every first pass is a real first pass: no plan, allocation or page of an earlier method is reused), rounds
alternate the order of the methods, and ratios are paired within a round, as above.

Run from the repository root::

    python benchmarks/inference.py               # 192^3, 3 rounds, one memory subprocess per row, then the cohort
    python benchmarks/inference.py --scenario cohort --repeats 3   # the cohort table alone
    python benchmarks/inference.py --repeats 7
    python benchmarks/inference.py --quick       # 1x24^3, 12^3 patches, 1 repeat, no memory column (smoke test)
    python benchmarks/inference.py --device cuda # on a GPU: input, networks and outputs there; memory column from
                                                 # torch.cuda.max_memory_allocated
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import os
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
from monai_patchplug.inference.blend import zeros_volume

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
#: identity network only: the bare torch ops any implementation that adds each patch into the output as it comes
#: must run (see :func:`bare_ops_runner`)
FLOOR = ("bare torch ops", "hann")
NETS = ["identity", "conv"]
HAS_TORCHIO = importlib.util.find_spec("torchio") is not None


def make_network(name: str, device: str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """The benchmark's networks: ``identity`` (1 -> 2 channels, no compute) or a small conv net (1 -> 2)."""
    if name == "identity":
        return lambda x: torch.cat([x, x], 1)
    torch.manual_seed(0)
    return (
        torch.nn.Sequential(
            torch.nn.Conv3d(1, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv3d(8, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv3d(8, 2, 1),
        )
        .eval()
        .to(device)
    )


def _sync(device: str) -> None:
    """Wait for the device's queued work (CUDA), so that wall times cover it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def make_runner(
    library: str, mode: str, network: Callable, image: torch.Tensor, patch: int, overlap: int, batch: int
) -> Callable[[], torch.Tensor]:
    """A no-argument function that runs one full inference of ``image`` (``(1, 1, *spatial)``, on the device the
    benchmark runs on; TorchIO samples from a CPU copy and each batch goes to that device for the network)."""
    if library == "GridInferer":
        inferer = mpp.GridInferer(patch, overlap, mode, batch_size=batch)
        return lambda: inferer(image, network)
    if library == FLOOR[0]:
        return bare_ops_runner(network, image, patch, overlap, batch)
    if library == "SlidingWindowInferer":
        sw = SlidingWindowInferer(patch, sw_batch_size=batch, overlap=overlap / patch, mode=mode)
        return lambda: sw(image, network)
    import torchio as tio

    subject = tio.Subject(t1=tio.ScalarImage(tensor=image[0].cpu()))

    def run() -> torch.Tensor:
        sampler = tio.inference.GridSampler(subject, patch, overlap)
        aggregator = tio.inference.GridAggregator(sampler, overlap_mode=mode)
        for batch_ in torch.utils.data.DataLoader(sampler, batch_size=batch, collate_fn=_torchio_collate):
            aggregator.add_batch(network(batch_[0].to(image.device)), batch_[1])
        return aggregator.get_output_tensor()

    return run


def bare_ops_runner(
    network: Callable, image: torch.Tensor, patch: int, overlap: int, batch: int
) -> Callable[[], torch.Tensor]:
    """The floor of the blending modes for a design that holds one batch of patches: per batch, stack the patches
    into one reused buffer, call the network, and ``addcmul_`` each output patch into a zeroed output volume
    (allocated as ours is) with one fixed weight tensor that stays in cache. No checks, no weight building, no
    normalising, no metadata, so its output is not a blend (only its time and memory mean something); ours does
    all of that on top."""
    spatial = image.shape[2:]
    corners = mpp.GridInferer(patch, overlap).geometry(spatial).corner_array().tolist()  # the same grid as ours
    weight = torch.ones((patch,) * len(spatial), device=image.device)

    def run() -> torch.Tensor:
        buffer = torch.empty(batch, *image.shape[1:2], *weight.shape, device=image.device)
        out = None
        for first in range(0, len(corners), batch):
            chunk = corners[first : first + batch]
            boxes = [tuple(slice(c, c + patch) for c in corner) for corner in chunk]
            window = torch.stack([image[(0, ..., *box)] for box in boxes], out=buffer[: len(chunk)])
            prediction = network(window)
            if out is None:
                out = zeros_volume((prediction.shape[1], *spatial), prediction.dtype, image.device)
            for patch_out, box in zip(prediction, boxes):
                out[(..., *box)].addcmul_(patch_out, weight)
        return out

    return run


def _torchio_collate(patches: list) -> tuple[torch.Tensor, torch.Tensor]:
    import torchio as tio

    return torch.stack([p["t1"][tio.DATA] for p in patches]), torch.stack([p[tio.LOCATION] for p in patches])


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field in KiB (``VmRSS``, or ``VmHWM``: the peak, reset by ``exec``)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


class TimedNetwork:
    """Wraps a network; ``seconds`` sums the wall time spent inside its calls."""

    def __init__(self, network: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.network, self.seconds = network, 0.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _sync(str(x.device))
        start = time.perf_counter()
        out = self.network(x)
        _sync(str(x.device))
        self.seconds += time.perf_counter() - start
        return out


def build(
    library: str, mode: str, net: str, size: int, patch: int, overlap: int, batch: int, device: str = "cpu"
) -> tuple[Callable, TimedNetwork]:
    """The runner of one configuration (same seeded volume for every row) and its timed network."""
    torch.manual_seed(1)
    image = torch.randn(1, 1, size, size, size).to(device)
    network = TimedNetwork(make_network(net, device))
    return make_runner(library, mode, network, image, patch, overlap, batch), network


def time_interleaved(runners: dict, repeats: int, device: str = "cpu") -> tuple[dict, dict]:
    """Per runner, the seconds of each round's run and of the part of it spent outside the network; rounds
    interleave the runners so machine noise hits every row alike."""
    times: dict = {key: [] for key in runners}
    outside: dict = {key: [] for key in runners}
    with torch.no_grad():
        for run, _ in runners.values():
            run()  # warm-up
        _sync(device)
        for _ in range(repeats):
            for key, (run, network) in runners.items():
                network.seconds = 0.0
                start = time.perf_counter()
                run()
                _sync(device)
                times[key].append(time.perf_counter() - start)
                outside[key].append(times[key][-1] - network.seconds)
    return times, outside


def paired_ratio(anchor: list[float], ours: list[float]) -> float:
    """The median over rounds of the anchor's time over ours in the same round: the load of a shared machine drifts
    between rounds (by up to 2x here), and a ratio within a round cancels most of it."""
    return statistics.median(a / o for a, o in zip(anchor, ours))


def _release_and_reset_peak() -> None:
    """Hand freed heap memory back to the system (glibc only) and reset ``VmHWM`` to the current RSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_extra_mib(
    library: str, mode: str, net: str, size: int, patch: int, overlap: int, batch: int, device: str = "cpu"
) -> float:
    """Peak memory of one full-size run minus the memory just before it, in MiB, after a warm-up run of the same
    configuration on a volume of ``2 * patch`` voxels per axis (meant for a fresh process): resident size on the
    CPU, memory allocated by PyTorch on a CUDA device."""
    with torch.no_grad():
        build(library, mode, net, 2 * patch, patch, overlap, batch, device)[0]()
    run, _ = build(library, mode, net, size, patch, overlap, batch, device)
    if torch.device(device).type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with torch.no_grad():
            run()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    _release_and_reset_peak()
    with torch.no_grad():
        before = _status_kib("VmRSS")
        run()
    return max(_status_kib("VmHWM") - before, 0) / 1024


def in_child(library: str, mode: str, net: str, device: str = "cpu") -> float:
    """:func:`peak_extra_mib` in a fresh interpreter."""
    cmd = [sys.executable, __file__, "--device", device, "--child", library, mode, net]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # every large buffer its own mapping: RSS = live memory
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return float(done.stdout.strip().splitlines()[-1])


def cohort_shapes(count: int, size: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """``count + 1`` distinct spatial shapes, each axis within +-10% of ``size`` (the first is the cold call's)."""
    rng = torch.Generator().manual_seed(seed)
    shapes: list[tuple[int, int, int]] = []
    while len(shapes) < count + 1:
        shape = tuple(int(size * (0.9 + 0.2 * float(v))) for v in torch.rand(3, generator=rng))
        if shape not in shapes:
            shapes.append(shape)
    return shapes


def cohort_child(
    library: str, mode: str, net: str, count: int, size: int, patch: int, overlap: int, batch: int
) -> dict:
    """In a fresh process: the cold first call, then two passes over the cohort, every output kept (seconds)."""
    shapes = cohort_shapes(count, size)
    torch.manual_seed(1)
    images = [torch.randn(1, 1, *shape) for shape in shapes]
    network = make_network(net)
    kept: list = []
    times = {}
    with torch.no_grad():
        start = time.perf_counter()
        kept.append(make_runner(library, mode, network, images[0], patch, overlap, batch)())
        times["cold"] = time.perf_counter() - start
        for name in ("first", "second"):
            start = time.perf_counter()
            for image in images[1:]:
                kept.append(make_runner(library, mode, network, image, patch, overlap, batch)())
            times[name] = time.perf_counter() - start
    return times


def run_cohort(methods: list, net: str, count: int, repeats: int, size: int, patch: int, quick: bool) -> dict:
    """Per method, the ``{"cold", "first", "second"}`` seconds of each round (methods alternate order per round)."""
    rounds: dict = {key: [] for key in methods}
    for r in range(repeats):
        for library, mode in methods if r % 2 == 0 else methods[::-1]:
            cmd = [sys.executable, __file__, "--cohort-child", library, mode, net, str(count), str(size)]
            cmd += ["--quick"] if quick else []
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr}")
            rounds[library, mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rounds


def print_cohort(args: argparse.Namespace, size: int, patch: int, overlap: int, batch: int) -> None:
    """The cohort table: cold first call, first and second pass, ours and the floor against the anchors."""
    print()
    print(
        f"# cohort: {args.cohort} volumes of distinct shapes within +-10% of {size}^3 (+1 for the cold first call), "
        f"each inferred once per pass, every output kept; {patch}^3 patches, overlap {overlap}, batch {batch}; "
        f"{args.repeats} rounds, a fresh process per method and round; conv net: {args.cohort_conv} volumes"
    )
    print()
    print(
        "| network | method | mode | cold call (s) | first pass (s) | second pass (s) | MONAI / ours: cold, first, "
        "second | TorchIO / ours: cold, first, second |"
    )
    print("|---|---|---|---|---|---|---|---|")
    pairs = {"hann": ("gaussian", "hann"), "average": ("constant", "average"), "crop": ("constant", "average")}
    for net in args.nets.split(","):
        count = args.cohort if net == "identity" else args.cohort_conv
        methods = [(lib, mode) for lib, mode in METHODS if lib != "torchio" or HAS_TORCHIO]
        if net == "identity":
            methods.insert(3, FLOOR)
        rounds = run_cohort(methods, net, count, args.repeats, size, patch, args.quick)
        for library, mode in methods:
            runs = rounds[library, mode]
            medians = [statistics.median(run[k] for run in runs) for k in ("cold", "first", "second")]
            ratios = ["", ""]
            if library in ("GridInferer", FLOOR[0]):
                for i, anchor in enumerate((("SlidingWindowInferer", pairs[mode][0]), ("torchio", pairs[mode][1]))):
                    if anchor in rounds:
                        ratios[i] = ", ".join(
                            f"{paired_ratio([run[k] for run in rounds[anchor]], [run[k] for run in runs]):.2f}x"
                            for k in ("cold", "first", "second")
                        )
            print(
                f"| {net} | {library} | {mode} | {medians[0]:.3f} | {medians[1]:.3f} | {medians[2]:.3f} | "
                f"{ratios[0]} | {ratios[1]} |"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny volume, 1 repeat, in-process (smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="where the input, networks and outputs live (e.g. cuda)")
    parser.add_argument("--scenario", choices=("all", "single", "cohort"), default="all")
    parser.add_argument("--nets", default=",".join(NETS), help="networks to run, e.g. identity")
    parser.add_argument("--cohort", type=int, default=6, help="volumes of the cohort scenario (identity network)")
    parser.add_argument("--cohort-conv", type=int, default=2, help="volumes of the cohort scenario (conv network)")
    parser.add_argument("--child", nargs=3, metavar=("LIBRARY", "MODE", "NET"), help=argparse.SUPPRESS)
    parser.add_argument("--cohort-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    size, patch, overlap, batch = (24, 12, 4, 4) if args.quick else (192, 64, 32, 4)
    if args.child:
        print(peak_extra_mib(*args.child, size, patch, overlap, batch, args.device))
        return 0
    if args.cohort_child:
        library, mode, net, count, size = args.cohort_child
        print(json.dumps(cohort_child(library, mode, net, int(count), int(size), patch, overlap, batch)))
        return 0
    args.repeats = 1 if args.quick else args.repeats
    print_header(args, size, patch, overlap, batch)
    if args.scenario in ("all", "cohort"):
        print_cohort(args, size, patch, overlap, batch)
    if args.scenario in ("all", "single"):
        print_single(args, size, patch, overlap, batch)
    return 0


def print_header(args: argparse.Namespace, size: int, patch: int, overlap: int, batch: int) -> None:
    """The machine and settings line."""
    print(
        f"# grid inference: 1x{size}^3, {patch}^3 patches, overlap {overlap}, batch {batch}; "
        f"{args.repeats} repeats; torch {torch.__version__}, MONAI {monai.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.machine()}, device {args.device}"
    )
    if not HAS_TORCHIO:
        print("# TorchIO is not installed (pip install torchio): its rows are skipped.")


def print_single(args: argparse.Namespace, size: int, patch: int, overlap: int, batch: int) -> None:
    """The single-shape table: one volume called again and again (steady state), with the memory column."""
    repeats = args.repeats
    print()
    print("# single shape: one volume, called again and again, each output dropped")
    out_mib = 2 * size**3 * 4 / 2**20
    batch_mib = batch * 3 * patch**3 * 4 / 2**20
    print(
        f"# extra peak: peak {'CUDA memory allocated' if 'cuda' in args.device else 'RSS'} minus the same before "
        f"the run, after a warm-up (1-channel input; output alone: "
        f"{out_mib:.1f} MiB; one batch of patches, network input + output: {batch_mib:.1f} MiB)"
    )
    print("# ratios: median over rounds of the anchor's time over ours in the same round")
    print("# outside the network: the run's time minus the time spent inside the network's calls (median)")
    print()
    print(
        "| network | method | mode | median (s) | MONAI / ours | TorchIO / ours | outside the network (s) | "
        "extra peak (MiB) | minus output |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for net in args.nets.split(","):
        methods = [(lib, mode) for lib, mode in METHODS if lib != "torchio" or HAS_TORCHIO]
        if net == "identity":
            methods.insert(3, FLOOR)
        runners = {key: build(*key, net, size, patch, overlap, batch, args.device) for key in methods}
        rounds, outside = time_interleaved(runners, repeats, args.device)
        del runners
        memory = {key: float("nan") if args.quick else in_child(*key, net, args.device) for key in methods}
        pairs = {"hann": ("gaussian", "hann"), "average": ("constant", "average"), "crop": ("constant", "average")}
        for library, mode in methods:
            median, ratio_monai, ratio_tio = statistics.median(rounds[library, mode]), "", ""
            if library in ("GridInferer", FLOOR[0]):
                m, t = pairs[mode]
                ratio_monai = f"{paired_ratio(rounds['SlidingWindowInferer', m], rounds[library, mode]):.2f}x"
                if ("torchio", t) in rounds:
                    ratio_tio = f"{paired_ratio(rounds['torchio', t], rounds[library, mode]):.2f}x"
            extra = memory[library, mode]
            print(
                f"| {net} | {library} | {mode} | {median:.3f} | {ratio_monai} | {ratio_tio} | "
                f"{statistics.median(outside[library, mode]):.3f} | {extra:.0f} | {extra - out_mib:.0f} |"
            )


if __name__ == "__main__":
    sys.exit(main())
