"""MHE: the paper's parameter count by hand, the heads of MHE-ADD and MHE-MUL by hand, module == functional."""
from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.mechanisms.heads.mhe import mhe_attention, mhe_attention_reference, qkv_parameter_count


def qkv_params(m: torch.nn.Module) -> int:
    """The Q/K/V parameters of a module: its three projections and, for MHE, the head embeddings (W_o aside)."""
    names = ("q_proj", "k_proj", "v_proj", "query_embeddings", "key_embeddings", "value_embeddings")
    return sum(p.numel() for name, p in m.named_parameters() if name.split(".")[0] in names)


# (n heads, d_h, d): MHE's Q/K/V = 3·d·d_h + 3·n·d_h, by hand
HAND_COUNTS = [
    (4, 4, 16, 3 * 16 * 4 + 3 * 4 * 4),  # 192 + 48 = 240
    (8, 8, 64, 3 * 64 * 8 + 3 * 8 * 8),  # 1536 + 192 = 1728
    (3, 5, 15, 3 * 15 * 5 + 3 * 3 * 5),  # 225 + 45 = 270
]


@pytest.mark.parametrize(("n", "d_h", "d", "want"), HAND_COUNTS)
@pytest.mark.parametrize("mode", ["add", "mul"])
def test_parameters_are_a_single_head_plus_3_n_dh(n: int, d_h: int, d: int, want: int, mode: str) -> None:
    mhe = attnlab.build("mhe", dim=d, heads=n, head_dim=d_h, qkv_bias=False, mode=mode)
    single = attnlab.build("softmax", dim=d, heads=1, head_dim=d_h, qkv_bias=False)
    assert qkv_params(mhe) == want == qkv_parameter_count(d, n, d_h)
    assert qkv_params(single) == 3 * d * d_h
    assert qkv_params(mhe) - qkv_params(single) == 3 * n * d_h
    # the output projection is that of multi-head attention with the same heads: n·d_h·d + d
    mha = attnlab.build("softmax", dim=d, heads=n, head_dim=d_h, qkv_bias=False)
    assert sum(p.numel() for p in mhe.out_proj.parameters()) == n * d_h * d + d == sum(p.numel() for p in mha.out_proj.parameters())


@pytest.mark.parametrize(("n", "d_h"), [(2, 3), (4, 4), (6, 2)])
def test_multi_head_attention_needs_3n2_minus_3n_dh2_minus_3n_dh_more(n: int, d_h: int) -> None:
    """With d = n·d_h, the paper's (3n² − 3n)·d_h² − 3·n·d_h more Q/K/V parameters for MHA than for MHE."""
    d = n * d_h
    mhe = attnlab.build("mhe", dim=d, heads=n, qkv_bias=False)
    mha = attnlab.build("softmax", dim=d, heads=n, qkv_bias=False)
    assert qkv_params(mha) - qkv_params(mhe) == (3 * n * n - 3 * n) * d_h * d_h - 3 * n * d_h


def test_bias_adds_the_same_3_dh_as_for_a_single_head() -> None:
    with_bias = attnlab.build("mhe", dim=12, heads=3, qkv_bias=True)
    without = attnlab.build("mhe", dim=12, heads=3, qkv_bias=False)
    assert qkv_params(with_bias) - qkv_params(without) == 3 * 4


def hand_case() -> tuple[torch.Tensor, ...]:
    """Two tokens, d_h = 2, two heads; shared q = k = 0 so every head's logits are equal (uniform attention in ADD:
    Q_i·K_j = e^Q_i·e^K_i for every pair), v = [[1, 2], [3, 4]]."""
    q = torch.zeros(1, 2, 2, dtype=torch.float64)
    k = torch.zeros(1, 2, 2, dtype=torch.float64)
    v = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], dtype=torch.float64)
    eq = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    ek = torch.tensor([[3.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    ev = torch.tensor([[10.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    return q, k, v, eq, ek, ev


@pytest.mark.parametrize("fn", [mhe_attention, lambda *a, **kw: mhe_attention_reference(*a, **kw)[0]])
def test_add_and_mul_heads_by_hand(fn) -> None:
    q, k, v, eq, ek, ev = hand_case()
    emb = {"query_embeddings": eq, "key_embeddings": ek, "value_embeddings": ev}
    # ADD: uniform weights, head_i = mean_j v_j + e^V_i = [2, 3] + e^V_i
    want_add = torch.tensor([[[12.0, 3.0]] * 2, [[2.0, 2.0]] * 2], dtype=torch.float64)[None]
    torch.testing.assert_close(fn(q, k, v, mode="add", **emb), want_add)
    # MUL: Q_i = 0 ⊙ e = 0 → uniform weights; head_i = e^V_i ⊙ mean_j v_j = e^V_i ⊙ [2, 3]
    want_mul = torch.tensor([[[20.0, 0.0]] * 2, [[0.0, -3.0]] * 2], dtype=torch.float64)[None]
    torch.testing.assert_close(fn(q, k, v, mode="mul", **emb), want_mul)


def test_mul_weights_by_hand() -> None:
    """MUL with q = [[1, 0]], k = [[1, 0], [0, 1]]: head i's logits are (e^Q_i ⊙ e^K_i) · (q ⊙ k_j)/√2."""
    q = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    k = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    v = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    eq = torch.tensor([[2.0, 1.0]], dtype=torch.float64)
    ek = torch.tensor([[1.5, 1.0]], dtype=torch.float64)
    ev = torch.ones(1, 2, dtype=torch.float64)
    out, w = mhe_attention_reference(q, k, v, query_embeddings=eq, key_embeddings=ek, value_embeddings=ev, mode="mul")
    logit = 3.0 / 2**0.5  # Q = [2, 0], K_1 = [1.5, 0], K_2 = [0, 1]: logits 3/√2 and 0
    p = torch.sigmoid(torch.tensor(logit, dtype=torch.float64))
    torch.testing.assert_close(w[0, 0, 0], torch.stack([p, 1 - p]))
    torch.testing.assert_close(out[0, 0, 0], torch.stack([p, 1 - p]))
    fast = mhe_attention(q, k, v, query_embeddings=eq, key_embeddings=ek, value_embeddings=ev, mode="mul")
    torch.testing.assert_close(fast, out)


@pytest.mark.parametrize("mode", ["add", "mul"])
@pytest.mark.parametrize("causal", [False, True])
def test_module_is_the_functional_reference_on_its_shared_projections(mode: str, causal: bool) -> None:
    m = attnlab.build("mhe", dim=12, heads=3, mode=mode, causal=causal).double()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 5:] = False
    heads, w = mhe_attention_reference(
        m.q_proj(x), m.k_proj(x), m.v_proj(x), query_embeddings=m.query_embeddings, key_embeddings=m.key_embeddings,
        value_embeddings=m.value_embeddings, mode=mode, causal=causal, attention_mask=keep,
    )
    want = m.out_proj(m.merge_heads(heads))
    for impl in ("fast", "reference"):
        torch.testing.assert_close(m(x, attention_mask=keep, impl=impl), want)
    torch.testing.assert_close(m.materialize(x, attention_mask=keep), w)


def test_equal_embeddings_make_every_head_the_single_shared_head() -> None:
    """ADD with all e_i equal (zero): the n heads coincide with single-head attention on the shared projection."""
    m = attnlab.build("mhe", dim=8, heads=4, head_dim=2).double()
    single = attnlab.build("softmax", dim=8, heads=1, head_dim=2).double()
    with torch.no_grad():
        for e in (m.query_embeddings, m.key_embeddings, m.value_embeddings):
            e.zero_()
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(single, name).load_state_dict(getattr(m, name).state_dict())
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    q, k, v = m.project(x)
    core = m.attend(q, k, v)
    one = single.attend(*single.project(x))
    torch.testing.assert_close(core, one.expand(-1, 4, -1, -1))


def test_bad_embeddings_are_refused_by_name() -> None:
    q = torch.randn(1, 3, 2)
    with pytest.raises(ValueError, match="embeddings: expected"):
        mhe_attention(q, q, q, query_embeddings=torch.randn(2, 3), key_embeddings=torch.randn(2, 3),
                      value_embeddings=torch.randn(2, 3))
    with pytest.raises(ValueError, match="mode: expected one of"):
        mhe_attention(q, q, q, query_embeddings=torch.randn(2, 2), key_embeddings=torch.randn(2, 2),
                      value_embeddings=torch.randn(2, 2), mode="concat")
