"""attnlab.functional: the stable path of every functional op, and each entry's `Spec.functional` leading to it."""
from __future__ import annotations

import importlib
import subprocess
import sys

import torch

import attnlab
import attnlab.functional as F
from attnlab.core.registry import BUILDABLE, entries

# memory entries share memory_attention (its `bias` selects the entry's rule): not named by the registry yet
WITHOUT_FUNCTIONAL = {"delta", "gated-linear", "linear", "miras", "miras-huber", "miras-lp", "retention"}


def test_every_entry_names_its_functional_ops_and_they_are_the_source_modules() -> None:
    for spec in [s for kind in BUILDABLE if kind != "block" for s in entries(kind)]:  # a block composes a mixer
        if spec.name in WITHOUT_FUNCTIONAL:
            continue
        assert spec.functional, f"{spec.name}: no functional ops named"
        source = importlib.import_module(spec.source)
        for name in spec.functional:
            assert getattr(F, name) is getattr(source, name), f"{spec.name}: attnlab.functional.{name}"
            assert name in F.__all__


def test_the_namespace_computes_what_the_module_computes() -> None:
    q, k, v = torch.randn(3, 2, 2, 7, 4, dtype=torch.float64)
    m = attnlab.build("softmax", dim=8, heads=2, causal=True).double()
    want = m.attend(q, k, v, impl="reference")
    torch.testing.assert_close(F.softmax_attention(q, k, v, causal=True), want)
    torch.testing.assert_close(F.sdpa(q, k, v, None, causal=True), want)


def test_info_prints_the_functional_entry_points() -> None:
    out = subprocess.run([sys.executable, "-m", "attnlab", "info", "xcit"], capture_output=True, text=True, check=True)
    assert "functional attnlab.functional.xca_attention, attnlab.functional.xca_attention_reference" in out.stdout


def test_a_speed_knob_changes_the_cost_not_the_result() -> None:
    """Every Param(knob=True): two values give one output (float64, causal where supported, an odd length)."""
    knobs = [(spec, p) for spec in attnlab.list_mechanisms() for p in spec.params if p.knob]
    assert {s.name for s, _ in knobs} >= {"galerkin", "mamba", "sliding-window"}
    for spec, p in knobs:
        causal = bool(spec.supports and spec.supports.causal)
        base = {"dim": 8, "heads": 2, **spec.test_params, **({"causal": True} if causal else {})}
        x = torch.randn(2, 13, 8, dtype=torch.float64)
        outs = []
        for value in (3, 16):
            torch.manual_seed(0)
            m = attnlab.build(spec.name, **{**base, p.name: value}).double()
            outs.append(m(x))
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-9, atol=1e-9, msg=f"{spec.name}.{p.name}")
