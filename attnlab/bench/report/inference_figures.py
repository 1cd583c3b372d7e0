"""The figures of the report's inference sections (`inference`), drawn by `plots.curves_figure`."""
from __future__ import annotations

from matplotlib.figure import Figure

from .. import plots
from ..decode import SCHEDULES
from .fmt import mib
from .inference import CompressionSetting, DecodeSetting, SelectionSetting

LEGEND = {"tree": "tree (P128)", "ring": "ring", "allreduce": "gloo all-reduce"}  # short names for legends


def kib(count: float | None) -> float | None:
    return None if count is None else count / 1024


def decode_figure(s: DecodeSetting) -> Figure:
    """Rounds and bytes per rank against p (measured points, the cost model dashed, out to the extrapolated p),
    time per token against p (the unsharded run dotted), peak memory held per rank against p."""
    rounds, sent, times, held = [], [], [], []
    extra = s.extrapolations[0] if s.extrapolations else None
    for name in SCHEDULES:
        rows = [r for r in s.rows if r.schedule == name]
        if not rows:
            continue
        label = LEGEND.get(name, name) + (" (modelled)" if rows[0].modelled else "")
        ps = [r.world for r in rows]
        rounds.append(plots.Curve(f"{label}, measured", ps, [r.rounds for r in rows], key=name))
        model_ps, model_rounds = list(ps), [r.predicted_rounds for r in rows]
        if extra is not None:
            model_ps += [x["world"] for x in extra.rows if name in x]
            model_rounds += [x[name]["rounds"] for x in extra.rows if name in x]
        rounds.append(plots.Curve(f"{label}, cost model", model_ps, model_rounds, key=name, dashed=True))
        sent.append(plots.Curve(f"{label}, measured", ps, [kib(r.bytes_sent) for r in rows], key=name))
        sent.append(plots.Curve(f"{label}, cost model", ps, [kib(r.predicted_bytes) for r in rows], key=name,
                                dashed=True))
        times.append(plots.Curve(label, ps, [r.median_s for r in rows], key=name))
        held.append(plots.Curve(label, ps, [mib(r.held_bytes) for r in rows], key=name))
    un = s.unsharded or {}
    un_held = None if un.get("peak_bytes") is None or un.get("cache_bytes") is None \
        else un["cache_bytes"] + un["peak_bytes"]
    tokens = s.shape["tokens"]
    panels = [
        plots.CurvePanel("communication rounds per rank" + (f" (model to p = {extra.rows[-1]['world']})" if extra and extra.rows else ""),
                         "p (processes)", "rounds", rounds, log_x=True, log_y=True),
        plots.CurvePanel(f"sent per rank, N = {tokens:,}", "p (processes)", "KiB", sent, log_x=True, log_y=True),
        plots.CurvePanel("time per decoded token (this machine, loopback)", "p (processes)", "median time", times,
                         [("unsharded (SDPA)", un["median_s"], "")] if un.get("median_s") else [],
                         log_x=True, log_y=True, seconds=True),
        plots.CurvePanel("peak memory held per rank (cache + rise)", "p (processes)", "MiB", held,
                         [("unsharded", mib(un_held), "")] if un_held else [], log_x=True, log_y=True),
    ]
    return plots.curves_figure("sharded decoding: tree vs ring", panels)


def compression_figure(c: CompressionSetting) -> Figure:
    """Relative error of the attention output and LM loss against r/d, one curve per method."""
    error = [plots.Curve(m, c.ratios, [c.value(m, x, "rel_error") for x in c.ratios], key=m) for m in c.methods]
    loss = [plots.Curve(m, c.ratios, [c.value(m, x, "lm_loss") for x in c.ratios], key=m) for m in c.methods]
    refs = [("uncompressed", c.uncompressed_lm_loss, "")] if c.uncompressed_lm_loss is not None else []
    panels = [plots.CurvePanel("attention output relative error", "r / d (kept fraction of K/V features)",
                               "‖o_r − o‖ / ‖o‖", error, invert_x=True),
              plots.CurvePanel("held-out LM loss", "r / d (kept fraction of K/V features)", "nats / char", loss, refs,
                               invert_x=True)]
    return plots.curves_figure("MatryoshkaKV (P004): PCA vs trained projections", panels)


def selection_figure(s: SelectionSetting) -> Figure:
    """Rank for 90% key variance per layer; recall (and output error) against r per k beside the baselines;
    decode time against k beside dense attention."""
    panels = []
    ranks = [plots.Curve(f"{model} (d = {m.get('head_dim')})", list(range(len(m.get("rank90") or []))),
                         [sum(layer) / len(layer) if layer else None for layer in m.get("rank90") or []], key=model)
             for model, m in s.rank90.items()]
    dims = sorted({int(m["head_dim"]) for m in s.rank90.values() if m.get("head_dim")})
    panels.append(plots.CurvePanel("rank for 90% key variance (mean over heads)", "layer", "rank",
                                   ranks, [(f"head dim d = {d}", float(d), "") for d in dims]))
    for model in s.quality:
        for metric, log_y in (("recall", False), ("output_error", True)):
            if not any(metric in x for x in s.quality[model].values()):
                continue
            curves, refs = [], []
            for k in s.ks(model):
                curves.append(plots.Curve(f"Loki, k={k}", s.ranks(model),
                                          [s.metric(model, k, "loki", r, metric) for r in s.ranks(model)], key=f"k={k}"))
                for b in s.baselines(model):
                    value = s.metric(model, k, b, None, metric)
                    if value is not None:
                        refs.append((f"{b}, k={k}", value, f"k={k}"))
            panels.append(plots.CurvePanel(f"{model}: {metric.replace('_', ' ')} vs rank r", "rank r",
                                           metric.replace("_", " "), curves, refs, log_y=log_y))
    for (n, heads, d), rows in s.decode.items():
        loki = [(k, t) for method, _, k, t in rows if method == "loki" and k is not None]
        r = next((r for method, r, _, _ in rows if method == "loki"), None)
        refs = [(method, t, method) for method, _, _, t in rows if method != "loki" and t is not None]
        panels.append(plots.CurvePanel(f"decode, one query, N = {n:,}, {heads} heads, d = {d}", "top-k",
                                       "median time", [plots.Curve(f"Loki r={r}", [k for k, _ in loki],
                                                                   [t for _, t in loki], key="loki")],
                                       refs, log_x=True, seconds=True))
    return plots.curves_figure("Loki (P027): low-rank keys and top-k selection", panels, columns=3)
