"""CSV outputs that survive a kill: appended batch by batch, read back without a torn last
row, rewritten atomically, and split into per-rank part files when sharded."""

from __future__ import annotations

import csv
import glob
import os
from pathlib import Path


def part_path(path: Path, rank: int, world: int) -> Path:
    """Rank `rank`'s part of `path` in a job of `world` ranks."""
    return path.with_name(f"{path.name}.part-{rank:05d}-of-{world:05d}")


def parts_of(path: Path) -> list[Path]:
    """Every rank's part file of `path` on disk, whatever the number of ranks that wrote it."""
    return sorted(path.parent.glob(f"{glob.escape(path.name)}.part-*-of-*"))


def complete_rows(path: Path, header: list[str] | None) -> list[list[str]]:
    """The complete data rows of a CSV written batch by batch (a last line torn by a kill is
    dropped; [] when the file does not exist). With `header`, the file must have it: a file
    of another job raises ValueError naming it."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]
    rows = list(csv.reader(lines))
    if header is not None and rows and rows[0] != header:
        raise ValueError(f"{path} has columns {rows[0][:4]}…, not this job's {header[:4]}…: "
                         "resuming needs the same columns in the same order")  # fmt: skip
    width = len(rows[0]) if rows else 0
    return [r for r in rows[1:] if len(r) == width]


def rewrite_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    """Write `path` whole through a temporary file and a rename: complete or not at all."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there when the write or the rename failed
