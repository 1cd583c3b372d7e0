"""RIN (P144): one read-process-write block by hand on a tiny case (every attention map and the output), blocks
chain, latent self-conditioning is a stop-gradient warm start, materialize = W_write·W_read, token equivariance."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnlab

DIM, M, N = 4, 2, 3


def build(**params: object) -> torch.nn.Module:
    torch.manual_seed(0)
    base = {"dim": DIM, "heads": 1, "num_latents": M, "blocks": 1, "process_layers": 1, "mlp_ratio": 2}
    m = attnlab.build("rin", **{**base, **params}).double().eval()
    with torch.no_grad():  # latents away from the 0.02 init, so the maps are far from uniform
        m.latents.mul_(50.0)
    return m


def tokens(batch: int = 2, n: int = N, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, n, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _ln(t: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(t, t.shape[-1:], norm.weight, norm.bias, norm.eps)


def _attend(attn: torch.nn.Module, queries: torch.Tensor, context: torch.Tensor | None, keep: torch.Tensor | None):
    """One head: softmax(q kᵀ/√d) over the (kept) context rows, written out; (output, weights)."""
    h = _ln(queries, attn.norm)
    c = h if context is None else _ln(context, attn.norm_context)
    q, k, v = attn.q(h), attn.k(c), attn.v(c)
    logits = q @ k.T / math.sqrt(q.shape[-1])
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    w = torch.softmax(logits, -1)
    return attn.out(w @ v), w


def _mlp(ff: torch.nn.Module, t: torch.Tensor) -> torch.Tensor:
    return ff.fc2(F.gelu(ff.fc1(_ln(t, ff.norm))))


def test_read_process_write_by_hand() -> None:
    m = build()
    x = tokens()
    keep = torch.tensor([[True, True, True], [True, False, True]])
    block = m.layers[0]
    attn, ff = block.process[0].attn, block.process[0].ff
    for mask in (None, keep):
        maps = m.attention_maps(x, attention_mask=mask)[0]
        for b in range(2):
            kb = None if mask is None else mask[b]
            z = m.latents
            read, w_read = _attend(block.read, z, x[b], kb)
            z = z + read
            z = z + _mlp(block.read_ff, z)
            proc, w_proc = _attend(attn, z, None, None)
            z = z + proc
            z = z + _mlp(ff, z)
            write, w_write = _attend(block.write, x[b], z, None)
            h = x[b] + write
            h = h + _mlp(block.write_ff, h)
            torch.testing.assert_close(maps["read"][b, 0], w_read)
            torch.testing.assert_close(maps["process"][0][b, 0], w_proc)
            torch.testing.assert_close(maps["write"][b, 0], w_write)
            for impl in ("fast", "reference"):
                out, latents = m.run(x, attention_mask=mask, impl=impl)
                torch.testing.assert_close(out[b], h)
                torch.testing.assert_close(latents[b], z)
            torch.testing.assert_close(m.materialize(x, attention_mask=mask)[b, 0], w_write @ w_read)
    assert maps["read"][1, 0, :, 1].abs().max() == 0  # the padded token is no key of the read
    assert (maps["read"][0, 0, 0] - maps["read"][0, 0, 1]).abs().max() > 1e-2  # the two latents read differently


def test_blocks_chain() -> None:
    """blocks=2: the second block takes the first block's tokens and latents."""
    m = build(blocks=2)
    x = tokens()
    h, z = x, m.latents.expand(2, M, DIM)
    for block in m.layers:
        h, z = block(h, z, None)
    out, latents = m.run(x)
    torch.testing.assert_close(out, h)
    torch.testing.assert_close(latents, z)
    torch.testing.assert_close(m.run(x, impl="reference")[0], h)


def test_latent_self_conditioning_is_stop_gradient() -> None:
    """Z⁰ = Z_init + LN(MLP(sg(Z_prev))): the output depends on Z_prev (once the LN scale is non-zero), no gradient
    reaches Z_prev (nor the step that made it), the conditioning parameters do get one; at init (LN scale 0) it
    is the plain forward."""
    m = build()
    x = tokens()
    prev = torch.randn(2, M, DIM, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(m.run(x, previous_latents=prev)[0], m(x))  # the zero-initialised scale
    with torch.no_grad():
        m.self_cond_norm.weight.fill_(1.0)
    for impl in ("fast", "reference"):
        out, _ = m.run(x, previous_latents=prev, impl=impl)
        assert (out - m(x, impl=impl)).abs().max() > 1e-3
        grads = torch.autograd.grad(out.sum(), [prev, m.self_cond.fc1.weight], allow_unused=True)
        assert grads[0] is None, "a gradient flows into the previous latents"
        assert grads[1] is not None and grads[1].abs().max() > 0
    # the previous step's latents come from a differentiable forward: its parameters get no gradient through Z_prev
    first = build()
    _, z_prev = first.run(tokens(seed=3))
    out, _ = m.run(x, previous_latents=z_prev)
    (g,) = torch.autograd.grad(out.sum(), [first.latents], allow_unused=True)
    assert g is None
    want = m.latents + F.layer_norm(_mlp(m.self_cond, prev.detach()), (DIM,), m.self_cond_norm.weight, m.self_cond_norm.bias)
    torch.testing.assert_close(m.initial_latents(2, prev.detach()), want)
    with pytest.raises(ValueError, match="^previous_latents: expected shape"):
        m.run(x, previous_latents=prev[:, :1])


def test_tokens_equivariant_and_grid() -> None:
    """No positions inside the block: permuting the tokens permutes the output; a (batch, h, w, dim) grid is its
    h·w tokens."""
    m = build(blocks=2, heads=2)
    x = tokens(n=6)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    torch.testing.assert_close(m(x[:, perm]), m(x)[:, perm])
    torch.testing.assert_close(m(x.reshape(2, 2, 3, DIM)), m(x).reshape(2, 2, 3, DIM))


@pytest.mark.parametrize("n", [20, 37])
def test_flops_equal_the_counted_matmul_flops(n: int) -> None:
    """The registry's FLOPs (default parameters, width 8 = 2 heads × 4) == torch's FlopCounterMode count."""
    from torch.utils.flop_counter import FlopCounterMode

    spec = attnlab.get("rin", "mechanism")
    torch.manual_seed(0)
    m = spec.build(dim=8, **{'heads': 2, 'head_dim': 4}).eval()
    with FlopCounterMode(display=False) as counter:
        m(torch.randn(1, n, 8))
    assert spec.flops is not None and counter.get_total_flops() == spec.flops(n, 2, 4, False)


def test_functional_read_and_write() -> None:
    """rin_attention == its reference == softmax over the (real) keys, by hand: a read (M latent queries over N
    token keys, padding) and a write (N token queries over M latent keys)."""
    from attnlab.mechanisms.latents.rin import rin_attention, rin_attention_reference

    g = torch.Generator().manual_seed(5)
    z, x = torch.randn(2, 2, M, 4, generator=g, dtype=torch.float64), torch.randn(2, 2, 5, 4, generator=g, dtype=torch.float64)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1, 3:] = False
    read = rin_attention(z, x, x, attention_mask=keep)
    ref, w = rin_attention_reference(z, x, x, attention_mask=keep)
    torch.testing.assert_close(read, ref)
    torch.testing.assert_close(read[1], torch.softmax(z[1] @ x[1, :, :3].transpose(-2, -1) / 2.0, -1) @ x[1, :, :3])
    assert w[1, ..., 3:].abs().max() == 0
    write = rin_attention(x, z, z)
    torch.testing.assert_close(write, torch.softmax(x @ z.transpose(-2, -1) / 2.0, -1) @ z)
    torch.testing.assert_close(rin_attention_reference(x, z, z)[0], write)
