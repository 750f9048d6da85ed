"""The ROC image of `carzero-fast evaluate --plot` (needs matplotlib; see `evaluate`).

`plot_problem` checks the destination and the image format before any evaluation; `render`
draws into a temporary file next to the destination, which the caller renames into place.
Up to 15 curves share a legend inside the axes; more get a legend outside the axes, in
columns, and a (colour, line style) pair of their own.
"""

from __future__ import annotations

import io
import math
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from carzero_fast.evaluate_io import UNKNOWN, Data

__all__ = ["describe_error", "figure", "legend_text", "plot_problem", "render"]

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 120
LEGEND_INSIDE_MAX = 15  # more curves: legend outside the axes, in columns
PER_COLUMN = 35  # legend entries per column outside the axes
LINESTYLES = ("-", "--", ":", "-.")


def image_format(out: Path) -> str:
    """The image format of `out` from its suffix (PNG without one)."""
    return out.suffix.lstrip(".").lower() or "png"


def temporary_path(out: Path) -> Path:
    """The temporary file the plot is drawn into before its rename onto `out`."""
    return out.with_name(f".{out.name[:80]}.{os.getpid()}.tmp")


def describe_error(e: BaseException) -> str:
    """`Type: first line of the message` of an exception, for a one-line error."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def plot_problem(value: str) -> str | None:
    """Why `--plot value` cannot work, found before any evaluation (matplotlib missing, an
    empty name, a folder, a folder that does not exist or cannot be written, a format
    matplotlib cannot write here), or None."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
        from matplotlib.figure import Figure
    except ImportError:
        return (
            "--plot needs matplotlib, which is not installed "
            "(pip install matplotlib), or leave out --plot"
        )
    if not value.strip():
        return "--plot: empty file name"
    if value.endswith(("/", os.sep)):
        return f"--plot: {value} names a folder, not an image file (such as roc.png)"
    out = Path(value)
    try:
        mode = out.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        return f"--plot: cannot use {value}: {e.strerror or e}"
    if mode is not None and stat.S_ISDIR(mode):
        return f"--plot: {value} is a folder, not an image file (such as {value}/roc.png)"
    if mode is not None and not stat.S_ISREG(mode):
        return f"--plot: {value} exists and is not a regular file"
    try:
        parent_is_dir = out.parent.is_dir()
    except OSError as e:
        return f"--plot: cannot use folder {out.parent}: {e.strerror or e}"
    if not parent_is_dir:
        return f"--plot: folder {out.parent} does not exist"
    fmt = image_format(out)
    supported = FigureCanvasBase.get_supported_filetypes()
    if fmt not in supported:
        return f"--plot: format {fmt!r} is not supported (use one of {', '.join(supported)})"
    probe = Figure(figsize=(1, 1))
    probe.add_subplot().set_title("ROC")
    try:  # some formats need more than matplotlib (pgf: LaTeX; some Pillow builds lack one)
        probe.savefig(io.BytesIO(), format=fmt, dpi=10)
    except Exception as e:
        return f"--plot: matplotlib cannot write {fmt!r} images here ({describe_error(e)})"
    tmp = temporary_path(out)
    try:  # the folder must take the temporary file (and its rename)
        with open(tmp, "x"):
            pass
        tmp.unlink()
    except OSError as e:
        return f"--plot: cannot write in folder {out.parent}: {e.strerror or e}"
    return None


def legend_text(name: str) -> str:
    """`name` as matplotlib shows it literally: `$` escaped (no mathtext). A leading `_`
    needs nothing here: the legend is given its labels, which it does not filter."""
    return name.replace("$", r"\$")


def _style(k: int, n: int) -> tuple[object, str]:
    """Colour and line style of curve `k` of `n`: all pairs distinct."""
    import matplotlib

    if n <= 10:
        return matplotlib.colormaps["tab10"](k), "-"
    if n <= 20:
        return matplotlib.colormaps["tab20"](k), "-"
    if n <= 20 * len(LINESTYLES):
        return matplotlib.colormaps["tab20"](k % 20), LINESTYLES[k // 20]
    return matplotlib.colormaps["turbo"](k / (n - 1)), LINESTYLES[k % len(LINESTYLES)]


def figure(data: Data, report: dict) -> Figure:
    """The ROC curve of every class with an AUROC (its value in the legend), the diagonal,
    and the macro AUROC in the title."""
    from matplotlib.figure import Figure

    from carzero_fast.evaluate import roc_curve

    curves = [(j, c) for j, c in enumerate(data.classes) if report["auroc"][c] is not None]
    many = len(curves) > LEGEND_INSIDE_MAX
    columns = math.ceil(len(curves) / PER_COLUMN)
    rows = math.ceil(len(curves) / columns) if curves else 0
    # outside legend: tall enough for a column of x-small entries (about 0.15 in each)
    fig = Figure(figsize=(7, max(7.0, 0.15 * rows + 1.5) if many else 7))
    ax = fig.add_subplot()
    ax.set_box_aspect(1)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1)
    handles, labels = [], []
    for k, (j, name) in enumerate(curves):
        known = data.labels[:, j] != UNKNOWN
        fpr, tpr = roc_curve(data.labels[known, j], data.scores[known, j])
        color, style = _style(k, len(curves))
        (line,) = ax.plot(fpr, tpr, color=color, linestyle=style, linewidth=1.0 if many else 1.2)
        handles.append(line)
        labels.append(f"{legend_text(name)} ({report['auroc'][name]:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    macro = report["macro_auroc"]
    ax.set_title("ROC, macro AUROC " + ("n/a" if macro is None else f"{macro:.4f}"))
    if many:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                  borderaxespad=0.0, ncol=columns, fontsize="x-small")  # fmt: skip
    elif curves:
        ax.legend(handles, labels, loc="lower right", fontsize="small")
    return fig


def render(data: Data, report: dict, out: Path) -> Path:
    """Draw the ROC image for `out` into its temporary file (removed on failure) and return
    that file's path; the caller renames it onto `out`."""
    fig = figure(data, report)
    tmp = temporary_path(out)
    try:
        fig.savefig(tmp, format=image_format(out), dpi=DPI, bbox_inches="tight")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp
