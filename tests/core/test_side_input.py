"""The core's side-input hook: `side_input(x, context)` computed by forward, materialize and the default decode,
handed by `attend(..., side=...)` to the cores of a mechanism that takes one, refused by name by the others."""
from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import attnlab
from attnlab.core.errors import DTypeError, ShapeError
from attnlab.core.module import Attention, KVCache
from attnlab.core.registry import Paper, Spec, Supports

F64 = torch.float64
DIM, HEADS, N = 8, 2, 6


class KeyBiasAttention(Attention[KVCache]):
    """Softmax attention with a learned score per key token, s_ij = q_i·k_j/√d + g_j, g_j = x_j·w: the side input
    (batch, n_k, 1), or per head (batch, heads, n_k, 1). The cores record the side input they were given."""

    takes_side_input = True

    def __init__(self, dim: int, heads: int, **common: object) -> None:
        super().__init__(dim, heads, **common)  # type: ignore[arg-type]
        self.key_score = nn.Linear(dim, 1, bias=False)
        self.received: list[Tensor | None] = []

    def side_input(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.key_score(x if context is None else context)

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, side: Tensor | None = None) -> Tensor:
        return self.attend_reference(q, k, v, mask, side=side)[0]

    def attend_reference(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, side: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        self.received.append(side)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if side is not None:
            per_head = side[:, None] if side.dim() == 3 else side  # (batch, heads or 1, n_k, 1)
            scores = scores + per_head.transpose(-2, -1)
        if mask is not None:
            scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask
        weights = scores.softmax(-1)
        return weights @ v, weights


KeyBiasAttention.spec = Spec(
    name="test-key-bias", kind="mechanism", paper=Paper(None, "a test mechanism", 2026), factory=KeyBiasAttention,
    supports=Supports(causal=True, key_padding=True, attn_mask=True, cross=True, decode=True),
)


def by_hand(m: KeyBiasAttention, x: Tensor, context: Tensor | None = None, causal: bool = False) -> tuple[Tensor, Tensor]:
    """(output, weights) written from the formula with m's weights: g_j = x_j·w of the key tokens."""
    src = x if context is None else context
    b, n, _ = x.shape
    heads = [t.view(b, -1, HEADS, DIM // HEADS).transpose(1, 2) for t in (m.q_proj(x), m.k_proj(src), m.v_proj(src))]
    q, k, v = heads
    g = src @ m.key_score.weight[0]  # (batch, n_k)
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(DIM // HEADS) + g[:, None, None, :]
    if causal:
        scores = scores.masked_fill(~torch.ones(n, src.shape[1], dtype=torch.bool).tril(), -math.inf)
    weights = scores.softmax(-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, DIM)
    return m.out_proj(out), weights


def toy(**kw: object) -> KeyBiasAttention:
    torch.manual_seed(0)
    return KeyBiasAttention(DIM, HEADS, **kw).double()


@pytest.mark.parametrize("name", ["softmax", "galerkin", "delta"])
def test_a_mechanism_that_takes_none_refuses_a_side_input_by_name(name: str) -> None:
    m = attnlab.build(name, dim=DIM, heads=HEADS, **({"gate_source": "key"} if name == "delta" else {}))
    assert m.side_input(torch.randn(1, N, DIM)) is None
    q, k, v = (torch.randn(1, HEADS, N, DIM // HEADS) for _ in range(3))
    with pytest.raises(ValueError, match=f"side: {name} takes no side input"):
        m.attend(q, k, v, side=torch.randn(1, N, 1))
    if not m.takes_side_input:
        with pytest.raises(ValueError, match=f"side: {name} takes no side input .*got list"):
            m.attend(q, k, v, side=[1.0])


def test_forward_and_materialize_hand_the_side_input_of_x_to_the_cores() -> None:
    m = toy(causal=True)
    x = torch.randn(2, N, DIM, dtype=F64)
    want, weights = by_hand(m, x, causal=True)
    for impl in ("fast", "reference"):
        torch.testing.assert_close(m(x, impl=impl), want)
    torch.testing.assert_close(m.materialize(x), weights)
    assert all(side is not None and side.shape == (2, N, 1) for side in m.received)


def test_cross_attention_reads_the_side_input_of_the_context() -> None:
    m = toy()
    x, context = torch.randn(2, N, DIM, dtype=F64), torch.randn(2, N + 3, DIM, dtype=F64)
    torch.testing.assert_close(m(x, context=context), by_hand(m, x, context)[0])


def test_attend_takes_an_explicit_side_input_token_aligned_or_per_head_and_checks_it() -> None:
    m = toy()
    q, k, v = (torch.randn(2, HEADS, N, DIM // HEADS, dtype=F64) for _ in range(3))
    plain = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(DIM // HEADS), -1) @ v
    torch.testing.assert_close(m.attend(q, k, v, side=torch.zeros(2, N, 1, dtype=F64)), plain)
    # a score of −1e9 on key 0 of head 1 only: that head's output is the softmax over keys 1..N−1
    side = torch.zeros(2, HEADS, N, 1, dtype=F64)
    side[:, 1, 0] = -1e9
    out = m.attend(q, k, v, side=side)
    torch.testing.assert_close(out[:, 0], plain[:, 0])
    rest = torch.softmax(q[:, 1] @ k[:, 1, 1:].transpose(-2, -1) / math.sqrt(DIM // HEADS), -1) @ v[:, 1, 1:]
    torch.testing.assert_close(out[:, 1], rest)
    with pytest.raises(ShapeError, match=r"side: expected \(batch, n_k, s\) = \(2, 6, s\)"):
        m.attend(q, k, v, side=torch.zeros(2, N - 1, 1, dtype=F64))
    with pytest.raises(ShapeError, match="side: expected"):
        m.attend(q, k, v, side=torch.zeros(1, N, 1, dtype=F64))
    with pytest.raises(ShapeError, match=r"\(batch, heads, n_k, s\) = \(2, 2, 6, s\)"):
        m.attend(q, k, v, side=torch.zeros(2, 3, N, 1, dtype=F64))
    with pytest.raises(ShapeError, match="side: expected"):
        m.attend(q, k, v, side=torch.zeros(N, dtype=F64))
    with pytest.raises(DTypeError, match="side: expected dtype torch.float64"):
        m.attend(q, k, v, side=torch.zeros(2, N, 1))
    with pytest.raises(TypeError, match="side: expected a torch.Tensor, got list"):
        m.attend(q, k, v, side=[0.0] * N)


def test_without_a_side_input_the_cores_are_called_as_before() -> None:
    """side=None is not handed on: cores (or patches of them) that know no `side` keyword keep working."""
    m = toy()
    calls = []

    def attend_fast(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:  # no `side` keyword
        calls.append(mask)
        return v

    m.attend_fast = attend_fast  # type: ignore[method-assign]
    q, k, v = (torch.randn(1, HEADS, N, DIM // HEADS, dtype=F64) for _ in range(3))
    torch.testing.assert_close(m.attend(q, k, v), v)
    assert len(calls) == 1


def test_the_default_decode_caches_the_side_inputs_and_equals_the_causal_forward() -> None:
    m = toy(causal=True)
    x = torch.randn(2, N, DIM, dtype=F64)
    state, outs = None, []
    for t in range(N):
        y, state = m.step(x[:, t : t + 1], state)
        outs.append(y)
    assert isinstance(state, KVCache) and state.side is not None and state.side.shape == (2, N, 1)
    torch.testing.assert_close(torch.cat(outs, 1), by_hand(m, x, causal=True)[0])
