"""Sharding one volume's grid over a ``torch.distributed`` process group.

Each rank runs the network on a contiguous, balanced share of the patches to run and accumulates them into its own
zero accumulator; the un-normalised accumulators are then summed with one collective (``all_reduce``, or ``reduce``
to ``dst``), and normalised. Summing is exact for the blending modes (the sum of weighted sums) and for ``crop``
(ownership is exclusive: every voxel is written by exactly one rank, zero elsewhere).

Every collective runs asynchronously and is waited on, so it raises after the process group's timeout instead of
hanging: initialise the group with one (``torch.distributed.init_process_group(..., timeout=timedelta(...))``).
Before any network call the ranks compare what they were given (input shape, patches to run), and before the
reduction the accumulators' shapes and dtypes, so a mismatch is a ``ValueError`` on every rank, never a hang.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "check_same_on_ranks",
    "collective_device",
    "gather_rows",
    "receives_rows",
    "reduce_sum_",
    "resolve_group",
    "share",
]

_WIDTH = 16  # entries of the fixed-size vectors the ranks compare


def resolve_group(distributed: bool, process_group: Any, who: str = "GridInferer") -> Any | None:
    """The process group to shard over, or ``None`` when running in one process.

    Raises:
        RuntimeError: sharding asked for without an initialised default process group.
    """
    if process_group is None and not distributed:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{who}: distributed=True (or a process_group) needs torch.distributed initialised first, e.g. "
            "torch.distributed.init_process_group('gloo' or 'nccl', timeout=datetime.timedelta(seconds=120)) "
            "(torchrun sets the environment it reads)."
        )
    return process_group if process_group is not None else dist.group.WORLD


def share(n: int, rank: int, world: int) -> slice:
    """The contiguous, balanced share ``[rank n / world, (rank + 1) n / world)`` of ``n`` items."""
    return slice(rank * n // world, (rank + 1) * n // world)


def collective_device(group: Any) -> torch.device:
    """Where the group's collectives take tensors (the current CUDA device for NCCL, else the CPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_same_on_ranks(group: Any, values: Sequence[int], what: str, who: str) -> None:
    """Raise on every rank unless every rank of ``group`` passes the same ``values`` (at most 15 ints).

    Args:
        group: the process group.
        values: what must agree (e.g. the input's shape).
        what: a description of ``values`` for the message.
        who: the public class named in the message.

    Raises:
        ValueError: ranks disagree, naming each rank's values.
        RuntimeError: the collective timed out (a rank never got there).
    """
    vector = torch.full((_WIDTH,), -1, dtype=torch.int64)
    vector[0] = len(values)
    vector[1 : 1 + len(values)] = torch.as_tensor(list(values), dtype=torch.int64)
    vector = vector.to(collective_device(group))
    gathered = [torch.empty_like(vector) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, vector, group=group, async_op=True).wait()
    rows = [g.cpu().tolist() for g in gathered]
    if any(row != rows[0] for row in rows):
        seen = {rank: row[1 : 1 + row[0]] for rank, row in enumerate(rows)}
        raise ValueError(f"{who}: the ranks of the process group disagree on {what}: {seen} (rank: values).")


def reduce_sum_(tensor: torch.Tensor, group: Any, dst: int | None) -> None:
    """Sum ``tensor`` over the ranks of ``group`` in place: on every rank (``dst=None``) or on rank ``dst`` only.

    Booleans (``crop`` mode of a boolean network) are summed as ``uint8``. Allocates a copy only for booleans.

    Raises:
        RuntimeError: the collective failed or timed out.
    """
    work_tensor = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor
    if dst is None:
        dist.all_reduce(work_tensor, op=dist.ReduceOp.SUM, group=group, async_op=True).wait()
    else:
        dist.reduce(work_tensor, dst=dst, op=dist.ReduceOp.SUM, group=group, async_op=True).wait()
    if work_tensor is not tensor:
        tensor.copy_(work_tensor != 0)


def receives_rows(group: Any, dst: int | None) -> bool:
    """Whether this rank gets the gathered volume: every rank (``dst=None``), or the global rank ``dst`` only."""
    return dst is None or dist.get_rank() == dst


def gather_rows(volume: torch.Tensor, n_rows: int, group: Any, dst: int | None) -> torch.Tensor | None:
    """Fill in the other ranks' rows of a ``(B, C, n_rows, ...)`` volume split along the first spatial axis (dim 2),
    rank ``k`` of ``group`` holding rows ``share(n_rows, k, world)``.

    On a rank that receives (:func:`receives_rows`), ``volume`` is the whole volume with this rank's rows already in
    place: the others' rows are written into it and it is returned. On the other ranks ``volume`` holds this rank's
    rows only; they are sent and ``None`` is returned. One transfer per rank's rows (a broadcast from each rank, or,
    with ``dst``, a send to ``dst``), so nothing of the volume's size is allocated: a transfer goes through a
    staging buffer of one part (the most one rank has) only where the rows are not one contiguous block on the
    collective's device (``B * C > 1``, or a volume off that device) or are booleans (sent as bytes).

    Raises:
        RuntimeError: the collective failed or timed out.
    """
    world, me = dist.get_world_size(group), dist.get_rank(group)
    receiving = receives_rows(group, dst)
    for k in range(world):
        src = dist.get_global_rank(group, k)
        if (k != me and not receiving) or src == dst:
            continue  # a sender takes no part in another sender's transfer to dst; dst's own rows are in place
        part = volume[:, :, share(n_rows, k, world)] if receiving else volume
        _transfer(part, k == me, src, group, dst)
    return volume if receiving else None


def _transfer(part: torch.Tensor, mine: bool, src: int, group: Any, dst: int | None) -> None:
    """Send ``part`` from global rank ``src`` (``mine``: this rank is ``src``) to every rank (``dst=None``, a
    broadcast) or to ``dst``, received in place. Stages through a contiguous copy on the collective's device when
    ``part`` is not one (see :func:`gather_rows`)."""
    device = collective_device(group)
    direct = part.is_contiguous() and part.device == device and part.dtype != torch.bool
    dtype = torch.uint8 if part.dtype == torch.bool else part.dtype
    if direct:
        buffer = part
    elif mine:
        buffer = part.to(device, dtype, copy=True, memory_format=torch.contiguous_format)
    else:
        buffer = torch.empty(part.shape, dtype=dtype, device=device)
    if dst is None:
        dist.broadcast(buffer, src=src, group=group, async_op=True).wait()
    elif mine:
        dist.isend(buffer, dst=dst, group=group).wait()
    else:
        dist.irecv(buffer, src=src, group=group).wait()
    if not mine and not direct:
        part.copy_(buffer if part.dtype != torch.bool else buffer != 0)
