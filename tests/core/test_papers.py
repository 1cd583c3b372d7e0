"""Every paper id in the catalogue is a row of shared/PAPERS.md (where the checkout has it beside it)."""
import re
from pathlib import Path

import pytest

import attnlab

PAPERS = Path(__file__).resolve().parents[3] / "shared" / "PAPERS.md"


@pytest.mark.skipif(not PAPERS.exists(), reason="shared/PAPERS.md is not beside this checkout")
def test_paper_ids_are_rows_of_papers_md() -> None:
    rows = {}
    for line in PAPERS.read_text().splitlines():
        m = re.match(r"\| (P\d{3}) \| ([^|]+) \|", line)
        if m:
            rows[m.group(1)] = m.group(2).strip()
    assert len(rows) == 251
    for spec in attnlab.entries():
        if spec.paper.id is not None:
            assert spec.paper.id in rows, f"{spec.kind} {spec.name}: {spec.paper.id} is not in PAPERS.md"
