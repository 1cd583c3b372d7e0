"""The results store: record / done / forget, and two processes writing one database at once."""
from __future__ import annotations

import multiprocessing
import os
import sqlite3

import pytest

from attnlab.bench.store import ResultStore, StoreError, config_hash
from attnlab.cli import main

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


# -- nothing lost: replace after the new result, read-only readers, bad files and rows -------------
def test_replace_swaps_the_result_in_one_transaction(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    store.record("speed", cfg(0), "ok", {"median_s": 1.0}, ENV)
    assert store.record("speed", cfg(0), "ok", {"median_s": 2.0}, ENV, replace=True) is True
    (only,) = store.results("speed")
    assert only.metrics == {"median_s": 2.0}


def test_a_read_only_store_is_refused_before_a_run(tmp_path, monkeypatch, capsys):
    db = tmp_path / "r.sqlite"
    ResultStore(db).record("speed", cfg(0), "ok", {"median_s": 1.0}, ENV)
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(db) else real(path, mode))
    with pytest.raises(StoreError, match=r"r\.sqlite: the results database is read-only; .*--db"):
        ResultStore(db)
    code = main(["bench", "speed", "--mechanisms", "softmax", "--lengths", "64", "--db", str(db)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "read-only" in err and str(db) in err
    assert len(ResultStore(db, readonly=True).results()) == 1  # a reader is fine


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files")
def test_a_read_only_file_is_refused_for_real(tmp_path):
    db = tmp_path / "r.sqlite"
    ResultStore(db).record("speed", cfg(0), "ok", {"median_s": 1.0}, ENV)
    db.chmod(0o444)
    with pytest.raises(StoreError, match="read-only"):
        ResultStore(db)
    assert len(ResultStore(db, readonly=True).results()) == 1


def test_a_reader_never_writes_a_foreign_file(tmp_path):
    path = tmp_path / "other.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match="not an attnlab results database"):
        ResultStore(path, readonly=True)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["other.sqlite"]
    with pytest.raises(StoreError, match="no results database here"):
        ResultStore(tmp_path / "missing.sqlite", readonly=True)
    assert not (tmp_path / "missing.sqlite").exists()


def test_a_corrupt_store_is_one_line_naming_the_file(tmp_path, capsys):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database " * 100)
    for readonly in (False, True):
        with pytest.raises(StoreError, match=r"junk\.sqlite: not a readable results database .*move it aside"):
            ResultStore(junk, readonly=readonly)
    code = main(["bench", "speed", "--mechanisms", "softmax", "--lengths", "64", "--db", str(junk)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "junk.sqlite" in err


def test_undecodable_rows_are_skipped_and_counted(tmp_path, capsys):
    store = ResultStore(tmp_path / "r.sqlite")
    for i in range(3):
        store.record("speed", cfg(i), "ok", {"median_s": float(i)}, ENV)
    con = sqlite3.connect(store.path)
    con.execute("UPDATE results SET metrics = '{broken' WHERE id = 2")
    con.execute("UPDATE results SET config = '[1, 2]' WHERE id = 3")
    con.commit()
    con.close()
    reader = ResultStore(store.path, readonly=True)
    assert [r.metrics["median_s"] for r in reader.results("speed")] == [0.0]
    assert reader.skipped_rows == 2 and "skipped 2 unreadable result rows" in capsys.readouterr().err
