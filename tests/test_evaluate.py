"""`carzero-fast evaluate`: metrics equal sklearn's, macro means and CARZero buckets, the JSON
report, and clear errors (exit code 2) on bad input."""

from __future__ import annotations

import builtins
import csv
import io
import json
import os
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from carzero_fast.evaluate import auroc, average_precision, bucket_of, evaluate, main

sklearn_metrics = pytest.importorskip("sklearn.metrics")

def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def random_files(tmp_path: Path, seed: int = 0) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """200 images × 6 classes: tied scores, ~20% unknown labels (-1 and empty cells), rows in
    different orders, and a class present in the labels only. Returns the two paths and the
    (image-ordered) scores and labels, NaN for unknown."""
    rng = np.random.default_rng(seed)
    n, classes = 200, [f"c{j}" for j in range(6)]
    prevalence = np.array([0.5, 0.3, 0.2, 0.1, 0.05, 0.03])
    y = (rng.random((n, 6)) < prevalence).astype(np.float64)
    y[:, 0] = 0.0
    y[:3, 0] = 1.0  # guarantee positives even after masking
    y[3:6, 0] = 0.0
    s = np.round(y * 0.8 + rng.normal(size=(n, 6)), 1)  # rounding makes ties
    s[:, 5] = rng.integers(0, 3, size=n)  # heavy ties
    unknown = rng.random((n, 6)) < 0.2
    unknown[:6, 0] = False
    labels = np.where(unknown, np.nan, y)
    ids = [f"img/{i:04d}.png" for i in range(n)]
    score_rows = [[ids[i], *(f"{v:g}" for v in s[i])] for i in rng.permutation(n)]
    label_rows = []
    for i in rng.permutation(n):
        cells = []
        for j in range(6):
            if unknown[i, j]:
                cells.append("-1" if (i + j) % 2 else "")
            else:
                cells.append(str(int(y[i, j])) if i % 3 else f"{y[i, j]:.1f}")  # "1.0", "0.0"
        label_rows.append([ids[i], cells[3], "7", *cells[:3], *cells[4:]])
    scores_path = write_csv(tmp_path / "scores.csv", ["path", *classes], score_rows)
    label_header = ["image", "c3", "extra", "c0", "c1", "c2", "c4", "c5"]
    labels_path = write_csv(tmp_path / "labels.csv", label_header, label_rows)
    return scores_path, labels_path, s, labels


def test_metrics_equal_sklearn_per_class(tmp_path):
    scores_path, labels_path, s, labels = random_files(tmp_path)
    warnings: list[str] = []
    report = evaluate(scores_path, labels_path, warn=warnings.append)
    assert warnings == []
    assert report["n_images"] == 200
    assert list(report["auroc"]) == [f"c{j}" for j in range(6)]  # "extra" is ignored
    for j in range(6):
        known = ~np.isnan(labels[:, j])
        y, sj = labels[known, j], s[known, j]
        name = f"c{j}"
        assert report["positives"][name] == int(y.sum())
        assert report["auroc"][name] == pytest.approx(sklearn_metrics.roc_auc_score(y, sj))
        expected_ap = sklearn_metrics.average_precision_score(y, sj)
        assert report["auprc"][name] == pytest.approx(expected_ap)
    assert report["macro_auroc"] == pytest.approx(np.mean(list(report["auroc"].values())))


def test_pure_metrics_on_many_small_random_cases():
    rng = np.random.default_rng(1)
    for _ in range(200):
        n = int(rng.integers(2, 30))
        y = rng.integers(0, 2, size=n)
        if y.min() == y.max():
            continue
        s = rng.integers(0, 4, size=n).astype(np.float64)  # many ties
        assert auroc(y, s) == pytest.approx(sklearn_metrics.roc_auc_score(y, s))
        assert average_precision(y, s) == pytest.approx(
            sklearn_metrics.average_precision_score(y, s)
        )
    with pytest.raises(ValueError, match="one positive and one negative"):
        auroc(np.ones(4), np.arange(4.0))
    with pytest.raises(ValueError, match="0 or 1"):
        average_precision(np.array([0, 2]), np.arange(2.0))


def test_buckets_from_positive_counts():
    # 65th percentile of [3, 8, 12, 30, 50] (linear) = 12 + 0.6 * 18 = 22.8
    counts = {"a": 50, "b": 30, "c": 12, "d": 8, "e": 3}
    assert bucket_of(counts) == {"a": "head", "b": "head", "c": "medium", "d": "tail", "e": "tail"}
    # with the percentile below 10 a class over it but with ≤ 10 positives stays tail
    assert bucket_of({"a": 9, "b": 2, "c": 1}) == {"a": "tail", "b": "tail", "c": "tail"}
    # the tail bound is inclusive: 10 positives is tail, 11 is not (65th pct. here: 48.05)
    assert bucket_of({"a": 10, "b": 11, "c": 50, "d": 60}) == {
        "a": "tail", "b": "medium", "c": "head", "d": "head"}  # fmt: skip


def hand_made_files(tmp_path: Path) -> tuple[Path, Path, dict[str, float]]:
    """60 images; classes with 50, 30, 12, 8 and 3 positives and a perfect, reversed or
    arbitrary ranking, plus `none` with no known negative (null metrics)."""
    n = 60
    counts = {"a": 50, "b": 30, "c": 12, "d": 8, "e": 3}
    rows_s, rows_l = [], []
    for i in range(n):
        labels = [1 if i < k else 0 for k in counts.values()]
        scores = [float(-i), float(-i), float(i), float(-i), float(i % 7)]
        rows_s.append([f"x{i}", *scores, 0.5])
        rows_l.append([f"x{i}", *labels, 1 if i % 2 else -1])
    header = ["image", *counts, "none"]
    scores_path = write_csv(tmp_path / "s.csv", header, rows_s)
    labels_path = write_csv(tmp_path / "l.csv", header, rows_l)
    e_y = np.array([1 if i < 3 else 0 for i in range(n)])
    e_s = np.array([i % 7 for i in range(n)], dtype=np.float64)
    expected = {"a": 1.0, "b": 1.0, "c": 0.0, "d": 1.0, "e": auroc(e_y, e_s)}
    return scores_path, labels_path, expected


def test_macro_means_and_buckets_hand_made(tmp_path):
    scores_path, labels_path, expected = hand_made_files(tmp_path)
    report = evaluate(scores_path, labels_path)
    assert report["positives"] == {"a": 50, "b": 30, "c": 12, "d": 8, "e": 3, "none": 30}
    for name, value in expected.items():
        assert report["auroc"][name] == pytest.approx(value)
    assert report["auroc"]["none"] is None and report["auprc"]["none"] is None
    assert report["macro_auroc"] == pytest.approx(np.mean(list(expected.values())))
    # counts with `none`: [3, 8, 12, 30, 30, 50] → 65th percentile 30; head needs more than 30
    b = report["buckets"]
    assert b["head"]["classes"] == ["a"]
    assert b["medium"]["classes"] == ["b", "c", "none"]
    assert b["tail"]["classes"] == ["d", "e"]
    assert b["head"]["macro_auroc"] == pytest.approx(1.0)
    assert b["medium"]["macro_auroc"] == pytest.approx(0.5)  # b = 1, c = 0, none left out
    assert b["tail"]["macro_auroc"] == pytest.approx((1.0 + expected["e"]) / 2)
    assert b["medium"]["macro_auprc"] == pytest.approx(
        (report["auprc"]["b"] + report["auprc"]["c"]) / 2
    )


def test_json_output_shape(tmp_path, capsys):
    scores_path, labels_path, _ = hand_made_files(tmp_path)
    assert main(["--scores", str(scores_path), "--labels", str(labels_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    classes = ["a", "b", "c", "d", "e", "none"]
    assert {"auroc", "macro_auroc", "auprc", "macro_auprc", "buckets", "n_images"} <= set(out)
    assert list(out["auroc"]) == classes and list(out["auprc"]) == classes
    assert out["auroc"]["none"] is None and out["auprc"]["none"] is None
    assert isinstance(out["macro_auroc"], float) and isinstance(out["macro_auprc"], float)
    assert out["n_images"] == 60
    assert out["positives"] == {"a": 50, "b": 30, "c": 12, "d": 8, "e": 3, "none": 30}
    assert set(out["buckets"]) == {"head", "medium", "tail"}
    for entry in out["buckets"].values():
        assert set(entry) == {"classes", "macro_auroc", "macro_auprc"}
    assert sorted(c for e in out["buckets"].values() for c in e["classes"]) == classes


def test_table_output_and_help(tmp_path, capsys):
    scores_path, labels_path, _ = hand_made_files(tmp_path)
    assert main(["--scores", str(scores_path), "--labels", str(labels_path)]) == 0
    out = capsys.readouterr().out
    assert "60 images, 6 classes" in out
    assert "AUROC" in out and "AUPRC" in out and "macro (all)" in out
    none_line = next(line for line in out.splitlines() if line.startswith("none "))
    assert "n/a" in none_line and "medium" in none_line
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "carzero-fast evaluate" in capsys.readouterr().out


def run_error(capsys, scores: Path, labels: Path, *extra: str) -> str:
    """Run main, expect exit code 2 and no stdout, and return stderr."""
    assert main(["--scores", str(scores), "--labels", str(labels), *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Traceback" not in captured.err
    return captured.err


GOOD_S = (["path", "a", "b"], [["x", 0.1, 0.2], ["y", 0.3, 0.4], ["z", 0.5, 0.6]])
GOOD_L = (["path", "a", "b"], [["x", 1, 0], ["y", 0, 1], ["z", 1, ""]])


def test_missing_files(tmp_path, capsys):
    labels = write_csv(tmp_path / "l.csv", *GOOD_L)
    err = run_error(capsys, tmp_path / "nope.csv", labels)
    assert "scores file" in err and "nope.csv" in err and "does not exist" in err
    scores = write_csv(tmp_path / "s.csv", *GOOD_S)
    err = run_error(capsys, scores, tmp_path / "gone.csv")
    assert "labels file" in err and "gone.csv" in err


def test_score_classes_missing_from_labels(tmp_path, capsys):
    scores = write_csv(
        tmp_path / "s.csv", ["path", "a", "b", "Hernia", "Mass"], [["x", 1, 2, 3, 4]]
    )
    labels = write_csv(tmp_path / "l.csv", *GOOD_L)
    err = run_error(capsys, scores, labels)
    assert "'Hernia'" in err and "'Mass'" in err and "'a'" not in err


def test_unmatched_rows_warn_and_empty_intersection_fails(tmp_path, capsys):
    scores = write_csv(tmp_path / "s.csv", GOOD_S[0], [*GOOD_S[1], ["w", 0.0, 0.0]])
    labels = write_csv(tmp_path / "l.csv", GOOD_L[0], [*GOOD_L[1], ["v", 1, 1], ["u", 0, 0]])
    assert main(["--scores", str(scores), "--labels", str(labels), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["n_images"] == 3
    assert "warning" in captured.err
    assert "1 score row(s) have no labels" in captured.err
    assert "2 label row(s) have no scores" in captured.err
    other = write_csv(tmp_path / "o.csv", GOOD_L[0], [["q", 1, 0]])
    err = run_error(capsys, scores, other)
    assert "no image id of the scores file" in err


def test_duplicate_ids(tmp_path, capsys):
    labels = write_csv(tmp_path / "l.csv", *GOOD_L)
    scores = write_csv(tmp_path / "s.csv", GOOD_S[0], [*GOOD_S[1], ["y", 0.0, 0.0]])
    err = run_error(capsys, scores, labels)
    assert "duplicate id 'y'" in err and "lines 3 and 5" in err and "scores file" in err
    scores = write_csv(tmp_path / "s.csv", *GOOD_S)
    labels = write_csv(tmp_path / "l.csv", GOOD_L[0], [*GOOD_L[1], ["x", 0, 0]])
    err = run_error(capsys, scores, labels)
    assert "duplicate id 'x'" in err and "labels file" in err


def test_non_numeric_scores(tmp_path, capsys):
    labels = write_csv(tmp_path / "l.csv", *GOOD_L)
    for bad in ("high", "", "nan"):
        scores = write_csv(tmp_path / "s.csv", GOOD_S[0], [["x", 0.1, 0.2], ["y", bad, 0.4]])
        err = run_error(capsys, scores, labels)
        assert "scores file" in err and "line 3" in err and "column 'a'" in err
        assert "not a number" in err


def test_bad_labels_named_by_file_row_column(tmp_path, capsys):
    scores = write_csv(tmp_path / "s.csv", *GOOD_S)
    for bad in ("yes", "2", "0.5"):
        labels = write_csv(tmp_path / "l.csv", GOOD_L[0], [["x", 1, 0], ["y", 0, bad]])
        err = run_error(capsys, scores, labels)
        assert "labels file" in err and "l.csv" in err
        assert "line 3" in err and "column 'b'" in err and repr(bad) in err
    # numbers equal to 1, 0 and -1 are labels
    labels = write_csv(tmp_path / "l.csv", GOOD_L[0], [["x", "1.0", "0.0"], ["y", "0", "-1.0"]])
    report = evaluate(scores, labels, warn=lambda m: None)
    assert report["positives"] == {"a": 1, "b": 0}
    assert report["negatives"] == {"a": 1, "b": 1}  # "-1.0" is unknown, not a negative


def test_malformed_csv(tmp_path, capsys):
    labels = write_csv(tmp_path / "l.csv", *GOOD_L)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert "is empty" in run_error(capsys, empty, labels)
    short = write_csv(tmp_path / "short.csv", GOOD_S[0], [["x", 0.1]])
    assert "line 2: 2 cells, the header has 3" in run_error(capsys, short, labels)
    no_classes = write_csv(tmp_path / "nc.csv", ["path"], [["x"]])
    assert "no class columns" in run_error(capsys, no_classes, labels)


def test_reader_keeps_no_per_cell_python_objects(tmp_path):
    """20k × 50: the reader's peak (tracemalloc: Python objects and numpy buffers) stays within
    twice the result arrays plus a few hundred bytes per row (ids, line numbers); keeping
    every cell as a Python string or float needs several times that (about 10×)."""
    from carzero_fast.evaluate import _load

    n, c = 20_000, 50
    rng = np.random.default_rng(0)
    names = [f"c{j}" for j in range(c)]
    with open(tmp_path / "s.csv", "w") as f:
        f.write("path," + ",".join(names) + "\n")
        for i, row in enumerate(rng.normal(size=(n, c))):
            f.write(f"img/{i:06d}.png," + ",".join(f"{v:.9g}" for v in row) + "\n")
    with open(tmp_path / "l.csv", "w") as f:
        f.write("path," + ",".join(names) + "\n")
        for i, row in enumerate(rng.integers(-1, 2, size=(n, c))):
            f.write(f"img/{i:06d}.png," + ",".join(map(str, row)) + "\n")
    tracemalloc.start()
    try:
        data = _load(tmp_path / "s.csv", tmp_path / "l.csv", warn=pytest.fail)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert data.scores.shape == (n, c) and data.scores.dtype == np.float64
    assert data.labels.shape == (n, c) and data.labels.dtype == np.int8
    arrays = data.scores.nbytes + data.labels.nbytes
    assert peak < 2 * arrays + 400 * n, (peak, arrays)


def test_bom_crlf_quotes_and_padding_still_read(tmp_path):
    scores = tmp_path / "s.csv"
    scores.write_bytes(b'\xef\xbb\xbfpath,a\r\n"x,1",0.1\r\n y ,0.9\r\n\r\n"z",0.5\r\n')
    labels = write_csv(tmp_path / "l.csv", ["id", "a"], [["x,1", " 0 "], ["y", "1.0"], ["z", 1]])
    report = evaluate(scores, labels, warn=pytest.fail)
    assert report["n_images"] == 3 and report["auroc"]["a"] == 1.0  # ids matched


def test_unreadable_paths_are_one_line_errors(tmp_path, capsys, monkeypatch):
    """A file in a folder the user cannot search (stat and open raise PermissionError), a
    name too long for the file system, and a folder: exit 2, no traceback."""
    good_s = write_csv(tmp_path / "s.csv", *GOOD_S)
    good_l = write_csv(tmp_path / "l.csv", *GOOD_L)
    long = tmp_path / ("x" * 300 + ".csv")
    err = run_error(capsys, long, good_l)
    assert "scores file" in err and "name too long" in err.lower()
    err = run_error(capsys, good_s, tmp_path)
    assert "labels file" in err and "is a folder" in err
    locked = tmp_path / "locked"
    locked.mkdir()
    hidden = write_csv(locked / "l.csv", *GOOD_L)
    real_stat, real_open = os.stat, builtins.open

    def denied(real):  # noqa: ANN001, ANN202
        def call(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if str(path).startswith(str(locked)):
                raise PermissionError(13, "Permission denied", str(path))
            return real(path, *args, **kwargs)

        return call

    monkeypatch.setattr(os, "stat", denied(real_stat))
    monkeypatch.setattr(builtins, "open", denied(real_open))
    err = run_error(capsys, good_s, hidden)
    assert "labels file" in err and "Permission denied" in err


def test_unreadable_file_as_a_user(tmp_path, capsys):
    """A file without read permission (as a user other than root)."""
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    labels = write_csv(tmp_path / "l.csv", *GOOD_L)
    labels.chmod(0)
    err = run_error(capsys, write_csv(tmp_path / "s.csv", *GOOD_S), labels)
    assert "labels file" in err and "Permission denied" in err


def test_pipes_and_stdin(tmp_path, capsys, monkeypatch):
    """`/dev/fd/N` (what `<(...)` passes) and `-` for standard input are read."""
    scores = write_csv(tmp_path / "s.csv", *GOOD_S)
    labels = write_csv(tmp_path / "l.csv", *GOOD_L)
    expected = evaluate(scores, labels)
    read_end, write_end = os.pipe()
    writer = threading.Thread(
        target=lambda: os.write(write_end, labels.read_bytes()) and os.close(write_end)
    )
    writer.start()
    try:
        assert main(["--scores", str(scores), "--labels", f"/dev/fd/{read_end}", "--json"]) == 0
    finally:
        writer.join()
        os.close(read_end)
    assert json.loads(capsys.readouterr().out)["auroc"] == expected["auroc"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(scores.read_bytes())))
    assert main(["--scores", "-", "--labels", str(labels), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["auroc"] == expected["auroc"]
    err = run_error(capsys, Path("-"), Path("-"))
    assert "only one" in err and "standard input" in err


def test_repeated_label_columns_only_matter_when_evaluated(tmp_path, capsys):
    scores = write_csv(tmp_path / "s.csv", ["path", "b"], [["x", 1], ["y", 2], ["z", 3]])
    rows = [["x", 1, 1, 1], ["y", 0, 0, 0], ["z", 0, 0, 0]]
    labels = write_csv(tmp_path / "l.csv", ["path", "b", "a", "a"], rows)
    assert evaluate(scores, labels, warn=pytest.fail)["auroc"] == {"b": 0.0}
    labels = write_csv(tmp_path / "l.csv", ["path", "b", "a", "b"], [["x", 1, 1, 1]])
    err = run_error(capsys, scores, labels)
    assert "repeats evaluated class column(s): b" in err


def test_a_class_named_like_the_labels_id_column(tmp_path):
    """The id column is no class column, whatever its header says: a class of that name is
    read from its own column of the labels file."""
    scores = write_csv(tmp_path / "s.csv", ["path", "study"], [["x", 1], ["y", 2], ["z", 3]])
    labels = write_csv(tmp_path / "l.csv", ["study", "study"], [["x", 1], ["y", 0], ["z", 1]])
    assert evaluate(scores, labels, warn=pytest.fail)["auroc"] == {"study": 0.5}


def test_no_overlap_error_shows_example_ids(tmp_path, capsys):
    scores = write_csv(tmp_path / "s.csv", *GOOD_S)
    labels = write_csv(
        tmp_path / "l.csv", GOOD_L[0], [[f"other{i}.png", 1, 0] for i in range(5)]
    )
    err = run_error(capsys, scores, labels)
    assert "no image id of the scores file (3 rows, e.g. 'x', 'y', 'z')" in err
    assert "labels file (5 rows, e.g. 'other0.png', 'other1.png', 'other2.png')" in err
    assert "other3.png" not in err and len(err.strip().splitlines()) == 1


def test_strict_number_syntax(tmp_path, capsys):
    """`float` reads `1_0` as 10 and full-width digits as numbers: both are refused, with
    the file, line and column; labels likewise; other spellings still work."""
    labels = write_csv(tmp_path / "l.csv", *GOOD_L)
    for bad in ("1_0", "\uff11", "0x10", "1e", "."):
        scores = write_csv(tmp_path / "s.csv", GOOD_S[0], [["x", 0.1, 0.2], ["y", 0.3, bad]])
        err = run_error(capsys, scores, labels)
        assert "line 3, column 'b'" in err and f"{bad!r} is not a number" in err
    scores = write_csv(
        tmp_path / "s.csv", GOOD_S[0], [["x", " +1.5e0 ", "-inf"], ["y", ".5", "Infinity"],
                                        ["z", "1.", "1e999"]]  # fmt: skip
    )
    report = evaluate(scores, labels, warn=pytest.fail)
    assert report["auroc"] == {"a": 1.0, "b": 1.0}
    scores = write_csv(tmp_path / "s.csv", *GOOD_S)
    for bad in ("1_0", "0_0", "\uff11"):
        labels = write_csv(tmp_path / "l.csv", GOOD_L[0], [["x", 1, 0], ["y", bad, 1]])
        err = run_error(capsys, scores, labels)
        assert "line 3, column 'a'" in err and f"{bad!r} is not a label" in err


def test_label_rows_without_scores_are_not_checked(tmp_path, capsys):
    scores = write_csv(tmp_path / "s.csv", *GOOD_S)
    labels = write_csv(tmp_path / "l.csv", GOOD_L[0], [*GOOD_L[1], ["w", "yes", "no"]])
    warnings: list[str] = []
    assert evaluate(scores, labels, warn=warnings.append)["n_images"] == 3
    assert "1 label row(s) have no scores" in warnings[0]


def pr_curve_auc_by_hand(y: np.ndarray, s: np.ndarray) -> float:
    """CARZero's AUPRC written out: points (recall, precision) of `s >= t` for each distinct
    `t` from the highest, plus (0, 1), joined by straight lines."""
    points = [(0.0, 1.0)]
    for t in sorted(set(s.tolist()), reverse=True):
        pred = s >= t
        tp = float((pred & (y == 1)).sum())
        points.append((tp / (y == 1).sum(), tp / pred.sum()))
    pairs = zip(points[:-1], points[1:], strict=True)
    return sum((r1 - r0) * (p0 + p1) / 2 for (r0, p0), (r1, p1) in pairs)


def test_trapezoid_auprc_is_carzeros_formula():
    from carzero_fast.evaluate import trapezoid_auprc

    # one positive among four tied scores: AP 0.25, trapezoid (1 + 0.25) / 2
    y, s = np.array([1, 0, 0, 0]), np.full(4, 0.5)
    assert average_precision(y, s) == 0.25 and trapezoid_auprc(y, s) == 0.625
    # ties across classes: thresholds 0.9 (1/1), 0.7 (2/3), 0.2 (3/4 of ... ) by hand
    y = np.array([1, 1, 0, 1, 0, 0])
    s = np.array([0.9, 0.7, 0.7, 0.2, 0.2, 0.2])
    # points (0,1) (1/3,1) (2/3,2/3) (1,1/2)
    expected = (1 / 3) * 1.0 + (1 / 3) * (1 + 2 / 3) / 2 + (1 / 3) * (2 / 3 + 1 / 2) / 2
    assert trapezoid_auprc(y, s) == pytest.approx(expected, rel=1e-15)
    rng = np.random.default_rng(3)
    for _ in range(300):
        n = int(rng.integers(2, 40))
        y = rng.integers(0, 2, size=n)
        if y.min() == y.max():
            continue
        s = rng.integers(0, 4, size=n).astype(np.float64)  # many ties
        precision, recall, _ = sklearn_metrics.precision_recall_curve(y, s)
        value = trapezoid_auprc(y, s)
        assert value == pytest.approx(sklearn_metrics.auc(recall, precision), rel=1e-12)
        assert value == pytest.approx(pr_curve_auc_by_hand(y, s), rel=1e-12)


def test_auprc_option_in_cli_and_json(tmp_path, capsys):
    scores_path, labels_path, s, labels = random_files(tmp_path)
    args = ["--scores", str(scores_path), "--labels", str(labels_path), "--json"]
    assert main(args) == 0
    default = json.loads(capsys.readouterr().out)
    assert default["auprc_method"] == "ap"
    assert "average_precision_score" in default["auprc_definition"]
    assert main([*args, "--auprc", "trapezoid"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["auprc_method"] == "trapezoid"
    assert "auc(recall, precision)" in out["auprc_definition"]
    assert out["auroc"] == default["auroc"]
    for j in range(6):
        known = ~np.isnan(labels[:, j])
        precision, recall, _ = sklearn_metrics.precision_recall_curve(labels[known, j],
                                                                      s[known, j])  # fmt: skip
        expected = sklearn_metrics.auc(recall, precision)
        assert out["auprc"][f"c{j}"] == pytest.approx(expected, rel=1e-12)
        assert out["auprc"][f"c{j}"] != pytest.approx(default["auprc"][f"c{j}"], rel=1e-6)
    assert out["macro_auprc"] == pytest.approx(np.mean(list(out["auprc"].values())))
    assert main(args[:4]) == 0
    assert "AUPRC: average precision" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "trapezoid" in capsys.readouterr().out


def test_broken_pipe_exits_quietly(tmp_path):
    """A reader that closes the pipe before the report (`| head`): no traceback, exit 0."""
    scores_path, labels_path, _ = hand_made_files(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "carzero_fast.evaluate", "--scores", str(scores_path),
         "--labels", str(labels_path), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    proc.stdout.close()  # before the report: its write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0
    assert err == ""


def test_undecodable_and_oversized_input(tmp_path, capsys):
    scores = write_csv(tmp_path / "s.csv", *GOOD_S)
    utf16 = tmp_path / "l16.csv"
    utf16.write_text("path,a,b\nx,1,0\n", encoding="utf-16")
    err = run_error(capsys, scores, utf16)
    assert "labels file" in err and "is not UTF-8 text" in err
    for bad_line in (3, 5002):  # the line is named, not where the block decoding stopped
        latin1 = tmp_path / f"latin1_{bad_line}.csv"
        rows = [f"x{i},1,0\n".encode() for i in range(6000)]
        rows[bad_line - 2] = b"R\xe9sum\xe9,1,0\n"
        latin1.write_bytes(b"path,a,b\n" + b"".join(rows))
        err = run_error(capsys, scores, latin1)
        assert f"is not UTF-8 text at line {bad_line} (" in err, err
    huge = tmp_path / "big.csv"
    huge.write_text('path,a,b\nx,1,0\ny,"' + "0" * 200_000 + '",1\n')
    err = run_error(capsys, scores, huge)
    assert "big.csv, line 3: field larger than field limit" in err


def test_evaluate_starts_without_importing_torch():
    """The package's public names load on first use: `carzero-fast evaluate` (numpy only)
    starts in a fraction of a second instead of paying for torch's import."""
    code = ("import sys, carzero_fast, carzero_fast.cli, carzero_fast.evaluate\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "assert carzero_fast.CrossAttentionAligner.__name__ == 'CrossAttentionAligner'\n"
            "assert 'torch' in sys.modules\n")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
