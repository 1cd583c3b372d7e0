"""A user's own mechanism on the bench CLI: `--import MODULE` and `--param MECH.NAME=VALUE`."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from attnlab.bench import recall
from attnlab.bench.speed import parse_params
from attnlab.cli import main
from attnlab.core import registry
from attnlab.core.errors import ParameterError

USER_MODULE = '''
import math

import torch
import torch.nn.functional as F

from attnlab.core.module import Attention
from attnlab.core.registry import Paper, Param, Supports, register


@register(name="user-temp-softmax", paper=Paper(None, "A user's softmax with a temperature", 2026), family="C",
          cost="O(N^2 d)", exponent=2.0, supports=Supports(causal=True),
          params=(Param("temperature", float, 1.0, "divides the logits", low=0.01),))
class TempSoftmax(Attention):
    def __init__(self, dim, heads=8, *, head_dim=None, qkv_bias=True, causal=False, temperature=1.0):
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal)
        self.temperature = temperature

    def attend_fast(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q / self.temperature, k, v, is_causal=self.causal)

    def attend_reference(self, q, k, v, mask):
        s = q @ k.transpose(-1, -2) / (self.temperature * math.sqrt(q.shape[-1]))
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        w = torch.softmax(s, -1)
        return w @ v, w
'''


@pytest.fixture
def user_module(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "my_attention.py"
    path.write_text(textwrap.dedent(USER_MODULE))
    yield path
    if "user-temp-softmax" in {s.name for s in registry.list_mechanisms()}:  # imported in this process
        registry.remove("user-temp-softmax")


def attnlab(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real command in a fresh process (nothing registered but what --import brings)."""
    return subprocess.run([sys.executable, "-m", "attnlab", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_bench_speed_measures_an_imported_mechanism_with_its_param(user_module: Path, tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    common = ["bench", "speed", "--mechanisms", "user-temp-softmax", "--lengths", "32,64", "--modes", "fwd",
              "--budget-seconds", "1", "--repeats", "3", "--threads", "1", "--db", str(db), "--quiet"]
    # without --import the name is unknown: a usage error
    done = attnlab(*common, cwd=tmp_path)
    assert done.returncode == 2 and "unknown mechanism 'user-temp-softmax'" in done.stderr
    # by file path (its module is not importable by name: the worker must import the file itself)
    done = attnlab(*common, "--import", str(user_module), "--param", "user-temp-softmax.temperature=2",
                   "--json", "-", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["results"] and not any(r["reused"] for r in data["results"])  # all measured in this run
    assert {r["env"]["run_id"] for r in data["results"]} == {data["run_id"]}
    rows = [r for r in data["results"] if r["config"]["mechanism"] == "user-temp-softmax"]
    assert [(r["config"]["n"], r["status"], r["config"]["params"]) for r in rows] == [
        (32, "ok", {"temperature": 2.0}), (64, "ok", {"temperature": 2.0})], [r["metrics"] for r in rows]
    # by module name (found in the current folder), before the subcommand (`attnlab bench --import X speed`)
    done = attnlab("bench", "--import", "my_attention", *common[1:], "--param", "user-temp-softmax.temperature=2",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "user-temp-softmax*" in done.stdout  # reused from the store, and marked so
    assert "user-temp-softmax" in done.stdout


@pytest.mark.parametrize(("item", "words"), [
    ("user-temp-softmax.temperature=0", "expected >= 0.01, got 0.0"),
    ("user-temp-softmax.temperature=hot", "expected float, got str 'hot'"),
    ("user-temp-softmax.temprature=2", "did you mean 'temperature'"),
    ("softmax.temperature=2", "unknown parameter 'temperature'"),
    ("local.window=2", "expected one of the measured mechanisms"),
    ("user-temp-softmax.heads=2", "set by the benchmark's own options"),
    ("temperature=2", "expected MECHANISM.NAME=VALUE"),
])
def test_bad_params_are_one_line_usage_errors(user_module: Path, tmp_path: Path, item: str, words: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "speed", "--import", str(user_module), "--mechanisms", "user-temp-softmax",
                 "--param", item, "--db", str(tmp_path / "r.sqlite")])
    err = capsys.readouterr().err
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r.sqlite").exists()  # refused before anything ran


def test_params_are_read_as_json_and_checked() -> None:
    assert parse_params(["sliding-window.radius=16", "sliding-window.block_size=32"], ["softmax", "sliding-window"]) == {
        "sliding-window": {"radius": 16, "block_size": 32}}
    with pytest.raises(ParameterError, match="radius"):
        parse_params(["sliding-window.radius=-1"], ["sliding-window"])
    with pytest.raises(ParameterError, match="'window' was renamed radius"):
        parse_params(["sliding-window.window=16"], ["sliding-window"])


def test_recall_configs_carry_the_params() -> None:
    configs = recall.grid_configs(recall.GRIDS["panel"], ["sliding-window", "softmax"],
                                  params=parse_params(["sliding-window.radius=16"], ["sliding-window"]))
    by = {c["mechanism"]: c["params"] for c in configs}
    assert by["sliding-window"]["radius"] == 16 and "radius" not in by["softmax"]
