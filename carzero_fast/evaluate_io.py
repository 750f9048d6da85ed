"""Reading `carzero-fast evaluate`'s two CSV files into arrays (see `carzero_fast.evaluate`).

Each file is streamed once: a row's cells are parsed as it is read and appended to a flat
`array` (float64 scores, int8 labels), so nothing per cell is kept as a Python object; what
is kept per row is its id (a dict from id to row index or line number) and a line number.
Any readable path that is not a folder works (pipes and `/dev/fd/N` included); `-` reads
standard input (for one of the two files).
"""

from __future__ import annotations

import csv
import io
import itertools
import operator
import os
import re
import sys
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import IO

import numpy as np

STDIN = "-"
UNKNOWN = -1
EXAMPLES = 3  # ids shown per file when the two files share none

# label cells in their usual spellings; anything else goes through `_label_cell`
_LABELS = {"1": 1, "0": 0, "-1": UNKNOWN, "": UNKNOWN, "1.0": 1, "0.0": 0, "-1.0": UNKNOWN}
# strict number syntax (ASCII digits, no `_`): what `float` reads of an ASCII cell without `_`
_NUMBER = re.compile(r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)",
                     re.IGNORECASE)  # fmt: skip


@dataclass
class Data:
    """The evaluated images: ids in scores-file order, scores (N, C) float64, labels (N, C)
    int8 in {1, 0, UNKNOWN}."""

    classes: list[str]
    ids: list[str]
    scores: np.ndarray
    labels: np.ndarray


class _Csv:
    """One open CSV file: its name for messages, its stripped header, and its records."""

    def __init__(self, f: IO[str], name: str, what: str) -> None:
        self.name = name
        self.what = what
        self.file = f
        self.reader = csv.reader(f)
        first = next(self.records(), None)
        if first is None:
            raise ValueError(f"{what} file {name} is empty (expected a header row)")
        self.header = [c.strip() for c in first[1]]
        self.classes = self.header[1:]
        if not self.classes:
            raise ValueError(f"{what} file {name} has no class columns after its id column")
        if "" in self.classes:
            raise ValueError(f"{what} file {name} has an empty class name in its header")

    def records(self) -> Iterator[tuple[int, list[str]]]:
        """(line number where the record ends, its raw cells); blank records are skipped."""
        reader = self.reader
        try:
            for row in reader:
                if any(row):
                    yield reader.line_num, row
        except UnicodeDecodeError as e:  # decoded by blocks: the bad byte is further on
            line = _bad_utf8_line(self.file)
            where = (f"line {line}" if line is not None
                     else f"a line after its first {reader.line_num}")  # a pipe: not read again
            raise ValueError(
                f"{self.what} file {self.name} is not UTF-8 text at {where} ({e.reason}, byte "
                f"{e.object[e.start:e.end]!r})"
            ) from None
        except csv.Error as e:  # a field over csv's size limit, a NUL in older Pythons...
            raise ValueError(f"{self.where(reader.line_num)}: {e}") from None
        except OSError as e:
            raise ValueError(
                f"cannot read {self.what} file {self.name} after its first "
                f"{reader.line_num} line(s): {e.strerror or e}"
            ) from None

    def where(self, line: int, column: str | None = None) -> str:
        """`scores file X, line N[, column 'c']` for messages."""
        at = f"{self.what} file {self.name}, line {line}"
        return at if column is None else f"{at}, column {column!r}"

    def row_id(self, line: int, row: list[str]) -> str:
        """The stripped id of a record, after checking its cell count."""
        if len(row) != len(self.header):
            raise ValueError(
                f"{self.where(line)}: {len(row)} cells, the header has {len(self.header)}"
            )
        image = row[0].strip()
        if not image:
            raise ValueError(f"{self.where(line)}: empty id in column {self.header[0]!r}")
        return image

    def duplicate(self, image: str, first: int, line: int) -> ValueError:
        """The error for `image` seen on line `first` and again on `line`."""
        return ValueError(
            f"{self.what} file {self.name}: duplicate id {image!r} on lines {first} and {line}"
        )


def _bad_utf8_line(f: IO[str]) -> int | None:
    """The number of the first line of `f`'s file that is not UTF-8, read again from its
    start as bytes (a UTF-8 character never holds a newline byte, so lines decode apart);
    None where the file cannot be read again (a pipe, standard input)."""
    raw = getattr(f, "buffer", None)
    try:
        if raw is None or not raw.seekable():
            return None
        raw.seek(0)
        for number, line in enumerate(raw, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    except OSError:
        return None
    return None


@contextmanager
def _opened(path: str | os.PathLike, what: str) -> Iterator[tuple[IO[str], str]]:
    """A text handle on `path` (UTF-8, a BOM skipped, newlines left to csv) and its name;
    opening errors become a one-line ValueError."""
    name = os.fspath(path)
    if name == STDIN:
        f = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig", newline="")
        try:
            yield f, "<stdin>"
        finally:
            f.detach()  # leave sys.stdin open
        return
    try:
        f = open(name, encoding="utf-8-sig", newline="")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        raise ValueError(f"{what} file {name} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{what} file {name} is a folder, not a file") from None
    except (OSError, ValueError) as e:  # permissions, a name too long, a NUL in the name...
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ValueError(f"cannot open {what} file {name}: {reason}") from None
    with f:
        yield f, name


def _score_cell(src: _Csv, cell: str, line: int, column: str) -> float:
    """One score cell, strictly: a number in ASCII without `_`, not NaN (inf is allowed)."""
    text = cell.strip()
    if _NUMBER.fullmatch(text) is None or (value := float(text)) != value:
        raise ValueError(f"{src.where(line, column)}: {cell!r} is not a number")
    return value


def _label_cell(src: _Csv, cell: str, line: int, column: str) -> int:
    """One label cell: 1, 0, or UNKNOWN for -1 or empty (numbers such as `1.0` accepted)."""
    text = cell.strip()
    if text in _LABELS:
        return _LABELS[text]
    if _NUMBER.fullmatch(text) is not None and (value := float(text)) in (1.0, 0.0, -1.0):
        return int(value)
    raise ValueError(
        f"{src.where(line, column)}: {cell!r} is not a label (expected 1, 0, -1 or empty)"
    )


def _read_scores(src: _Csv) -> tuple[dict[str, int], np.ndarray]:
    """Every score row: id → row index (file order) and the (rows, classes) float64 array."""
    index: dict[str, int] = {}
    lines = array("q")  # line of each row, for duplicate messages
    values = array("d")
    for line, row in src.records():
        image = src.row_id(line, row)
        if image in index:
            raise src.duplicate(image, lines[index[image]], line)
        cells = row[1:]
        try:
            parsed = list(map(float, cells))
            text = "".join(cells)
            total = sum(parsed)  # NaN if a cell is NaN (or cells add up inf and -inf)
            strict = text.isascii() and "_" not in text and total == total
        except ValueError:
            strict = False
        if not strict:  # find and name the bad cell (or accept an inf + -inf row)
            parsed = [
                _score_cell(src, cell, line, name)
                for cell, name in zip(cells, src.classes, strict=True)
            ]
        index[image] = len(lines)
        lines.append(line)
        values.extend(parsed)
    scores = np.frombuffer(values, dtype=np.float64) if values else np.empty(0)
    return index, scores.reshape(len(index), len(src.classes))


def _column_getter(columns: list[int]) -> Callable[[list[str]], list[str] | tuple[str, ...]]:
    """The cells at `columns` of a row (always a sequence, even for one column)."""
    if len(columns) == 1:
        (only,) = columns
        return lambda row: (row[only],)
    return operator.itemgetter(*columns)


def _read_labels(
    src: _Csv, classes: list[str], index: dict[str, int]
) -> tuple[dict[str, int], np.ndarray, np.ndarray]:
    """Every label row's id → line, and for the rows whose id is in `index` (the score rows)
    their score row indices and their (rows, classes) int8 labels of `classes`."""
    columns = [1 + src.classes.index(c) for c in classes]  # not the id column, whatever its name
    pick = _column_getter(columns)
    get = _LABELS.__getitem__
    seen: dict[str, int] = {}
    targets = array("q")
    values = array("b")
    for line, row in src.records():
        image = src.row_id(line, row)
        if image in seen:
            raise src.duplicate(image, seen[image], line)
        seen[image] = line
        target = index.get(image)
        if target is None:
            continue  # no scores: its labels are not used, nor checked
        cells = pick(row)
        try:
            parsed = list(map(get, cells))
        except KeyError:
            parsed = [
                _label_cell(src, cell, line, name)
                for cell, name in zip(cells, classes, strict=True)
            ]
        targets.append(target)
        values.extend(parsed)
    labels = np.frombuffer(values, dtype=np.int8) if values else np.empty(0, np.int8)
    return seen, np.frombuffer(targets, dtype=np.int64), labels.reshape(len(targets), len(classes))


def _examples(ids: dict[str, int]) -> str:
    """The first few ids of a file, for the no-shared-id message."""
    return ", ".join(repr(i) for i in itertools.islice(ids, EXAMPLES))


def load(
    scores_path: str | os.PathLike,
    labels_path: str | os.PathLike,
    warn: Callable[[str], None],
) -> Data:
    """Read, match and check both files (every score row; the label rows that have scores, in
    the columns the scores use). Raises ValueError naming the file, line and column."""
    if os.fspath(scores_path) == STDIN and os.fspath(labels_path) == STDIN:
        raise ValueError("only one of the scores and labels files can be - (standard input)")
    with ExitStack() as stack:
        scores_src = _Csv(*stack.enter_context(_opened(scores_path, "scores")), "scores")
        labels_src = _Csv(*stack.enter_context(_opened(labels_path, "labels")), "labels")
        classes = scores_src.classes
        repeated = sorted(c for c, n in Counter(classes).items() if n > 1)
        if repeated:
            raise ValueError(f"scores file {scores_src.name} repeats class column(s): "
                             + ", ".join(repeated))  # fmt: skip
        missing = [c for c in classes if c not in labels_src.classes]
        if missing:
            raise ValueError(
                f"labels file {labels_src.name} lacks {len(missing)} class(es) of the scores "
                "file: " + ", ".join(repr(c) for c in missing)
            )
        counts = Counter(labels_src.classes)
        repeated = [c for c in classes if counts[c] > 1]
        if repeated:
            raise ValueError(f"labels file {labels_src.name} repeats evaluated class column(s): "
                             + ", ".join(repeated))  # fmt: skip
        index, scores = _read_scores(scores_src)
        if not index:
            raise ValueError(f"scores file {scores_src.name} has a header but no rows")
        label_ids, targets, labels = _read_labels(labels_src, classes, index)
        if not label_ids:
            raise ValueError(f"labels file {labels_src.name} has a header but no rows")
    if not len(targets):
        raise ValueError(
            f"no image id of the scores file ({len(index)} rows, e.g. {_examples(index)}) is in "
            f"the labels file ({len(label_ids)} rows, e.g. {_examples(label_ids)})"
        )
    only_scores = len(index) - len(targets)
    only_labels = len(label_ids) - len(targets)
    if only_scores or only_labels:
        warn(
            f"evaluating the {len(targets)} images in both files; {only_scores} score row(s) "
            f"have no labels and {only_labels} label row(s) have no scores"
        )
    matched = np.zeros(len(index), dtype=bool)
    matched[targets] = True
    label_rows = np.empty((len(index), len(classes)), dtype=np.int8)
    label_rows[targets] = labels
    del labels
    if not only_scores:
        return Data(classes, list(index), scores, label_rows)
    ids = list(itertools.compress(index, matched.tolist()))
    return Data(classes, ids, scores[matched], label_rows[matched])
