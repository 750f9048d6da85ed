"""`carzero-fast evaluate`: metrics equal sklearn's, macro means and CARZero buckets, the JSON
report, and clear errors (exit code 2) on bad input."""

from __future__ import annotations

import csv
import json
import sys
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
    assert evaluate(scores, labels, warn=lambda m: None)["positives"] == {"a": 1, "b": 0}


def test_malformed_csv(tmp_path, capsys):
    labels = write_csv(tmp_path / "l.csv", *GOOD_L)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert "is empty" in run_error(capsys, empty, labels)
    short = write_csv(tmp_path / "short.csv", GOOD_S[0], [["x", 0.1]])
    assert "line 2: 2 cells, the header has 3" in run_error(capsys, short, labels)
    no_classes = write_csv(tmp_path / "nc.csv", ["path"], [["x"]])
    assert "no class columns" in run_error(capsys, no_classes, labels)


def test_plot_without_matplotlib(tmp_path, capsys, monkeypatch):
    for name in ("matplotlib", "matplotlib.backend_bases", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)  # `import` raises ImportError
    scores = write_csv(tmp_path / "s.csv", *GOOD_S)
    labels = write_csv(tmp_path / "l.csv", *GOOD_L)
    err = run_error(capsys, scores, labels, "--plot", str(tmp_path / "roc.png"))
    assert "matplotlib" in err and "--plot" in err
    assert not (tmp_path / "roc.png").exists()


def test_plot_draws_every_class_with_an_auroc(tmp_path, capsys):
    """The ROC image holds one labelled curve per class with an AUROC (its value in the
    legend), the diagonal, and the macro AUROC in the title; no temporary file is left."""
    matplotlib = pytest.importorskip("matplotlib")
    scores_path, labels_path, _ = hand_made_files(tmp_path)
    report = evaluate(scores_path, labels_path)
    svg = tmp_path / "roc.svg"
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays searchable text
        assert main(["--scores", str(scores_path), "--labels", str(labels_path), "--json",
                     "--plot", str(svg)]) == 0  # fmt: skip
    assert "ROC curves written to" in capsys.readouterr().err
    text = svg.read_text()
    for name in ("a", "b", "c", "d", "e"):
        assert f"{name} ({report['auroc'][name]:.3f})" in text
    assert "none (" not in text  # no AUROC, no curve
    assert f"macro AUROC {report['macro_auroc']:.4f}" in text
    png = tmp_path / "roc.png"
    assert main(["--scores", str(scores_path), "--labels", str(labels_path), "--plot",
                 str(png)]) == 0  # fmt: skip
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.csv", "roc.png", "roc.svg", "s.csv"]


def test_plot_bad_destination_fails_before_evaluating(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    scores = write_csv(tmp_path / "s.csv", *GOOD_S)
    labels = write_csv(tmp_path / "l.csv", *GOOD_L)
    err = run_error(capsys, scores, labels, "--plot", str(tmp_path / "no" / "roc.png"))
    assert "does not exist" in err and "--plot" in err
    err = run_error(capsys, scores, labels, "--plot", str(tmp_path / "roc.docx"))
    assert "format 'docx' is not supported" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.csv", "s.csv"]
