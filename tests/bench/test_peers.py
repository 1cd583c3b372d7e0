"""Peers: adapters agree with attnlab where they should, disagree where a mapping is wrong, say why they cannot run.

Independent computations here: dense softmax attention written with einsum over masks
and biases built by loops from the definitions (ALiBi's slopes 2^(−8h/H), lucidrains'
block windows, NATTEN's clamped windows, P228's formula).
"""
from __future__ import annotations

import math

import pytest
import torch

from attnlab.bench import peers as P
from attnlab.bench.store import Result, ResultStore

SHAPE = {"impl": "attnlab", "grid": None, "mode": "fwd", "causal": False, "dtype": "float32", "batch": 1, "heads": 4,
         "head_dim": 16, "threads": 1}
ENV = {"test": True}


def config(mechanism: str, n: int = 64, params: dict | None = None, **over) -> dict:
    return {**SHAPE, "mechanism": mechanism, "params": params or {}, "n": n, **over}


def dense(q, k, v, keep=None, bias=None):
    """softmax(q kᵀ/√d + bias, over kept keys) v in float64, from the definition."""
    s = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias.double()
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return torch.einsum("bhij,bhjd->bhid", s.softmax(-1), v.double())


def qkv(n=64, heads=4, d=16, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, n, d, generator=g).requires_grad_(grad) for _ in range(3)]


def run(store_path, configs, peers, **kw):
    options = {"budget_s": 0.2, "repeats": 2, "quiet": True, **kw}
    return P.run_peer_configs(configs, ResultStore(store_path), ENV, peers=peers, **options)


def by_impl(results, impl):
    return [r for r in results if r.config["impl"] == impl]


# -- FlexAttention --------------------------------------------------------------------------
flex = P.FlexPeer(compile=False)  # the unfused path: the same score_mod/mask_mod, without a 15–40 s compile


def alibi_bias(heads, n):
    """−m_h·|i − j| with m_h = 2^(−8h/H), h = 1..H (H a power of two)."""
    i = torch.arange(n)
    slopes = torch.tensor([2.0 ** (-8.0 * h / heads) for h in range(1, heads + 1)])
    return -slopes[:, None, None] * (i[:, None] - i[None, :]).abs()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mechanism", ["softmax", "alibi"])
def test_flex_matches_the_definition(mechanism, causal):
    q, k, v = qkv()
    out = flex.prepare(q, k, v, config(mechanism, causal=causal))()
    i = torch.arange(64)
    keep = (i[:, None] >= i[None, :]) if causal else None
    bias = alibi_bias(4, 64) if mechanism == "alibi" else None
    assert out.shape == (1, 4, 64, 16)
    assert (out.double() - dense(q, k, v, keep, bias)).abs().max() < 1e-5


def test_flex_multiscale_bands_per_head():
    q, k, v = qkv()
    radii = [1, 3, 9, -1]
    out = flex.prepare(q, k, v, config("multiscale", params={"radii": radii}, causal=True))()
    i = torch.arange(64)
    dist = i[:, None] - i[None, :]
    keep = torch.stack([(dist >= 0) & ((dist <= w) if w >= 0 else True) for w in radii])[None]
    assert (out.double() - dense(q, k, v, keep)).abs().max() < 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_flex_sliding_window_is_the_band(causal):
    q, k, v = qkv()
    out = flex.prepare(q, k, v, config("sliding-window", params={"radius": 5}, causal=causal))()
    i = torch.arange(64)
    dist = i[:, None] - i[None, :]
    keep = (dist.abs() <= 5) & ((dist >= 0) if causal else True)
    assert (out.double() - dense(q, k, v, keep)).abs().max() < 1e-5


def test_flex_agrees_with_attnlab_in_a_run(tmp_path):
    configs = [config(m, causal=c) for m in ("softmax", "alibi") for c in (False, True)]
    configs.append(config("multiscale", params={"radii": None}))
    configs.append(config("sliding-window", params={"radius": 5}, causal=True))
    results = run(tmp_path / "r.sqlite", P.peer_configs(configs, {"flex": flex}), {"flex": flex})
    mine = by_impl(results, "flex")
    assert len(mine) == 6
    for r in mine:
        assert r.status == "ok", r.metrics
        assert r.metrics["max_abs_diff"] <= P.TOLERANCE["float32"]
        assert r.metrics["median_s"] > 0 and r.metrics["repeats"] >= 1
    rows = P.peer_ratios(results)
    assert all(row["ratio"] is not None and row["ratio"] > 0 for row in rows)  # attnlab's side was measured beside


def test_planted_wrong_mapping_is_caught(tmp_path):
    class WrongAlibi(P.FlexPeer):
        """ALiBi with the slopes in reverse head order: a plausible mapping bug."""

        def mods(self, cfg, device):
            score_mod, mask_mod, per_head = super().mods(cfg, device)
            if cfg["mechanism"] != "alibi":
                return score_mod, mask_mod, per_head
            heads = cfg["heads"]

            def reversed_heads(score, b, h, q_idx, kv_idx):
                return score_mod(score, b, heads - 1 - h, q_idx, kv_idx)

            return reversed_heads, mask_mod, per_head

    wrong = WrongAlibi(compile=False)
    results = run(tmp_path / "r.sqlite", [config("alibi", impl="flex")], {"flex": wrong})
    (r,) = by_impl(results, "flex")
    assert r.status == "disagree"
    assert r.metrics["median_s"] is None and r.metrics["repeats"] == 0  # never timed
    assert r.metrics["max_abs_diff"] > P.TOLERANCE["float32"]
    assert "differ" in r.metrics["note"]
    assert by_impl(results, "attnlab") == []  # nothing to compare against, nothing measured
    assert P.peer_ratios(results)[0]["ratio"] is None
    assert "disagree" in P.peer_table(results)


def test_flex_backward_is_unsupported_with_a_note(tmp_path):
    results = run(tmp_path / "r.sqlite", [config("softmax", impl="flex", mode="fwd+bwd")], {"flex": flex})
    (r,) = results
    assert r.status == "unsupported"
    assert "backward on CPU" in r.metrics["note"]


# -- lucidrains' local-attention -------------------------------------------------------------
def block_window_keep(n, w, back, fwd, causal):
    """keep[i, j]: key j's block within [block(i) − back, block(i) + fwd], and j ≤ i when causal (by loops)."""
    keep = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            keep[i, j] = i // w - back <= j // w <= i // w + fwd and (not causal or j <= i)
    return keep


@pytest.mark.parametrize(("w", "back", "fwd", "causal"), [(16, 1, 1, False), (8, 2, 0, True), (16, 1, 0, True),
                                                          (8, 0, 2, False)])
def test_local_attention_mask_is_lucidrains_pattern(w, back, fwd, causal):
    pytest.importorskip("local_attention")
    from local_attention import LocalAttention

    q, k, v = qkv()
    keep = block_window_keep(64, w, back, fwd, causal)
    assert torch.equal(P.local_attention_mask(64, w, back, fwd, causal), keep)
    theirs = LocalAttention(w, causal=causal, look_backward=back, look_forward=fwd, dim=None)(q, k, v)
    assert (theirs.double() - dense(q, k, v, keep)).abs().max() < 1e-5


def test_local_attention_agrees_in_a_run_forward_and_backward(tmp_path):
    pytest.importorskip("local_attention")
    peer = P.LocalAttentionPeer()
    shapes = [config("softmax", n=256, causal=c, mode=m) for c in (False, True) for m in ("fwd", "fwd+bwd")]
    configs = P.peer_configs(shapes, {"local-attention": peer})
    assert {c["mechanism"] for c in configs} == {"softmax"}  # plain softmax has no counterpart: only the pattern
    assert all(c["params"]["attn_mask"]["pattern"] == "local-attention" for c in configs)
    configs.append(config("multiscale", n=256, params={"radii": [16] * 4}, impl="local-attention", causal=True))
    results = run(tmp_path / "r.sqlite", configs, {"local-attention": peer})
    mine = by_impl(results, "local-attention")
    assert len(mine) == 5
    for r in mine:
        assert r.status == "ok", r.metrics
        assert r.metrics["max_abs_diff"] <= P.TOLERANCE["float32"]
    # the pattern's FLOPs count the attended pairs: non-causal, 2 blocks of 128 each see both: 256² pairs
    full = next(r for r in mine if not r.config["causal"] and r.config["mode"] == "fwd")
    assert full.metrics["flops"] == 4 * 4 * 16 * 256 * 256


def test_local_attention_refuses_what_it_cannot_map():
    peer = P.LocalAttentionPeer()
    assert "multiple of window_size" in peer.unsupported_params(
        config("softmax", n=200, params={"attn_mask": {"pattern": "local-attention", "window_size": 128,
                                                       "look_backward": 1, "look_forward": 1}}))
    assert "one finite radius" in peer.unsupported_params(config("multiscale", params={"radii": [1, 3, 9, -1]}))
    assert not peer.maps(config("softmax"))


# -- NATTEN's neighborhood ----------------------------------------------------------------------
def natten_keep_1d(n, kernel, dilation, causal):
    """NATTEN's windows by loops: within each dilation group, k keys around the query, shifted inside the group;
    causal: the query and the k − 1 keys before it in its group."""
    keep = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        group = [p for p in range(n) if p % dilation == i % dilation]
        c = group.index(i)
        if causal:
            chosen = group[max(0, c - kernel + 1): c + 1]
        else:
            start = min(max(c - kernel // 2, 0), len(group) - kernel)
            chosen = group[start: start + kernel]
        keep[i, chosen] = True
    return keep


@pytest.mark.parametrize(("n", "kernel", "dilation", "causal"), [(10, 3, 1, False), (12, 4, 1, False),
                                                                  (13, 3, 2, False), (11, 4, 2, True)])
def test_neighborhood_keep_is_natten_windows(n, kernel, dilation, causal):
    i = torch.arange(n)
    got = P.neighborhood_keep(i[:, None], i[None, :], (n,), (kernel,), (dilation,), causal)
    assert torch.equal(got, natten_keep_1d(n, kernel, dilation, causal))


def test_neighborhood_clamps_at_the_borders_by_hand():
    i = torch.arange(10)
    keep = P.neighborhood_keep(i[:, None], i[None, :], (10,), (3,), (1,), False)
    assert keep[0].nonzero().flatten().tolist() == [0, 1, 2]
    assert keep[9].nonzero().flatten().tolist() == [7, 8, 9]
    assert keep[5].nonzero().flatten().tolist() == [4, 5, 6]


@pytest.mark.parametrize(("grid", "kernel", "dilation", "causal"), [((20,), (5,), (2,), False), ((6, 7), (3, 4), (2, 1), False),
                                                                     ((6, 5), (3, 3), (1, 1), True)])
def test_natten_output_is_the_neighborhood_mask(grid, kernel, dilation, causal):
    pytest.importorskip("natten")
    n = math.prod(grid)
    q, k, v = qkv(n=n, heads=2, d=8)
    cfg = config("neighborhood", n=n, params={"kernel_size": list(kernel), "dilation": list(dilation)},
                 grid=list(grid) if len(grid) > 1 else None, causal=causal, heads=2, head_dim=8)
    out = P.NattenPeer().prepare(q, k, v, cfg)()
    i = torch.arange(n)
    keep = P.neighborhood_keep(i[:, None], i[None, :], grid, kernel, dilation, causal)
    assert (out.double() - dense(q, k, v, keep)).abs().max() < 1e-5
    assert (flex.prepare(q, k, v, cfg)().double() - dense(q, k, v, keep)).abs().max() < 1e-5


def test_natten_waits_for_the_neighborhood_mechanism(tmp_path):
    peer = P.NattenPeer()
    configs = P.peer_configs([config("softmax", n=256)], {"natten": peer})
    assert [(c["mechanism"], c["grid"]) for c in configs] == [("neighborhood", None), ("neighborhood", [16, 16])]
    if P.spec_or_none("neighborhood") is not None:
        pytest.skip("neighborhood is registered")
    results = run(tmp_path / "r.sqlite", configs, {"natten": peer})
    assert [r.status for r in results] == ["unsupported", "unsupported"]
    assert all(r.metrics["note"] == "attnlab mechanism 'neighborhood' not registered" for r in results)


# -- linear-attention-transformer ----------------------------------------------------------------
def test_linear_attention_adapter_is_p228():
    pytest.importorskip("linear_attention_transformer")
    peer = P.LinearAttentionTransformerPeer()
    q, k, v = qkv()
    rho_q = q.double().softmax(-1)  # over features
    rho_k = k.double().softmax(-2)  # over tokens
    expected = rho_q @ (rho_k.transpose(-1, -2) @ v.double())
    assert (peer.prepare(q, k, v, config("efficient"))().double() - expected).abs().max() < 1e-5
    assert "not mapped" in peer.unsupported(config("efficient", causal=True))
    assert "scaling" in peer.unsupported_params(config("efficient", params={"normalization": "scaling"}))


def test_linear_attention_agrees_with_efficient_in_a_run(tmp_path):
    pytest.importorskip("linear_attention_transformer")
    if P.spec_or_none("efficient") is None:
        pytest.skip("efficient is not registered yet")
    peer = P.LinearAttentionTransformerPeer()
    configs = P.peer_configs([config("softmax", n=128, mode=m) for m in ("fwd", "fwd+bwd")], {peer.name: peer})
    results = run(tmp_path / "r.sqlite", configs, {peer.name: peer})
    mine = by_impl(results, peer.name)
    assert [r.status for r in mine] == ["ok", "ok"], [r.metrics for r in mine]
    assert all(r.metrics["max_abs_diff"] <= P.TOLERANCE["float32"] for r in mine)


def test_efficient_is_unsupported_until_registered(tmp_path):
    if P.spec_or_none("efficient") is not None:
        pytest.skip("efficient is registered")
    peer = P.LinearAttentionTransformerPeer()
    results = run(tmp_path / "r.sqlite", P.peer_configs([config("softmax")], {peer.name: peer}), {peer.name: peer})
    assert [r.status for r in results] == ["unsupported"]
    assert results[0].metrics["note"] == "attnlab mechanism 'efficient' not registered"


# -- availability, resume, ratios ----------------------------------------------------------------
class Missing(P.FlexPeer):
    name = "missing"
    package = "attnlab-no-such-package"
    module = "attnlab_no_such_package"


def test_unavailable_peer_is_reported_with_its_reason_and_tried_again(tmp_path):
    peer = Missing(compile=False)
    assert not peer.available()
    assert "attnlab-no-such-package" in peer.why_unavailable()
    path = tmp_path / "r.sqlite"
    (r,) = run(path, [config("softmax", impl="missing")], {"missing": peer})
    assert r.status == "unsupported" and r.metrics["note"].startswith(P.NOT_INSTALLED)
    assert "missing" not in P.available_peers()
    # installed later: the next run measures it instead of resuming the old answer
    Missing.module = "torch.nn.attention.flex_attention"
    try:
        results = run(path, [config("softmax", impl="missing")], {"missing": peer})
    finally:
        Missing.module = "attnlab_no_such_package"
    assert by_impl(results, "missing")[0].status == "ok"


def test_finished_configurations_are_not_measured_again(tmp_path, monkeypatch):
    path = tmp_path / "r.sqlite"
    first = run(path, [config("softmax", impl="flex")], {"flex": flex})
    assert len(first) == 2  # the peer and attnlab's side

    def boom(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr("attnlab.bench.peers.run.measure_pair", boom)  # where run_peer_configs finds it
    again = run(path, [config("softmax", impl="flex")], {"flex": flex})
    assert [r.config_hash for r in again] == [r.config_hash for r in first]


def test_unknown_peer_names_are_refused():
    with pytest.raises(ValueError, match="did you mean natten"):
        P.select_peers(["nattn"])


def test_ratio_is_attnlab_over_peer():
    cfg = config("softmax", impl="flex")
    mk = lambda c, s, t: Result("speed", c, s, {"median_s": t, "note": None}, {}, 0.0, "")  # noqa: E731
    rows = P.peer_ratios([mk(cfg, "ok", 0.5), mk(P.twin(cfg), "ok", 2.0)])
    assert [(r["impl"], r["ratio"]) for r in rows] == [("flex", 4.0)]
    assert P.peer_ratios([mk(cfg, "ok", 0.5)])[0]["ratio"] is None


def test_over_budget_sides_are_recorded_not_timed(tmp_path):
    configs = [config("softmax", n=n, impl="flex", causal=True) for n in (64, 128)]
    results = run(tmp_path / "r.sqlite", configs, {"flex": flex}, budget_s=1e-6)
    status = {(r.config["impl"], r.config["n"]): r.status for r in results}
    assert status[("flex", 64)] == "ok"  # always one timed call
    assert status[("attnlab", 64)] == "over_time"  # its check call alone took longer than the budget
    assert status[("flex", 128)] == "over_time"  # predicted from N=64
    assert ("attnlab", 128) not in status


def test_peer_configs_skip_what_a_peer_cannot_map():
    local = P.LocalAttentionPeer()
    assert P.peer_configs([config("softmax", n=200)], {"local-attention": local}) == []  # 128 does not divide 200
    assert "multiscale: one window" in local.describe()  # the mapping is spelled out for users
    (mine,) = P.peer_configs([config("softmax", n=256), config("softmax", n=256)], {"local-attention": local})
    assert mine["params"]["attn_mask"]["window_size"] == 128 and mine["impl"] == "local-attention"
