"""The report's figures, drawn with matplotlib on the Agg canvas (no display, no pyplot state) as PNG bytes.

Text from users (mechanism names, parameters) is drawn as plain text: math parsing is
off, and legend labels are passed explicitly, so a name with `$` or a leading `_` shows
as written.

Speed figures are small multiples: one row per panel (a mode and causality), time and
peak memory side by side on log-log axes. In every panel the reference (SDPA) is the
thick black line with a grey band; each other series has a colour and marker of its own
within the figure (a mechanism's peers share its colour, dashed, with other markers), so
no two series of a panel look alike; spreads are error bars. The series of a panel are
drawn a little apart around each N (DODGE), so that equal values do not hide each other.
"""
from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

DPI = 100
PALETTE = tuple(colormaps["tab10"](i) for i in (0, 1, 2, 3, 4, 5, 6, 8, 9))  # tab10 without its grey (black and grey are the reference's)
MARKERS = "osD^vPXh<>"
PEER_MARKERS = "x+1*"
REFERENCE = {"color": "black", "linewidth": 2.6, "marker": "_", "markersize": 10, "zorder": 1.8}  # under the series
REFERENCE_BAND = "#bbbbbb"
DODGE = 0.025  # octaves between neighbouring series' markers at one N
REFERENCE_STYLES = (":", "-.", (0, (6, 2, 1, 2, 1, 2)))  # reference lines sharing a colour
MAX_LABEL = 48  # legend and tick labels longer than this are cut with "…"


@dataclass(frozen=True)
class Line:
    """One curve: y against N, with an optional spread (low, high) per point.

    Lines with the same `key` share a colour (a mechanism and its peers); a peer is dashed.
    """

    label: str
    n: Sequence[int]
    y: Sequence[float | None]
    low: Sequence[float | None] = ()
    high: Sequence[float | None] = ()
    peer: bool = False
    key: str = ""


@dataclass(frozen=True)
class SpeedPanel:
    """One row of a speed figure: a title, the reference's time and memory lines (None when not measured),
    and the series' time and memory lines."""

    title: str
    reference_time: Line | None
    reference_memory: Line | None
    time: Sequence[Line]
    memory: Sequence[Line]
    reference_note: str = "no SDPA measured here"  # shown in an axes where the reference has no point


def png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)  # a fixed layout: tight_layout and tight bboxes double the cost
    return buf.getvalue()


def _short(text: str, width: int = MAX_LABEL) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def styles(lines: Sequence[Line]) -> dict[str, tuple[tuple[float, ...], str, str]]:
    """label -> (colour, marker, line style), no two labels alike: each key its colour and marker (the first
    len(PALETTE) keys differ in both), a peer its key's colour, dashed, with a peer marker.

    ValueError when the lines are too many to tell apart this way (a panel is split long before).
    """
    keys = list(dict.fromkeys(line.key or line.label for line in lines))
    base = {key: (i, PALETTE[i % len(PALETTE)], MARKERS[(i % len(PALETTE) + i // len(PALETTE)) % len(MARKERS)])
            for i, key in enumerate(keys)}
    out: dict[str, tuple[tuple[float, ...], str, str]] = {}
    peers_of: dict[str, int] = {}
    for line in lines:
        if line.label in out:
            continue
        key = line.key or line.label
        index, colour, marker = base[key]
        if line.peer:
            marker = PEER_MARKERS[(index // len(PALETTE) + peers_of.get(key, 0)) % len(PEER_MARKERS)]
            peers_of[key] = peers_of.get(key, 0) + 1
        out[line.label] = (colour, marker, "--" if line.peer else "-")
    if len(set(out.values())) < len(out):
        raise ValueError(f"lines: expected series that can be told apart by colour and marker, got {len(keys)} "
                         f"mechanisms and {sum(peers_of.values())} peers in one figure")
    return out


def _points(line: Line) -> tuple[list[int], list[float], list[float], list[float]]:
    low = list(line.low) or [None] * len(line.n)
    high = list(line.high) or [None] * len(line.n)
    rows = sorted((n, y, lo, hi) for n, y, lo, hi in zip(line.n, line.y, low, high) if y is not None and y > 0 and n > 0)
    ns = [r[0] for r in rows]
    ys = [r[1] for r in rows]
    below = [r[1] - r[2] if r[2] is not None and 0 < r[2] <= r[1] else 0.0 for r in rows]
    above = [r[3] - r[1] if r[3] is not None and r[3] >= r[1] else 0.0 for r in rows]
    return ns, ys, below, above


def _draw(ax: Axes, line: Line, style: tuple[tuple[float, ...], str, str], shift: float = 0.0) -> None:
    """A series with its error bars, `shift` octaves to the side of its N (so equal values stay visible)."""
    ns, ys, below, above = _points(line)
    if not ns:
        return
    ns = [n * 2.0**shift for n in ns]
    colour, marker, linestyle = style
    (artist,) = ax.plot(ns, ys, color=colour, marker=marker, markersize=6, linestyle=linestyle, linewidth=1.5,
                        label=line.label, markerfacecolor="none" if line.peer else colour, markeredgewidth=1.4)
    artist.set_gid("series")
    if any(below) or any(above):
        ax.errorbar(ns, ys, yerr=[below, above], fmt="none", ecolor=colour, elinewidth=1.0, capsize=3, alpha=0.8)


def _draw_reference(ax: Axes, line: Line | None, extent: tuple[int, int] | None, note: str) -> None:
    """The reference line with its band; a note in the axes when it has no point to draw."""
    ns, ys, below, above = _points(line) if line is not None else ([], [], [], [])
    if extent is not None:
        keep = [i for i, n in enumerate(ns) if extent[0] <= n <= extent[1]]
        ns, ys, below, above = ([x[i] for i in keep] for x in (ns, ys, below, above))
    if not ns:
        ax.text(0.02, 0.97, note, transform=ax.transAxes, ha="left", va="top", fontsize="small", color="#a15c00")
        return
    lows = [y - b for y, b in zip(ys, below)]
    highs = [y + a for y, a in zip(ys, above)]
    if any(below) or any(above):
        ax.fill_between(ns, lows, highs, color=REFERENCE_BAND, alpha=0.6, linewidth=0, zorder=1)
    (artist,) = ax.plot(ns, ys, label=line.label, **REFERENCE)
    artist.set_gid("reference")


def seconds_text(value: float) -> str:
    """An axis label for a time: 500 µs, 2 ms, 1.5 s."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if value >= scale * 0.999:
            return f"{value / scale:.3g} {unit}"
    return f"{value / 1e-9:.3g} ns"


def _log_axes(ax: Axes, ylabel: str, title: str, *, seconds: bool) -> None:
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: seconds_text(value) if seconds else f"{value:g}"))
    ax.set_xlabel("N (tokens)")
    ax.set_ylabel(ylabel, parse_math=False)
    ax.set_title(title, parse_math=False, fontsize="medium", loc="left")
    ax.grid(True, which="major", alpha=0.3)


def speed_figure(title: str, panels: Sequence[SpeedPanel], *, time_label: str = "median time",
                 memory_label: str = "peak memory (MiB)") -> Figure:
    """Rows of (time, memory) log-log axes, one row per panel, one legend below them all; `title` (shown by the
    page above the image) is the figure's label."""
    lines = [line for p in panels for line in (*p.time, *p.memory)]
    style = styles(lines)
    labels = list(dict.fromkeys(line.label for line in lines if line.label in style))
    references = list(dict.fromkeys(ref.label for p in panels for ref in (p.reference_time, p.reference_memory)
                                    if ref is not None))
    entries = len(labels) + len(references)
    longest = max((len(_short(x)) for x in labels + references), default=1)
    columns = max(1, min(entries, int(10.4 / (0.55 + 0.075 * longest))))
    legend_h = 0.26 * math.ceil(entries / columns) + 0.25
    row_h, top_h = 3.3, 0.3
    height = top_h + row_h * len(panels) + legend_h
    fig = Figure(figsize=(11.0, height))
    fig.subplots_adjust(left=0.075, right=0.985, wspace=0.22, hspace=0.55, top=1 - top_h / height,
                        bottom=(legend_h + 0.55) / height)
    handles: dict[str, object] = {}
    for row, panel in enumerate(panels):
        extent = None
        ns = [n for line in panel.time for n, y in zip(line.n, line.y) if y]
        if ns:
            extent = (min(ns), max(ns))
        for column, (ylabel, ref, series) in enumerate(((time_label, panel.reference_time, panel.time),
                                                        (memory_label, panel.reference_memory, panel.memory))):
            ax = fig.add_subplot(len(panels), 2, 2 * row + column + 1)
            _draw_reference(ax, ref, extent, panel.reference_note)
            drawn = [line for line in series if _points(line)[0]]
            for i, line in enumerate(drawn):  # side by side around N: equal values do not hide each other
                _draw(ax, line, style[line.label], DODGE * (i - (len(drawn) - 1) / 2))
            _log_axes(ax, ylabel, f"{panel.title} — {'time' if column == 0 else 'peak memory'}", seconds=column == 0)
            for artist in ax.get_lines():
                handles.setdefault(artist.get_label(), artist)
    fig.set_label(title)
    order = [x for x in references + labels if x in handles]
    if order:
        legend = fig.legend([handles[x] for x in order], [_short(x) for x in order], loc="lower center", ncol=columns,
                            fontsize="small", frameon=False, bbox_to_anchor=(0.5, 0.0))
        for text in legend.get_texts():
            text.set_parse_math(False)
    return fig


def exponent_figure(title: str, columns: Sequence[str],
                    rows: Sequence[tuple[str, Sequence[float | None], float | None]]) -> Figure:
    """A dot plot with one panel per column (e.g. per mode) and one row per (label, measured per column,
    declared): a filled dot at the measured exponent, a hollow diamond at the declared one, joined by a line;
    rows top to bottom as given, the same in every panel."""
    row_h = 0.19
    height = 1.0 + row_h * max(1, len(rows))
    left = 0.3 + 0.068 * max((len(_short(r[0], 40)) for r in rows), default=1)
    width = left + 3.4 * max(1, len(columns)) + 0.3
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=left / width, right=1 - 0.3 / width, top=1 - 0.5 / height, bottom=0.5 / height,
                        wspace=0.08)
    ys = np.arange(len(rows))[::-1]
    values = [v for r in rows for v in (*r[1], r[2]) if v is not None]
    low, high = min(values, default=0.0), max(values, default=2.0)
    share = None
    for c, column in enumerate(columns):
        ax = fig.add_subplot(1, len(columns), c + 1, sharey=share)
        share = share or ax
        for y, (_, measured, declared) in zip(ys, rows):
            if declared is not None:
                ax.plot([declared], [y], marker="D", markerfacecolor="white", markeredgecolor="black", markersize=5,
                        linestyle="none", zorder=2)
            if measured[c] is None:
                continue
            if declared is not None:
                ax.plot([declared, measured[c]], [y, y], color="#999999", linewidth=1.0, zorder=1)
            ax.plot([measured[c]], [y], marker="o", color=PALETTE[0], markersize=5, linestyle="none", zorder=3)
        if c == 0:
            ax.set_yticks(ys, [_short(r[0], 40) for r in rows], parse_math=False, fontsize="small")
        else:
            ax.tick_params(labelleft=False)
        ax.set_ylim(-0.7, len(rows) - 0.3)
        ax.set_xlim(min(0.0, low - 0.1), max(2.0, high) + 0.3)
        ax.set_xlabel("exponent e (time ∝ N^e)", parse_math=False)
        ax.grid(True, axis="x", alpha=0.3)
        ax.set_title(column, parse_math=False, fontsize="medium")
    fig.suptitle(title, parse_math=False, fontsize="medium", x=left / width, ha="left")
    handles = [Line2D([], [], marker="o", color=PALETTE[0], linestyle="none"),
               Line2D([], [], marker="D", markerfacecolor="white", markeredgecolor="black", linestyle="none")]
    fig.legend(handles, ["measured", "declared"], loc="upper right", ncol=2, fontsize="small", frameon=False)
    return fig


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
    return png(fig)


@dataclass(frozen=True)
class Curve:
    """One curve of a `curves_figure` panel: y against x. Curves with the same `key` share a colour and marker
    (a measurement and its model); a dashed curve is a model or a baseline, not a measurement."""

    label: str
    x: Sequence[float]
    y: Sequence[float | None]
    key: str = ""
    dashed: bool = False


@dataclass(frozen=True)
class CurvePanel:
    """One axes of a `curves_figure`: its curves and horizontal reference lines (label, y, key)."""

    title: str
    xlabel: str
    ylabel: str
    curves: Sequence[Curve]
    references: Sequence[tuple[str, float, str]] = ()
    log_x: bool = False
    log_y: bool = False
    invert_x: bool = False
    seconds: bool = False  # the y axis is a time in seconds (labelled 2 ms, 500 µs)


def curves_figure(title: str, panels: Sequence[CurvePanel], *, columns: int = 2) -> Figure:
    """Panels side by side (`columns` per row), each with its own legend; every key one colour and marker across
    the figure (the first len(PALETTE) keys differ in both), models dashed, references dotted (dash-dotted for a
    second one of the same key)."""
    keys = list(dict.fromkeys([c.key or c.label for p in panels for c in p.curves]
                              + [key or label for p in panels for label, _, key in p.references]))
    look = {key: (PALETTE[i % len(PALETTE)], MARKERS[(i % len(PALETTE) + i // len(PALETTE)) % len(MARKERS)])
            for i, key in enumerate(keys)}
    columns = max(1, min(columns, len(panels)))
    rows = max(1, math.ceil(len(panels) / columns))
    fig = Figure(figsize=(5.4 * columns, 3.9 * rows))
    fig.subplots_adjust(left=0.08, right=0.98, top=1 - 0.45 / (3.9 * rows), bottom=0.5 / (3.9 * rows),
                        wspace=0.28, hspace=0.45)
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, columns, i + 1)
        for curve in panel.curves:
            points = sorted((x, y) for x, y in zip(curve.x, curve.y) if y is not None and math.isfinite(y)
                            and (not panel.log_y or y > 0) and (not panel.log_x or x > 0))
            if not points:
                continue
            colour, marker = look[curve.key or curve.label]
            ax.plot([x for x, _ in points], [y for _, y in points], color=colour, marker=marker,
                    linestyle="--" if curve.dashed else "-", markersize=5, linewidth=1.4, label=_short(curve.label),
                    markerfacecolor="none" if curve.dashed else colour)
        seen: dict[str, int] = {}
        for label, y, key in panel.references:  # references of one key: dotted, then dash-dotted, ...
            if panel.log_y and y <= 0:
                continue
            style = REFERENCE_STYLES[seen.get(key, 0) % len(REFERENCE_STYLES)]
            seen[key] = seen.get(key, 0) + 1
            ax.axhline(y, color=look[key or label][0] if key else "black", linestyle=style, linewidth=1.3,
                       label=_short(label))
        if panel.log_x:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        if panel.log_y:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        if panel.seconds:
            ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: seconds_text(value)))
        if panel.invert_x:
            ax.invert_xaxis()
        ax.set_xlabel(panel.xlabel, parse_math=False)
        ax.set_ylabel(panel.ylabel, parse_math=False)
        ax.set_title(panel.title, parse_math=False, fontsize="medium", loc="left")
        ax.grid(True, which="major", alpha=0.3)
        if ax.get_lines():
            legend = ax.legend(fontsize="x-small", frameon=False)
            for text in legend.get_texts():
                text.set_parse_math(False)
    fig.set_label(title)
    return fig
