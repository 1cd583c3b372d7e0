"""Exports of an `Explanation` for papers and notebooks: `explain.json` and PNG figures.

    figs = figures(ex)                  # file name -> PNG bytes (matplotlib, Agg canvas, no pyplot state)
    write_json(ex, out / "explain.json")
    write_pngs(figs, out / "png")

Figures, one set per text t (1-based): tokens_t{t}.png (each token-scoring method, scores scaled by
their maximum), attention_t{t}.png (the layer × head grid of attention maps over the real tokens,
each map scaled by its maximum), heads_t{t}.png (with head-statistics: every head statistic as a
layer × head heat map), sinks_t{t}.png (with sink-scores: mean attention each token receives, per
layer, over heads), and, with qk-embedding, qk.png (the joint query–key embedding of every head,
all texts). Token text is drawn as plain text (math parsing off), so "$" or "_" show as written.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .explain import Explanation

DPI = 100
MAX_TOKEN = 16  # tick labels longer than this are cut with "…"


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _label(token: str) -> str:
    return token if len(token) <= MAX_TOKEN else token[: MAX_TOKEN - 1] + "…"


def real_tokens(ex: Explanation, t: int) -> tuple[np.ndarray, list[str]]:
    """Indices of the real tokens of text t and their strings."""
    idx = np.flatnonzero(np.array(ex.mask[t], dtype=bool))
    return idx, [ex.tokens[t][i] for i in idx]


def token_methods(ex: Explanation) -> list[str]:
    """The methods of `ex` that score tokens (hold `token_scores`), in run order."""
    return [name for name, data in ex.methods.items() if "token_scores" in data]


def colour_scale(ex: Explanation, t: int, name: str) -> float:
    """The score that gets full colour in a token row of `name`: the largest |score| over the real tokens,
    leaving out the target token itself for row-of-matrix methods (rollout, attention-flow: its own share dominates)."""
    idx, _ = real_tokens(ex, t)
    scores = np.abs(np.array(ex.methods[name]["token_scores"][t], dtype=float))
    if "matrix" in ex.methods[name] and len(idx) > 1:
        idx = idx[idx != ex.targets[t]]
    return float(scores[idx].max()) if idx.size else 0.0


def _scaled(ex: Explanation, t: int, name: str) -> np.ndarray:
    idx, _ = real_tokens(ex, t)
    values = np.array(ex.methods[name]["token_scores"][t], dtype=float)[idx]
    top = colour_scale(ex, t, name)
    return np.clip(values / top, -1, 1) if top > 0 else values


def tokens_figure(ex: Explanation, t: int) -> bytes:
    idx, toks = real_tokens(ex, t)
    names = token_methods(ex)
    data = np.array([_scaled(ex, t, m) for m in names])
    width, height = 1.6 + 0.42 * len(toks), 1.3 + 0.4 * len(names)
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=1.3 / width, right=1 - 0.2 / width, top=1 - 0.35 / height, bottom=0.95 / height)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(data, cmap=colormaps["RdBu_r"], vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(toks)), [_label(s) for s in toks], rotation=60, ha="right", parse_math=False)
    ax.set_yticks(range(len(names)), names, parse_math=False)
    ax.set_title(f"text {t + 1}: token scores (each row / its max, target token {ex.targets[t]} left out)", parse_math=False, fontsize="small")
    return _png(fig)


def attention_figure(ex: Explanation, t: int) -> bytes:
    idx, toks = real_tokens(ex, t)
    n, gap = len(idx), 1
    att = np.array(ex.attention, dtype=float)[:, t][:, :, idx][:, :, :, idx]  # (layers, heads, n, n)
    layers, heads = att.shape[:2]
    top = att.max(axis=(-1, -2), keepdims=True)
    att = np.divide(att, top, out=np.zeros_like(att), where=top > 0)
    mosaic = np.full((layers * (n + gap) - gap, heads * (n + gap) - gap), np.nan)
    for l_ in range(layers):
        for h in range(heads):
            mosaic[l_ * (n + gap): l_ * (n + gap) + n, h * (n + gap): h * (n + gap) + n] = att[l_, h]
    width = min(2.0 + 0.9 * heads, 16.0)
    height = 0.9 + (width - 1.2) * mosaic.shape[0] / mosaic.shape[1]
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=0.8 / width, right=1 - 0.4 / width, top=1 - 0.4 / height, bottom=0.5 / height)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(np.ma.masked_invalid(mosaic), cmap=colormaps["Blues"].with_extremes(bad="white"), vmin=0, vmax=1,
              interpolation="nearest")
    centre = (n - 1) / 2
    ax.set_xticks([h * (n + gap) + centre for h in range(heads)], [str(h) for h in range(heads)])
    ax.set_yticks([l_ * (n + gap) + centre for l_ in range(layers)], [str(l_) for l_ in range(layers)])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"text {t + 1}: attention maps over {n} tokens (rows = queries, each map / its max)", fontsize="small")
    return _png(fig)


def heads_figure(ex: Explanation, t: int) -> bytes:
    stats = ex.methods["head-statistics"]["stats"]
    names = list(stats)
    cols = 3
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.2 * cols, 2.6 * rows))
    fig.subplots_adjust(left=0.05, right=0.97, top=1 - 0.6 / (2.6 * rows), bottom=0.08, wspace=0.35, hspace=0.5)
    for k, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, k + 1)
        values = np.array(stats[name], dtype=float)[:, t]  # (layers, heads)
        image = ax.imshow(values, cmap=colormaps["viridis"], aspect="auto", interpolation="nearest")
        ax.set_title(name, fontsize="small", parse_math=False)
        ax.set_xlabel("head", fontsize="small")
        ax.set_ylabel("layer", fontsize="small")
        fig.colorbar(image, ax=ax)
    fig.suptitle(f"text {t + 1}: head statistics", fontsize="small")
    return _png(fig)


def sinks_figure(ex: Explanation, t: int) -> bytes:
    idx, toks = real_tokens(ex, t)
    scores = np.array(ex.methods["sink-scores"]["scores"], dtype=float)[:, t][:, :, idx].mean(axis=1)  # (layers, n)
    width, height = 2.0 + 0.42 * len(toks), 1.4 + 0.35 * scores.shape[0]
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=0.9 / width, right=1 - 1.1 / width, top=1 - 0.35 / height, bottom=0.95 / height)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(scores, cmap=colormaps["magma_r"], aspect="auto", vmin=0, interpolation="nearest")
    ax.set_xticks(range(len(toks)), [_label(s) for s in toks], rotation=60, ha="right", parse_math=False)
    ax.set_yticks(range(scores.shape[0]), [str(i) for i in range(scores.shape[0])])
    ax.set_ylabel("layer")
    ax.set_title(f"text {t + 1}: mean attention received (mean over heads)", fontsize="small")
    fig.colorbar(image, ax=ax)
    return _png(fig)


def qk_figure(ex: Explanation) -> bytes:
    """Every head's joint embedding in one axes: head h of layer l in the unit box at column h, row l."""
    heads = ex.methods["qk-embedding"]["heads"]
    layers, n_heads = len(heads), len(heads[0])
    points: dict[str, list[np.ndarray]] = {"q": [], "k": []}
    for l_, row in enumerate(heads):
        for h, e in enumerate(row):
            xy = np.array([e["x"], e["y"]], dtype=float).T
            centre, span = (xy.min(0) + xy.max(0)) / 2, np.ptp(xy, axis=0).max()  # one scale: the aspect is kept
            xy = 0.5 + 0.9 * (xy - centre) / span if span > 0 else np.full_like(xy, 0.5)
            xy += [h, layers - 1 - l_]
            kind = np.array(e["kind"])
            for k in points:
                points[k].append(xy[kind == k])
    width, height = 0.9 * n_heads + 0.8, 0.9 * layers + 0.8
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=0.6 / width, right=1 - 0.2 / width, top=1 - 0.45 / height, bottom=0.35 / height)
    ax = fig.add_subplot(1, 1, 1)
    for k, colour, marker in (("q", "#d62728", "o"), ("k", "#1f77b4", "s")):
        xy = np.concatenate(points[k])
        ax.scatter(xy[:, 0], xy[:, 1], s=3, c=colour, marker=marker, linewidths=0)
    ax.set_xlim(0, n_heads)
    ax.set_ylim(0, layers)
    ax.set_xticks(np.arange(n_heads) + 0.5, [f"H{h}" for h in range(n_heads)], fontsize="x-small")
    ax.set_yticks(np.arange(layers) + 0.5, [f"L{l_}" for l_ in reversed(range(layers))], fontsize="x-small")
    ax.set_xticks(np.arange(1, n_heads), minor=True)
    ax.set_yticks(np.arange(1, layers), minor=True)
    ax.grid(True, which="minor", color="#ccc", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    ax.set_title("joint query (red) / key (blue) embedding of every head, all texts, PCA (P093)", fontsize="small")
    return _png(fig)


def figures(ex: Explanation) -> dict[str, bytes]:
    """File name -> PNG bytes for every figure the methods of `ex` allow (module docstring)."""
    out: dict[str, bytes] = {}
    for t in range(len(ex.texts)):
        if token_methods(ex):
            out[f"tokens_t{t + 1}.png"] = tokens_figure(ex, t)
        if ex.attention:  # empty when explain did not keep the maps (max_map_values)
            out[f"attention_t{t + 1}.png"] = attention_figure(ex, t)
        if "head-statistics" in ex.methods:
            out[f"heads_t{t + 1}.png"] = heads_figure(ex, t)
        if "sink-scores" in ex.methods:
            out[f"sinks_t{t + 1}.png"] = sinks_figure(ex, t)
    if "qk-embedding" in ex.methods:
        out["qk.png"] = qk_figure(ex)
    return out


def write_json(ex: Explanation, path: str | Path) -> Path:
    """All numbers of `ex` as JSON (strict: no NaN or infinity)."""
    path = Path(path)
    path.write_text(json.dumps(ex.to_dict(), ensure_ascii=False, allow_nan=False), encoding="utf-8")
    return path


def write_pngs(figs: dict[str, bytes], folder: str | Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, png in figs.items():
        path = folder / name
        path.write_bytes(png)
        paths.append(path)
    return paths


def load_json(path: str | Path) -> dict[str, Any]:
    """An `explain.json` back as a dict."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
