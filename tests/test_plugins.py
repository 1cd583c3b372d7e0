"""A user's own mechanism on the CLI, through real `attnlab` processes: a module registering
`temp-softmax` (a softmax with a temperature, subclassing attnlab's) named by `--import` and seen by
`info`, `bench speed` and `explain`; and an installed package (a `*.dist-info` whose entry point in
the group `attnlab.mechanisms` registers `ep-softmax`) seen by `list` with no option at all."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

SCRIPT = Path(sys.executable).parent / "attnlab"

MECHANISM = '''
"""temp-softmax: softmax attention whose scores are divided by a temperature."""
import torch
from torch import nn

from attnlab import register
from attnlab.core.registry import Paper, Param
from attnlab.mechanisms.dense.softmax import SoftmaxAttention

SUPPORTS = SoftmaxAttention.spec.supports


@register(
    name="{name}",
    paper=Paper(None, "A Softmax With a Temperature", 2026),
    family="A",
    cost="O(N²d)",
    exponent=2.0,
    supports=SUPPORTS,
    params=(Param("temperature", float, 2.0, "divides the scores", low=0.01),),
    summary="softmax attention at temperature T",
    test_params={{"temperature": 2.0}},
)
class TempSoftmax(SoftmaxAttention):
    def __init__(self, dim, heads=8, *, head_dim=None, qkv_bias=True, causal=False, temperature=2.0):
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal)
        self.temperature = temperature

    @property
    def scale(self):
        return super().scale / self.temperature
'''

MODEL = '''

class Model(nn.Module):
    """Token ids -> two residual temp-softmax layers (the model `attnlab explain --model` builds)."""

    def __init__(self, vocab_size):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 16)
        self.layers = nn.ModuleList(TempSoftmax(16, 2, temperature=2.0) for _ in range(2))

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = x + layer(x)
        return x


def make_model(vocab_size):
    torch.manual_seed(0)
    return Model(vocab_size)
'''


def attnlab(*argv: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([str(SCRIPT), *argv], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert "Traceback" not in done.stderr, done.stderr
    return done


@pytest.fixture
def user_module(tmp_path: Path) -> Path:
    path = tmp_path / "tempmod.py"
    path.write_text(MECHANISM.format(name="temp-softmax") + MODEL)
    return path


def test_info_sees_an_imported_mechanism(user_module, tmp_path):
    done = attnlab("--import", str(user_module), "info", "temp-softmax", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("temp-softmax: softmax attention at temperature T")
    source = next(line for line in done.stdout.splitlines() if line.strip().startswith("source"))
    line = MECHANISM.format(name="x").splitlines().index("@register(") + 1  # the class's definition starts there
    assert source.split()[1] == f"{user_module}:{line}"
    temperature = next(line for line in done.stdout.splitlines() if line.startswith("temperature"))
    assert temperature.split()[:3] == ["temperature", "float", "2.0"]
    # the same after the command, by dotted name from the current folder
    again = attnlab("info", "temp-softmax", "--import", "tempmod", cwd=tmp_path)
    assert again.returncode == 0 and again.stdout == done.stdout


def test_bench_speed_measures_an_imported_mechanism(user_module, tmp_path):
    db = tmp_path / "results.sqlite"
    done = attnlab("bench", "speed", "--import", str(user_module), "--mechanisms", "temp-softmax",
                   "--lengths", "64,128,256", "--modes", "fwd", "--db", str(db), cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.split()[:1] == ["temp-softmax"]]
    measured = {int(row[1]): row for row in rows if row[1].isdigit()}  # the time table: name, N, mode, status, ...
    assert sorted(measured) == [64, 128, 256], done.stdout
    assert all(row[2:4] == ["fwd", "ok"] for row in measured.values()), done.stdout
    assert db.is_file()


def test_explain_a_model_of_the_imported_mechanism(user_module, tmp_path):
    out = tmp_path / "page"
    done = attnlab("explain", "--import", str(user_module), "--model", f"{user_module}:make_model",
                   "--tokens", "the cat sat on the mat", "--tokens", "a cat sat on a hat", "--out", str(out), "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out / "index.html")
    data = json.loads((out / "explain.json").read_text())
    assert data["model"] == f"{user_module}:make_model"
    assert data["layer_names"] == ["layers.0", "layers.1"] and data["heads"] == 2
    assert data["tokens"] == [["the", "cat", "sat", "on", "the", "mat"], ["a", "cat", "sat", "on", "a", "hat"]]
    assert data["vocabulary"] == ["<pad>", "the", "cat", "sat", "on", "mat", "a", "hat"]
    assert sorted(data["methods"]) == sorted(["rollout", "attention-flow", "relevance-generic", "relevance-lrp",
                                              "head-statistics", "sink-scores", "qk-embedding", "layer-similarity",
                                              "head-classes", "attention-patterns"])
    page = (out / "index.html").read_text()
    assert page.count("class='strip'") == 2 * 5  # rollout, attention-flow, the 2 relevances, sink-scores per sequence
    # the maps on the page are those of the temperature softmax: softmax(q kᵀ / (√d · 2)), layer by layer
    torch.manual_seed(0)
    embed, layers = nn.Embedding(len(data["vocabulary"]), 16), []
    for _ in range(2):  # the same draws as make_model: TempSoftmax(16, 2) is four nn.Linear(16, 16)
        layers.append([nn.Linear(16, 16) for _ in range(4)])
    with torch.no_grad():
        for b, seq in enumerate(data["tokens"]):
            x = embed(torch.tensor([data["vocabulary"].index(t) for t in seq]))
            for layer, (wq, wk, wv, wo) in enumerate(layers):
                q, k, v = (w(x).view(6, 2, 8).transpose(0, 1) for w in (wq, wk, wv))
                a = (q @ k.transpose(1, 2) / (8 ** 0.5 * 2.0)).softmax(-1)
                got = torch.tensor(data["attention"][layer][b], dtype=torch.float64)
                torch.testing.assert_close(got, a.double(), atol=1e-6, rtol=0)
                x = x + wo((a @ v).transpose(0, 1).reshape(6, 16))


def test_entry_point_of_an_installed_package_registers_its_mechanism(tmp_path):
    site = tmp_path / "site"
    (site / "tempplug-0.1.dist-info").mkdir(parents=True)
    (site / "tempplug-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: tempplug\nVersion: 0.1\n")
    (site / "tempplug-0.1.dist-info" / "entry_points.txt").write_text(
        textwrap.dedent("""\
            [attnlab.mechanisms]
            ep-softmax = tempplug_mech
        """)
    )
    (site / "tempplug_mech.py").write_text(MECHANISM.format(name="ep-softmax"))
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    done = attnlab("list", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    row = next((line for line in done.stdout.splitlines() if line.split()[:1] == ["ep-softmax"]), None)
    assert row is not None, done.stdout
    assert row.split()[1:3] == ["A", "O(N²d)"]
    info = attnlab("info", "ep-softmax", cwd=tmp_path, env=env)
    assert info.returncode == 0 and str(site / "tempplug_mech.py") in info.stdout
    plain = attnlab("list", cwd=tmp_path)  # not installed: not there
    assert "ep-softmax" not in plain.stdout
