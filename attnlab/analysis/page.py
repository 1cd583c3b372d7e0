"""The self-contained HTML page of `attnlab explain`: inline CSS and JavaScript, no network.

Per text: the text itself; its tokens coloured by each token-scoring method (rollout,
attention-flow, relevance-generic, relevance-lrp, sink-scores — click a token to see the methods
with a matrix for that output token instead of the target); the layer × head grid of attention
maps (canvases drawn by the inline script from the embedded data; click one to enlarge it with
token labels); head-statistics as layer × head tables (keyed by the catalogue names of the
statistics); the sink table of sink-scores; layer-similarity's layer × layer CKA table; head-classes' layer ×
head table of classes (local / hybrid / global) and NMI, with each layer's mean NMI; attention-patterns' layer ×
head table of each head's closest pattern; qk-decomposition's layer × head table of the singular terms needed. Methods and their JSON keys are the catalogue's names. Methods left out because they do not apply to the model are listed
with the reason at the top. Then the QK embedding scatter per head (all texts jointly), the PNG figures
(inline base64). Text from users and tokenizers is escaped by `html.escape` where the page is
written, and the script puts it in the DOM only as text (`textContent`, canvas `fillText`). The
data travels in a <script type="application/json"> element whose JSON has "<", ">", "&" and the
line separators escaped, so no string can close the element.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from .explain import Explanation
from .export import colour_scale, real_tokens, token_methods

DIGITS = 5  # decimals of the numbers embedded for the script


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, DIGITS)
    if isinstance(value, list):
        return [_round(v) for v in value]
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    return value


def script_json(data: Any) -> str:
    """JSON safe inside a <script> element: no "<", ">", "&", U+2028 or U+2029 left as such."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text


def _colour(score: float, top: float) -> str:
    """Background for a token: red for positive, blue for negative, alpha = |score| / top."""
    alpha = min(abs(score) / top, 1.0) if top > 0 else 0.0
    rgb = "214,39,40" if score >= 0 else "31,119,180"
    return f"rgba({rgb},{alpha:.3f})"


def _strip(ex: Explanation, t: int, name: str) -> str:
    idx, toks = real_tokens(ex, t)
    scores = [ex.methods[name]["token_scores"][t][i] for i in idx]
    top = colour_scale(ex, t, name)
    row = ex.targets[t] if "matrix" in ex.methods[name] else -1
    spans = "".join(
        f"<span class='tok{' sel' if i == row else ''}' data-i='{i}' style='background:{_colour(s, top)}' title='{_e(f'{tok} {s:.4g}')}'>{_e(tok)}</span>"
        for i, tok, s in zip(idx, toks, scores)
    )
    return f"<div class='strip' data-method='{_e(name)}' data-text='{t}'><span class='label'>{_e(name)}</span>{spans}</div>"


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """An HTML table; header text is escaped here, cells are HTML the caller escaped."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table class='{_e(cls)}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _heat_rows(grid: list[list[float]], rgb: str, fmt: str) -> tuple[list[list[str]], float, float]:
    """Table rows "<b>row index</b>, cells" of `grid`, each cell coloured rgba(rgb, share of the grid's range) and
    written with `fmt`; and the grid's smallest and largest value."""
    flat = [v for row in grid for v in row]
    low, high = min(flat), max(flat)
    rows = []
    for l_, row in enumerate(grid):
        cells = [f"<b>{l_}</b>"]
        for v in row:
            share = (v - low) / (high - low) if high > low else 0.0
            cells.append(f"<span class='cell' style='background:rgba({rgb},{share:.3f});"
                         f"color:{'#fff' if share > 0.55 else '#000'}'>{v:{fmt}}</span>")
        rows.append(cells)
    return rows, low, high


def _heads_section(ex: Explanation, t: int) -> str:
    data = ex.methods["head-statistics"]
    parts = []
    for name, values in data["stats"].items():
        rows, _, _ = _heat_rows([row[t] for row in values], "68,1,84", ".2f")  # (layers, heads)
        table = _table(["layer \\ head", *map(str, range(ex.heads))], rows, "stats")
        parts.append(f"<details open><summary><b>{_e(name)}</b>: {_e(data['descriptions'][name])}</summary>{table}</details>")
    return "".join(parts)


def _sinks_section(ex: Explanation, t: int) -> str:
    rows = []
    for row in ex.methods["sink-scores"]["table"]:
        if row["text"] != t:
            continue
        heads = ", ".join(f"L{l_}H{h}" for l_, h in row["layer_heads"][:12]) + (" …" if len(row["layer_heads"]) > 12 else "")
        rows.append([str(row["token"]), f"<code>{_e(ex.tokens[t][row['token']])}</code>", str(row["heads"]),
                     f"{100 * row['share_of_heads']:.0f}%", f"{row['mean_score']:.3f}", _e(heads)])
    if not rows:
        return "<p>No key receives more than 5/N of the attention in any head.</p>"
    return ("<p>A key is a sink in a head when the mean attention it receives from the real queries exceeds "
            "5/N (N real tokens).</p>" + _table(["position", "token", "heads", "share of heads", "mean score", "layer/head"], rows, "sinks"))


def _similarity_section(ex: Explanation, t: int) -> str:
    data = ex.methods["layer-similarity"]
    grid = data["cka"][t]  # (layers, layers)
    rows, low, high = _heat_rows(grid, "8,81,156", ".3f")
    return (f"<p class='meta'>{_e(data['measure'])} between every pair of layers over the real tokens of this text, of the "
            f"{_e(data['source'])}; 1 = the same up to rotation and scale. Colour from the smallest ({low:.3f}) to the "
            f"largest value.</p>" + _table(["layer \\ layer", *map(str, range(len(grid)))], rows, "similarity"))


CLASS_COLOURS = {"local": "#fdae6b", "hybrid": "#74c476", "global": "#9ecae1"}  # head-classes: class -> background


def _classes_section(ex: Explanation, t: int) -> str:
    data = ex.methods["head-classes"]
    rows = []
    for l_, (nmi, classes) in enumerate(zip(data["nmi"], data["classes"])):
        cells = [f"<b>{l_}</b>"]
        for v, c in zip(nmi[t], classes[t]):
            colour = CLASS_COLOURS.get(c, "#fff")
            cells.append(f"<span class='cell' style='background:{colour}' title='{_e(c)}, NMI {v:.4f}'>{_e(c[:1].upper())} {v:.2f}</span>")
        mark = " ★" if data["hybrid_layer"][t] == l_ else ""
        cells.append(f"{data['layer_nmi'][l_][t]:.3f}{mark}")
        rows.append(cells)
    legend = " ".join(f"<span class='cell' style='display:inline;background:{colour}'>{_e(name)}</span>"
                      for name, colour in CLASS_COLOURS.items())
    return (f"<p class='meta'>{legend} — by the NMI of each head's map over this text: local above "
            f"{data['local_above']:g}, global below {data['global_below']:g}, hybrid in between. ★ the layer whose "
            f"mean NMI is closest to s = {data['hybrid_target']:g}, the one NMI-HAD distils.</p>"
            + _table(["layer \\ head", *map(str, range(ex.heads)), "mean NMI"], rows, "classes"))


PATTERN_COLOURS = {"matching-token": "#fdd0a2", "same-sentence": "#c7e9c0", "neighbours": "#dadaeb",
                   "previous": "#fcbba1", "next": "#c6dbef", "first-token": "#d9d9d9"}  # attention-patterns


def _patterns_section(ex: Explanation, t: int) -> str:
    data = ex.methods["attention-patterns"]
    rows = []
    for l_, (names, sims, shares) in enumerate(zip(data["best"][t], data["best_similarity"][t], data["best_match"][t])):
        cells = [f"<b>{l_}</b>"]
        for name, sim, share in zip(names, sims, shares):
            cells.append(f"<span class='cell' style='background:{PATTERN_COLOURS.get(name, '#fff')}' "
                         f"title='{_e(name)}: similarity {sim:.3f}, {share:.0%} of the attention on it'>"
                         f"{_e(name)} {sim:.2f}</span>")
        rows.append(cells)
    return ("<p class='meta'>For each head, the pattern its map is closest to (1 − total variation between its rows "
            "and the normalised pattern; 1 = it is that pattern); hover for the share of attention on it.</p>"
            + _table(["layer \\ head", *map(str, range(ex.heads))], rows, "patterns"))


def _decomposition_section(ex: Explanation, t: int) -> str:
    data = ex.methods["qk-decomposition"]
    rows = []
    for l_, (layer, needed) in enumerate(zip(data["layers"], data["terms_needed_by_text"][t])):
        cells = [f"<b>{l_}</b>"]
        for head, k in zip(layer["heads"], needed):
            pair = next((p for p in head["pairs"] if p["text"] == t), None)
            tip = "" if pair is None else (
                f"{ex.tokens[t][pair['query']]} → {ex.tokens[t][pair['key']]} (weight {pair['weight']:.2f}): "
                + ", ".join(f"term {x['term']} σ={x['sigma']:.2f} {x['share']:.0%}" for x in pair["top_terms"]))
            share = min(1.0, k / max(1, head["rank"]))
            cells.append(f"<span class='cell' style='background:rgba(165,15,21,{share:.3f});color:{'#fff' if share > 0.55 else '#000'}' "
                         f"title='{_e(tip)}'>{k:.1f}/{head['rank']}</span>")
        rows.append(cells)
    return (f"<p class='meta'>Terms of the SVD of W_Q W_Kᵀ needed to reach {data['share']:.0%} of the score, averaged over "
            "the (up to 3) strongest query–key pairs of this text, out of the rank; few terms = sparsely coded "
            "(hover for the strongest pair's largest terms).</p>"
            + _table(["layer \\ head", *map(str, range(ex.heads))], rows, "decomposition"))


def _text_section(ex: Explanation, t: int) -> str:
    idx, toks = real_tokens(ex, t)
    target = ex.targets[t]
    parts = [f"<section class='text' id='text{t + 1}'><h2>Text {t + 1}</h2>",
             f"<blockquote class='source'>{_e(ex.texts[t])}</blockquote>",
             f"<p class='meta'>{len(idx)} tokens; target token <code>{_e(ex.tokens[t][target])}</code> (position {target}).</p>"]
    names = token_methods(ex)
    if names:
        parts.append("<h3>Tokens</h3><p class='meta'>Colour = score / the largest score of the row (for rollout, "
                     "attention-flow and the relevances the output token's own share is left out of that maximum). "
                     "Click a token to show rollout, attention-flow and the relevances for that output token; "
                     "<span class='reset' data-text='" + str(t) + "'>back to the target</span>.</p>")
        parts += [_strip(ex, t, name) for name in names]
    if ex.attention:
        parts.append(f"<h3>Attention maps (layer × head)</h3><p class='meta'>Rows are queries, columns keys; each map "
                     f"scaled by its maximum. Click a map to enlarge it.</p><div class='grid' data-text='{t}'></div>"
                     f"<div class='zoom'><canvas data-text='{t}'></canvas><p class='caption'></p></div>")
    else:
        parts.append("<h3>Attention maps (layer × head)</h3><p class='meta'>Not kept: too many numbers for the page "
                     "(see the notes at the top; explain's max_map_values).</p>")
    if "head-statistics" in ex.methods:
        parts.append("<h3>Head statistics</h3>" + _heads_section(ex, t))
    if "sink-scores" in ex.methods:
        parts.append("<h3>Attention sinks</h3>" + _sinks_section(ex, t))
    if "layer-similarity" in ex.methods:
        parts.append("<h3>Layer similarity</h3>" + _similarity_section(ex, t))
    if "head-classes" in ex.methods:
        parts.append("<h3>Head classes</h3>" + _classes_section(ex, t))
    if "attention-patterns" in ex.methods:
        parts.append("<h3>Attention patterns</h3>" + _patterns_section(ex, t))
    if "qk-decomposition" in ex.methods:
        parts.append("<h3>Score decomposition</h3>" + _decomposition_section(ex, t))
    parts.append("</section>")
    return "".join(parts)


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;margin-top:2em}h3{margin-top:1.4em}
.meta{color:#555;font-size:.92em}.source{font-size:1.1em;background:#f6f6f6;padding:.5em 1em;white-space:pre-wrap}
.strip{margin:.25em 0;line-height:2}.strip .label{display:inline-block;width:10em;color:#555;font-size:.9em}
.tok{padding:.15em .3em;margin:0 1px;border-radius:3px;cursor:pointer;font-family:ui-monospace,monospace;white-space:pre}
.tok.sel{outline:2px solid #000}.reset{text-decoration:underline;cursor:pointer}
.grid{display:grid;gap:3px;align-items:center}.grid canvas{width:100%;aspect-ratio:1/1;image-rendering:pixelated;border:1px solid #ddd;cursor:pointer}
.grid .hdr{font-size:.75em;color:#555;text-align:center}.zoom canvas{max-width:100%;margin-top:.5em}
table{border-collapse:collapse;margin:.4em 0;font-size:.85em}td,th{border:1px solid #ddd;padding:.15em .35em;text-align:right}
.cell{display:block;padding:0 .2em}.qk canvas{image-rendering:auto}
.figs img{max-width:100%;display:block;margin:1em 0;border:1px solid #eee}
"""

JS = r"""
(function () {
  'use strict';
  const D = JSON.parse(document.getElementById('attnlab-data').textContent);
  const real = t => D.mask[t].map((m, i) => m ? i : -1).filter(i => i >= 0);
  function colour(v) {  // white -> dark blue
    const r = Math.round(255 - 247 * v), g = Math.round(255 - 207 * v), b = Math.round(255 - 148 * v);
    return [r, g, b];
  }
  function drawMap(canvas, m, idx, cell, labels) {
    const n = idx.length, pad = labels ? 90 : 0;
    canvas.width = pad + n * cell; canvas.height = pad + n * cell;
    const ctx = canvas.getContext('2d');
    let top = 0;
    for (const i of idx) for (const j of idx) top = Math.max(top, m[i][j]);
    ctx.fillStyle = '#fff'; ctx.fillRect(0, 0, canvas.width, canvas.height);
    idx.forEach((i, a) => idx.forEach((j, b) => {
      const [r, g, bl] = colour(top > 0 ? m[i][j] / top : 0);
      ctx.fillStyle = `rgb(${r},${g},${bl})`;
      ctx.fillRect(pad + b * cell, pad + a * cell, cell, cell);
    }));
    if (!labels) return;
    ctx.fillStyle = '#222'; ctx.font = '11px monospace'; ctx.textBaseline = 'middle';
    idx.forEach((i, a) => {
      const s = labels[i].length > 11 ? labels[i].slice(0, 10) + '…' : labels[i];
      ctx.textAlign = 'right'; ctx.fillText(s, pad - 4, pad + a * cell + cell / 2);
      ctx.save(); ctx.translate(pad + a * cell + cell / 2, pad - 4); ctx.rotate(-Math.PI / 2);
      ctx.textAlign = 'left'; ctx.fillText(s, 0, 0); ctx.restore();
    });
  }
  document.querySelectorAll('.grid[data-text]').forEach(grid => {
    const t = +grid.dataset.text, idx = real(t), L = D.attention.length, H = D.heads;
    if (!L) return;  // maps not kept (explain's max_map_values)
    grid.style.gridTemplateColumns = `2.5em repeat(${H}, 1fr)`;
    const zoom = grid.nextElementSibling, big = zoom.querySelector('canvas'), cap = zoom.querySelector('.caption');
    const show = (l, h) => {
      drawMap(big, D.attention[l][t][h], idx, Math.max(10, Math.min(28, Math.floor(560 / idx.length))), D.tokens[t]);
      cap.textContent = `layer ${l}, head ${h} (${D.layer_names[l]})`;
    };
    grid.appendChild(document.createElement('span'));
    for (let h = 0; h < H; h++) {
      const s = document.createElement('span'); s.className = 'hdr'; s.textContent = 'H' + h; grid.appendChild(s);
    }
    for (let l = 0; l < L; l++) {
      const s = document.createElement('span'); s.className = 'hdr'; s.textContent = 'L' + l; grid.appendChild(s);
      for (let h = 0; h < H; h++) {
        const c = document.createElement('canvas');
        c.title = `layer ${l}, head ${h}`;
        drawMap(c, D.attention[l][t][h], idx, 1, null);
        c.addEventListener('click', () => show(l, h));
        grid.appendChild(c);
      }
    }
    show(L - 1, 0);
  });
  function recolour(t, row) {
    document.querySelectorAll(`.strip[data-text="${t}"]`).forEach(strip => {
      const data = D.methods[strip.dataset.method];
      const scores = data.matrix ? data.matrix[t][row] : data.token_scores[t];
      let top = 0;  // as colour_scale: the row's own token left out
      for (const i of real(t)) if (!(data.matrix && i === row)) top = Math.max(top, Math.abs(scores[i]));
      strip.querySelectorAll('.tok').forEach(span => {
        const i = +span.dataset.i, v = scores[i], a = top > 0 ? Math.min(Math.abs(v) / top, 1) : 0;
        span.style.background = `rgba(${v >= 0 ? '214,39,40' : '31,119,180'},${a.toFixed(3)})`;
        span.title = `${D.tokens[t][i]} ${v.toPrecision(4)}`;
        span.classList.toggle('sel', i === row);
      });
    });
  }
  document.querySelectorAll('.strip .tok').forEach(span => span.addEventListener('click', () => {
    recolour(+span.parentElement.dataset.text, +span.dataset.i);
  }));
  document.querySelectorAll('.reset').forEach(r => r.addEventListener('click', () => {
    const t = +r.dataset.text; recolour(t, D.targets[t]);
  }));
  const qk = D.methods['qk-embedding'], qkBox = document.querySelector('.qk');
  if (qk && qkBox) {
    const zoom = qkBox.nextElementSibling, big = zoom.querySelector('canvas'), cap = zoom.querySelector('.caption');
    const label = (p, e) => D.tokens[e.sequence[p]][real(e.sequence[p])[e.position[p]]];
    function scatter(canvas, e, size, labels) {
      canvas.width = canvas.height = size;
      const ctx = canvas.getContext('2d'), m = labels ? 40 : 6, w = size - 2 * m;
      const x0 = Math.min(...e.x), x1 = Math.max(...e.x), y0 = Math.min(...e.y), y1 = Math.max(...e.y);
      const sx = v => m + w * (x1 > x0 ? (v - x0) / (x1 - x0) : 0.5);
      const sy = v => size - m - w * (y1 > y0 ? (v - y0) / (y1 - y0) : 0.5);
      const r = labels ? 4 : 2.5;
      ctx.font = '11px monospace';
      e.x.forEach((x, p) => {
        const q = e.kind[p] === 'q', X = sx(x), Y = sy(e.y[p]);
        ctx.fillStyle = q ? 'rgba(214,39,40,.75)' : 'rgba(31,119,180,.75)';
        if (q) { ctx.beginPath(); ctx.arc(X, Y, r, 0, 2 * Math.PI); ctx.fill(); }
        else ctx.fillRect(X - r, Y - r, 2 * r, 2 * r);
        if (labels) { ctx.fillStyle = '#333'; ctx.fillText(label(p, e), X + r + 2, Y + 3); }
      });
    }
    qkBox.style.gridTemplateColumns = `2.5em repeat(${D.heads}, 1fr)`;
    qkBox.appendChild(document.createElement('span'));
    for (let h = 0; h < D.heads; h++) {
      const s = document.createElement('span'); s.className = 'hdr'; s.textContent = 'H' + h; qkBox.appendChild(s);
    }
    const show = (l, h) => {
      scatter(big, qk.heads[l][h], 640, true);
      cap.textContent = `layer ${l}, head ${h}: queries (red circles), keys (blue squares) of all texts`;
    };
    qk.heads.forEach((row, l) => {
      const s = document.createElement('span'); s.className = 'hdr'; s.textContent = 'L' + l; qkBox.appendChild(s);
      row.forEach((e, h) => {
        const c = document.createElement('canvas');
        c.title = `layer ${l}, head ${h}`;
        scatter(c, e, 96, false);
        c.addEventListener('click', () => show(l, h));
        qkBox.appendChild(c);
      });
    });
    show(0, 0);
  }
})();
"""


def _page_data(ex: Explanation) -> dict[str, Any]:
    """What the script needs, rounded: tokens, masks, targets, attention, and of each method its token scores,
    matrix and qk-embedding's heads (the rest, e.g. relevance-lrp's per-head relevance, stays in explain.json)."""
    used = ("token_scores", "matrix", "heads")
    methods = {name: {k: v for k, v in data.items() if k in used and not (k == "heads" and name != "qk-embedding")}
               for name, data in ex.methods.items()}
    return _round({
        "tokens": ex.tokens, "mask": ex.mask, "targets": ex.targets, "heads": ex.heads,
        "layer_names": ex.layer_names, "attention": ex.attention, "methods": methods,
    })


def render(ex: Explanation, figs: dict[str, bytes] | None = None) -> str:
    """The page as a string; `figs` (file name -> PNG bytes) are shown inline at the end."""
    methods = ", ".join(f"{name} ({', '.join(info['papers'])})" for name, info in ex.method_info.items())
    times = ", ".join(f"{k} {v:.1f} s" for k, v in ex.seconds.items())
    nav = " · ".join(f"<a href='#text{t + 1}'>text {t + 1}</a>" for t in range(len(ex.texts)))
    head = (f"<h1>attnlab explain</h1><p class='meta'>model <code>{_e(ex.model)}</code>: {ex.layers} layers × "
            f"{ex.heads} heads, {'causal' if ex.causal else 'bidirectional'}; methods: {_e(methods)}; "
            f"time: {_e(times)}.</p><p>{nav}" + (" · <a href='#qk'>query–key embedding</a>" if "qk-embedding" in ex.methods else "")
            + (" · <a href='#figures'>figures</a>" if figs else "") + "</p>")
    summaries = "".join(f"<li><b>{_e(n)}</b>: {_e(i['summary'])}</li>" for n, i in ex.method_info.items())
    body = [head, f"<ul class='meta'>{summaries}</ul>"]
    if ex.skipped:
        reasons = "".join(f"<li><b>{_e(n)}</b>: {_e(why)}</li>" for n, why in ex.skipped.items())
        body.append(f"<div class='skipped'><p class='meta'>Left out: these methods do not apply to this model.</p>"
                    f"<ul class='meta'>{reasons}</ul></div>")
    if ex.notes:
        notes = "".join(f"<li>{_e(note)}</li>" for note in ex.notes)
        body.append(f"<div class='skipped'><p class='meta'>Limits applied:</p><ul class='meta'>{notes}</ul></div>")
    body += [_text_section(ex, t) for t in range(len(ex.texts))]
    if "qk-embedding" in ex.methods:
        body.append("<section id='qk'><h2>Query–key embedding (P093)</h2><p class='meta'>For each head, the queries "
                    "(red circles) and keys (blue squares) of the real tokens of all texts in one plane: keys translated "
                    "to the queries' centroid and q/k scaled to equal mean norms (the softmax is unchanged), then PCA. "
                    "Click a head to enlarge it with token labels.</p><div class='qk grid'></div>"
                    "<div class='zoom'><canvas></canvas><p class='caption'></p></div></section>")
    if figs:
        images = "".join(
            f"<h3>{_e(name)}</h3><img alt='{_e(name)}' src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'>"
            for name, png in figs.items())
        body.append(f"<section class='figs' id='figures'><h2>Figures (also in png/)</h2>{images}</section>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>attnlab explain</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}"
            f"<script type='application/json' id='attnlab-data'>{script_json(_page_data(ex))}</script>"
            f"<script>{JS}</script></body></html>")


def write_page(ex: Explanation, path: str | Path, figs: dict[str, bytes] | None = None) -> Path:
    path = Path(path)
    path.write_text(render(ex, figs), encoding="utf-8")
    return path
