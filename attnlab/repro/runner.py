"""Run claims over seeds, decide each by its pre-stated rule, write the figure, table and verdict, record the outcome.

For a claim and a size, the outcome is keyed in the results store (suite "repro") by the claim id, its protocol
version, the size and the seeds; a claim with a stored outcome is not run again unless `rerun`, so `--all`
resumes. A claim whose run raises is recorded with status "error" (and run again next time). Files go to
`<results folder>/repro/` (the folder of the database): `<id>.png`, `<id>.csv` (one row per seed), `<id>.md`
(the table and the verdict) and `<id>.txt` (the verdict line); a smoke run's names end in `.smoke`.
Claims run on one torch thread (`THREADS`): on a shared 2-core machine two threads contend and run slower.
"""
from __future__ import annotations

import csv
import math
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..bench.env import environment
from ..bench.progress import progress, say
from ..bench.store import ResultStore, config_hash
from .claim import Claim, Measurement, t_interval

SUITE = "repro"
THREADS = 1


@dataclass(frozen=True)
class Outcome:
    """A claim's result: per-seed values, their mean and 95% interval, the verdict, and where the files are."""

    claim: str
    paper: str
    size: str
    values: tuple[float, ...]
    mean: float
    low: float
    high: float
    verdict: str
    seconds: float
    line: str
    figure: str  # the paths of the PNG and the CSV
    table: str
    ran: bool  # False: read from the store

    def metrics(self, results_dir: Path) -> dict[str, Any]:
        """What the store keeps; the files as paths relative to `results_dir` (the database's folder)."""
        return {"values": list(self.values), "mean": self.mean, "low": _finite(self.low), "high": _finite(self.high),
                "verdict": self.verdict, "seconds": self.seconds, "line": self.line, "paper": self.paper,
                "figure": Path(self.figure).relative_to(results_dir).as_posix(),
                "table": Path(self.table).relative_to(results_dir).as_posix()}


def _finite(value: float) -> float | str:
    """JSON has no infinities: ±inf as the strings "inf" / "-inf"."""
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def _number(value: float | str) -> float:
    return float(value)


def config_of(claim: Claim, size: str, seeds: Sequence[int]) -> dict[str, Any]:
    """The store key of an outcome."""
    return {"claim": claim.id, "version": claim.version, "size": size, "seeds": list(seeds)}


def output_dir(store: ResultStore) -> Path:
    return store.path.parent / "repro"


def stored(store: ResultStore, config: dict[str, Any]) -> dict[str, Any] | None:
    """The metrics of the stored successful outcome of `config`, or None."""
    key = config_hash(config)
    found = [r for r in store.results(SUITE) if r.config_hash == key and r.status == "ok"]
    return found[-1].metrics if found else None


def verdict_line(claim: Claim, mean: float, low: float, high: float, seeds: int, verdict: str) -> str:
    interval = f"[{low:.4g}, {high:.4g}]" if math.isfinite(low) and math.isfinite(high) else "(unbounded: one seed)"
    return (f"{claim.id} ({claim.paper.id}): {claim.statement}. Measured {claim.statistic} = {mean:.4g}, "
            f"95% interval {interval} over {seeds} seed{'s' * (seeds != 1)}; expected {claim.direction}; "
            f"{claim.rule.text()}. Verdict: {verdict}.")


def write_table(path: Path, claim: Claim, seeds: Sequence[int], measured: Sequence[Measurement]) -> None:
    """One CSV row per seed: seed, the statistic, the claim's other numbers."""
    extras = sorted({k for m in measured for k in m.extra})
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["seed", claim.statistic, *extras])
        for seed, m in zip(seeds, measured, strict=True):
            out.writerow([seed, repr(m.value), *(repr(m.extra[k]) if k in m.extra else "" for k in extras)])


def write_markdown(path: Path, claim: Claim, seeds: Sequence[int], measured: Sequence[Measurement], line: str) -> None:
    rows = [f"# {claim.id}", "", f"Paper: {claim.paper.cite()}", "", f"Claim: {claim.statement}", "",
            f"Method: {claim.method}. {claim.note}", "", "| seed | value |", "|---|---|"]
    rows += [f"| {s} | {m.value:.6g} |" for s, m in zip(seeds, measured, strict=True)]
    rows += ["", line, ""]
    path.write_text("\n".join(rows))


def draw(path: Path, claim: Claim, seeds: Sequence[int], measured: Sequence[Measurement], mean: float, low: float,
         high: float, verdict: str) -> None:
    """Left: every seed's curves (one colour per label); right: the per-seed values, the interval, the rule's band."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    curves, judged = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    labels = list(dict.fromkeys(s.label for m in measured for s in m.series))
    colours = colormaps["tab10"]
    for m in measured:
        for s in m.series:
            i = labels.index(s.label)
            curves.plot(s.x, s.y, "o-" if len(s.x) > 1 else "o", color=colours(i % 10), alpha=0.7,
                        label=s.label if m is measured[0] else None)
    if claim.logx:
        curves.set_xscale("log")
    if claim.logy:
        curves.set_yscale("log")
    curves.set_xlabel(claim.xlabel)
    curves.set_ylabel(claim.ylabel)
    if labels:
        curves.legend(fontsize=7)
    curves.set_title(claim.id, fontsize=9)
    values = [m.value for m in measured]
    judged.plot(range(len(values)), values, "ko", label="per seed")
    # a one-sided rule's band runs from its finite end past every value (below it, or above it)
    lo_band = claim.rule.low if math.isfinite(claim.rule.low) else min(values + [mean, claim.rule.high]) - 1
    hi_band = claim.rule.high if math.isfinite(claim.rule.high) else max(values + [mean, claim.rule.low]) + 1
    judged.axhspan(lo_band, hi_band, color="tab:green", alpha=0.15, label="rule: reproduced")
    if math.isfinite(low) and math.isfinite(high):
        judged.errorbar([len(values)], [mean], yerr=[[mean - low], [high - mean]], fmt="s", color="tab:blue",
                        capsize=4, label="mean, 95% interval")
    judged.set_xticks(range(len(values) + 1), [*map(str, seeds), "mean"])
    judged.set_xlabel("seed")
    judged.set_ylabel("statistic")
    judged.set_title(f"{verdict}", fontsize=9)
    judged.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=80)


def run_claim(claim: Claim, store: ResultStore, *, size: str = "full", seeds: Sequence[int] | None = None,
              rerun: bool = False, quiet: bool = False) -> Outcome:
    """Run `claim` over `seeds` (default 0..claim.seeds−1; smoke: seed 0 only), or read its stored outcome."""
    chosen = list(seeds) if seeds is not None else ([0] if size == "smoke" else list(range(claim.seeds)))
    if not chosen:
        raise ValueError(f"seeds: expected one or more seeds, got {chosen!r}")
    config = config_of(claim, size, chosen)
    known = None if rerun else stored(store, config)
    if known is not None:
        return Outcome(claim.id, claim.paper.id or "", size, tuple(known["values"]), known["mean"],
                       _number(known["low"]), _number(known["high"]), known["verdict"], known["seconds"],
                       known["line"], str(store.path.parent / known["figure"]), str(store.path.parent / known["table"]),
                       ran=False)
    folder = output_dir(store)
    folder.mkdir(parents=True, exist_ok=True)
    stem = claim.id + (".smoke" if size == "smoke" else "")
    start = time.perf_counter()
    measured: list[Measurement] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        for seed in progress(chosen, total=len(chosen), desc=claim.id, quiet=quiet):
            measured.append(claim(seed, size))
        mean, low, high = t_interval([m.value for m in measured])
    except Exception as err:
        store.record(SUITE, config, "error", {"error": f"{type(err).__name__}: {err}",
                                              "traceback": traceback.format_exc(limit=5)}, environment(), replace=True)
        raise
    finally:
        torch.set_num_threads(threads)
    verdict = claim.rule.verdict(low, high)
    seconds = time.perf_counter() - start
    line = verdict_line(claim, mean, low, high, len(chosen), verdict)
    figure, table = folder / f"{stem}.png", folder / f"{stem}.csv"
    draw(figure, claim, chosen, measured, mean, low, high, verdict)
    write_table(table, claim, chosen, measured)
    write_markdown(folder / f"{stem}.md", claim, chosen, measured, line)
    (folder / f"{stem}.txt").write_text(line + "\n")
    outcome = Outcome(claim.id, claim.paper.id or "", size, tuple(m.value for m in measured), mean, low, high,
                      verdict, seconds, line, str(figure), str(table), ran=True)
    store.record(SUITE, config, "ok", outcome.metrics(store.path.parent), environment(), replace=True)
    say(f"{claim.id}: {verdict} ({seconds:.1f} s)", quiet=quiet)
    return outcome


def run_claims(claims: Sequence[Claim], store: ResultStore, *, size: str = "full", budget_s: float | None = None,
               rerun: bool = False, quiet: bool = False) -> tuple[list[Outcome], list[str], list[str]]:
    """Run the claims in order, those with a stored outcome skipped (unless `rerun`); with `budget_s`, a claim is
    started only when its own budget still fits. A claim that raises is reported and the next one runs.
    Returns the outcomes, the ids left out for the budget, and "id: error" of the claims that failed."""
    outcomes: list[Outcome] = []
    left: list[str] = []
    failed: list[str] = []
    start = time.perf_counter()
    for claim in claims:
        config = config_of(claim, size, [0] if size == "smoke" else list(range(claim.seeds)))
        if not rerun and stored(store, config) is not None:
            outcomes.append(run_claim(claim, store, size=size, quiet=True))
            continue
        spent = time.perf_counter() - start
        if budget_s is not None and spent + claim.budget_s > budget_s:
            left.append(claim.id)
            continue
        try:
            outcomes.append(run_claim(claim, store, size=size, rerun=rerun, quiet=quiet))
        except Exception as err:  # recorded as an error by run_claim; the others still run
            failed.append(f"{claim.id}: {type(err).__name__}: {err}")
            say(f"{claim.id}: failed: {type(err).__name__}: {err}", quiet=quiet)
    return outcomes, left, failed
