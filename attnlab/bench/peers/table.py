"""Peer results as ratios (attnlab time / peer time) and as a text table."""
from __future__ import annotations

import textwrap
from collections.abc import Iterable, Mapping
from typing import Any

from .. import compare
from ..store import Result, canonical


# -- ratios ----------------------------------------------------------------------------------
def peer_ratios(results: Iterable[Result], run_id: str | None = None) -> list[dict[str, Any]]:
    """Per peer result: attnlab's median time over the peer's at the same configuration (`compare.peer_ratios`:
    None unless both are ok and comparable)."""
    return compare.peer_ratios(results, run_id)


def _short_params(params: Mapping[str, Any]) -> str:
    mask = params.get("attn_mask")
    if isinstance(mask, Mapping):
        rest = {k: v for k, v in params.items() if k != "attn_mask"}
        text = f"mask {mask.get('pattern')} w={mask.get('window_size')} b={mask.get('look_backward')} " \
               f"f={mask.get('look_forward')}"
        return text + (f" {canonical(rest)}" if rest else "")
    return canonical(dict(params)) if params else ""


def peer_table(results: Iterable[Result], run_id: str | None = None) -> str:
    """A text table of attnlab/peer time ratios (>1: the peer is faster), one block per peer, one line per
    peer configuration (within 100 columns: parameters and notes are listed below the lines that need them);
    a ratio with a side reused from the store (not measured in run `run_id`) is marked "*", one between
    incomparable environments is "n/c"."""
    rows = peer_ratios(results, run_id)
    if not rows:
        return "peers: no peer results"
    header = ["mechanism", "params", "N", "mode", "peer ms", "attnlab ms", "attnlab/peer", "status"]
    blocks = []
    for peer in sorted({row["impl"] for row in rows}):
        lines, notes, params_ids = [], [], {}
        mine = [r for r in rows if r["impl"] == peer]
        for row in sorted(mine, key=lambda r: (r["mechanism"], canonical(r["params"]), r["mode"], r["n"])):
            status = row["status"]
            if status == "disagree" and row["max_abs_diff"] is not None:
                status = f"disagree ({len(notes) + 1})"
                notes.append(f"({len(notes) + 1}) max |attnlab - peer| {row['max_abs_diff']:.3g}")
            elif status != "ok" and row["note"]:
                notes.append(f"({len(notes) + 1}) {row['note']}")
                status = f"{status} ({len(notes)})"
            key = _short_params(row["params"])
            params_ids.setdefault(key, f"p{len(params_ids) + 1}")
            ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}" + (
                "*" if row["reused"] or row["attnlab_reused"] else "")
            lines.append([
                row["mechanism"] + (" causal" if row["causal"] else ""), params_ids[key],
                "×".join(map(str, row["grid"])) if row["grid"] else str(row["n"]), row["mode"],
                f"{row['peer_median_s'] * 1e3:.4g}" if row["peer_median_s"] is not None else "-",
                f"{row['attnlab_median_s'] * 1e3:.4g}" if row["attnlab_median_s"] is not None else "-",
                "n/c" if row["incomparable"] else ratio, status,
            ])
        widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
        out = [f"{peer}:"] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *lines]]
        out.insert(2, "  ".join("-" * w for w in widths))
        out += [textwrap.fill(f"{pid}: {text or '(defaults)'}", 100, subsequent_indent="    ")
                for text, pid in params_ids.items()]
        out += [textwrap.fill(note, 100, subsequent_indent="    ") for note in notes]
        blocks.append("\n".join(out))
    return "\n\n".join(blocks)
