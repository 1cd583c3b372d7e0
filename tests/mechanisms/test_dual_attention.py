"""Dual attention: the official package (dual-attention 0.0.7) agrees for every symbol retriever, no relational head
== multi-head softmax attention (torch's), symmetric relations, the retrievers by hand, α and the messages explain
the output."""
from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.mechanisms.heads.dual_attention import relational_attention, relational_attention_reference

DIM, HEADS = 16, 4
RETRIEVERS = ("symbolic", "positional", "position-relative")


def build(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    params = {"dim": DIM, "heads": HEADS, "max_length": 32, "max_relative_position": 3, **kw}
    return attnlab.build("dual-attention", **params).double()


def peer_pair(retriever: str, causal: bool, symmetric: bool):
    """The package's DualAttention and symbol retriever, and attnlab's module with their weights (2 sensory,
    2 relational heads, 4 relations of width 2: the code needs relations · width = n_ra · d_h)."""
    da = pytest.importorskip("dual_attention.dual_attention")
    sr = pytest.importorskip("dual_attention.symbol_retrieval")
    torch.manual_seed(3)
    peer = da.DualAttention(d_model=DIM, n_heads_sa=2, n_heads_ra=2, dropout=0.0, ra_kwargs={
        "n_relations": 4, "rel_proj_dim": 2, "symmetric_rels": symmetric,
        "use_relative_positional_symbols": retriever == "position-relative"}).double().eval()
    if retriever == "symbolic":
        symbols = sr.SymbolicAttention(d_model=DIM, n_heads=2, n_symbols=5).double()
    elif retriever == "positional":
        symbols = sr.PositionalSymbolRetriever(symbol_dim=DIM, max_length=32).double()
    else:
        symbols = sr.PositionRelativeSymbolRetriever(symbol_dim=DIM, max_rel_pos=3).double()
    ours = build(relational_heads=2, relations=4, relation_dim=2, symmetric_relations=symmetric, qkv_bias=False,
                 symbol_retriever=retriever, n_symbols=5, symbol_heads=2, causal=causal)
    sa, ra = peer.self_attention, peer.relational_attention
    with torch.no_grad():
        ours.q_proj.weight.copy_(torch.cat([sa.wq.weight, ra.wq_attn.weight]))
        ours.k_proj.weight.copy_(torch.cat([sa.wk.weight, ra.wk_attn.weight]))
        ours.v_proj.weight.copy_(sa.wv.weight)
        ours.rel_q_proj.weight.copy_(ra.wq_rel.weight)
        ours.rel_k_proj.weight.copy_(ra.wk_rel.weight)
        ours.relation_out.copy_(ra.wr)
        ours.symbol_proj.weight.copy_(ra.wv.weight)
        ours.out_proj.weight.copy_(torch.block_diag(sa.wo.weight, ra.wo.weight))  # the code's two W_o: one block each
        ours.out_proj.bias.zero_()
        if retriever == "symbolic":
            ours.symbols.query.load_state_dict(symbols.q_proj.state_dict())
            ours.symbols.templates.copy_(symbols.template_features)
            ours.symbols.library.copy_(symbols.symbol_library)
        elif retriever == "positional":
            ours.symbols.copy_(symbols.symbol_library.weight)
        else:
            ours.symbols.copy_(symbols.rel_pos_enc.rel_pos_embeddings)
    return peer, symbols, ours


@pytest.mark.parametrize("retriever", RETRIEVERS)
@pytest.mark.parametrize(("causal", "symmetric"), [(False, False), (True, False), (False, True)])
def test_the_official_package_agrees(retriever: str, causal: bool, symmetric: bool) -> None:
    peer, symbols, ours = peer_pair(retriever, causal, symmetric)
    x = torch.randn(2, 9, DIM, dtype=torch.float64)
    with torch.no_grad():
        want = peer(x, symbols(x), is_causal=causal)[0]
        for impl in ("fast", "reference"):
            torch.testing.assert_close(ours(x, impl=impl), want, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("causal", [False, True])
def test_no_relational_head_is_multi_head_softmax_attention(causal: bool) -> None:
    m = build(relational_heads=0, causal=causal)
    mha = torch.nn.MultiheadAttention(DIM, HEADS, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([m.q_proj.weight, m.k_proj.weight, m.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([m.q_proj.bias, m.k_proj.bias, m.v_proj.bias]))
        mha.out_proj.load_state_dict(m.out_proj.state_dict())
    x = torch.randn(2, 7, DIM, dtype=torch.float64)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[0, 5:] = False
    future = torch.ones(7, 7, dtype=torch.bool).triu(1) if causal else None
    want, weights = mha(x, x, x, key_padding_mask=~keep, attn_mask=future, average_attn_weights=False)
    for impl in ("fast", "reference"):
        torch.testing.assert_close(m(x, attention_mask=keep, impl=impl), want)
    torch.testing.assert_close(m.materialize(x, attention_mask=keep), weights)
    assert not any("rel" in name or "symbol" in name for name, _ in m.named_parameters())


def relation_block(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """r_ij of the relational heads read from the messages: symbols off (W_s = 0), W_r^h = [I; 0]."""
    with torch.no_grad():
        m.symbol_proj.weight.zero_()
        m.symbol_proj.bias.zero_()
        m.relation_out.zero_()
        for h in range(m.relational_heads):
            m.relation_out[h, : m.relations] = torch.eye(m.relations, dtype=torch.float64)
    return m.messages(x)[:, m.sensory_heads :, :, :, : m.relations]


def test_symmetric_relations_are_symmetric() -> None:
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    r = relation_block(build(symmetric_relations=True), x)
    torch.testing.assert_close(r, r.transpose(2, 3))
    assert r.abs().max() > 0.1
    r = relation_block(build(symmetric_relations=False), x)
    assert (r - r.transpose(2, 3)).abs().max() > 0.1  # untied maps: r_ij != r_ji


def uniform_relational(retriever: str, n_tokens: int) -> torch.nn.Module:
    """One relational head, no sensory head; zero attention maps (uniform α over the visible keys), zero relation
    maps (r = 0), W_s = identity on the first 2 channels of the symbols (d_h = 2: dim 2)."""
    m = attnlab.build("dual-attention", dim=2, heads=1, relational_heads=1, symbol_retriever=retriever, max_length=8,
                      max_relative_position=1).double()
    with torch.no_grad():
        for p in (m.q_proj.weight, m.q_proj.bias, m.k_proj.weight, m.k_proj.bias, m.rel_q_proj.weight, m.symbol_proj.bias):
            p.zero_()
        m.symbol_proj.weight.copy_(torch.eye(2))
        m.out_proj.weight.copy_(torch.eye(2))
        m.out_proj.bias.zero_()
    return m


def test_position_relative_symbols_by_hand() -> None:
    """R = 1: symbols e_{-1}, e_0, e_{+1} = rows 0, 1, 2 of the table; 4 tokens, uniform α = 1/4, so
    out_i = (1/4) Σ_j e_{clip(j − i)}: i = 0 sees offsets 0, 1, 1, 1 -> (e_0 + 3 e_1)/4; i = 1: -1, 0, 1, 1;
    i = 2: -1, -1, 0, 1; i = 3: -1, -1, -1, 0."""
    m = uniform_relational("position-relative", 4)
    table = torch.tensor([[1.0, 0.0], [0.0, 10.0], [100.0, 0.0]], dtype=torch.float64)
    with torch.no_grad():
        m.symbols.copy_(table)
    e_m, e_0, e_p = table
    want = torch.stack([e_0 + 3 * e_p, e_m + e_0 + 2 * e_p, 2 * e_m + e_0 + e_p, 3 * e_m + e_0]) / 4
    x = torch.randn(1, 4, 2, dtype=torch.float64)
    for impl in ("fast", "reference"):
        torch.testing.assert_close(m(x, impl=impl)[0], want)
    # causal: query i sees j <= i only, α = 1/(i + 1): i = 2 -> (2 e_{-1} + e_0)/3
    m.causal = True
    torch.testing.assert_close(m(x)[0, 2], (2 * e_m + e_0) / 3)


def test_positional_symbols_by_hand_and_padding_does_not_shift_them() -> None:
    """Uniform α: out_i = mean_j e_{p(j)}; 3 tokens: (e_0 + e_1 + e_2)/3 at every query. Two padded tokens in front
    leave the real tokens' positions 0, 1, 2 (p counts real tokens)."""
    m = uniform_relational("positional", 3)
    with torch.no_grad():
        m.symbols.copy_(torch.arange(16, dtype=torch.float64).view(8, 2))
    x = torch.randn(1, 3, 2, dtype=torch.float64)
    want = torch.tensor([[2.0, 3.0]] * 3, dtype=torch.float64)  # rows (0, 1), (2, 3), (4, 5): mean (2, 3)
    torch.testing.assert_close(m(x)[0], want)
    padded = torch.cat([100 * torch.randn(1, 2, 2, dtype=torch.float64), x], 1)
    keep = torch.tensor([[False, False, True, True, True]])
    for impl in ("fast", "reference"):
        torch.testing.assert_close(m(padded, attention_mask=keep, impl=impl)[0, 2:], want)


def test_symbolic_symbols_by_hand() -> None:
    """Symbolic attention with zero query map: each token retrieves the mean of the library; uniform α then gives it."""
    m = uniform_relational("symbolic", 3)
    with torch.no_grad():
        m.symbols.query.weight.zero_()
        m.symbols.query.bias.zero_()
        m.symbols.library.copy_(torch.arange(2 * m.symbols.library.shape[0], dtype=torch.float64).view(-1, 2))
    x = torch.randn(1, 3, 2, dtype=torch.float64)
    torch.testing.assert_close(m(x)[0], m.symbols.library.mean(0).expand(3, 2))


@pytest.mark.parametrize("retriever", RETRIEVERS)
@pytest.mark.parametrize("causal", [False, True])
def test_alpha_and_the_messages_explain_the_output(retriever: str, causal: bool) -> None:
    """out = out_proj(concat_h Σ_j α^h_ij m^h_ij), fast and reference, with padding and an additive attn_mask; α rows
    sum to 1 for both kinds of heads."""
    m = build(symbol_retriever=retriever, causal=causal, relational_heads=3, symmetric_relations=retriever == "symbolic")
    x = torch.randn(2, 8, DIM, dtype=torch.float64)
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[1, 6:] = False
    extra = torch.randn(2, HEADS, 8, 8, dtype=torch.float64)
    a = m.materialize(x, attention_mask=keep, attn_mask=extra)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, HEADS, 8, dtype=torch.float64))
    heads = torch.einsum("bhij,bhijd->bhid", a, m.messages(x, attention_mask=keep))
    want = m.out_proj(heads.transpose(1, 2).reshape(2, 8, DIM))
    for impl in ("fast", "reference"):
        torch.testing.assert_close(m(x, attention_mask=keep, attn_mask=extra, impl=impl), want)


def test_functional_fast_path_equals_the_reference_with_a_symbol_table() -> None:
    q, k = torch.randn(2, 2, 3, 6, 4, dtype=torch.float64)
    rel_q, rel_k = torch.randn(2, 2, 6, 3, 5, dtype=torch.float64)
    table, w_r = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(3, 4, 3, dtype=torch.float64)
    offsets = torch.randint(0, 5, (2, 6, 6))
    mask = torch.rand(2, 1, 6, 6) > 0.3
    mask[0, 0, 2] = False  # a fully masked row: zeros
    fast = relational_attention(q, k, rel_q, rel_k, table, w_r, symbol_offsets=offsets, mask=mask, causal=True)
    ref, alpha = relational_attention_reference(q, k, rel_q, rel_k, table, w_r, symbol_offsets=offsets, mask=mask,
                                                causal=True)
    torch.testing.assert_close(fast, ref)
    assert fast[0, :, 2].abs().max() == 0 and alpha[0, :, 2].abs().max() == 0
    with pytest.raises(ValueError, match="symbol_offsets: expected indices in"):
        relational_attention(q, k, rel_q, rel_k, table, w_r, symbol_offsets=offsets + 5)


def test_bad_arguments_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="relational_heads: expected"):
        attnlab.build("dual-attention", dim=8, heads=2, relational_heads=3)
    with pytest.raises(ValueError, match="symbol_heads: expected a divisor of dim=8"):
        attnlab.build("dual-attention", dim=8, heads=2, symbol_heads=3)
    m = attnlab.build("dual-attention", dim=8, heads=2, symbol_retriever="positional", max_length=4)
    with pytest.raises(ValueError, match="x: positional symbols cover max_length=4 positions, got 5 tokens"):
        m(torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="context: dual-attention does not support cross-attention"):
        m(torch.randn(1, 3, 8), context=torch.randn(1, 3, 8))
