"""The report's inference sections: rows of the "decode", "kv-compression" and "kv-selection" suites, written the
way the benchmark scripts write them (`bench.decode.record`, `bench.kv_cache.record_*`) with known numbers, come
back in summary.md and report.html with those numbers, the cost model's % difference computed from them, and a
difference beyond 20% flagged. The scripts' own `main` writes its rows to the store given by --db."""
from __future__ import annotations

import copy
import importlib.util
import math
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from attnlab.bench import decode, kv_cache
from attnlab.bench.report import Report, markdown, to_json, write
from attnlab.bench.report.inference import bytes_difference
from attnlab.bench.store import ResultStore

ROOT = Path(__file__).resolve().parents[2]
ENV = {"cpu": "hand", "run_id": "20261207T060000Z-00000003", "time": 3000.0}


def decode_result() -> dict[str, Any]:
    """p = 2: tree's model says 2,640 B for rank 1 where 2,112 B were sent (+25%, flagged); ring's 900 B for rank 0
    where 1,000 B were (−10%, within 20%); allreduce exact, its counts modelled."""
    def schedule(sent: list[int], predicted: list[int], rounds: int, median: float, peaks: list[int],
                 modelled: bool = False) -> dict[str, Any]:
        return {"rounds": [rounds, rounds], "messages": [rounds, rounds], "bytes_sent": sent, "modelled": modelled,
                "median_s": median, "times_s": [median] * 5, "peak_bytes": peaks,
                "predicted": {"rounds": [rounds, rounds], "messages": [rounds, rounds], "bytes_sent": predicted,
                              "time_s": 1e-5, "buffer_bytes": [2**19, 2**19]}}
    return {
        "config": {"worlds": [2], "tokens": 4096, "batch": 1, "heads": 8, "head_dim": 64, "dtype": "float32",
                   "rounds": 5, "extrapolate_tokens": 1 << 20, "extrapolate_worlds": [64]},
        "network": {"alpha_s": 5e-6, "beta_bytes_per_s": 25e9},
        "unsharded": {"median_s": 1.5e-3, "times_s": [1.5e-3] * 5, "peak_bytes": 0, "cache_bytes": 16 * 2**20,
                      "buffer_bytes": 2**18},
        "worlds": [{"world": 2, "sizes": [2048, 2048], "cache_bytes_per_rank": [8 * 2**20, 8 * 2**20],
                    "tree": schedule([2112, 2112], [2112, 2640], 1, 3.44e-3, [2**20, 2 * 2**20]),
                    "ring": schedule([1000, 1000], [900, 1000], 1, 22.5e-3, [2**23, 2**23]),
                    "allreduce": schedule([2112, 2112], [2112, 2112], 4, 4.9e-3, [2**20, 2**20], modelled=True)}],
        "extrapolated": [{"world": 64, "tokens": 1 << 20,
                          "tree": {"rounds": 6, "bytes_sent": 12672, "time_s": 30.5e-6},
                          "ring": {"rounds": 63, "bytes_sent": 4227858432, "time_s": 0.169},
                          "allreduce": {"rounds": 252, "bytes_sent": 5040, "time_s": 1.26e-3}}],
    }


def compression_result() -> dict[str, Any]:
    rows = [{"r_over_d": x, "rank": round(32 * x), "pca_rel_error": e, "trained_rel_error": e + 0.01,
             "pca_rel_error_per_layer": [e, e], "trained_rel_error_per_layer": [e + 0.01, e + 0.01],
             "pca_lm_loss": lp, "trained_lm_loss": lt}
            for x, e, lp, lt in ((1.0, 0.0, 1.7, 1.7), (0.5, 0.182, 1.7742, 1.7382), (0.25, 0.43, 2.1132, 1.9025))]
    return {"model": {"dim": 64, "heads": 2, "head_dim": 32, "layers": 2, "context": 64, "steps": 200},
            "distill": {"steps": 50}, "corpus": {"sha256": "abc"}, "uncompressed_lm_loss": 1.7, "rows": rows,
            "greedy_at_half": {"trained": {"ranks": [[16, 8], [16, 24]], "lm_loss": 1.7701, "head_errors": []}}}


def selection_result() -> dict[str, Any]:
    def quality(k: int, base: float) -> list[dict[str, Any]]:
        return ([{"k": k, "method": f"loki r={r}", "recall": base + r / 100, "mass": 0.5, "output_error": 0.4 - r / 100}
                 for r in (4, 8)]
                + [{"k": k, "method": "random", "recall": 0.2, "mass": 0.1, "output_error": 0.9},
                   {"k": k, "method": "recent", "recall": 0.31, "mass": 0.2, "output_error": 0.75}])
    return {"args": {"steps": "120", "seed": "0"},
            "minilm": {"head_dim": 32, "mean_tokens": 60, "rank90": [[10, 20], [18, 18]],
                       "quality": [{"k": 7, "method": "loki r=4", "recall": 0.79, "mass": 0.4},
                                   {"k": 7, "method": "random", "recall": 0.22, "mass": 0.1}]},
            "lm": {"model": {"steps": 120}, "head_dim": 32, "n": 256, "rank90": [[16, 18], [9, 12]], "quality": quality(16, 0.8) + quality(32, 0.85)},
            "decode": {"n": 8192, "heads": 8, "head_dim": 64, "repeats": 5, "threads": 1,
                       "median_ms": {"dense matmul": 5.0, "dense sdpa": 4.0, "loki r=16 k=128": 2.0}}}


def _store(tmp_path: Path) -> ResultStore:
    store = ResultStore(tmp_path / "r.sqlite")
    decode.record(store, decode_result(), ENV)
    kv_cache.record_compression(store, compression_result(), ENV)
    kv_cache.record_selection(store, selection_result(), ENV)
    return store


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]


def _rows(text: str, first: str) -> list[list[str]]:
    return [_cells(line) for line in text.splitlines() if line.startswith("| " + first)]


def test_bytes_difference_is_the_largest_over_ranks() -> None:
    assert bytes_difference([2112, 2640], [2112, 2112]) == pytest.approx(0.25)
    assert bytes_difference([900, 1000], [1000, 1000]) == pytest.approx(-0.1)
    assert bytes_difference([900, 1300], [1000, 1000]) == pytest.approx(0.3)
    assert bytes_difference([0, 0], [0, 0]) == 0.0
    assert math.isinf(bytes_difference([5], [0]))  # type: ignore[arg-type]
    assert bytes_difference([5, None], [5, 5]) is None


def test_decode_table_shows_the_numbers_and_the_difference(tmp_path: Path) -> None:
    text = markdown.render(Report.from_store(_store(tmp_path)))
    rows = {row[1]: row for row in _rows(text, "2 ")}
    tree = rows["tree (butterfly, P128)"]
    assert tree[2:8] == ["1 (1)", "1", "2,112 B", "2,640 B", "+25.0% (over 20%)", "3.44 ms"]
    assert tree[8] == "2 MiB" and tree[10] == "10 MiB"  # largest rise over ranks; held = 8 MiB cache + 2 MiB
    assert tree[11] == "0.625×"  # held 10 MiB against the unsharded run's 16 MiB cache + 0
    ring = rows["ring (K/V blocks)"]
    assert ring[4:7] == ["1,000 B", "1,000 B", "-10.0%"]  # largest over ranks; the worst rank's difference
    assert rows["tree by gloo all-reduce (counts modelled)"][2] == "4 (4)"
    assert "misses the measured bytes by more than 20% at: tree p=2." in text
    assert "ring p=2" not in text.split("misses the measured bytes")[1].split("\n")[0]
    assert "unsharded (one process, SDPA): 1.5 ms per token, cache 16 MiB" in text
    (extra,) = _rows(text, "64 ")
    assert extra == ["64", "6", "12,672 B", "30.5 µs", "63", "4,227,858,432 B", "169 ms", "252", "5,040 B", "1.26 ms"]
    assert "α = 5 µs per communication step, β = 25 GB/s per link" in text


def test_a_model_within_20_percent_is_not_flagged(tmp_path: Path) -> None:
    result = decode_result()
    result["worlds"][0]["tree"]["predicted"]["bytes_sent"] = [2112, 2500]  # +18.4%
    store = ResultStore(tmp_path / "r.sqlite")
    decode.record(store, result, ENV)
    report = Report.from_store(store)
    text = markdown.render(report)
    assert "The cost model is within 20% of the measured bytes at every measured p." in text
    assert "over 20%" not in text and "misses" not in text
    assert {r.schedule: r.off_model for r in report.decode_settings[0].rows} == \
        {"tree": False, "ring": False, "allreduce": False}
    exported = to_json(report)["decode"][0]["rows"]
    assert [round(r["bytes_diff"], 4) for r in exported] == [round(2500 / 2112 - 1, 4), -0.1, 0.0]


def test_a_rerun_replaces_its_setting_and_a_new_setting_is_listed_first(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "r.sqlite")
    decode.record(store, decode_result(), ENV)
    again = decode_result()
    again["worlds"][0]["tree"]["median_s"] = 7.77e-3
    decode.record(store, again, ENV)
    other = copy.deepcopy(again)
    other["config"]["tokens"] = 16384
    decode.record(store, other, ENV)
    settings = Report.from_store(store).decode_settings
    assert [s.shape["tokens"] for s in settings] == [16384, 4096]
    assert [r.median_s for r in settings[1].rows if r.schedule == "tree"] == [7.77e-3]


def test_compression_table(tmp_path: Path) -> None:
    text = markdown.render(Report.from_store(_store(tmp_path)))
    assert _rows(text, "r/d ") == [["r/d", "rank r", "pca rel. error", "trained rel. error", "pca LM loss",
                                    "trained LM loss"]]
    assert _rows(text, "0.5 ") == [["0.5", "16", "0.182", "0.192", "1.7742", "1.7382"]]
    assert _rows(text, "0.25 ") == [["0.25", "8", "0.430", "0.440", "2.1132", "1.9025"]]
    assert "trained 200 steps, projections distilled 50 steps; held-out loss uncompressed 1.7000" in text
    assert "LM loss 1.7701 (uniform r/d = 0.5: 1.7382)" in text


def test_selection_tables(tmp_path: Path) -> None:
    text = markdown.render(Report.from_store(_store(tmp_path)))
    assert _rows(text, "char LM ") == [["char LM", "32", "17.0 (16–18)", "10.5 (9–12)", "13.8", "0.43"]]
    assert _rows(text, "MiniLM ") == [["MiniLM", "32", "15.0 (10–20)", "18.0 (18–18)", "16.5", "0.52"]]
    recall, error = text.split("char LM: relative output error")
    assert _rows(recall, "16 ") == [["16", "0.840", "0.880", "0.200", "0.310"]]
    assert _rows(recall, "32 ") == [["32", "0.890", "0.930", "0.200", "0.310"]]
    assert _rows(error.split("MiniLM:")[0], "16 ") == [["16", "0.360", "0.320", "0.900", "0.750"]]
    assert _rows(text, "7 ") == [["7", "0.790", "0.220"]]  # MiniLM: no recent-window baseline, no values
    assert _rows(text, "Loki r=16 k=128") == [["Loki r=16 k=128", "2 ms", "0.5×"]]
    assert _rows(text, "dense matmul") == [["dense matmul", "5 ms", "1.25×"]]


def test_page_has_a_section_and_a_figure_for_each(tmp_path: Path) -> None:
    page = write(Report.from_store(_store(tmp_path)), tmp_path / "out").read_text()
    sections = {name: page.split(f"<section id='{name}'>")[1].split("</section>")[0]
                for name in ("decode", "kv-compression", "kv-selection")}
    for name, body in sections.items():
        assert body.count("<img class='plot'") == 1, name
    decode_rows = re.findall(r"<tr>(.*?)</tr>", sections["decode"])
    tree = next(r for r in decode_rows if "tree (butterfly, P128)" in r)
    assert "<span class='flag'>⚠ +25.0% (over 20%)</span>" in tree
    ring = next(r for r in decode_rows if "ring (K/V blocks)" in r)
    assert "<td>-10.0%</td>" in ring and "⚠" not in ring
    assert "<td>0.182</td><td>0.192</td><td>1.7742</td><td>1.7382</td>" in sections["kv-compression"]
    assert "<td>17.0 (16–18)</td>" in sections["kv-selection"]
    assert "href='#decode'" in page and "href='#kv-selection'" in page


def test_the_counts_of_each_suite_head_the_summary(tmp_path: Path) -> None:
    text = markdown.render(Report.from_store(_store(tmp_path)))
    assert "0 speed and 0 recall results, 5 decode, 7 kv-compression, 15 kv-selection from" in text


def test_no_section_without_results(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "r.sqlite")
    page = write(Report.from_store(store), tmp_path / "out").read_text()
    assert "<section id='decode'>" not in page and "href='#decode'" not in page
    assert "Sharded decoding" not in markdown.render(Report.from_store(store))


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_script_{name}", ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_scripts_write_their_rows_to_the_store_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "results.sqlite"
    monkeypatch.setattr("attnlab.bench.env.matmul_gflops", lambda *a, **k: 1.0)
    dd = _script("distributed_decode")
    monkeypatch.setattr(dd.decode, "measure", lambda config, network: decode_result())
    assert dd.main(["--db", str(db), "--json", str(tmp_path / "dd.json")]) == 0

    mkv = _script("matryoshka_kv")
    monkeypatch.setattr(mkv, "measure", lambda out, **kw: compression_result())
    monkeypatch.setattr(sys, "argv", ["matryoshka_kv.py", "--db", str(db), "--out", str(tmp_path / "m")])
    mkv.main()

    loki = _script("loki")
    part = selection_result()
    monkeypatch.setattr(loki, "docstrings", lambda: ["x"])
    monkeypatch.setattr(loki, "minilm_part", lambda texts: part["minilm"])
    monkeypatch.setattr(loki, "lm_part", lambda text, out, steps, seed: part["lm"])
    monkeypatch.setattr(loki, "decode_timing", lambda n, heads, d, repeats: part["decode"])
    monkeypatch.setattr(loki, "plot", lambda result, path: None)
    monkeypatch.setattr(sys, "argv", ["loki.py", "--db", str(db), "--out", str(tmp_path / "l"), "--steps", "120"])
    loki.main()

    store = ResultStore(db, readonly=True)
    assert store.count(decode.SUITE) == len(decode.records(decode_result())) == 1 + 3 + 1
    assert store.count(kv_cache.COMPRESSION_SUITE) == 3 * 2 + 1
    assert store.count(kv_cache.SELECTION_SUITE) == 2 + 2 + 2 * 4 + 3
    tree = next(r for r in store.results(decode.SUITE) if r.config.get("schedule") == "tree")
    assert tree.metrics["predicted_bytes"] == [2112, 2640] and tree.env["cpu"] != "hand"
