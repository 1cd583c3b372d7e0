"""The runner: verdicts over seeds, the files it writes, resuming from the store, the budget, the report's rows."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from attnlab.bench.store import ResultStore
from attnlab.core.registry import Paper
from attnlab.repro.claim import Claim, Measurement, Rule, Series
from attnlab.repro.runner import SUITE, run_claim, run_claims
from attnlab.repro.section import claim_rows

PAPER = Paper("P999", "A planted paper", 2024)


class Counted:
    """A run returning `base + spread·seed` and counting its calls."""

    def __init__(self, base: float, spread: float = 0.01) -> None:
        self.base, self.spread, self.calls = base, spread, 0

    def __call__(self, seed: int, size: str) -> Measurement:
        self.calls += 1
        value = self.base + self.spread * seed
        return Measurement(value, (Series("planted", (1.0, 2.0), (1.0, 2.0 ** value)),), {"seed twice": 2.0 * seed})


def claim(run: Counted, name: str = "linear", budget_s: float = 1.0) -> Claim:
    return Claim(id=f"P999-{name}", paper=PAPER, statement="cost grows linearly", statistic="exponent",
                 direction="≈ 1", rule=Rule(0.9, 1.1), run=run, budget_s=budget_s)


@pytest.fixture
def store(tmp_path: Path) -> ResultStore:
    return ResultStore(tmp_path / "results.sqlite")


def test_a_claim_that_holds_is_reproduced_and_its_files_are_written(store: ResultStore) -> None:
    run = Counted(1.0)
    out = run_claim(claim(run), store, quiet=True)
    assert run.calls == 3 and out.ran
    assert out.values == pytest.approx((1.0, 1.01, 1.02))
    assert out.verdict == "reproduced"
    assert Path(out.figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.reader(Path(out.table).open()))
    assert rows[0] == ["seed", "exponent", "seed twice"] and [r[0] for r in rows[1:]] == ["0", "1", "2"]
    assert float(rows[2][1]) == pytest.approx(1.01)
    folder = store.path.parent / "repro"
    assert (folder / "P999-linear.txt").read_text().strip().endswith("Verdict: reproduced.")
    assert "| 2 | 1.02 |" in (folder / "P999-linear.md").read_text()


def test_a_planted_fault_is_not_reproduced(store: ResultStore) -> None:
    """A run whose statistic goes the wrong way (quadratic where linear is claimed) gives "not reproduced"."""
    out = run_claim(claim(Counted(2.0)), store, quiet=True)
    assert out.verdict == "not reproduced"
    assert "Verdict: not reproduced." in out.line


def test_a_noisy_statistic_across_the_band_is_inconclusive(store: ResultStore) -> None:
    out = run_claim(claim(Counted(1.0, spread=0.2)), store, quiet=True)  # 1.0, 1.2, 1.4: interval across 1.1
    assert out.low < 1.1 < out.high
    assert out.verdict == "inconclusive"


def test_the_runner_resumes_from_the_store(store: ResultStore) -> None:
    run = Counted(1.0)
    first, _, _ = run_claims([claim(run)], store, quiet=True)
    assert run.calls == 3 and first[0].ran
    again, left, failed = run_claims([claim(run)], store, quiet=True)
    assert run.calls == 3, "a claim with a stored outcome ran again"
    assert not again[0].ran and again[0].verdict == first[0].verdict and again[0].values == first[0].values
    assert again[0].figure == first[0].figure and again[0].table == first[0].table
    assert (left, failed) == ([], [])
    run_claims([claim(run)], store, rerun=True, quiet=True)
    assert run.calls == 6
    assert store.count(SUITE) == 1  # the rerun replaced the outcome


def test_a_smoke_run_is_kept_apart_from_the_full_one(store: ResultStore) -> None:
    run = Counted(1.0)
    smoke = run_claim(claim(run), store, size="smoke", quiet=True)
    assert run.calls == 1 and smoke.verdict == "inconclusive"  # one seed: an unbounded interval
    assert Path(smoke.figure).name == "P999-linear.smoke.png"
    run_claim(claim(run), store, quiet=True)
    assert run.calls == 4


def test_a_failing_claim_is_recorded_and_run_again(store: ResultStore) -> None:
    calls = []

    def broken(seed: int, size: str) -> Measurement:
        calls.append(seed)
        raise RuntimeError("planted")

    bad = Claim(id="P999-broken", paper=PAPER, statement="s", statistic="x", direction="≈ 1", rule=Rule(0.9, 1.1),
                run=broken, budget_s=1)
    outcomes, _, failed = run_claims([bad, claim(Counted(1.0))], store, quiet=True)
    assert [o.claim for o in outcomes] == ["P999-linear"]  # the next claim still ran
    assert failed == ["P999-broken: RuntimeError: planted"]
    assert [r.status for r in store.results(SUITE)] == ["error", "ok"]
    run_claims([bad], store, quiet=True)
    assert len(calls) == 2, "a claim stored as an error was not run again"


def test_the_budget_leaves_out_what_does_not_fit(store: ResultStore) -> None:
    small, large = Counted(1.0), Counted(1.0)
    outcomes, left, _ = run_claims([claim(large, "large", 200.0), claim(small, "small", 10.0)], store,
                                   budget_s=60.0, quiet=True)
    assert left == ["P999-large"] and [o.claim for o in outcomes] == ["P999-small"]
    assert large.calls == 0


def test_the_report_rows_come_from_the_store(store: ResultStore) -> None:
    done, never = claim(Counted(2.0), "done"), claim(Counted(1.0), "never")
    run_claim(done, store, quiet=True)
    rows = claim_rows(ResultStore(store.path, readonly=True), [done, never])
    assert [r.verdict for r in rows] == ["not reproduced", "not run"]
    assert rows[0].measured.startswith("2.01 [") and "(3 seeds)" in rows[0].measured
    assert rows[0].figure is not None and rows[0].figure.name == "P999-done.png"
    assert rows[1].figure is None
    assert store.results(SUITE)[0].metrics["figure"] == "repro/P999-done.png"  # relative: the folder may move
    assert rows[0].paper.startswith("P999 ")


def test_the_report_shows_the_claims_section(store: ResultStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """`attnlab report`: the Claims section lists every claim with its measured interval, verdict and figure."""
    from attnlab.bench.report import markdown
    from attnlab.bench.report.html import Page
    from attnlab.bench.report.model import Report
    from attnlab.repro import section

    done, never = claim(Counted(2.0), "done"), claim(Counted(1.0), "never")
    monkeypatch.setattr(section, "all_claims", lambda: [done, never])
    empty = Report.from_store(ResultStore(store.path, readonly=True))
    assert empty.claims == [] and "Claims" not in markdown.render(empty)  # nothing run: no section
    run_claim(done, store, quiet=True)
    report = Report.from_store(ResultStore(store.path, readonly=True))
    page, summary = Page(report).render(), markdown.render(report)
    assert "1 not reproduced, 1 not run of 2 claims" in page and "1 not reproduced, 1 not run of 2 claims" in summary
    assert "<span class='verdict not-reproduced'>not reproduced</span>" in page
    assert page.count("<img class='claim'") == 1  # the run claim's figure, embedded; none for the other
    row = next(line for line in summary.splitlines() if line.startswith("| P999-done"))
    assert "2.01 \\[1.985, 2.035\\]" in row and "**not reproduced**" in row and "P999-done.png" in row
