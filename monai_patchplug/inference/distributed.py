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

__all__ = ["check_same_on_ranks", "collective_device", "gather_rows", "reduce_sum_", "resolve_group", "share"]

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


def gather_rows(rows: torch.Tensor, n_rows: int, group: Any, dst: int | None) -> torch.Tensor | None:
    """Join the ranks' parts of a ``(B, C, rows_k, ...)`` volume along the first spatial axis (dim 2), rank ``k``
    holding rows ``share(n_rows, k, world)``: on every rank (``dst=None``) or on rank ``dst`` only (the others get
    ``None``). Allocates the joined volume and one padded copy per rank of the largest part.

    Raises:
        RuntimeError: the collective failed or timed out.
    """
    world = dist.get_world_size(group)
    sizes = [len(range(n_rows)[share(n_rows, k, world)]) for k in range(world)]
    device = collective_device(group)
    padded = torch.zeros((*rows.shape[:2], max(sizes), *rows.shape[3:]), dtype=rows.dtype, device=device)
    padded[:, :, : rows.shape[2]] = rows
    if dst is None:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group, async_op=True).wait()
    else:
        parts = [torch.empty_like(padded) for _ in range(world)] if dist.get_rank() == dst else None
        dist.gather(padded, parts, dst=dst, group=group, async_op=True).wait()
        if parts is None:
            return None
    return torch.cat([part[:, :, :size] for part, size in zip(parts, sizes)], 2).to(rows.device)
