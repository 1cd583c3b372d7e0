"""The headline facts, computed from a `Report`: what a reader wants first.

* `beats_sdpa`: per attnlab series, its time over SDPA's at each N (causal rows against
  causal SDPA), the smallest N from which it is faster at every larger measured N, and
  by how much at the largest N;
* `exponent_rows`: the fitted cost exponent of every mechanism beside the declared one;
* `leaderboards`: MQAR accuracy per (d_model, seq_len) at one stated training budget,
  best first, with the runs that stopped before converging marked;
* `peer_standing`: attnlab's time over each peer's, and how many outputs agreed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .fmt import fmt_accuracy
from .model import Report, SpeedSeries, sort_key


@dataclass(frozen=True)
class BeatsSdpa:
    """One series against its SDPA reference."""

    series: SpeedSeries
    label: str
    reference: str  # "SDPA" or "causal SDPA"
    ratios: dict[int, float]  # N -> time / reference time
    from_n: int | None  # faster than the reference at this N and at every larger measured N
    n_max: int  # the largest N with a ratio
    at_max: float  # the ratio at n_max

    def to_json(self) -> dict[str, Any]:
        return {**self.series.fields(), "label": self.label, "reference": self.reference,
                "ratios": {str(n): r for n, r in self.ratios.items()}, "faster_from_n": self.from_n,
                "n_max": self.n_max, "ratio_at_n_max": self.at_max}


def crossover(ratios: dict[int, float]) -> int | None:
    """The smallest N from which every ratio (at that N and above) is below 1; None when the largest is not."""
    start = None
    for n in sorted(ratios, reverse=True):
        if ratios[n] >= 1:
            break
        start = n
    return start


def beats_sdpa(report: Report) -> list[BeatsSdpa]:
    """Every attnlab series with a ratio to SDPA, fastest (at its largest N) first."""
    rows = []
    for s in report.series:
        if s.peer or report.is_reference(s):
            continue
        ratios = {n: r for n in report.series[s] if (r := report.sdpa_ratio(s, n)) is not None}
        if not ratios:
            continue
        n_max = max(ratios)
        rows.append(BeatsSdpa(s, report.label(s, with_params=None),
                              "causal SDPA" if s.causal else "SDPA", ratios, crossover(ratios), n_max, ratios[n_max]))
    return sorted(rows, key=lambda b: (b.series.mode, b.series.causal, b.at_max, b.label))


def uncompared(report: Report) -> list[tuple[SpeedSeries, str]]:
    """attnlab series timed ok at some N but without any ratio to SDPA, with the reason (first N's)."""
    out = []
    for s in sorted(report.series, key=report.series_order):
        if s.peer or report.is_reference(s):
            continue
        points = report.series[s]
        if any(report.sdpa_ratio(s, n) is not None for n in points):
            continue
        timed = [n for n, p in points.items() if p.ok]
        if not timed:
            continue
        if all(points[n].time is None for n in timed):
            why = "its times are flagged implausible"
        elif any(report.baseline_flagged(s, n) for n in timed):
            why = "the SDPA times it would be compared with are flagged implausible"
        elif any(report.incomparable(s, n) for n in timed):
            why = "SDPA was measured only in another environment"
        else:
            why = "no SDPA measured at its lengths"
        out.append((s, why))
    return out


def exponent_rows(report: Report) -> list[dict[str, Any]]:
    """attnlab's series with a fitted time exponent, with the declared one, lowest measured first."""
    rows = [x for x in report.exponents() if x["impl"] == "attnlab" and x["measured"] is not None]
    return sorted(rows, key=lambda x: (x["measured"], x["mechanism"]))


def unfitted(report: Report) -> list[dict[str, Any]]:
    """attnlab's series with too few points for an exponent (fewer than 3 lengths measured ok)."""
    return [x for x in report.exponents() if x["impl"] == "attnlab" and x["measured"] is None]


@dataclass(frozen=True)
class Leaderboard:
    """MQAR accuracy of every mechanism trained at one (d_model, seq_len) and one stated budget."""

    d_model: Any
    seq_len: Any
    budget: str
    kvs: list[Any]
    rows: list[dict[str, Any]]  # label, mean accuracy, rank (equal when shown equal), cells by kv, stopped (kv -> why)

    def to_json(self) -> dict[str, Any]:
        return {"d_model": self.d_model, "seq_len": self.seq_len, "budget": self.budget, "num_kv_pairs": self.kvs,
                "rows": [{**row, "cells": {str(kv): c for kv, c in row["cells"].items()},
                          "stopped": {str(kv): why for kv, why in row["stopped"].items()}} for row in self.rows]}


def leaderboards(report: Report) -> list[Leaderboard]:
    """One leaderboard per (d_model, seq_len, budget), mechanisms by mean accuracy over the kv cells, best first;
    a mechanism without an accurate cell (unsupported, error) comes last with its status. Per (d_model,
    seq_len), the board with the most mechanisms comes first."""
    out = []
    for (d_model, seq_len, budget), rows in report.recall_cells().items():
        kvs = sorted({kv for cells in rows.values() for kv in cells}, key=lambda kv: (str(type(kv)), kv))
        board = []
        for (mechanism, params), cells in rows.items():
            accuracies = [c["accuracy"] for c in cells.values() if c["accuracy"] is not None]
            board.append({
                "label": report.recall_row_label(mechanism, params),
                "mechanism": mechanism,
                "mean": sum(accuracies) / len(accuracies) if accuracies else None,
                "complete": len(accuracies) == len(kvs),
                "cells": cells,
                "stopped": {kv: c["stopped"] for kv, c in cells.items() if c["stopped"]},
            })
        board.sort(key=lambda row: (row["mean"] is None, -(row["mean"] or 0.0), row["label"]))
        shown = [fmt_accuracy(row["mean"]) if row["mean"] is not None else None for row in board]
        for i, row in enumerate(board):  # rank as shown: equal on the page, equal rank
            row["rank"] = None if shown[i] is None else shown.index(shown[i]) + 1
        out.append(Leaderboard(d_model, seq_len, budget, kvs, board))
    # per (d_model, seq_len), the board comparing the most mechanisms first
    return sorted(out, key=lambda b: (sort_key(b.d_model), sort_key(b.seq_len), -len(b.rows), b.budget))


@dataclass(frozen=True)
class PeerStanding:
    """attnlab against one peer library on one mechanism and mode."""

    series: SpeedSeries
    label: str
    ratios: dict[int, float]  # N -> attnlab time / peer time
    agreed: int  # configurations whose outputs matched (and were timed)
    disagreed: int
    other: dict[str, int]  # other statuses (over_time, error, ...)

    def to_json(self) -> dict[str, Any]:
        return {**self.series.fields(), "label": self.label, "ratios": {str(n): r for n, r in self.ratios.items()},
                "agreed": self.agreed, "disagreed": self.disagreed, "other": self.other}


def peer_standing(report: Report) -> list[PeerStanding]:
    out = []
    for s in sorted((s for s in report.series if s.peer), key=lambda s: (s.impl, s.mode) + report.series_order(s)):
        statuses: dict[str, int] = {}
        for p in report.series[s].values():
            statuses[p.result.status] = statuses.get(p.result.status, 0) + 1
        ratios = {n: r for n in report.series[s] if (r := report.peer_ratio(s, n)) is not None}
        agreed, disagreed = statuses.pop("ok", 0), statuses.pop("disagree", 0)
        out.append(PeerStanding(s, report.label(s, with_params=None), ratios, agreed, disagreed, statuses))
    return out


def to_json(report: Report) -> dict[str, Any]:
    """The headline facts, machine-readable."""
    return {
        "beats_sdpa": [b.to_json() for b in beats_sdpa(report)],
        "not_compared": [{**s.fields(), "why": why} for s, why in uncompared(report)],
        "exponents": exponent_rows(report),
        "recall_leaderboards": [board.to_json() for board in leaderboards(report)],
        "peers": [p.to_json() for p in peer_standing(report)],
    }
