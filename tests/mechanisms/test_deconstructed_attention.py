"""Deconstructed attention (P057): each variant's defining property, and the interleaved stack."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.mechanisms.mixers.deconstructed_attention import InterleavedStack


def _build(name: str, **kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return attnlab.build(name, **{"dim": 12, "heads": 3, **kw}).double().eval()


def _heads(t: torch.Tensor, heads: int = 3) -> torch.Tensor:
    return t.view(*t.shape[:-1], heads, -1).transpose(-3, -2)


def _merge(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(-3, -2).reshape(*t.shape[:-3], t.shape[-2], -1)


def _softmax_rows(scores: torch.Tensor) -> torch.Tensor:
    e = (scores - scores.amax(-1, keepdim=True)).exp()
    return e / e.sum(-1, keepdim=True)


def test_no_mixing_output_depends_on_its_own_token_only() -> None:
    m = _build("no-mixing", causal=True)
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    for impl in ("fast", "reference"):
        for i in range(7):
            (g,) = torch.autograd.grad(m(x, impl=impl)[:, i].sum(), x)
            others = torch.cat([g[:, :i], g[:, i + 1 :]], 1)
            assert others.abs().max().item() == 0.0 and g[:, i].abs().sum().item() > 0, (impl, i)
    with torch.no_grad():
        want = (x @ m.v_proj.weight.T + m.v_proj.bias) @ m.out_proj.weight.T + m.out_proj.bias
        torch.testing.assert_close(m(x), want)
        torch.testing.assert_close(m.materialize(x), torch.eye(7, dtype=torch.float64).expand(2, 3, 7, 7))


def test_fixed_mixing_weights_do_not_depend_on_the_input() -> None:
    m = _build("fixed-mixing", max_length=16, causal=True)
    x1, x2 = torch.randn(2, 2, 9, 12, dtype=torch.float64)
    with torch.no_grad():
        a = m.materialize(x1)
        torch.testing.assert_close(m.materialize(x2), a, atol=0.0, rtol=0.0)
        e = m.sequence[:9]
        q, k = _heads(e @ m.q_proj.weight.T + m.q_proj.bias), _heads(e @ m.k_proj.weight.T + m.k_proj.bias)
        scores = q @ k.transpose(-1, -2) / math.sqrt(4) + torch.full((9, 9), -math.inf).triu(1)
        want = _softmax_rows(scores)
        torch.testing.assert_close(a, want.expand(2, -1, -1, -1))
        v = _heads(x1 @ m.v_proj.weight.T + m.v_proj.bias)
        out = _merge(want @ v) @ m.out_proj.weight.T + m.out_proj.bias
        for impl in ("fast", "reference"):
            torch.testing.assert_close(m(x1, impl=impl), out)


def test_fixed_mixing_reads_the_sequence_at_the_rank_among_real_tokens() -> None:
    """Padding between real tokens: the real tokens' outputs and weights are those of the unpadded sequence."""
    m = _build("fixed-mixing", max_length=16)
    real = torch.randn(1, 6, 12, dtype=torch.float64)
    x = torch.cat([real[:, :2], 50 * torch.randn(1, 3, 12, dtype=torch.float64), real[:, 2:]], 1)
    keep = torch.tensor([[True, True, False, False, False, True, True, True, True]])
    with torch.no_grad():
        for impl in ("fast", "reference"):
            torch.testing.assert_close(m(x, attention_mask=keep, impl=impl)[keep], m(real, impl=impl)[0])
        a = m.materialize(x, attention_mask=keep)
        torch.testing.assert_close(a[0][:, keep[0]][:, :, keep[0]], m.materialize(real)[0])


@pytest.mark.parametrize("similarity", ["distance", "cosine"])
def test_altered_similarity_scores_by_hand(similarity: str) -> None:
    m = _build("altered-similarity", similarity=similarity)
    x = torch.randn(2, 8, 12, dtype=torch.float64)
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[0, 5:] = False
    with torch.no_grad():
        q, k, v = (_heads(x @ p.weight.T + p.bias) for p in (m.q_proj, m.k_proj, m.v_proj))
        if similarity == "distance":
            scores = -((q[..., :, None, :] - k[..., None, :, :]) ** 2).sum(-1) / (2 * math.sqrt(4))
        else:
            qn, kn = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
            scores = math.sqrt(4) * qn @ kn.transpose(-1, -2)
        want = _softmax_rows(scores.masked_fill(~keep[:, None, None, :], -math.inf))
        torch.testing.assert_close(m.materialize(x, attention_mask=keep), want)
        out = _merge(want @ v) @ m.out_proj.weight.T + m.out_proj.bias
        for impl in ("fast", "reference"):
            torch.testing.assert_close(m(x, attention_mask=keep, impl=impl), out)
        dot = _softmax_rows(q @ k.transpose(-1, -2) / 2.0)
        assert (want[1] - dot[1]).abs().max().item() > 1e-3  # the form is really altered


def test_decoupled_queries_and_keys_come_from_the_embeddings() -> None:
    m = _build("decoupled-attention", causal=True)
    e, x1, x2 = torch.randn(3, 2, 7, 12, dtype=torch.float64)
    with torch.no_grad():
        a = m.materialize(x1, embeddings=e)
        torch.testing.assert_close(m.materialize(x2, embeddings=e), a, atol=0.0, rtol=0.0)
        q, k = _heads(e @ m.q_proj.weight.T + m.q_proj.bias), _heads(e @ m.k_proj.weight.T + m.k_proj.bias)
        want = _softmax_rows(q @ k.transpose(-1, -2) / 2.0 + torch.full((7, 7), -math.inf).triu(1))
        torch.testing.assert_close(a, want)
        v = _heads(x1 @ m.v_proj.weight.T + m.v_proj.bias)
        out = _merge(want @ v) @ m.out_proj.weight.T + m.out_proj.bias
        for impl in ("fast", "reference"):
            torch.testing.assert_close(m(x1, embeddings=e, impl=impl), out)
        torch.testing.assert_close(m(x1), m(x1, embeddings=x1))  # default: the embeddings are x (layer 0)


def test_interleaved_stack_pattern_and_layer0_embeddings() -> None:
    torch.manual_seed(0)
    stack = InterleavedStack("decoupled-attention", dim=12, heads=3, layers=4, softmax_every=2, causal=True).double()
    assert stack.names == ["decoupled-attention", "softmax", "decoupled-attention", "softmax"]
    assert [type(m).__name__ for m in stack.mixers] == ["DecoupledAttention", "SoftmaxAttention"] * 2
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    with torch.no_grad():
        h = x
        for name, mixer, n1, n2, mlp in zip(stack.names, stack.mixers, stack.norms1, stack.norms2, stack.mlps):
            extra = {"embeddings": n1(x)} if name == "decoupled-attention" else {}  # the stack's input, not h
            h = h + mixer(n1(h), **extra)
            h = h + mlp(n2(h))
        torch.testing.assert_close(stack(x), h)
    assert InterleavedStack("no-mixing", dim=12, heads=3, layers=3, softmax_every=0).names == ["no-mixing"] * 3
