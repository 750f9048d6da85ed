"""`carzero-fast evaluate`: per-class AUROC / AUPRC of zero-shot scores against labels.

Two CSV files, each with a header row: the first column is the image id (whatever its header
cell says, e.g. `path` or `image`), every other column a class, matched by header name.

* scores: one real number per cell (logits or probabilities: the metrics only use ranks);
* labels: `1` positive, `0` negative, `-1` or an empty cell unknown (numbers such as `1.0`
  and `0.0` are accepted). Unknown labels are left out of that class only.

Rows are matched by id; images present in both files are evaluated (a warning on stderr
counts the rows found in only one). Every class of the scores file must be a column of the
labels file; label columns without scores are ignored.

Reported per class: AUROC (Mann–Whitney U with average ranks for ties, equal to
`sklearn.metrics.roc_auc_score`) and AUPRC (step-wise average precision over the distinct
thresholds, equal to `sklearn.metrics.average_precision_score`). A class needs at least one
known positive and one known negative; otherwise its metrics are null and it is left out of
every macro mean. CARZero's buckets split the classes by known positive count: tail ≤ 10
positives, head more positives than the 65th percentile of the per-class counts (numpy's
linear percentile, over all evaluated classes), medium the rest. A class that meets both the
tail and the head rule (possible when the percentile is below 10) is tail.

Bad input gives a clear message on stderr and exit code 2. Nothing is written except the
`--plot` image (through a temporary file and an atomic rename); plotting needs matplotlib.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["auroc", "average_precision", "bucket_of", "evaluate", "main", "roc_curve", "table"]

PROG = "carzero-fast evaluate"
TAIL_MAX_POSITIVES = 10
HEAD_PERCENTILE = 65.0
BUCKETS = ("head", "medium", "tail")
UNKNOWN = -1


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def _check_binary(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`y` as bool and `s` as float64, 1-D and of equal length, with both classes in `y`."""
    y = np.asarray(y)
    s = np.asarray(s, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} must be 1-D of equal length")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 or 1")
    if np.isnan(s).any():
        raise ValueError("scores must not be NaN")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise ValueError("need at least one positive and one negative label")
    return y, s


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks of `s`, ties sharing the mean of the ranks they span."""
    order = np.argsort(s, kind="stable")
    sorted_s = s[order]
    # start of each run of equal values in the sorted scores, and one past the end of the last
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    mean_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(s), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def auroc(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the ROC curve of scores `s` for 0/1 labels `y` (Mann–Whitney U over
    positives × negatives, a tie counting one half; equals sklearn's `roc_auc_score`)."""
    y, s = _check_binary(y, s)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    rank_sum = _average_ranks(s)[y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _threshold_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positive counts when predicting `s >= t`, for each distinct score `t`
    from the highest down."""
    order = np.argsort(-s, kind="stable")
    sorted_s = s[order]
    sorted_y = y[order]
    # last position of each run of equal scores: every tied item is predicted together
    last = np.flatnonzero(np.r_[sorted_s[1:] != sorted_s[:-1], True])
    tps = np.cumsum(sorted_y)[last].astype(np.float64)
    fps = (last + 1) - tps
    return tps, fps


def average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the precision–recall curve as a step function: the sum over the distinct
    thresholds of (recall gain) × precision (equals sklearn's `average_precision_score`)."""
    y, s = _check_binary(y, s)
    tps, fps = _threshold_counts(y, s)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at each distinct threshold, starting from (0, 0)."""
    y, s = _check_binary(y, s)
    tps, fps = _threshold_counts(y, s)
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]


# ---------------------------------------------------------------------------------------------
# Reading the CSV files
# ---------------------------------------------------------------------------------------------


@dataclass
class _Table:
    """One CSV file: the class names of its header and, per id, (line number, cells)."""

    path: Path
    classes: list[str]
    rows: dict[str, tuple[int, list[str]]]


def _read_table(path: Path, what: str) -> _Table:
    """Read a `what` (scores or labels) CSV: header check, one cell per column, unique ids."""
    if not path.is_file():
        raise ValueError(f"{what} file {path} does not exist or is not a file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            # (line number where the record ends, its stripped cells); blank lines are skipped
            numbered = [(reader.line_num, [c.strip() for c in r]) for r in reader if any(r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"cannot read {what} file {path}: {e}") from e
    if not numbered:
        raise ValueError(f"{what} file {path} is empty (expected a header row)")
    (_, header), body = numbered[0], numbered[1:]
    classes = header[1:]
    if not classes:
        raise ValueError(f"{what} file {path} has no class columns after its id column")
    if "" in classes:
        raise ValueError(f"{what} file {path} has an empty class name in its header")
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        raise ValueError(f"{what} file {path} repeats class column(s): {', '.join(repeated)}")
    rows: dict[str, tuple[int, list[str]]] = {}
    for line, cells in body:
        if len(cells) != len(header):
            raise ValueError(
                f"{what} file {path}, line {line}: {len(cells)} cells, the header has {len(header)}"
            )
        image = cells[0]
        if not image:
            raise ValueError(f"{what} file {path}, line {line}: empty id in column {header[0]!r}")
        if image in rows:
            raise ValueError(
                f"{what} file {path}: duplicate id {image!r} on lines {rows[image][0]} and {line}"
            )
        rows[image] = (line, cells)
    if not rows:
        raise ValueError(f"{what} file {path} has a header but no rows")
    return _Table(path, classes, rows)


def _parse_score(cell: str, src: _Table, line: int, column: str) -> float:
    """One score cell as a float (NaN and non-numbers rejected)."""
    try:
        value = float(cell)
    except ValueError:
        value = math.nan
    if math.isnan(value):
        raise ValueError(
            f"scores file {src.path}, line {line}, column {column!r}: {cell!r} is not a number"
        )
    return value


def _parse_label(cell: str, src: _Table, line: int, column: str) -> int:
    """One label cell as 1, 0 or UNKNOWN (-1 or empty)."""
    if cell == "":
        return UNKNOWN
    try:
        value = float(cell)
    except ValueError:
        value = math.nan
    if value not in (1.0, 0.0, -1.0):
        raise ValueError(
            f"labels file {src.path}, line {line}, column {column!r}: {cell!r} is not a "
            "label (expected 1, 0, -1 or empty)"
        )
    return int(value)


@dataclass
class _Data:
    """The evaluated images: ids in scores-file order, scores (N, C), labels (N, C) in
    {1, 0, UNKNOWN}."""

    classes: list[str]
    ids: list[str]
    scores: np.ndarray
    labels: np.ndarray


def _stderr_warning(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _load(
    scores_path: str | os.PathLike,
    labels_path: str | os.PathLike,
    warn: Callable[[str], None] | None = None,
) -> _Data:
    """Read, match and check both files (every score row, the label rows that are used)."""
    warn = _stderr_warning if warn is None else warn
    scores = _read_table(Path(scores_path), "scores")
    labels = _read_table(Path(labels_path), "labels")
    missing = [c for c in scores.classes if c not in labels.classes]
    if missing:
        raise ValueError(
            f"labels file {labels.path} lacks {len(missing)} class(es) of the scores file: "
            + ", ".join(repr(c) for c in missing)
        )
    ids = [i for i in scores.rows if i in labels.rows]
    if not ids:
        raise ValueError(
            f"no image id of the scores file ({len(scores.rows)} rows) is in the labels file "
            f"({len(labels.rows)} rows)"
        )
    only_scores = len(scores.rows) - len(ids)
    only_labels = len(labels.rows) - len(ids)
    if only_scores or only_labels:
        warn(
            f"evaluating the {len(ids)} images in both files; {only_scores} score row(s) have "
            f"no labels and {only_labels} label row(s) have no scores"
        )
    parsed: dict[str, list[float]] = {}  # every score row is checked, matched or not
    for image, (line, cells) in scores.rows.items():
        parsed[image] = [
            _parse_score(cell, scores, line, name)
            for cell, name in zip(cells[1:], scores.classes, strict=True)
        ]
    score_values = np.array([parsed[image] for image in ids], dtype=np.float64)
    label_columns = [labels.classes.index(c) + 1 for c in scores.classes]
    label_values = np.empty((len(ids), len(scores.classes)), dtype=np.int8)
    for i, image in enumerate(ids):
        line, cells = labels.rows[image]
        for j, (name, col) in enumerate(zip(scores.classes, label_columns, strict=True)):
            label_values[i, j] = _parse_label(cells[col], labels, line, name)
    return _Data(scores.classes, ids, score_values, label_values)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def _macro(values: list[float | None]) -> float | None:
    """Mean of the non-null values, null when there are none."""
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def bucket_of(positives: dict[str, int]) -> dict[str, str]:
    """CARZero's head / medium / tail bucket of each class from its positive count."""
    if not positives:
        return {}
    cut = float(
        np.percentile(np.array(list(positives.values()), dtype=np.float64), HEAD_PERCENTILE)
    )
    out = {}
    for name, n in positives.items():
        if n <= TAIL_MAX_POSITIVES:
            out[name] = "tail"
        elif n > cut:
            out[name] = "head"
        else:
            out[name] = "medium"
    return out


def _metrics(data: _Data) -> dict:
    """The report (see `evaluate`) of loaded data."""
    auroc_by: dict[str, float | None] = {}
    auprc_by: dict[str, float | None] = {}
    positives: dict[str, int] = {}
    negatives: dict[str, int] = {}
    for j, name in enumerate(data.classes):
        known = data.labels[:, j] != UNKNOWN
        y = data.labels[known, j]
        s = data.scores[known, j]
        positives[name] = int((y == 1).sum())
        negatives[name] = int((y == 0).sum())
        if positives[name] and negatives[name]:
            auroc_by[name] = auroc(y, s)
            auprc_by[name] = average_precision(y, s)
        else:
            auroc_by[name] = auprc_by[name] = None
    bucket = bucket_of(positives)
    buckets = {}
    for b in BUCKETS:
        members = [c for c in data.classes if bucket[c] == b]
        buckets[b] = {
            "classes": members,
            "macro_auroc": _macro([auroc_by[c] for c in members]),
            "macro_auprc": _macro([auprc_by[c] for c in members]),
        }
    return {
        "auroc": auroc_by,
        "macro_auroc": _macro(list(auroc_by.values())),
        "auprc": auprc_by,
        "macro_auprc": _macro(list(auprc_by.values())),
        "buckets": buckets,
        "n_images": len(data.ids),
        "positives": positives,
        "negatives": negatives,
    }


def evaluate(
    scores_path: str | os.PathLike,
    labels_path: str | os.PathLike,
    warn: Callable[[str], None] | None = None,
) -> dict:
    """Per-class and macro AUROC / AUPRC of a scores CSV against a labels CSV.

    Returns `{"auroc": {class: float | None}, "macro_auroc", "auprc": {...}, "macro_auprc",
    "buckets": {"head" | "medium" | "tail": {"classes", "macro_auroc", "macro_auprc"}},
    "n_images", "positives": {class: int}, "negatives": {class: int}}` (None where a class
    lacks a known positive or negative, or a bucket has no such class). Raises ValueError with
    a readable message on bad input; `warn` (default: print to stderr) receives the count of
    rows found in only one file.
    """
    return _metrics(_load(scores_path, labels_path, warn))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def table(report: dict) -> str:
    """A readable plain-text table of an `evaluate` report."""
    classes = list(report["auroc"])
    bucket = {c: b for b in BUCKETS for c in report["buckets"][b]["classes"]}
    width = max(len("macro (all)"), *(len(c) for c in classes))
    lines = [
        f"{report['n_images']} images, {len(classes)} classes",
        "",
        f"{'class':<{width}}  {'pos':>6}  {'neg':>6}  {'AUROC':>6}  {'AUPRC':>6}  bucket",
    ]
    for c in classes:
        lines.append(
            f"{c:<{width}}  {report['positives'][c]:>6}  {report['negatives'][c]:>6}  "
            f"{_fmt(report['auroc'][c]):>6}  {_fmt(report['auprc'][c]):>6}  {bucket[c]}"
        )
    lines.append("")
    summary = [("macro (all)", report["macro_auroc"], report["macro_auprc"], len(classes))]
    for b in BUCKETS:
        entry = report["buckets"][b]
        summary.append((b, entry["macro_auroc"], entry["macro_auprc"], len(entry["classes"])))
    lines.append(f"{'':<{width}}  {'':>6}  {'':>6}  {'AUROC':>6}  {'AUPRC':>6}  classes")
    for name, a, p, n in summary:
        lines.append(f"{name:<{width}}  {'':>6}  {'':>6}  {_fmt(a):>6}  {_fmt(p):>6}  {n}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------


def _plot(data: _Data, report: dict, out: Path) -> None:
    """ROC curves of every class with an AUROC, written through a temporary file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 7))
    try:
        ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1)
        for j, name in enumerate(data.classes):
            if report["auroc"][name] is None:
                continue
            known = data.labels[:, j] != UNKNOWN
            fpr, tpr = roc_curve(data.labels[known, j], data.scores[known, j])
            ax.plot(fpr, tpr, linewidth=1.2, label=f"{name} ({report['auroc'][name]:.3f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"ROC, macro AUROC {_fmt(report['macro_auroc'])}")
        ax.legend(loc="lower right", fontsize="small")
        fmt = out.suffix.lstrip(".").lower() or "png"
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            fig.savefig(tmp, format=fmt, dpi=120)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        plt.close(fig)


def _plot_problem(out: Path) -> str | None:
    """Why `--plot out` cannot work (checked before any evaluation), or None."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        return (
            "--plot needs matplotlib, which is not installed "
            "(pip install matplotlib), or leave out --plot"
        )
    if not out.parent.is_dir():
        return f"--plot: folder {out.parent} does not exist"
    fmt = out.suffix.lstrip(".").lower() or "png"
    supported = FigureCanvasBase.get_supported_filetypes()
    if fmt not in supported:
        return f"--plot: format {fmt!r} is not supported (use one of {', '.join(supported)})"
    return None


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`carzero-fast evaluate`: print the report as a table or JSON; 2 on bad input."""
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="Per-class and macro AUROC / AUPRC of zero-shot scores against labels, "
        "with CARZero's head / medium / tail buckets.",
    )
    ap.add_argument(
        "--scores",
        required=True,
        type=Path,
        help="CSV: id column, then one score (logit or probability) per class",
    )
    ap.add_argument(
        "--labels",
        required=True,
        type=Path,
        help="CSV: id column, then per class 1, 0, -1 or empty (unknown)",
    )
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="also draw the ROC curves into this image (needs matplotlib)",
    )
    args = ap.parse_args(argv)

    if args.plot is not None:
        problem = _plot_problem(args.plot)
        if problem is not None:
            print(f"{PROG}: error: {problem}", file=sys.stderr)
            return 2
    try:
        data = _load(args.scores, args.labels)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    report = _metrics(data)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(table(report))
    if args.plot is not None:
        try:
            _plot(data, report, args.plot)
        except (OSError, ValueError) as e:
            print(f"{PROG}: error: cannot write the plot {args.plot}: {e}", file=sys.stderr)
            return 2
        print(f"ROC curves written to {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
