"""Kill `attnlab bench speed` mid-run (SIGKILL), run it again: nothing measured twice, nothing lost."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

from attnlab.bench.store import ResultStore

LENGTHS = (64, 80, 96, 112, 128, 144)


def command(db) -> list[str]:
    # each configuration spends about its 0.4 s budget (up to 1000 repeats), so the run is caught midway
    return [sys.executable, "-m", "attnlab", "bench", "speed", "--mechanisms", "softmax", "--modes", "fwd",
            "--lengths", ",".join(map(str, LENGTHS)), "--budget-seconds", "0.4", "--repeats", "1000",
            "--threads", "1", "--quiet", "--db", str(db)]


def rows(db) -> list[tuple[str, float]]:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT config_hash, created FROM results WHERE suite = 'speed' ORDER BY id").fetchall()
    finally:
        con.close()


def group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_killed_run_resumes_without_repeating(tmp_path):
    db = tmp_path / "results.sqlite"
    store = ResultStore(db)
    first = subprocess.Popen(command(db), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while store.count("speed") == 0 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(first.pid, signal.SIGKILL)
    finally:
        first.kill()
        _, err = first.communicate()
    before = rows(db)
    assert 1 <= len(before) < len(LENGTHS), (len(before), err.decode()[-2000:])
    # the orphaned worker sees its pipe close and exits on its own
    assert group_gone(first.pid, 30)

    started = time.time()
    second = subprocess.run(command(db), capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stderr[-2000:]
    after = rows(db)
    assert len(after) == len({h for h, _ in after}) == len(LENGTHS)  # every configuration, once
    assert after[: len(before)] == before  # the finished ones were kept, not measured again
    assert all(created >= started for _, created in after[len(before):])
    assert sorted(r.config["n"] for r in store.results("speed")) == sorted(LENGTHS)
    assert all(r.status == "ok" for r in store.results("speed"))
    # the table names every length
    table = second.stdout.splitlines()
    assert sorted(int(line.split()[1]) for line in table[2 : 2 + len(LENGTHS)]) == sorted(LENGTHS)


SLOW_MODULE = '''
import os
import time
from pathlib import Path

import torch.nn.functional as F

from attnlab.core.module import Attention
from attnlab.core.reference import softmax_attention_reference
from attnlab.core.registry import Paper, Supports, register


@register(name="test-rerun-slow", paper=Paper(None, "Slow when asked to", 2026), family="A", cost="O(N^2 d)",
          exponent=2.0, supports=Supports())
class Slow(Attention):
    def attend_fast(self, q, k, v, mask):
        mark = os.environ.get("SLOW_MARK")
        if mark:  # the rerun: say that the measurement has started, then take long
            Path(mark).touch()
            time.sleep(120)
        return F.scaled_dot_product_attention(q, k, v)

    def attend_reference(self, q, k, v, mask):
        return softmax_attention_reference(q, k, v, mask)
'''


def test_a_rerun_killed_mid_measurement_keeps_the_stored_result(tmp_path):
    (tmp_path / "slow_mech.py").write_text(SLOW_MODULE)
    db = tmp_path / "results.sqlite"
    cmd = [sys.executable, "-m", "attnlab", "bench", "speed", "--import", str(tmp_path / "slow_mech.py"),
           "--mechanisms", "test-rerun-slow", "--modes", "fwd", "--lengths", "32", "--budget-seconds", "1",
           "--repeats", "3", "--threads", "1", "--quiet", "--db", str(db)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    store = ResultStore(db, readonly=True)
    (before,) = [r for r in store.results("speed") if r.config["mechanism"] == "test-rerun-slow"]
    assert before.status == "ok"

    mark = tmp_path / "measuring"
    rerun = subprocess.Popen([*cmd, "--rerun"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True, env={**os.environ, "SLOW_MARK": str(mark)})
    try:
        deadline = time.monotonic() + 150
        while not mark.exists() and rerun.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mark.exists(), rerun.stderr.read().decode()[-2000:] if rerun.poll() is not None else "no mark"
        os.killpg(rerun.pid, signal.SIGKILL)  # the command and its worker, mid-measurement
    finally:
        rerun.kill()
        rerun.communicate()
    assert group_gone(rerun.pid, 30)
    (after,) = [r for r in store.results("speed") if r.config["mechanism"] == "test-rerun-slow"]
    assert (after.status, after.metrics, after.created) == (before.status, before.metrics, before.created)
