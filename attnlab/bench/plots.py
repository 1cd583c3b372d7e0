"""The report's figures, drawn with matplotlib on the Agg canvas (no display, no pyplot state) as PNG bytes.

Text from users (mechanism names, parameters) is drawn as plain text: math parsing is
off, and legend labels are passed explicitly, so a name with `$` or a leading `_` shows
as written.
"""
from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

DPI = 100
MARKERS = "osD^v<>ph*"
MAX_LABEL = 48  # legend and tick labels longer than this are cut with "…"


@dataclass(frozen=True)
class Line:
    """One curve: y against N for a mechanism (solid) or a peer library running it (dashed)."""

    label: str
    n: Sequence[int]
    y: Sequence[float]
    peer: bool = False
    colour_key: str = ""  # curves with the same key share a colour (a mechanism and its peers)


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)  # a fixed layout: tight_layout and tight bboxes double the cost
    return buf.getvalue()


def _short(text: str, width: int = MAX_LABEL) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _styles(lines: Sequence[Line]) -> dict[str, tuple[object, str]]:
    """colour key -> (colour, marker), stable in the order the keys first appear."""
    keys = list(dict.fromkeys(line.colour_key or line.label for line in lines))
    cmap = colormaps["tab10" if len(keys) <= 10 else "tab20"]
    return {key: (cmap(i % cmap.N), MARKERS[(i // cmap.N) % len(MARKERS)]) for i, key in enumerate(keys)}


def scaling_figure(title: str, panels: Sequence[tuple[str, Sequence[Line]]]) -> bytes:
    """Side-by-side log-log panels (e.g. time and peak memory against N) with one legend below them.

    `panels` is a sequence of (y-axis label, lines); points with y <= 0 or None are left out.
    """
    styles = _styles([line for _, lines in panels for line in lines])
    labels = list(dict.fromkeys(line.label for _, lines in panels for line in lines))
    columns = max(1, min(len(labels), int(5.2 * len(panels) // (0.4 + 0.075 * max(map(len, labels), default=1)))))
    legend_rows = math.ceil(len(labels) / columns)
    axes_h, top_h, bottom_h, legend_h = 3.4, 0.45, 0.55, 0.22 * legend_rows + 0.2
    height = top_h + axes_h + bottom_h + legend_h
    fig = Figure(figsize=(5.2 * len(panels), height))
    fig.subplots_adjust(left=0.08, right=0.98, wspace=0.28, top=1 - top_h / height, bottom=(bottom_h + legend_h) / height)
    handles: dict[str, Line2D] = {}
    for index, (ylabel, lines) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), index + 1)
        for line in lines:
            points = sorted((n, y) for n, y in zip(line.n, line.y) if y is not None and y > 0 and n > 0)
            if not points:
                continue
            colour, marker = styles[line.colour_key or line.label]
            (artist,) = ax.plot(
                [p[0] for p in points], [p[1] for p in points], color=colour, marker=marker, markersize=4,
                linestyle="--" if line.peer else "-", linewidth=1.4,
            )
            handles.setdefault(line.label, artist)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.set_xlabel("N (tokens)")
        ax.set_ylabel(ylabel, parse_math=False)
        ax.grid(True, which="major", alpha=0.3)
    fig.suptitle(title, parse_math=False)
    if handles:
        legend = fig.legend(list(handles.values()), [_short(label) for label in handles], loc="lower center",
                            ncol=columns, fontsize="small", frameon=False, bbox_to_anchor=(0.5, 0.0))
        for text in legend.get_texts():
            text.set_parse_math(False)
    return _png(fig)


def heatmap(
    title: str,
    rows: Sequence[str],
    columns: Sequence[str],
    values: Sequence[Sequence[float | None]],
    notes: Sequence[Sequence[str]],
    *,
    xlabel: str = "",
    colorbar_label: str = "",
) -> bytes:
    """A rows × columns heat map of values in [0, 1], each cell annotated with its note; None cells grey."""
    data = np.ma.masked_invalid(np.array([[math.nan if v is None else v for v in row] for row in values], dtype=float))
    left = 0.3 + 0.075 * max(map(len, rows), default=1)
    width, height = left + 1.0 * len(columns) + 1.3, 1.15 + 0.4 * len(rows)
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=left / width, right=1 - 1.3 / width, top=1 - 0.45 / height, bottom=0.7 / height)
    ax = fig.add_subplot(1, 1, 1)
    cmap = colormaps["viridis"].with_extremes(bad="#d9d9d9")
    image = ax.imshow(data, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(columns)), list(columns), parse_math=False)
    ax.set_yticks(range(len(rows)), [_short(r) for r in rows], parse_math=False)
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            dark = value is not None and value < 0.6
            ax.text(j, i, notes[i][j], ha="center", va="center", parse_math=False,
                    fontsize="small" if value is not None else "x-small",
                    color="white" if dark else "black")
    ax.set_xlabel(xlabel, parse_math=False)
    ax.set_title(title, parse_math=False)
    cax = fig.add_axes((1 - 1.05 / width, 0.7 / height, 0.15 / width, 1 - 1.15 / height))
    bar = fig.colorbar(image, cax=cax)
    bar.set_label(colorbar_label, parse_math=False)
    return _png(fig)
