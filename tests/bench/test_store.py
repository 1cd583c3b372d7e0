"""The results store: record / done / forget, and two processes writing one database at once."""
from __future__ import annotations

import multiprocessing
import sqlite3

import pytest

from attnlab.bench.store import ResultStore, config_hash

ENV = {"torch": "x", "threads": 1}


def cfg(i: int) -> dict:
    return {"mechanism": "softmax", "n": 64 * (i + 1), "mode": "fwd", "params": {"w": [i, i + 1]}}


def test_record_done_forget(tmp_path):
    store = ResultStore(tmp_path / "sub" / "r.sqlite")  # the folder is created
    config = cfg(0)
    assert not store.done("speed", config)
    assert store.record("speed", config, "ok", {"median_s": 0.5}, ENV) is True
    reordered = dict(reversed(list(config.items())))  # key order does not matter
    assert store.done("speed", reordered) and not store.done("recall", config)
    # a second result of the same configuration is refused and changes nothing
    assert store.record("speed", reordered, "error", {"note": "later"}, ENV) is False
    (only,) = store.results("speed")
    assert (only.config, only.status, only.metrics, only.env) == (config, "ok", {"median_s": 0.5}, ENV)
    assert only.config_hash == config_hash(reordered)
    store.record("speed", cfg(1), "over_time", {}, {**ENV, "threads": 2})
    assert store.count("speed") == 2 and store.count() == 2
    store.forget("speed", config)
    assert not store.done("speed", config) and store.count("speed") == 1
    assert store.record("speed", config, "error", {"note": "again"}, ENV) is True
    assert [r.status for r in store.results("speed")] == ["over_time", "error"]  # oldest first


def test_unknown_status_is_refused(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    with pytest.raises(ValueError, match="status.*'fine'"):
        store.record("speed", cfg(0), "fine", {}, ENV)
    assert store.count() == 0


def _writer(path: str, start: int, stop: int, barrier) -> None:
    store = ResultStore(path)
    barrier.wait()
    for i in range(start, stop):
        store.record("speed", cfg(i), "ok", {"median_s": float(i), "writer": start}, {**ENV, "writer": start})


def test_two_processes_writing_at_once(tmp_path):
    path = str(tmp_path / "r.sqlite")
    ResultStore(path)
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    barrier = ctx.Barrier(2)
    # overlapping ranges: configurations 40..79 are written by both
    procs = [ctx.Process(target=_writer, args=(path, 0, 80, barrier)),
             ctx.Process(target=_writer, args=(path, 40, 120, barrier))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = con.execute("SELECT suite, config_hash FROM results").fetchall()
    finally:
        con.close()
    assert len(rows) == len(set(rows)) == 120  # every configuration once, none twice
    store = ResultStore(path)
    assert {r.config_hash for r in store.results("speed")} == {config_hash(cfg(i)) for i in range(120)}
    for r in store.results("speed"):
        assert r.metrics["median_s"] == r.config["n"] / 64 - 1  # each row is whole: its own metrics
        assert r.env["writer"] == r.metrics["writer"]
