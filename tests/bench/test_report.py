"""`attnlab report` on the results of tiny real bench runs, checked in headless Chromium.

The module fixture plants a mechanism whose name is an HTML <script> element (it fails
above N=64, so the speed run records errors, and has no causal mode, so the recall run
records it as unsupported) and two peer libraries of softmax (one agreeing, one off by
0.01), runs the real speed, peer and recall code on tiny settings into a fresh store,
and writes the report. The page must load without console errors or network requests,
decode every plot, escape the planted name and list every registered mechanism; the
Markdown and JSON exports must agree with the store, value by value.
"""
from __future__ import annotations

import html
import importlib
import json
import math
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnlab.bench.env import environment
from attnlab.bench.peers import Peer, peer_configs, run_peer_configs
from attnlab.bench.recall import Grid, grid_configs, run_recall
from attnlab.bench.report import write_report
from attnlab.bench.speed import SpeedOptions, run_speed
from attnlab.bench.store import ResultStore
from attnlab.cli import main
from attnlab.core import registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from browser import open_page  # noqa: E402  (tests/browser.py)

pytestmark = pytest.mark.xdist_group("report")  # one process runs the module's costly fixture (--dist loadgroup)
PLANTED = '<script>alert("planted")</script>'
FAILS_ABOVE = 64
LENGTHS = (32, 64, 128)
PROBE = """
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
  const probe = document.createElement('div');
  probe.id = 'attnlab-probe';
  probe.dataset.images = images.length;
  probe.dataset.decoded = images.length - broken.length;
  probe.dataset.scripts = document.scripts.length;
  probe.textContent = JSON.stringify(broken);
  document.body.appendChild(probe);
});
"""
RECALL = Grid(cells=((16, 2), (16, 4)), d_models=(16,), lrs=(3e-3,), vocab_size=64, max_epochs=1,
              train_examples=64, test_examples=32, cell_seconds=10.0)
PLANTED_MODULE = f'''
from attnlab.core.registry import Paper, Supports, register
from attnlab.mechanisms.dense.softmax import SoftmaxAttention


@register(name={PLANTED!r}, paper=Paper(None, "planted", 2024), family="A", cost="O(N²d)", exponent=2.0,
          supports=Supports(causal=False))
class Planted(SoftmaxAttention):
    def attend_fast(self, q, k, v, mask):
        if q.shape[-2] > {FAILS_ABOVE}:
            raise RuntimeError("planted failure")
        return super().attend_fast(q, k, v, mask)
'''


class _TorchPeer(Peer):
    """A peer library planted by this test: torch's SDPA (plus `offset`), forward only."""

    package = module = "torch"
    summary = "torch SDPA, planted by the report test"
    mechanisms = {"softmax": "the same"}
    modes = ("fwd",)
    offset = 0.0

    def prepare(self, q, k, v, config):
        return lambda: F.scaled_dot_product_attention(q, k, v) + self.offset


class AgreeingPeer(_TorchPeer):
    name = "planted-agree"


class DisagreeingPeer(_TorchPeer):
    name = "planted-disagree"
    offset = 0.01  # far above the float32 tolerance: recorded "disagree", never timed


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    """(store, report.html) after tiny real runs: speed of softmax and the planted mechanism, two planted
    peers of softmax, MQAR recall of softmax (two seeds) and of the planted mechanism."""
    root = tmp_path_factory.mktemp("report")
    (root / "planted_mechanism_for_report.py").write_text(textwrap.dedent(PLANTED_MODULE), encoding="utf-8")
    sys.path.insert(0, str(root))  # the speed worker processes get this path and import the module too
    try:
        importlib.import_module("planted_mechanism_for_report")
        store = ResultStore(root / "results.sqlite")
        options = SpeedOptions(lengths=LENGTHS, budget_s=0.2, repeats=3, threads=1, quiet=True)
        results = run_speed(store, [PLANTED], options)
        peers = {p.name: p for p in (AgreeingPeer(), DisagreeingPeer())}
        configs = peer_configs([r.config for r in results if r.config["mechanism"] == "softmax"], peers)
        run_peer_configs(configs, store, {**environment(), "threads": 1}, peers=peers, budget_s=0.2, repeats=3, quiet=True)
        recall = grid_configs(RECALL, ["softmax"], seeds=(0, 1)) + grid_configs(RECALL, [PLANTED])
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny models: one thread is faster, much faster on a busy machine
        try:
            run_recall(store, recall, quiet=True)
        finally:
            torch.set_num_threads(threads)
        page = write_report(store, root / "report")
        yield store, page
    finally:
        registry.remove(PLANTED)
        sys.modules.pop("planted_mechanism_for_report", None)
        sys.path.remove(str(root))


def _family_of(name: str) -> str:
    return "A" if name == PLANTED else registry.get(name).family


def test_browser_helper_catches_console_errors(tmp_path: Path) -> None:
    page = tmp_path / "page.html"
    page.write_text(
        "<!DOCTYPE html><html><body><p>x</p>"
        "<script>console.log('just a log'); console.error('deliberate error 123');</script>"
        "<script>notDefinedAnywhere();</script><img alt='gone' src='missing.png'></body></html>",
        encoding="utf-8",
    )
    seen = open_page(page, probe="document.body.insertAdjacentHTML('beforeend', '<i id=\"marker\">m</i>')")
    assert any("deliberate error 123" in e for e in seen.errors), seen.errors
    assert any("notDefinedAnywhere" in e for e in seen.errors), seen.errors
    assert any("missing.png" in e for e in seen.errors), seen.errors
    assert not any("just a log" in e for e in seen.errors)
    assert ("log", "just a log") in seen.console
    assert '<i id="marker">m</i>' in seen.dom
    assert list(tmp_path.iterdir()) == [page]  # the probe's copy is gone


def test_page_loads_cleanly_with_every_plot(run) -> None:
    store, page = run
    seen = open_page(page, probe=PROBE)
    assert seen.errors == []
    assert seen.remote_requests == []
    marker = re.search(r'<div id="attnlab-probe" data-images="(\d+)" data-decoded="(\d+)" data-scripts="(\d+)">'
                       r"(.*?)</div>", seen.dom)
    assert marker, "the probe did not run"
    images, decoded, scripts, broken = int(marker[1]), int(marker[2]), int(marker[3]), json.loads(html.unescape(marker[4]))
    speed = store.results("speed")
    panels = {(_family_of(r.config["mechanism"]), r.config["mode"]) for r in speed if r.status == "ok"}
    heatmaps = {(r.config["d_model"], r.config["seq_len"]) for r in store.results("recall")}
    assert len(panels) == 2 and len(heatmaps) == 1  # family A, fwd and fwd+bwd; d_model=16, seq_len=16
    # the headline's exponent dot plot; one speed figure per mechanism group of family A: the planted
    # mechanism's ("other": not under attnlab/mechanisms) and dense (the peers of softmax; softmax itself
    # is the reference line); one heat map
    assert images == 1 + 2 + len(heatmaps)
    assert decoded == images, broken
    assert scripts == 1  # the probe's own: the planted <script> name stayed text


def test_planted_script_name_is_escaped(run) -> None:
    _, page = run
    text = page.read_text(encoding="utf-8")
    assert "<script" not in text.lower()
    assert html.escape(PLANTED, quote=True) in text
    assert "planted failure" in text  # the error note of N=128, in a title attribute


def test_every_registered_mechanism_is_listed(run) -> None:
    store, page = run
    text = page.read_text(encoding="utf-8")
    coverage = text[text.index("id='coverage'"):text.index("id='environment'")]
    rows = {html.unescape(m[1]): re.findall(r"<td>(.*?)</td>", m[0])
            for m in re.finditer(r"<tr><td><code>(.*?)</code>.*?</tr>", coverage)}
    registered = {s.name for s in registry.list_mechanisms()}
    assert PLANTED in registered and registered <= set(rows)
    for name in registered:
        for suite, cell in (("speed", rows[name][-2]), ("recall", rows[name][-1])):
            measured = any(r.config["mechanism"] == name for r in store.results(suite))
            assert ("not measured" in cell) == (not measured), (name, suite, cell)
    assert re.fullmatch(r"4 ok, 2 error", rows[PLANTED][-2])  # N=32, 64 ok and N=128 failing, two modes


def test_json_export_agrees_with_the_store(run) -> None:
    store, page = run
    export = json.loads((page.parent / "results.json").read_text(encoding="utf-8"))
    stored = {r.config_hash: r for r in store.results()}
    assert len(export["results"]) == len(stored)
    for row in export["results"]:
        r = stored[row["config_hash"]]
        assert (row["suite"], row["config"], row["status"], row["metrics"]) == (r.suite, r.config, r.status, r.metrics)
        assert export["environments"][row["environment"]] == r.env
    by_name = {m["name"]: m for m in export["mechanisms"]}
    for spec in registry.list_mechanisms():
        assert by_name[spec.name]["measured"] == any(r.config["mechanism"] == spec.name for r in stored.values())

    speed = [r for r in stored.values() if r.suite == "speed" and r.config["impl"] == "attnlab"]
    ok = {(r.config["mechanism"], r.config["mode"], r.config["n"]): r.metrics["median_s"] for r in speed if r.status == "ok"}
    for row in (x for x in export["exponents"] if x["impl"] == "attnlab"):  # measured: least squares of log time on log N, fitted here independently
        points = sorted((n, t) for (m, mode, n), t in ok.items() if (m, mode) == (row["mechanism"], row["mode"]))
        assert row["points"] == len(points)
        if len(points) >= 3:
            slope = np.polyfit(np.log([n for n, _ in points]), np.log([t for _, t in points]), 1)[0]
            assert row["measured"] == pytest.approx(slope, rel=1e-9)
        assert row["declared"] == 2.0
    ratios = [row for row in export["ratios"] if row["mechanism"] == PLANTED]
    assert {(row["mode"], row["n"]) for row in ratios} == {(m, n) for m in ("fwd", "fwd+bwd") for n in LENGTHS}
    timed = {(r.config["mechanism"], r.config["mode"], r.config["n"]) for r in speed if _timed(r)}
    for row in ratios:
        key = (PLANTED, row["mode"], row["n"])
        if key in ok and {key, ("softmax", row["mode"], row["n"])} <= timed:
            assert row["over_sdpa"] == pytest.approx(ok[key] / ok[("softmax", row["mode"], row["n"])])
        elif key in ok:  # a time flagged implausible (on a loaded machine, a rate above the run's matmul rate)
            assert row["over_sdpa"] is None
        else:
            assert row["n"] > FAILS_ABOVE and row["status"] == "error" and row["over_sdpa"] is None


def _timed(r) -> bool:
    """Whether a stored speed result's time is data: ok, and not flagged implausible."""
    return r.status == "ok" and "rate_above_matmul" not in (r.metrics.get("flags") or [])


def _seconds(cell: str) -> float:
    value, unit = cell.split()
    return float(value) * {"s": 1.0, "ms": 1e-3, "µs": 1e-6, "ns": 1e-9}[unit]


def _md_rows(markdown: str, heading: str) -> list[list[str]]:
    """The body rows of the first table under `heading`, cells stripped."""
    lines = markdown[markdown.index(heading):].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(first, len(lines)) if not lines[i].startswith("|")), len(lines))
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines[first + 2:end]]


def test_markdown_summary_agrees_with_the_store(run) -> None:
    store, page = run
    markdown = (page.parent / "summary.md").read_text(encoding="utf-8")
    assert re.search(r"(?<!\\)<", markdown) is None  # every < escaped, as in \<script\>
    rows = _md_rows(markdown, "## Speed: median time by N")
    peer_rows = [row for row in rows if "planted-" in row[0]]
    rows = [row for row in rows if row not in peer_rows]
    speed = [r for r in store.results("speed") if r.config["impl"] == "attnlab"]
    md_name = {"softmax": "softmax", PLANTED: PLANTED.replace("<", "\\<").replace(">", "\\>")}
    assert len(rows) == len({(r.config["mechanism"], r.config["mode"]) for r in speed})
    for r in speed:
        row = next(row for row in rows if row[0] == md_name[r.config["mechanism"]] and row[1] == r.config["mode"])
        cell = row[2 + LENGTHS.index(r.config["n"])]
        if r.status == "ok":  # three significant digits, then " (flagged)" when the time is implausible
            time_flagged = "rate_above_matmul" in r.metrics.get("flags", [])  # (a loaded machine's matmul rate)
            assert cell.endswith(" (flagged)") == time_flagged, cell
            assert _seconds(cell.removesuffix(" (flagged)")) == pytest.approx(r.metrics["median_s"], rel=5e-3)
        else:
            assert cell == r.status.replace("_", " ")
    # the peers: the agreeing one timed, the disagreeing one never
    assert [row[:2] for row in peer_rows] == [["softmax \\[planted-agree\\]", "fwd"], ["softmax \\[planted-disagree\\]", "fwd"]]
    agree = {r.config["n"]: r.metrics["median_s"] for r in _peer_results(store, "planted-agree")}
    assert [_seconds(cell.removesuffix(" (flagged)")) for cell in peer_rows[0][2:]] == pytest.approx(
        [agree[n] for n in LENGTHS], rel=5e-3)
    assert peer_rows[1][2:] == ["disagree"] * len(LENGTHS)
    ratios = _md_rows(markdown, "## attnlab time / peer time")
    assert [row[:2] for row in ratios] == [row[:2] for row in peer_rows]
    assert [float(c.rstrip("×")) if c.endswith("×") else c for c in ratios[0][2:]] == _expected_peer_cells(store)
    assert ratios[1][2:] == ["disagree"] * len(LENGTHS)
    assert "- softmax \\[planted-agree\\], fwd+bwd: planted-agree supports modes fwd" in markdown

    missing = {s.name for s in registry.list_mechanisms()} - {r.config["mechanism"] for r in store.results()}
    listed = re.findall(r"^- (\S+) \(family", markdown[markdown.index("## Not measured"):], re.M)
    assert set(listed) == missing


def _expected_peer_cells(store: ResultStore) -> list:
    """Per N, the agreeing peer's ratio cell: attnlab/peer as a number (to compare approximately), or "flagged"."""
    out = []
    for r in _peer_results(store, "planted-agree"):
        (ours,) = [x for x in store.results("speed") if (x.config["mechanism"], x.config["impl"], x.config["mode"],
                                                            x.config["n"]) == ("softmax", "attnlab", "fwd", r.config["n"])]
        out.append("flagged" if not _timed(r) else "attnlab flagged" if not _timed(ours)
                   else pytest.approx(ours.metrics["median_s"] / r.metrics["median_s"], rel=5e-3))
    return out


def _peer_results(store: ResultStore, peer: str, mode: str = "fwd") -> list:
    return [r for r in store.results("speed") if r.config["impl"] == peer and r.config["mode"] == mode]


def _softmax_time(store: ResultStore, n: int, mode: str = "fwd") -> float:
    (r,) = [r for r in store.results("speed") if (r.config["mechanism"], r.config["impl"], r.config["mode"],
                                                     r.config["n"]) == ("softmax", "attnlab", mode, n)]
    return r.metrics["median_s"]


def test_peers_show_ratios_and_disagreement_never_a_time(run) -> None:
    store, page = run
    agree, disagree = _peer_results(store, "planted-agree"), _peer_results(store, "planted-disagree")
    assert [r.status for r in agree] == ["ok"] * len(LENGTHS)  # what the planted peers did for real
    assert [r.status for r in disagree] == ["disagree"] * len(LENGTHS)
    assert {r.status for r in _peer_results(store, "planted-agree", "fwd+bwd")} == {"unsupported"}
    text = page.read_text(encoding="utf-8")
    section = text[text.index("id='peers'"):text.index("id='limits'")]
    rows = {m[1]: re.findall(r"<td>(.*?)</td>", m[0])[2:] for m in re.finditer(r"<tr><td>(.*?)</td>.*?</tr>", section)}
    assert set(rows) == {"softmax [planted-agree]", "softmax [planted-disagree]"}
    shown = [re.sub(r"<.*?>", "", cell) for cell in rows["softmax [planted-agree]"]]
    assert [float(c.rstrip("×")) if c.endswith("×") else c for c in shown] == _expected_peer_cells(store)
    for cell in rows["softmax [planted-disagree]"]:
        assert re.fullmatch(r"<span class='status s-disagree' title='max \|attnlab − peer\| = 0\.01'>disagree</span>",
                            cell), cell
    speed = text[text.index("id='speed'"):text.index("id='exponents'")]
    row = re.search(r"<tr><td>softmax \[planted-disagree\]</td>(.*?)</tr>", speed)[1]
    assert row.count(">disagree<") == len(LENGTHS) and not re.search(r"\d (s|ms|µs|ns)<", row)
    export = json.loads((page.parent / "results.json").read_text(encoding="utf-8"))
    for r in agree + disagree:
        (row,) = [x for x in export["ratios"] if (x["impl"], x["mode"], x["n"]) == (r.config["impl"], "fwd", r.config["n"])]
        expected = _expected_peer_cells(store)[LENGTHS.index(r.config["n"])] if r.status == "ok" else None
        if r.status == "ok" and not isinstance(expected, str):
            assert row["attnlab_over_peer"] == expected
        elif r.status == "ok":  # a flagged time: no ratio
            assert row["attnlab_over_peer"] is None
        else:
            assert row["attnlab_over_peer"] is None and row["max_abs_diff"] == pytest.approx(0.01, rel=1e-3)


def test_recall_tables_agree_with_the_store(run) -> None:
    store, page = run
    recall = store.results("recall")
    assert {r.status for r in recall if r.config["mechanism"] == PLANTED} == {"unsupported"}  # no causal mode
    softmax = [r for r in recall if r.config["mechanism"] == "softmax"]
    assert {r.status for r in softmax} == {"ok"} and len(softmax) == 4
    kvs = [kv for _, kv in RECALL.cells]
    mean = {kv: np.mean([r.metrics["accuracy"] for r in softmax if r.config["num_kv_pairs"] == kv]) for kv in kvs}
    shown = {kv: f"{math.floor(mean[kv] * 100 + 1e-9) / 100:.2f}" for kv in kvs}  # the mean over seeds, rounded down
    converged = {kv: all(r.metrics["converged"] for r in softmax if r.config["num_kv_pairs"] == kv) for kv in kvs}
    marked = {kv: shown[kv] + ("" if converged[kv] else " ◐") for kv in kvs}  # ◐: stopped before converging

    text = page.read_text(encoding="utf-8")
    section = text[text.index("id='recall'"):text.index("id='coverage'")]
    assert len(re.findall(r"<h3>MQAR accuracy, d_model=16, seq_len=16</h3>\s*<img ", section)) == 1
    table = section[:section.index("<details><summary>Every recall run")]
    rows = {m[1]: re.findall(r"<td>(.*?)</td>", m[0])[1:] for m in re.finditer(r"<tr><td>(.*?)</td>.*?</tr>", table)}
    assert rows["softmax"] == [marked[kv] for kv in kvs]
    assert rows[html.escape(PLANTED)] == ["<span class='status s-unsupported'>unsupported</span>"] * len(kvs)
    details = section[section.index("<details><summary>Every recall run"):]
    assert details.count("<tr><td>") == len(recall)  # every run listed

    markdown = (page.parent / "summary.md").read_text(encoding="utf-8")
    md = {row[0]: row[1:] for row in _md_rows(markdown, "## MQAR accuracy, d_model=16, seq_len=16")}
    assert md == {"softmax": [shown[kv] for kv in kvs],
                  PLANTED.replace("<", "\\<").replace(">", "\\>"): ["unsupported"] * len(kvs)}

    export = json.loads((page.parent / "results.json").read_text(encoding="utf-8"))
    cells = {(c["mechanism"], c["num_kv_pairs"]): c for c in export["recall"]}
    for kv in kvs:
        assert cells[("softmax", kv)]["accuracy"] == pytest.approx(mean[kv]) and cells[("softmax", kv)]["runs"] == 2
        assert cells[(PLANTED, kv)]["accuracy"] is None and cells[(PLANTED, kv)]["status"] == "unsupported"


def test_command_prints_path_markdown_and_json(run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store, _ = run
    out = tmp_path / "out"
    assert main(["report", "--db", str(store.path), "--out", str(out), "--quiet", "--markdown"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# attnlab results")
    assert printed.strip().splitlines()[-1] == str(out / "report.html")  # the path is the last line
    assert {p.name for p in out.iterdir()} == {"report.html", "results.json", "summary.md"}

    assert main(["report", "--db", str(store.path), "--out", str(out), "--quiet", "--json", "-"]) == 0
    export = json.loads(capsys.readouterr().out)  # nothing but the JSON on stdout
    assert sorted(r["config_hash"] for r in export["results"]) == sorted(r.config_hash for r in store.results())

    assert main(["report", "--db", str(tmp_path / "none.sqlite"), "--out", str(out)]) == 2
    assert "no results database" in capsys.readouterr().err
    assert not (tmp_path / "none.sqlite").exists()


def test_time_and_size_formats() -> None:
    from attnlab.bench.report import fmt_accuracy, fmt_mib, fmt_time

    assert [fmt_time(x) for x in (2.5, 0.00123, 8.12e-4, 3e-8)] == ["2.5 s", "1.23 ms", "812 µs", "30 ns"]
    assert [fmt_mib(x) for x in (512 * 1024, 1536 * 2**20, 32 * 2**20)] == ["0.5 MiB", "1.54e+03 MiB", "32 MiB"]
    assert [fmt_accuracy(x) for x in (0.9899, 0.99, 1.0)] == ["0.98", "0.99", "1.00"]
    assert math.isclose(_seconds("812 µs"), 8.12e-4)


# -- a hand-made store: known times, so that every headline fact is checked against numbers set here ----------
MS = 1e-3
SHAPE = {"dtype": "float32", "batch": 1, "heads": 8, "head_dim": 64, "threads": 1}
OLD_RUN, NEW_RUN, ELSEWHERE = "20261207T050000Z-00000001", "20261207T060000Z-00000002", "20261207T040000Z-00000003"
RUN_STARTS = {ELSEWHERE: 1000.0, OLD_RUN: 2000.0, NEW_RUN: 3000.0}  # runs 1, 2, 3 in the environment table
# median seconds at N = 256, 512, 1024
SDPA = (1 * MS, 4 * MS, 16 * MS)
CAUSAL_SDPA = (0.6 * MS, 2.4 * MS, 9.6 * MS)
TIMES = {  # (mechanism, causal) -> times; ratios to the right SDPA in the comments
    ("linear", False): (2 * MS, 4 * MS, 8 * MS),  # 2, 1, 0.5: faster from N=1024 (1 is not faster), 2× there
    ("efficient", False): (3 * MS, 6 * MS, 12 * MS),  # 3, 1.5, 0.75: faster from 1024, 1.33×
    ("retention", False): (2 * MS, 1.5 * MS, 20 * MS),  # 2, 0.375, 1.25: faster at 512 only: not faster
    ("neighborhood", True): (0.5 * MS, 1.2 * MS, 2.4 * MS),  # vs causal SDPA 0.833, 0.5, 0.25: from 256, 4×
    ("twins-gsa", False): (0.5 * MS, 1 * MS, 2 * MS),  # peak memory 0 B at every N: memory flagged
}
PEER = "linear-attention-transformer"
PEER_TIMES = (6 * MS, 12 * MS, 24 * MS)  # efficient's attnlab / peer = 0.5; the peer disagrees at N=1024


def _hand_speed(mechanism: str, n: int, median: float, *, causal: bool = False, impl: str = "attnlab",
                status: str = "ok", peak: int | None = None, run: str = NEW_RUN, load: float = 0.5,
                cpu: str = "hand") -> tuple:
    from attnlab.bench.speed import bench_params

    config = {"mechanism": mechanism, "impl": impl, "params": bench_params(registry.get(mechanism)), "n": n,
              "mode": "fwd", "causal": causal, **SHAPE}
    metrics = {"median_s": median, "min_s": median * 0.9, "max_s": median * 1.2, "repeats": 5,
               "peak_mem_bytes": n * 4096 if peak is None else peak, "load_1m": load}
    if status != "ok":
        metrics = {"note": "planted", "max_abs_diff": 0.5}
    return "speed", config, status, metrics, {"cpu": cpu, "run_id": run, "time": RUN_STARTS[run]}


def _hand_recall(mechanism: str, accuracy: float, *, stopped: str, steps: int, max_epochs: int = 4) -> tuple:
    """A recall result as `recall.train_recall` records it: 2 steps per epoch (100 examples, batch 64), 20 s cap."""
    from attnlab.bench.recall import make_config
    from attnlab.bench.speed import bench_params

    config = make_config(mechanism, bench_params(registry.get(mechanism)), seq_len=64, num_kv_pairs=4, d_model=64,
                         vocab_size=128, seed=0, lr=3e-3, max_epochs=max_epochs, train_examples=100, test_examples=10,
                         cell_seconds=20)
    metrics = {"accuracy": accuracy, "best_accuracy": accuracy, "epochs": (steps + 1) // 2, "train_seconds": 10.0,
               "converged": stopped == "converged", "stopped": stopped, "steps": steps, "step_budget": 2 * max_epochs}
    return "recall", config, "ok", metrics, {"cpu": "hand", "run_id": NEW_RUN, "time": RUN_STARTS[NEW_RUN]}


@pytest.fixture(scope="module")
def hand(tmp_path_factory: pytest.TempPathFactory):
    """(store, Report) of hand-made results with known times: SDPA and causal SDPA, four mechanisms, one of them
    measured in an older run (reused), twins-gsa with 0 B peaks, a peer, and MQAR results at two budgets."""
    from attnlab.bench.report import Report

    rows = []
    for i, n in enumerate(LENGTHS_HAND):
        rows.append(_hand_speed("softmax", n, SDPA[i]))
        rows.append(_hand_speed("softmax", n, CAUSAL_SDPA[i], causal=True))
        for (mechanism, causal), times in TIMES.items():
            rows.append(_hand_speed(mechanism, n, times[i], causal=causal, peak=0 if mechanism == "twins-gsa" else None,
                                    run=OLD_RUN if mechanism == "retention" else NEW_RUN, load=0.25 + i))
        # measured on another machine, where SDPA was not: no ratio ("not comparable"), never in the headline
        rows.append(_hand_speed("galerkin", n, SDPA[i] / 10, cpu="another", run=ELSEWHERE))
        rows.append(_hand_speed("efficient", n, PEER_TIMES[i], impl=PEER, status="disagree" if n == 1024 else "ok"))
    rows += [
        _hand_recall("softmax", 1.0, stopped="converged", steps=4),
        _hand_recall("linear", 0.8, stopped="step budget", steps=8),  # all 8 steps: stopped before converging
        _hand_recall("based", 0.5, stopped="time cap", steps=3),
        _hand_recall("retention", 0.9, stopped="step budget", steps=16, max_epochs=8),  # another budget, board
    ]
    store = ResultStore(tmp_path_factory.mktemp("hand") / "results.sqlite")
    for row in rows:
        assert store.record(*row)
    return store, Report.from_store(store)


LENGTHS_HAND = (256, 512, 1024)


def test_headline_beats_sdpa_from_known_times(hand) -> None:
    from attnlab.bench.report import headline

    _, report = hand
    facts = {(b.series.mechanism, b.series.causal): b for b in headline.beats_sdpa(report)}
    assert set(facts) == set(TIMES)
    expected = {  # (faster from N, ratio at N=1024, reference), worked out by hand from the tables above
        ("linear", False): (1024, 0.5, "SDPA"),
        ("efficient", False): (1024, 0.75, "SDPA"),
        ("retention", False): (None, 1.25, "SDPA"),
        ("neighborhood", True): (256, 0.25, "causal SDPA"),  # against plain SDPA it would be 0.15
        ("twins-gsa", False): (256, 0.125, "SDPA"),
    }
    for key, (from_n, at_max, reference) in expected.items():
        b = facts[key]
        assert (b.from_n, b.n_max, b.reference) == (from_n, 1024, reference), key
        assert b.at_max == pytest.approx(at_max)
    assert facts[("neighborhood", True)].ratios == pytest.approx({256: 0.5 / 0.6, 512: 0.5, 1024: 0.25})
    assert {s.mechanism: why for s, why in headline.uncompared(report)} == {
        "galerkin": "SDPA was measured only in another environment"}
    # the page says it in words: faster from which N and by how much
    text = (Path(write_report(hand[0], Path(hand[0].path).parent / "report")).read_text(encoding="utf-8"))
    section = text[text.index("id='headline'"):text.index("id='speed'")]
    compact, full = section.split("<details><summary>Every run against SDPA")
    block = compact[compact.index("<h4>fwd, causal: against causal SDPA</h4>"):]
    row = re.search(r"<tr><td><b>neighborhood causal</b></td>(.*?)</tr>", block)[1]
    assert "N ≥ 256" in row and "4× at N=1024" in row
    block = compact[compact.index("<h4>fwd, non-causal: against SDPA</h4>"):compact.index("<h4>fwd, causal")]
    faster = re.findall(r"<tr><td><b>(.*?)</b></td>", block)
    assert faster == ["twins-gsa", "linear", "efficient"]  # 8×, 2×, 1.33× at N=1024
    assert "Not faster: retention (1.25× slower)." in block
    row = re.search(r"<tr><td><b>neighborhood causal</b></td>(.*?)</tr>", full)[1]
    assert "causal SDPA" in row and "N ≥ 256" in row and "4× faster at N=1024" in row
    row = re.search(r"<tr><td><b>retention</b></td>(.*?)</tr>", full)[1]
    assert "not faster" in row and "1.25× slower at N=1024" in row


def test_headline_exponents_leaderboards_and_peers(hand) -> None:
    from attnlab.bench.report import headline

    _, report = hand
    exps = {(x["mechanism"], x["causal"]): x["measured"] for x in headline.exponent_rows(report)}
    assert exps[("softmax", False)] == pytest.approx(2.0) and exps[("linear", False)] == pytest.approx(1.0)
    assert exps[("neighborhood", True)] == pytest.approx(np.polyfit(np.log(LENGTHS_HAND), np.log(TIMES[("neighborhood", True)]), 1)[0])
    assert [x["measured"] for x in headline.exponent_rows(report)] == sorted(exps.values())

    boards = headline.leaderboards(report)
    assert [b.budget for b in boards] == ["8 steps (4 epochs of 100 examples), at most 20 s",
                                          "16 steps (8 epochs of 100 examples), at most 20 s"]
    first = boards[0]
    assert [row["mechanism"] for row in first.rows] == ["softmax", "linear", "based"]  # retention: another budget
    assert [row["mean"] for row in first.rows] == pytest.approx([1.0, 0.8, 0.5])
    assert [row["rank"] for row in first.rows] == [1, 2, 3]
    assert [bool(row["stopped"]) for row in first.rows] == [False, True, True]
    assert first.rows[2]["stopped"][4] == "stopped at the time cap (20 s) after 3 of 8 steps"
    assert first.rows[1]["stopped"][4] == "step budget spent (8 of 8 steps) below the target"

    (standing,) = headline.peer_standing(report)
    assert (standing.series.impl, standing.agreed, standing.disagreed) == (PEER, 2, 1)
    assert standing.ratios == pytest.approx({256: 0.5, 512: 0.5})  # attnlab 3, 6 ms against the peer's 6, 12 ms


def _figures(report):
    from attnlab.bench.report import html as page

    return [(title, panels, fig) for _, panels in report.families() for title, panels, fig in page.group_figures(report, panels)]


def test_every_speed_panel_has_its_sdpa_line_and_distinct_series(hand) -> None:
    _, report = hand
    figures = _figures(report)
    assert figures
    seen_causal = False
    for title, panels, fig in figures:
        axes = fig.get_axes()
        assert len(axes) == 2 * len(panels)  # time and memory per panel
        for panel, (time_ax, memory_ax) in zip(panels, zip(axes[::2], axes[1::2])):
            times = CAUSAL_SDPA if panel.causal else SDPA  # the hand-made baseline this panel must show
            for ax, values in ((time_ax, times), (memory_ax, [n * 4096 / 2**20 for n in LENGTHS_HAND])):
                (line,) = [x for x in ax.get_lines() if x.get_gid() == "reference"]
                assert list(line.get_ydata()) == pytest.approx(values), (title, panel)  # plain or causal, as the panel
            seen_causal |= panel.causal
            for ax, value in ((time_ax, "time"), (memory_ax, "memory")):
                series = [x for x in ax.get_lines() if x.get_gid() == "series"]
                looks = [(tuple(x.get_color()) if not isinstance(x.get_color(), str) else x.get_color(),
                          x.get_marker(), x.get_linestyle()) for x in series]
                drawn = [s for s in panel.series if any(getattr(p, value) for p in report.series[s].values())]
                assert len(series) == len(drawn) and len(set(looks)) == len(looks), (title, looks)
                assert all(look[0] != "black" for look in looks)
    assert seen_causal


def test_a_crowded_group_is_split_and_styles_never_repeat() -> None:
    from attnlab.bench import plots
    from attnlab.bench.report.model import PANEL_SIZE

    lines = [plots.Line(f"m{i}", [1, 2], [1.0, 2.0], key=f"m{i}") for i in range(36)]
    lines += [plots.Line(f"m{i} [peer]", [1, 2], [1.0, 2.0], peer=True, key=f"m{i}") for i in range(36)]
    looks = plots.styles(lines)
    assert len(set(looks.values())) == len(lines)
    first = [looks[f"m{i}"] for i in range(len(plots.PALETTE))]  # these differ in colour and in marker
    assert len({c for c, _, _ in first}) == len({m for _, m, _ in first}) == len(plots.PALETTE)
    assert PANEL_SIZE <= len(plots.PALETTE)  # so one panel's mechanisms differ in both
    crowd = [plots.Line(f"m{i}", [1], [1.0], key="m") for i in range(2)]
    crowd += [plots.Line(f"p{i}", [1], [1.0], peer=True, key="m") for i in range(len(plots.PEER_MARKERS) + 1)]
    with pytest.raises(ValueError, match="told apart"):
        plots.styles(crowd)  # more peers of one mechanism than peer markers


def test_implausible_values_are_listed_not_plotted(hand) -> None:
    store, report = hand
    (twins,) = [s for s in report.series if s.mechanism == "twins-gsa"]
    assert [p.memory for p in report.series[twins].values()] == [None] * 3
    assert all(p.time is not None for p in report.series[twins].values())  # the time stays: only the peak is wrong
    for _, panels, fig in _figures(report):
        for panel, memory_ax in zip(panels, fig.get_axes()[1::2]):
            if twins in panel.series:
                labels = [x.get_label() for x in memory_ax.get_lines()]
                assert not any(label.startswith("twins-gsa") for label in labels)
    text = write_report(store, Path(store.path).parent / "flagged").read_text(encoding="utf-8")
    listed = re.findall(r"<p class='flag'>⚠ Not plotted \(implausible\): (.*?)</p>", text)
    assert listed == ["twins-gsa, fwd at N=256, 512, 1024: peak memory of 0 (below the probe&#x27;s resolution, "
                      "or not measured)."]


def test_reused_rows_and_load_are_marked(hand) -> None:
    store, report = hand
    text = write_report(store, Path(store.path).parent / "reused").read_text(encoding="utf-8")
    speed = text[text.index("id='speed'"):text.index("id='exponents'")]
    rows = dict(re.findall(r"<tr><td>([^<]*)</td><td>fwd</td>(.*?)</tr>", speed))
    reused = r"<span class='reused' title='reused from the store: measured in run {} \(.*?\), not the newest'>↺{}</span>"
    assert len(re.findall(reused.format(2, 2), rows["retention"])) == 3  # measured in the older run
    assert len(re.findall(reused.format(1, 1), rows["galerkin"])) == 3  # and in the oldest, elsewhere
    assert all("class='reused'" not in row for name, row in rows.items() if name not in ("retention", "galerkin"))
    assert re.findall(r"load (\d\.\d\d)", rows["linear"]) == ["0.25", "1.25", "2.25"]
    assert "6 speed results measured in earlier runs than the newest speed run (run 3), reused from the store" in text
    sdpa = text[text.index("id='sdpa'"):text.index("id='peers'")]
    galerkin = re.search(r"<tr><td>galerkin</td><td>fwd</td>(.*?)</tr>", sdpa)[1]
    assert galerkin.count(">not comparable<") == 3 and "×" not in galerkin
    markdown = (Path(store.path).parent / "reused" / "summary.md").read_text(encoding="utf-8")
    assert [row[2:] for row in _md_rows(markdown, "## Speed: median time by N") if row[0] == "retention"] == [
        ["2 ms (reused)", "1.5 ms (reused)", "20 ms (reused)"]]


def test_one_memory_unit_throughout(hand) -> None:
    store, report = hand
    out = Path(store.path).parent / "units"
    text = write_report(store, out).read_text(encoding="utf-8")
    shown = re.sub(r"data:image/png;base64,[^']*", "", text)
    assert re.findall(r"\d (B|KiB|GiB|kB|MB|GB)\b", shown) == []
    assert len(re.findall(r"\d MiB", shown)) >= 3 * len(TIMES)
    markdown = (out / "summary.md").read_text(encoding="utf-8")
    peaks = {r.config["n"]: r.metrics["peak_mem_bytes"] for r in store.results("speed")
             if (r.config["mechanism"], r.config["causal"], r.config["impl"]) == ("linear", False, "attnlab")}
    (row,) = [row for row in _md_rows(markdown, "## Peak memory (MiB) by N") if row[0] == "linear"]
    assert [float(c) for c in row[2:]] == pytest.approx([peaks[n] / 2**20 for n in LENGTHS_HAND], rel=1e-3)
    for _, _, fig in _figures(report):
        assert {ax.get_ylabel() for ax in fig.get_axes()[1::2]} == {"peak memory (MiB)"}


def test_report_reads_the_store_without_writing(hand, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A store in rollback-journal mode (as a foreign or older SQLite file may be) is left byte for byte as it
    was: a writer would switch it to WAL and add its tables. A foreign or corrupt file: one line, exit 2."""
    import hashlib
    import sqlite3

    store, _ = hand
    db = tmp_path / "copy.sqlite"
    with sqlite3.connect(store.path) as src, sqlite3.connect(db) as dst:
        src.backup(dst)
        dst.execute("PRAGMA journal_mode=DELETE")
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as con:
        con.execute("PRAGMA journal_mode=DELETE")
        con.execute("CREATE TABLE notes (text TEXT)")
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not a database at all" * 100)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (db, foreign, garbage)}

    assert main(["report", "--db", str(db), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert (tmp_path / "out" / "report.html").is_file()
    capsys.readouterr()
    for bad in (foreign, garbage):
        assert main(["report", "--db", str(bad), "--out", str(tmp_path / "none"), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(bad) in err and "--db" in err, err
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before} == before
    assert not (tmp_path / "none").exists()


def test_a_reader_sees_the_headline_first(hand, tmp_path: Path) -> None:
    """In Chromium at 1400 px: the headline is the first section, in the first screen; everything after it
    folds, and the page with its default folding stays short."""
    from browser import screenshot

    store, _ = hand
    page = write_report(store, tmp_path / "report")
    shot = tmp_path / "headline.png"
    size = screenshot(page, shot, selector="#headline", width=1400, height=1000)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and size["height"] > 200
    text = page.read_text(encoding="utf-8")
    sections = re.findall(r"<section id='(\w+)'>(<details)?", text)
    assert sections[0] == ("headline", "") and all(folds for _, folds in sections[1:])
    assert size["page_height"] < 8000


def test_a_flagged_sdpa_time_gives_no_ratio_and_no_line() -> None:
    """SDPA's time flagged implausible (a rate above the run's matmul rate): no ratio against it, no reference line
    but a note in the panel, the reason in the headline; the flagged point is listed."""
    from attnlab.bench.report import Report, headline
    from attnlab.bench.store import Result, config_hash

    results = []
    for i, n in enumerate(LENGTHS_HAND):
        for mechanism, median, flags in (("softmax", SDPA[i], ["rate_above_matmul"] if n == 512 else []),
                                         ("linear", TIMES[("linear", False)][i], [])):
            suite, config, status, metrics, env = _hand_speed(mechanism, n, median)
            metrics["flags"] = flags
            results.append(Result(suite, config, status, metrics, env, float(i), config_hash(config)))
    report = Report(results, {s.name: s for s in registry.list_mechanisms()})
    (linear,) = [s for s in report.series if s.mechanism == "linear"]
    assert [report.sdpa_ratio(linear, n) for n in LENGTHS_HAND] == pytest.approx([2.0, None, 0.5])
    (fact,) = headline.beats_sdpa(report)
    assert fact.ratios == pytest.approx({256: 2.0, 1024: 0.5}) and fact.from_n == 1024
    ((_, panels, fig),) = _figures(report)
    (line,) = [x for x in fig.get_axes()[0].get_lines() if x.get_gid() == "reference"]
    assert list(line.get_xdata()) == [256, 1024]  # N=512 left out

    everything_flagged = [Result(r.suite, r.config, r.status, {**r.metrics, "flags": ["rate_above_matmul"]}, r.env,
                                 r.created, r.config_hash) if r.config["mechanism"] == "softmax" else r for r in results]
    report = Report(everything_flagged, {s.name: s for s in registry.list_mechanisms()})
    assert headline.beats_sdpa(report) == []
    assert [why for _, why in headline.uncompared(report)] == [
        "the SDPA times it would be compared with are flagged implausible"]
    ((_, panels, fig),) = _figures(report)
    time_ax = fig.get_axes()[0]
    assert not [x for x in time_ax.get_lines() if x.get_gid() == "reference"]
    assert [t.get_text() for t in time_ax.texts] == ["SDPA not plotted: flagged implausible"]
    elsewhere = [Result(r.suite, r.config, r.status, {**r.metrics, "flags": []}, {"cpu": "another", "run_id": "x"},
                        r.created, r.config_hash) if r.config["mechanism"] == "softmax" else r for r in results]
    report = Report(elsewhere, {s.name: s for s in registry.list_mechanisms()})
    ((_, panels, fig),) = _figures(report)
    for ax in fig.get_axes():  # time and memory: an SDPA measured on another machine is not drawn beside these
        assert not [x for x in ax.get_lines() if x.get_gid() == "reference"]
        assert [t.get_text() for t in ax.texts] == ["SDPA not plotted: measured only in another environment"]


def test_a_crowded_family_is_split_into_small_panels() -> None:
    """Every registered mechanism of family A in one store (the 34-series plot of issue 10): panels of at most
    PANEL_SIZE mechanisms, grouped by folder, each mechanism in exactly one panel, SDPA in every one."""
    from attnlab.bench.report import Report
    from attnlab.bench.report.model import PANEL_SIZE
    from attnlab.bench.store import Result, config_hash

    family = [s.name for s in registry.list_mechanisms() if s.family == "A"]
    assert len(family) > 3 * PANEL_SIZE
    results = []
    for i, n in enumerate(LENGTHS_HAND):
        for name in family:
            suite, config, status, metrics, env = _hand_speed(name, n, SDPA[i] * (1 + len(name) / 10))
            results.append(Result(suite, config, status, metrics, env, float(i), config_hash(config)))
    report = Report(results, {s.name: s for s in registry.list_mechanisms()})
    ((name, panels),) = report.families()
    assert name == "A"
    placed = [s.mechanism for p in panels for s in p.series]
    assert sorted(placed) == sorted(set(family) - {"softmax"})  # softmax is every panel's reference line
    assert all(len(p.series) <= PANEL_SIZE and p.reference is not None for p in panels)
    assert {p.group.split()[0] for p in panels} == {report.group(m) for m in placed}
    for _, _, fig in _figures(report):
        for ax in fig.get_axes():
            looks = [(tuple(x.get_color()), x.get_marker()) for x in ax.get_lines() if x.get_gid() == "series"]
            assert len(set(looks)) == len(looks) and len([x for x in ax.get_lines() if x.get_gid() == "reference"]) == 1
