"""CSV outputs that survive a kill: appended batch by batch, read back without a torn last
row, rewritten atomically, split into per-rank part files when sharded, and described by a
run file (`OUT.run.json`: what the scores depend on, which a resume must match)."""

from __future__ import annotations

import csv
import glob
import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path


def part_path(path: Path, rank: int, world: int) -> Path:
    """Rank `rank`'s part of `path` in a job of `world` ranks."""
    return path.with_name(f"{path.name}.part-{rank:05d}-of-{world:05d}")


def parts_of(path: Path) -> list[Path]:
    """Every rank's part file of `path` on disk, whatever the number of ranks that wrote it."""
    return sorted(path.parent.glob(f"{glob.escape(path.name)}.part-*-of-*"))


def iter_complete_rows(path: Path, header: list[str] | None) -> Iterator[list[str]]:
    """The complete data rows of a CSV written batch by batch, streamed (nothing is held but
    one row): a last row torn by a kill is dropped, also one torn inside a quoted cell;
    nothing when the file does not exist. Rows are parsed as CSV, not split at line breaks,
    so a cell may hold any character. With `header`, the file must have it: a file of
    another job raises ValueError naming it."""
    if not path.exists():
        return
    with open(path, "rb") as f:
        torn = False
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"  # every write ends its rows with a line end
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, strict=True)
        try:
            first = next(reader, None)
        except csv.Error:
            return  # torn inside the header's own write
        if first is None:
            return
        if header is not None and first != header:
            raise ValueError(f"{path} has columns {first[:4]}…, not this job's {header[:4]}…: "
                             "resuming needs the same columns in the same order")  # fmt: skip
        pending = None  # the last row read: complete unless it ends the file torn
        try:
            for row in reader:
                if pending is not None and len(pending) == len(first):
                    yield pending
                pending = row
        except csv.Error:  # a kill inside a quoted cell: the row being read is torn
            torn = False  # ... and `pending`, the row before it, complete
        if pending is not None and len(pending) == len(first) and not torn:
            yield pending


def row_text(row: list[str]) -> str:
    """One row as the CSV writer writes it (line end included): rows held as text cost a
    fraction of their parsed cells' memory."""
    buf = io.StringIO()
    csv.writer(buf).writerow(row)
    return buf.getvalue()


def rewrite_csv(path: Path, header: list[str], rows: Iterable[list[str] | str]) -> None:
    """Write `path` whole through a temporary file and a rename: complete or not at all.
    Rows are cell lists or `row_text` lines."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            for row in rows:
                if isinstance(row, str):
                    f.write(row)
                else:
                    w.writerow(row)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there when the write or the rename failed


def run_file(out: Path) -> Path:
    """Where `out`'s run file is: what its scores depend on beyond rounding."""
    return out.with_name(f"{out.name}.run.json")


def write_json(path: Path, value: dict) -> None:
    """`value` as JSON at `path`, atomically (temporary file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def changed_since(out: Path, identity: dict) -> list[str]:
    """The keys of `identity` whose values differ from those in `out`'s run file (none when
    it has no run file); ValueError naming the file when it cannot be read."""
    path = run_file(out)
    if not path.exists():
        return []
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read ({e}): remove it and the part files to start "
                         "over") from None  # fmt: skip
    if not isinstance(before, dict):
        raise ValueError(f"{path} is not a run file: remove it and the part files to start over")
    # through JSON, so that a tuple equals the list it was written as
    return [k for k in identity if before.get(k) != json.loads(json.dumps(identity[k]))]
