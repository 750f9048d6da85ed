"""`carzero-fast evaluate --plot`: every class drawn, destinations and formats checked before
any work, readable with many classes, class names literal, no matplotlib named."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from test_evaluate import GOOD_L, GOOD_S, hand_made_files, run_error, write_csv

from carzero_fast.evaluate import evaluate, main


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


# ---------------------------------------------------------------------------------------------
# Review fixes: streaming reader, robust paths and plots, CARZero's AUPRC, strict syntax
# ---------------------------------------------------------------------------------------------


def test_plot_destinations_checked_before_evaluating(tmp_path, capsys):
    """An existing folder, `.`, a trailing `/`, an empty name, a name too long and a folder
    that takes no file: refused before the (here missing) input files are even opened."""
    pytest.importorskip("matplotlib")

    (tmp_path / "adir").mkdir()
    missing, labels = tmp_path / "missing.csv", tmp_path / "l.csv"
    cases = {
        str(tmp_path / "adir"): "is a folder",
        ".": "is a folder",
        str(tmp_path / "new") + "/": "names a folder",
        "": "empty file name",
        str(tmp_path / ("r" * 300 + ".png")): "too long",
    }
    if os.path.isdir("/proc/self"):
        cases["/proc/self/roc.png"] = "cannot write in folder /proc/self"
    for dest, message in cases.items():
        err = run_error(capsys, missing, labels, "--plot", dest)
        assert message in err.lower() and "--plot" in err and "missing.csv" not in err, dest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir"]
    assert list((tmp_path / "adir").iterdir()) == []


def test_plot_read_only_folder_as_a_user(tmp_path, capsys):
    """A folder without write permission (as a user other than root), before evaluating."""
    pytest.importorskip("matplotlib")
    if os.geteuid() == 0:
        pytest.skip("root writes in every folder")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    err = run_error(capsys, tmp_path / "missing.csv", tmp_path / "l.csv", "--plot",
                    str(ro / "roc.png"))  # fmt: skip
    assert "cannot write in folder" in err


def test_plot_formats_that_cannot_be_written_and_render_failures(tmp_path, capsys, monkeypatch):
    """pgf needs LaTeX: refused before evaluating; a failure while drawing is one error line,
    with no report printed and no file left behind."""
    pytest.importorskip("matplotlib")
    import carzero_fast.evaluate as ev

    scores = write_csv(tmp_path / "s.csv", *GOOD_S)
    labels = write_csv(tmp_path / "l.csv", *GOOD_L)
    if not any(shutil.which(t) for t in ("xelatex", "pdflatex", "lualatex")):
        err = run_error(capsys, tmp_path / "missing.csv", labels, "--plot",
                        str(tmp_path / "roc.pgf"))  # fmt: skip
        assert "cannot write 'pgf' images" in err and "latex" in err.lower()

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("backend exploded\nsecond line")

    monkeypatch.setattr(ev, "render", broken)
    err = run_error(capsys, scores, labels, "--plot", str(tmp_path / "roc.png"))
    assert "cannot draw the plot" in err and "RuntimeError: backend exploded" in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.csv", "s.csv"]


def many_class_files(tmp_path: Path, c: int, names: list[str] | None = None) -> tuple[Path, Path]:
    rng = np.random.default_rng(c)
    names = names or [f"finding_{j:03d}" for j in range(c)]
    n = 80
    y = rng.integers(0, 2, size=(n, c))
    y[0], y[1] = 1, 0
    s = np.round(y + rng.normal(size=(n, c)), 2)
    ids = [f"i{i}" for i in range(n)]
    header = ["path", *names]
    scores = write_csv(tmp_path / "s.csv", header, [[i, *r] for i, r in zip(ids, s, strict=True)])
    labels = write_csv(tmp_path / "l.csv", header, [[i, *r] for i, r in zip(ids, y, strict=True)])
    return scores, labels


def test_plot_many_classes_stays_readable(tmp_path, capsys):
    """100 curves: every (colour, line style) pair differs, the legend sits outside the axes
    in columns and inside the figure, and the saved image includes it."""
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.image import imread

    from carzero_fast.evaluate_io import load
    from carzero_fast.evaluate_plot import DPI, figure

    scores, labels = many_class_files(tmp_path, 100)
    data = load(scores, labels, warn=pytest.fail)
    report = evaluate(scores, labels)
    fig = figure(data, report)
    ax = fig.axes[0]
    curves = ax.get_lines()[1:]  # after the diagonal
    assert len(curves) == 100
    styles = {(tuple(np.round(line.get_color(), 6)), line.get_linestyle()) for line in curves}
    assert len(styles) == 100
    renderer = FigureCanvasAgg(fig).get_renderer()
    legend = ax.get_legend()
    assert len(legend.get_texts()) == 100 and legend._ncols > 1
    box, axes_box = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
    assert box.x0 >= axes_box.x1  # right of the axes
    assert box.y0 >= 0 and box.y1 <= fig.bbox.height  # not off the top or bottom
    png = tmp_path / "roc.png"
    assert main(["--scores", str(scores), "--labels", str(labels), "--plot", str(png)]) == 0
    height, width = imread(png).shape[:2]
    assert width > fig.get_figwidth() * DPI  # widened to hold the legend
    # few classes: the legend stays inside, in one column
    few_s, few_l = many_class_files(tmp_path, 5)
    few = figure(load(few_s, few_l, warn=pytest.fail), evaluate(few_s, few_l))
    few_legend = few.axes[0].get_legend()
    assert few_legend._ncols == 1
    few_renderer = FigureCanvasAgg(few).get_renderer()
    few_box = few_legend.get_window_extent(few_renderer)
    assert few.axes[0].get_window_extent(few_renderer).contains(*few_box.p0)


def test_plot_class_names_are_literal(tmp_path, capsys):
    """A name with `$` (mathtext) or a leading `_` (hidden by matplotlib's legend) is shown
    as written."""
    matplotlib = pytest.importorskip("matplotlib")
    names = ["$x^$", "_hidden", "plain"]
    scores, labels = many_class_files(tmp_path, 3, names)
    report = evaluate(scores, labels)
    svg = tmp_path / "roc.svg"
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        assert main(["--scores", str(scores), "--labels", str(labels), "--plot", str(svg)]) == 0
    text = svg.read_text()
    for name in names:  # the svg's text is the name as written
        assert f"{name} ({report['auroc'][name]:.3f})" in text, name
