"""KV-cache compression (MatryoshkaKV, P004) and key selection (Loki, P027) results as results-store rows.

`benchmarks/matryoshka_kv.py` and `benchmarks/loki.py` measure; these functions turn what they measured into
rows of two suites, which `attnlab report` reads back (`report.inference`):

"kv-compression" (P004), one setting = the char LM and its training (`setting`):

* kind "ratio":  per (method, r/d) — method "pca" (projections from PCA of the cached K/V) or "trained"
  (Cayley-parametrised, distilled): the attention output's relative error ‖o_r − o‖/‖o‖ (mean over layers,
  and per layer), the held-out LM loss of the compressed model and of the uncompressed one;
* kind "greedy": per method, the greedy per-head rank allocation at an average r/d = 0.5: its ranks and LM loss.

"kv-selection" (P027), one setting = the LM's training and the seed:

* kind "rank90":  per model, the rank for 90% of the key variance of every layer and head, and the head dim;
* kind "quality": per (model, k, method, r) — method "loki" at rank r, or the baselines "random" and "recent"
  (r None): top-k recall, attention mass kept and (when values were captured) the relative output error;
* kind "decode":  per (N, heads, head dim, method, r, k) — one query's decode time (median), dense or Loki.

Every row's configuration holds its setting, so a rerun of the same setting replaces its rows.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..core.errors import ParameterError
from .store import ResultStore

COMPRESSION_SUITE = "kv-compression"
SELECTION_SUITE = "kv-selection"
METHODS = ("pca", "trained")  # MatryoshkaKV's two kinds of projection
_LOKI = re.compile(r"loki r=(\d+)(?: k=(\d+))?$")

Rows = list[tuple[dict[str, Any], dict[str, Any]]]


def _require(result: Mapping[str, Any], keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in result]
    if missing:
        raise ParameterError(f"result: expected a {what} result with keys {list(keys)}, got one without {missing}")


def compression_records(result: Mapping[str, Any]) -> Rows:
    """(config, metrics) per row of a `benchmarks/matryoshka_kv.py` result (see the module docstring)."""
    _require(result, ("model", "distill", "corpus", "rows", "uncompressed_lm_loss", "greedy_at_half"), "MatryoshkaKV")
    model, distill = result["model"], result["distill"]
    setting = {"model": "char LM", **{k: model[k] for k in ("dim", "heads", "head_dim", "layers", "context", "steps")},
               "distill_steps": distill["steps"], "corpus_sha256": result["corpus"]["sha256"]}
    base = float(result["uncompressed_lm_loss"])
    rows: Rows = []
    for row in result["rows"]:
        for method in METHODS:
            rows.append(({"kind": "ratio", **setting, "method": method, "r_over_d": row["r_over_d"]}, {
                "rank": row["rank"], "head_dim": model["head_dim"], "rel_error": row[f"{method}_rel_error"],
                "rel_error_per_layer": row[f"{method}_rel_error_per_layer"], "lm_loss": row[f"{method}_lm_loss"],
                "uncompressed_lm_loss": base}))
    for method, greedy in result["greedy_at_half"].items():
        rows.append(({"kind": "greedy", **setting, "method": method, "r_over_d": 0.5},
                     {"ranks": greedy["ranks"], "lm_loss": greedy["lm_loss"], "uncompressed_lm_loss": base}))
    return rows


def _loki_method(name: str) -> tuple[str, int | None, int | None]:
    """("loki", r, k) from "loki r=8" or "loki r=16 k=512"; (name, None, None) for a baseline or dense."""
    match = _LOKI.match(name)
    if match is None:
        return name, None, None
    return "loki", int(match.group(1)), int(match.group(2)) if match.group(2) else None


def selection_records(result: Mapping[str, Any]) -> Rows:
    """(config, metrics) per row of a `benchmarks/loki.py` result (see the module docstring)."""
    _require(result, ("args", "minilm", "lm", "decode"), "Loki")
    args = result["args"]
    setting = {"lm_steps": int(args["steps"]), "seed": int(args["seed"]), "lm_n": int(result["lm"]["n"])}
    rows: Rows = []
    for model, part in (("MiniLM", result["minilm"]), ("char LM", result["lm"])):
        tokens = part.get("n", part.get("mean_tokens"))
        rows.append(({"kind": "rank90", **setting, "model": model},
                     {"head_dim": part["head_dim"], "rank90": part["rank90"], "tokens": tokens}))
        for q in part["quality"]:
            method, r, _ = _loki_method(str(q["method"]))
            metrics = {m: q[m] for m in ("recall", "mass", "output_error") if m in q}
            rows.append(({"kind": "quality", **setting, "model": model, "k": q["k"], "method": method, "r": r},
                         {**metrics, "head_dim": part["head_dim"], "tokens": tokens}))
    dec = result["decode"]
    for name, ms in dec["median_ms"].items():
        method, r, k = _loki_method(name)
        rows.append(({"kind": "decode", **setting, "n": dec["n"], "heads": dec["heads"], "head_dim": dec["head_dim"],
                      "method": method, "r": r, "k": k},
                     {"median_s": ms / 1e3, "repeats": dec["repeats"], "threads": dec["threads"]}))
    return rows


def _write(store: ResultStore, suite: str, rows: Rows, env: Mapping[str, Any]) -> int:
    for config, metrics in rows:
        store.record(suite, config, "ok", metrics, dict(env), replace=True)
    return len(rows)


def record_compression(store: ResultStore, result: Mapping[str, Any], env: Mapping[str, Any]) -> int:
    """Write a MatryoshkaKV result's rows (suite "kv-compression"); the number written."""
    return _write(store, COMPRESSION_SUITE, compression_records(result), env)


def record_selection(store: ResultStore, result: Mapping[str, Any], env: Mapping[str, Any]) -> int:
    """Write a Loki result's rows (suite "kv-selection"); the number written."""
    return _write(store, SELECTION_SUITE, selection_records(result), env)
