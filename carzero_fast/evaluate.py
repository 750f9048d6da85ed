"""`carzero-fast evaluate`: per-class AUROC / AUPRC of zero-shot scores against labels.

Two CSV files, each with a header row: the first column is the image id (whatever its header
cell says, e.g. `path` or `image`), every other column a class, matched by header name.

* scores: one real number per cell (logits or probabilities: the metrics only use ranks), in
  plain ASCII number syntax (`1_0` and NaN are refused, `inf` is accepted);
* labels: `1` positive, `0` negative, `-1` or an empty cell unknown (numbers such as `1.0`
  and `0.0` are accepted). Unknown labels are left out of that class only.

Either file may be any readable path that is not a folder (a pipe, `<(...)`), or `-` for
standard input (one of the two). Each is streamed once into numpy arrays (float64 scores,
int8 labels); per row only its id and line number are kept (`carzero_fast.evaluate_io`).
Rows are matched by id; images present in both files are evaluated (a warning on stderr
counts the rows found in only one). Every class of the scores file must be a column of the
labels file, once; label columns without scores are ignored (not checked).

Reported per class: AUROC (Mann–Whitney U with average ranks for ties, equal to
`sklearn.metrics.roc_auc_score`) and AUPRC, by default (`auprc="ap"`) the average precision:
step-wise over the distinct thresholds, equal to `sklearn.metrics.average_precision_score`.
CARZero's own `calculate_micro_macro_auprc` reports instead the trapezoidal area
`auc(recall, precision)` of sklearn's `precision_recall_curve` (the point (0, 1) included,
straight lines between thresholds), which differs, in either direction; `auprc="trapezoid"`
(`--auprc trapezoid`) reproduces it, to compare with the paper's numbers. A class needs at
least one known positive and one known negative; otherwise its metrics are null and it is
left out of every macro mean. CARZero's buckets split the classes by known positive count:
tail ≤ 10 positives, head more positives than the 65th percentile of the per-class counts
(numpy's linear percentile, over all evaluated classes), medium the rest. A class that meets
both the tail and the head rule (possible when the percentile is below 10) is tail.

Bad input gives a clear one-line message on stderr and exit code 2. Nothing is written
except the `--plot` image (`carzero_fast.evaluate_plot`; needs matplotlib): its destination
and format are checked before any evaluation, it is drawn into a temporary file before the
report is printed and renamed into place after. A reader that closes stdout early (`| head`)
ends the output quietly (exit code 0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from carzero_fast.evaluate_io import UNKNOWN, Data, load
from carzero_fast.evaluate_plot import describe_error, plot_problem, render

__all__ = [
    "auroc",
    "average_precision",
    "bucket_of",
    "evaluate",
    "main",
    "roc_curve",
    "table",
    "trapezoid_auprc",
]

PROG = "carzero-fast evaluate"
TAIL_MAX_POSITIVES = 10
HEAD_PERCENTILE = 65.0
BUCKETS = ("head", "medium", "tail")
AUPRC_METHODS = {
    "ap": "average precision (step-wise; sklearn average_precision_score)",
    "trapezoid": "trapezoidal area under the PR curve (CARZero's auc(recall, precision))",
}


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


def _ascending(s: np.ndarray) -> np.ndarray:
    """The order that sorts `s` ascending (one sort serves every metric of a class)."""
    return np.argsort(s, kind="stable")


def _average_ranks(s: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """1-based ranks of `s`, ties sharing the mean of the ranks they span (`order`:
    `_ascending(s)` when already computed)."""
    order = _ascending(s) if order is None else order
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
    return _auroc(y, s, _ascending(s))


def _auroc(y: np.ndarray, s: np.ndarray, order: np.ndarray) -> float:
    """`auroc` of checked bool `y` and float64 `s`, with `order` = `_ascending(s)`."""
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    rank_sum = _average_ranks(s, order)[y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _threshold_counts(
    y: np.ndarray, s: np.ndarray, order: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """True and false positive counts when predicting `s >= t`, for each distinct score `t`
    from the highest down (`order`: `_ascending(s)` when already computed; the counts at the
    end of each run of ties do not depend on the order inside the run)."""
    order = (_ascending(s) if order is None else order)[::-1]
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
    return _average_precision(*_threshold_counts(y, s))


def _average_precision(tps: np.ndarray, fps: np.ndarray) -> float:
    """`average_precision` from `_threshold_counts`."""
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def trapezoid_auprc(y: np.ndarray, s: np.ndarray) -> float:
    """CARZero's AUPRC: `sklearn.metrics.auc(recall, precision)` of `precision_recall_curve`,
    i.e. trapezoids between the points (recall, precision) of the distinct thresholds and the
    point (0, 1). Not the average precision: linear interpolation between thresholds."""
    y, s = _check_binary(y, s)
    return _trapezoid_auprc(*_threshold_counts(y, s))


def _trapezoid_auprc(tps: np.ndarray, fps: np.ndarray) -> float:
    """`trapezoid_auprc` from `_threshold_counts`."""
    precision = np.r_[1.0, tps / (tps + fps)]
    recall = np.r_[0.0, tps / tps[-1]]
    return float(np.sum(np.diff(recall) * (precision[1:] + precision[:-1]) / 2.0))


def roc_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at each distinct threshold, starting from (0, 0)."""
    y, s = _check_binary(y, s)
    tps, fps = _threshold_counts(y, s)
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]


def _stderr_warning(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _load(
    scores_path: str | os.PathLike,
    labels_path: str | os.PathLike,
    warn: Callable[[str], None] | None = None,
) -> Data:
    """Both files read and matched (`carzero_fast.evaluate_io.load`); warnings to stderr."""
    return load(scores_path, labels_path, _stderr_warning if warn is None else warn)


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


def _metrics(data: Data, auprc: str = "ap") -> dict:
    """The report (see `evaluate`) of loaded data."""
    if auprc not in AUPRC_METHODS:
        raise ValueError(f"auprc must be one of {', '.join(AUPRC_METHODS)}, not {auprc!r}")
    pr_area = _average_precision if auprc == "ap" else _trapezoid_auprc
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
            y, s = _check_binary(y, s)
            order = _ascending(s)  # one sort for both metrics
            auroc_by[name] = _auroc(y, s, order)
            auprc_by[name] = pr_area(*_threshold_counts(y, s, order))
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
        "auprc_method": auprc,
        "auprc_definition": AUPRC_METHODS[auprc],
        "buckets": buckets,
        "n_images": len(data.ids),
        "positives": positives,
        "negatives": negatives,
    }


def evaluate(
    scores_path: str | os.PathLike,
    labels_path: str | os.PathLike,
    warn: Callable[[str], None] | None = None,
    auprc: str = "ap",
) -> dict:
    """Per-class and macro AUROC / AUPRC of a scores CSV against a labels CSV.

    Returns `{"auroc": {class: float | None}, "macro_auroc", "auprc": {...}, "macro_auprc",
    "auprc_method": "ap" | "trapezoid", "auprc_definition": str, "buckets": {"head" |
    "medium" | "tail": {"classes", "macro_auroc", "macro_auprc"}}, "n_images", "positives":
    {class: int}, "negatives": {class: int}}` (None where a class lacks a known positive or
    negative, or a bucket has no such class). `auprc` is "ap" (average precision, sklearn's
    `average_precision_score`) or "trapezoid" (CARZero's `auc(recall, precision)`). Raises
    ValueError with a readable message on bad input; `warn` (default: print to stderr)
    receives the count of rows found in only one file.
    """
    return _metrics(_load(scores_path, labels_path, warn), auprc)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def table(report: dict) -> str:
    """A readable plain-text table of an `evaluate` report."""
    classes = list(report["auroc"])
    bucket = {c: b for b in BUCKETS for c in report["buckets"][b]["classes"]}
    width = max(len("macro (all)"), *(len(c) for c in classes))
    lines = [
        f"{report['n_images']} images, {len(classes)} classes",
        f"AUPRC: {AUPRC_METHODS[report.get('auprc_method', 'ap')]}",
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
# Command line
# ---------------------------------------------------------------------------------------------


def _error(message: str) -> int:
    """Print `message` as this command's one-line error; the exit code 2."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _print_report(text: str) -> None:
    """Print `text` on stdout; a reader that stopped reading (`| head`) ends it quietly."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # later writes (and the flush at exit) go nowhere instead of raising again
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (AttributeError, OSError, ValueError):
            pass


def main(argv: list[str] | None = None) -> int:
    """`carzero-fast evaluate`: print the report as a table or JSON; 2 on bad input."""
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="Per-class and macro AUROC / AUPRC of zero-shot scores against labels, "
        "with CARZero's head / medium / tail buckets. AUPRC is the average precision "
        "(sklearn's average_precision_score) unless --auprc trapezoid.",
    )
    ap.add_argument(
        "--scores",
        required=True,
        type=Path,
        help="CSV: id column, then one score (logit or probability) per class; "
        "any readable file or pipe, - for standard input",
    )
    ap.add_argument(
        "--labels",
        required=True,
        type=Path,
        help="CSV: id column, then per class 1, 0, -1 or empty (unknown); "
        "any readable file or pipe, - for standard input",
    )
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument(
        "--auprc",
        choices=list(AUPRC_METHODS),
        default="ap",
        help="ap (default): average precision, the step-wise area, equal to sklearn's "
        "average_precision_score; trapezoid: CARZero's own AUPRC, auc(recall, precision) "
        "of sklearn's precision_recall_curve (comparable with the paper's numbers)",
    )
    ap.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also draw the ROC curves into this image (needs matplotlib; the format from "
        "the suffix, PNG without one)",
    )
    args = ap.parse_args(argv)

    if args.plot is not None:
        problem = plot_problem(args.plot)
        if problem is not None:
            return _error(problem)
    try:
        data = _load(args.scores, args.labels)
    except ValueError as e:
        return _error(str(e))
    report = _metrics(data, args.auprc)
    tmp: Path | None = None
    try:
        if args.plot is not None:
            try:  # before the report: a failure leaves neither half a report nor an image
                tmp = render(data, report, Path(args.plot))
            except Exception as e:  # matplotlib's backends raise many kinds
                return _error(f"cannot draw the plot {args.plot}: {describe_error(e)}")
        _print_report(json.dumps(report, indent=1) if args.json else table(report))
        if tmp is not None:
            try:
                os.replace(tmp, args.plot)
            except OSError as e:
                return _error(f"cannot write the plot {args.plot}: {e.strerror or e}")
            tmp = None
            print(f"ROC curves written to {args.plot}", file=sys.stderr)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
