"""``python -m monai_patchplug.prepare datalist.json out/``: prepare a MONAI datalist's cases for patch reads.

Converts every case of the datalist's sections (``training``, ``validation``, ... : each a list of dicts of file
names) with :class:`~monai_patchplug.PatchStore` and writes ``out/datalist.json``, the same datalist with the
converted keys pointing at the store's zarr arrays (absolute paths), for :class:`~monai_patchplug.LoadLazyd`.
Idempotent: a second run skips the cases already prepared; a killed run resumes with the case it was writing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .store import PatchStore

__all__ = ["main", "prepare_datalist"]

_IMAGE_SUFFIXES = (".nii", ".nii.gz", ".npy", ".img", ".img.gz")


def _resolve(item: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative file names resolved against the datalist's folder (as ``load_decathlon_datalist`` does)."""
    return {
        k: str(base / v) if isinstance(v, str) and v.lower().endswith(_IMAGE_SUFFIXES) and not os.path.isabs(v) else v
        for k, v in item.items()
    }


def prepare_datalist(
    datalist: str | os.PathLike,
    out: str | os.PathLike,
    keys: Sequence[str] | None = None,
    label_key: str | None = "label",
    **store_kwargs: Any,
) -> Path:
    """Prepare every case of a MONAI-style datalist JSON into ``out`` and write ``out/datalist.json``.

    Args:
        datalist: the JSON file (sections mapping to lists of dicts; relative paths are relative to its folder).
        out: the store folder.
        keys: keys to convert; ``None``: every key of the first item whose value is an image file name.
        label_key: the label map's key, indexed if present among ``keys`` (``None``: no index).
        store_kwargs: :class:`~monai_patchplug.PatchStore` options (``chunks``, ``clevel``, ``workers``, ``progress``,
            ``max_runs_per_label``).

    Returns:
        The path of the datalist written. Reads each case whole, one per worker at a time.

    Raises:
        ValueError: a datalist without a list of dict items.
        RuntimeError: cases that failed, each named (see :class:`~monai_patchplug.PatchStore`).
    """
    path = Path(datalist)
    content = json.loads(path.read_text())
    sections = {k: v for k, v in content.items() if isinstance(v, list) and v and all(isinstance(i, dict) for i in v)}
    if not sections:
        raise ValueError(f"prepare: {str(path)!r} holds no section that is a list of dicts of file names.")
    base = path.parent.resolve()
    resolved = {name: [_resolve(item, base) for item in items] for name, items in sections.items()}
    if keys is None:
        first = next(iter(resolved.values()))[0]
        keys = [k for k, v in first.items() if isinstance(v, str) and v.lower().endswith(_IMAGE_SUFFIXES)]
    label = label_key if label_key in keys else None
    store = PatchStore(out, **store_kwargs)
    written = dict(content)
    for name, items in resolved.items():
        written[name] = store(items, keys=keys, label_key=label)
    target = Path(out) / "datalist.json"
    target.write_text(json.dumps(written, indent=1))
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (1 when cases failed, their names printed)."""
    parser = argparse.ArgumentParser(prog="python -m monai_patchplug.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("datalist", help="MONAI-style datalist JSON")
    parser.add_argument("out", help="store folder")
    parser.add_argument("--keys", nargs="+", default=None, help="keys to convert (default: every image file key)")
    parser.add_argument("--label-key", default="label", help="the label map's key, indexed (default: label)")
    parser.add_argument("--chunks", type=int, default=32, help="chunk edge in voxels (default 32)")
    parser.add_argument("--codec", choices=["lz4", "zstd"], default="lz4", help="Blosc compressor (default lz4)")
    parser.add_argument("--workers", type=int, default=None, help="parallel processes (default: all cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--max-runs-per-label", type=int, default=None,
        help="keep at most this many runs per label in the label index, a seeded random subset (an approximation, "
        "as nnU-Net's cap; default: all, the exact index)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        target = prepare_datalist(
            args.datalist, args.out, args.keys, args.label_key,
            chunks=args.chunks, codec=args.codec, workers=args.workers, progress=not args.no_progress,
            max_runs_per_label=args.max_runs_per_label,
        )  # fmt: skip
    except (RuntimeError, ValueError, OSError) as error:
        print(error, file=sys.stderr)
        return 1
    print(f"prepared datalist: {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
