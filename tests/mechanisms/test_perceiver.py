"""Perceiver (P151): the Fourier position features by hand, no N×N tensor anywhere (memory O(M·N)), weight sharing
across repeats, and perceiver-pytorch 0.11.0's Perceiver with mapped weights (float64)."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnlab
from attnlab.core.errors import ParameterError
from attnlab.mechanisms.latents.perceiver import (
    fourier_features,
    grid_positions,
    perceiver_attention,
    perceiver_attention_reference,
)

DIM = 8


def build(**params: object) -> torch.nn.Module:
    torch.manual_seed(0)
    base = {"dim": DIM, "num_latents": 3, "latent_heads": 2, "depth": 2, "latent_layers": 1}
    return attnlab.build("perceiver", **{**base, **params}).double().eval()


def test_fourier_features_by_hand() -> None:
    """bands 3, μ = 8: f = (1, 2.5, 4); per axis [sin πf x, cos πf x, x]; axes concatenated in order."""
    pos = torch.tensor([[0.5, -0.25]], dtype=torch.float64)
    got = fourier_features(pos, 3, 8.0)
    want = []
    for x in (0.5, -0.25):
        want += [math.sin(math.pi * f * x) for f in (1.0, 2.5, 4.0)]
        want += [math.cos(math.pi * f * x) for f in (1.0, 2.5, 4.0)]
        want.append(x)
    torch.testing.assert_close(got, torch.tensor([want], dtype=torch.float64))
    # one band: f = 1 alone; at x = 1: sin π = 0, cos π = −1
    torch.testing.assert_close(fourier_features(torch.tensor([1.0]), 1, 2.0), torch.tensor([0.0, -1.0, 1.0]))
    with pytest.raises(ParameterError, match="^bands: "):
        fourier_features(pos, 0, 8.0)
    with pytest.raises(ParameterError, match="^max_freq: "):
        fourier_features(pos, 2, 1.0)


def test_grid_positions() -> None:
    p = grid_positions((2, 3), dtype=torch.float64)
    assert p.shape == (2, 3, 2)
    torch.testing.assert_close(p[1, 2], torch.tensor([1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(p[0, :, 1], torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(p[:, 0, 0], torch.tensor([-1.0, 1.0], dtype=torch.float64))


def test_positions_reach_the_latents() -> None:
    """With Fourier features the tokens' order matters; positions given explicitly equal the grid's default, and a
    padded sequence given its real tokens' positions pools as the unpadded one."""
    m = build(fourier_bands=2, max_freq=6.0)
    x = torch.randn(1, 5, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    perm = torch.tensor([4, 2, 0, 1, 3])
    assert (m(x[:, perm]) - m(x)).abs().max() > 1e-6
    pos = grid_positions((5,), dtype=torch.float64)
    torch.testing.assert_close(m(x, positions=pos), m(x))
    torch.testing.assert_close(m(x[:, perm], positions=pos[perm]), m(x))  # a set again once positions travel along
    padded = torch.cat([x, torch.randn(1, 2, DIM, dtype=torch.float64)], 1)
    keep = torch.tensor([[True] * 5 + [False] * 2])
    pos7 = torch.cat([pos, torch.zeros(2, 1, dtype=torch.float64)])
    for impl in ("fast", "reference"):
        torch.testing.assert_close(m(padded, positions=pos7, attention_mask=keep, impl=impl), m(x, impl=impl))
    grid = build(fourier_bands=2, input_axes=2)
    y = torch.randn(1, 3, 4, DIM, dtype=torch.float64)
    torch.testing.assert_close(grid(y), grid(y.reshape(1, 12, DIM), positions=grid_positions((3, 4), dtype=torch.float64).reshape(12, 2)))
    with pytest.raises(ValueError, match="^x: expected 2 position axes"):
        grid(x)


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_no_n_by_n_tensor() -> None:
    """N = 300 tokens, M = 3 latents: no op of the fast forward (nor its backward) returns a tensor with two axes
    of length N and none is larger than the input (batch·N·dim; the weights are batch·heads·M·N); materialize is (batch, heads, M, N)."""
    n = 300
    m = build(heads=2)
    x = torch.randn(2, n, DIM, dtype=torch.float64, requires_grad=True)
    with _Shapes() as rec:
        m(x).sum().backward()
    assert rec.shapes, "nothing recorded"
    assert all(shape.count(n) <= 1 for shape in rec.shapes), [s for s in rec.shapes if s.count(n) > 1]
    largest = max(math.prod(s) for s in rec.shapes)
    assert largest <= 2 * n * DIM, largest  # nothing larger than the input x (batch, n, dim) itself
    assert m.materialize(x.detach()).shape == (2, 2, 3, n)


def test_weight_sharing() -> None:
    """share_weights: repeats 2..depth are one module (parameter count independent of depth beyond 2); False: each
    repeat its own; depth 1 == the first repeat alone."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    shared3, shared5 = build(depth=3), build(depth=5)
    assert count(shared3) == count(shared5)
    repeats = shared5.repeats()
    assert len(repeats) == 5 and all(r is repeats[1] for r in repeats[1:]) and repeats[0] is not repeats[1]
    own = build(depth=3, share_weights=False)
    one = sum(p.numel() for p in own.first.parameters())
    assert count(own) == count(shared3) + one
    assert len({id(r) for r in own.repeats()}) == 3


def test_functional_cross_attention() -> None:
    """perceiver_attention == the reference; a latent over a sample with no real token reads 0."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, s, 4, generator=g, dtype=torch.float64) for s in (3, 7, 7))
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1] = False
    keep[0, 5:] = False
    out = perceiver_attention(q, k, v, attention_mask=keep)
    ref, w = perceiver_attention_reference(q, k, v, attention_mask=keep)
    torch.testing.assert_close(out, ref)
    want = torch.softmax(q[0] @ k[0, :, :5].transpose(-2, -1) / 2.0, -1) @ v[0, :, :5]
    torch.testing.assert_close(out[0], want)
    assert out[1].abs().max() == 0 and w[1].abs().max() == 0


def _peer_weights(ours: torch.nn.Module, peer: torch.nn.Module) -> None:
    """perceiver-pytorch's parameters copied into ours: latents, per block the cross-attention (to_kv split into
    W_k, W_v), its GEGLU feed-forward, the latent self-attention layers."""

    def attn(dst: torch.nn.Module, pre: torch.nn.Module) -> None:
        dst.norm.load_state_dict(pre.norm.state_dict())
        if dst.norm_context is not None:
            dst.norm_context.load_state_dict(pre.norm_context.state_dict())
        dst.q.weight.copy_(pre.fn.to_q.weight)
        wk, wv = pre.fn.to_kv.weight.chunk(2, 0)
        dst.k.weight.copy_(wk)
        dst.v.weight.copy_(wv)
        dst.out.load_state_dict(pre.fn.to_out.state_dict())

    def ff(dst: torch.nn.Module, pre: torch.nn.Module) -> None:
        dst.norm.load_state_dict(pre.norm.state_dict())
        dst.fc1.load_state_dict(pre.fn.net[0].state_dict())
        dst.fc2.load_state_dict(pre.fn.net[2].state_dict())

    with torch.no_grad():
        ours.latents.copy_(peer.latents)
        for mine, theirs in zip([ours.first, *ours.rest], peer.layers):
            attn(mine.cross, theirs.cross_attn)
            ff(mine.cross_ff, theirs.cross_ff)
            for layer, (pa, pf) in zip(mine.latent, theirs.self_attns):
                attn(layer.attn, pa)
                ff(layer.ff, pf)


@pytest.mark.parametrize("tied", [True, False])
def test_matches_perceiver_pytorch(tied: bool) -> None:
    pp = pytest.importorskip("perceiver_pytorch")
    bands, freq, latents, depth = 3, 7.0, 4, 3
    torch.manual_seed(3)
    peer = pp.Perceiver(
        num_freq_bands=bands, depth=depth, max_freq=freq, input_channels=DIM, input_axis=1, num_latents=latents,
        latent_dim=DIM, cross_heads=1, latent_heads=2, cross_dim_head=DIM, latent_dim_head=DIM // 2,
        self_per_cross_attn=2, weight_tie_layers=tied, final_classifier_head=False,
    ).double().eval()
    ours = build(num_latents=latents, depth=depth, latent_layers=2, share_weights=tied, fourier_bands=bands,
                 max_freq=freq, feedforward="geglu")
    _peer_weights(ours, peer)
    x = torch.randn(2, 11, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    want = peer(x)
    for impl in ("fast", "reference"):
        torch.testing.assert_close(ours(x, impl=impl), want, atol=1e-10, rtol=1e-8)
    keep = torch.ones(2, 11, dtype=torch.bool)
    keep[0, 8:] = False
    torch.testing.assert_close(ours(x, attention_mask=keep), peer(x, mask=keep), atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("n", [20, 37])
def test_flops_equal_the_counted_matmul_flops(n: int) -> None:
    """The registry's FLOPs (default parameters, width 8 = 2 heads × 4) == torch's FlopCounterMode count."""
    from torch.utils.flop_counter import FlopCounterMode

    spec = attnlab.get("perceiver", "pooling")
    torch.manual_seed(0)
    m = spec.build(dim=8, **{'heads': 2}).eval()
    with FlopCounterMode(display=False) as counter:
        m(torch.randn(1, n, 8))
    assert spec.flops is not None and counter.get_total_flops() == spec.flops(n, 2, 4, False)
