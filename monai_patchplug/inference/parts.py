"""Parts: block-wise inference that any engine can run, and markers that let a killed job resume.

``part=(k, n)`` splits the output's first spatial axis into ``n`` balanced, contiguous row ranges; part ``k`` runs
every patch whose output reaches its rows (a patch on a boundary runs in both neighbours), blends them exactly as a
single run would, and writes only its rows. Parts need no communication, so torchrun ranks, Dask tasks or a batch
queue's array jobs can run them in any order or at once into one store.

``resume=PATH`` records each finished slab of output rows as a small JSON marker under ``PATH``, written (atomically:
a temporary file, then a rename) only after the slab is in the output; a rerun with the same settings skips the
slabs marked and runs only the patches the others need. ``PATH/settings.json`` names the settings and shapes the
markers belong to, so a rerun with other settings or shapes is refused instead of mixing results. Markers are data
(JSON), never code.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np

from .distributed import share

__all__ = ["Markers", "check_part", "part_rows", "remaining_rows"]


def check_part(part: Any, who: str) -> tuple[int, int] | None:
    """``part`` as ``(k, n)`` with ``0 <= k < n`` (``None`` stays ``None``).

    Raises:
        TypeError: not a pair of ints.
        ValueError: ``n < 1`` or ``k`` outside ``[0, n)``.
    """
    if part is None:
        return None
    if (
        not isinstance(part, Sequence)
        or len(part) != 2
        or any(isinstance(v, bool | np.bool_) or not isinstance(v, Integral) for v in part)
    ):
        raise TypeError(f"{who}: part must be a pair of ints (k, n), got {part!r}.")
    k, n = int(part[0]), int(part[1])
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"{who}: part {part!r} must satisfy 0 <= k < n.")
    return k, n


def part_rows(n_rows: int, part: tuple[int, int] | None) -> tuple[int, int]:
    """The ``[a, b)`` output rows of ``part`` (all rows for ``None``): balanced and contiguous."""
    if part is None:
        return 0, n_rows
    rows = share(n_rows, *part)
    return rows.start, rows.stop


def remaining_rows(rows: tuple[int, int], done: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The intervals of ``rows`` that no interval of ``done`` covers."""
    left = [rows]
    for a, b in sorted(done):
        left = [piece for lo, hi in left for piece in ((lo, min(hi, a)), (max(lo, b), hi)) if piece[0] < piece[1]]
    return left


class Markers:
    """The completion markers of one job under ``path`` (a directory, created if missing).

    Args:
        path: the directory.
        settings: what the markers belong to (JSON-serialisable: shapes, dtypes, grid and blending settings).
        who: the public class named in error messages.

    Raises:
        ValueError: ``path`` holds markers of other settings or shapes.
    """

    def __init__(self, path: str | os.PathLike, settings: dict, who: str) -> None:
        self.path, self.who = Path(path), who
        self.path.mkdir(parents=True, exist_ok=True)
        recorded = self.path / "settings.json"
        text = json.dumps(settings, sort_keys=True)
        if recorded.exists():
            previous = json.loads(recorded.read_text())
            if previous != json.loads(text):
                changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
                raise ValueError(
                    f"{who}: resume={str(path)!r} holds markers of another job (differs in {', '.join(changed)}); "
                    "use a new resume path or remove the old markers."
                )
        else:
            self._write(recorded, text)

    def done(self, item: int) -> list[tuple[int, int]]:
        """The ``[a, b)`` output rows of batch item ``item`` marked finished."""
        rows = []
        for marker in self.path.glob(f"item{item}_rows*.json"):
            record = json.loads(marker.read_text())
            rows.append((int(record["rows"][0]), int(record["rows"][1])))
        return rows

    def mark(self, item: int, a: int, b: int) -> None:
        """Record output rows ``[a, b)`` of ``item`` as finished (call once they are in the output)."""
        self._write(self.path / f"item{item}_rows{a}-{b}.json", json.dumps({"item": item, "rows": [a, b]}))

    @staticmethod
    def _write(target: Path, text: str) -> None:
        """Write ``text`` to ``target`` atomically: a temporary file in the same directory, then a rename."""
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(handle, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
