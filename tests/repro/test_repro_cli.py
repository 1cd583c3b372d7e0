"""`attnlab repro`: the listing, and a smoke run of every registered claim writing its verdict."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from attnlab.cli import main
from attnlab.core.registry import entries, papers
from attnlab.repro.claim import VERDICTS, all_claims


def test_every_claim_is_a_catalogue_entry_of_its_paper() -> None:
    claims = all_claims()
    assert len(claims) >= 8
    assert {s.name for s in entries("repro")} == {c.id for c in claims}
    for c in claims:
        assert c.id in {s.name for s in papers()[c.paper.id] if s.kind == "repro"}
        assert c.budget_s <= 300 and c.seeds >= 3


def test_list_shows_every_claim(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["repro", "list"]) == 0
    text = capsys.readouterr().out
    for c in all_claims():
        assert f"{c.id}  [{c.paper.id}, {c.method}, ≤ {c.budget_s:g} s]" in text
    assert max(len(line) for line in text.splitlines()) <= 100
    assert main(["repro", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [d["id"] for d in listed] == [c.id for c in all_claims()]
    assert all(d["rule"].startswith("reproduced if") for d in listed)


@pytest.mark.parametrize("argv", [["repro"], ["repro", "P019", "--all"], ["repro", "P000"],
                                  ["repro", "P019", "--budget-minutes", "1"]])
def test_bad_use_is_a_usage_error(argv: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main([*argv, "--db", str(tmp_path / "r.sqlite")]) == 2
    assert "attnlab repro: error:" in capsys.readouterr().err


def test_every_claim_runs_in_smoke_size_and_writes_its_verdict(capsys: pytest.CaptureFixture[str],
                                                               tmp_path: Path) -> None:
    db = tmp_path / "results.sqlite"
    assert main(["repro", "--all", "--smoke", "--quiet", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    for c in all_claims():
        line = (tmp_path / "repro" / f"{c.id}.smoke.txt").read_text()
        assert line.startswith(f"{c.id} ({c.paper.id}): ")
        assert line.rstrip().rsplit("Verdict: ", 1)[1].rstrip(".") in VERDICTS
        assert (tmp_path / "repro" / f"{c.id}.smoke.png").stat().st_size > 0
        assert f"{c.id} ({c.paper.id})" in out
    # the same command again reads the store instead of running
    assert main(["repro", "--all", "--smoke", "--quiet", "--db", str(db)]) == 0
    assert capsys.readouterr().out.count("(stored)") == len(all_claims())
