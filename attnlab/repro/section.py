"""The rows of the report's "Claims" section, read from the results store (suite "repro").

    from attnlab.repro.section import claim_rows
    rows = claim_rows(ResultStore(db, readonly=True))   # every registered claim, in `attnlab repro list` order

A claim without a full-size outcome in the store gets the verdict "not run" and no figure. Figure paths are
the database's folder joined with the stored relative path (`repro/<id>.png`).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..bench.store import Result, ResultStore
from .claim import Claim, all_claims
from .runner import SUITE


@dataclass(frozen=True)
class ClaimRow:
    """One row: claim | paper | measured | verdict | figure (a PNG path, or None when not run)."""

    claim: str  # the claim id and the statement
    paper: str
    measured: str  # "1.002 [0.998, 1.006] (3 seeds): <statistic>"
    verdict: str  # reproduced / not reproduced / inconclusive / not run
    figure: Path | None
    line: str  # the full verdict line


def _interval(low: float | str, high: float | str) -> str:
    lo, hi = float(low), float(high)
    return f"[{lo:.4g}, {hi:.4g}]" if math.isfinite(lo) and math.isfinite(hi) else "(unbounded)"


def claim_rows(store: ResultStore, claims: list[Claim] | None = None) -> list[ClaimRow]:
    """The section's rows: the latest full-size outcome of each claim (newest protocol version only)."""
    return rows_of_results(store.results(SUITE), store.path.parent, claims)


def rows_of_results(results: Iterable[Result], folder: Path, claims: list[Claim] | None = None) -> list[ClaimRow]:
    """`claim_rows` from results already read (those of other suites are skipped); `folder`: the database's folder,
    which the stored figure paths are relative to."""
    latest: dict[str, dict] = {}
    pool = all_claims() if claims is None else claims
    versions = {c.id: c.version for c in pool}
    for result in results:
        if result.suite != SUITE:
            continue
        cfg = result.config
        if result.status == "ok" and cfg.get("size") == "full" and versions.get(cfg.get("claim")) == cfg.get("version"):
            latest[cfg["claim"]] = result.metrics
    rows = []
    for c in pool:
        m = latest.get(c.id)
        title = f"{c.id}: {c.statement}"
        if m is None:
            rows.append(ClaimRow(title, c.paper.cite(), c.statistic, "not run", None, ""))
            continue
        seeds = len(m["values"])
        measured = f"{m['mean']:.4g} {_interval(m['low'], m['high'])} ({seeds} seeds): {c.statistic}"
        figure = folder / m["figure"]  # stored relative to the database's folder
        rows.append(ClaimRow(title, c.paper.cite(), measured, m["verdict"], figure if figure.is_file() else None,
                             m["line"]))
    return rows
