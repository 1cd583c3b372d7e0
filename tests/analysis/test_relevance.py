"""Relevance (P035 generic explainability, P111 LRP) against explicit loops, finite differences and hand values."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import attnlab
from attnlab.analysis import capture, tiny_llama
from attnlab.analysis.relevance import (
    _LRPMode,
    generic_relevance,
    generic_relevance_from,
    lrp_relevance,
    propagate_relevance,
)


def _mean_pool_norm(hidden, mask):
    """The documented default target of an encoder without head, written out."""
    m = mask.to(hidden.dtype)[..., None]
    return ((hidden * m).sum(1) / m.sum(1)).norm(dim=-1)


def _by_hand_cam(a, g):
    """Ā = mean over heads of max(g·a, 0), loop over heads, numpy float64; a, g (heads, n_q, n_k)."""
    a = a.detach().double().numpy()
    g = g.detach().double().numpy()
    out = np.zeros(a.shape[1:])
    for h in range(a.shape[0]):
        out += np.maximum(g[h] * a[h], 0.0)
    return out / a.shape[0]


def _self_rule(cams, n):
    """R = I; R ← R + Ā R for every layer (eq. 6)."""
    r = np.eye(n)
    for cam in cams:
        r = r + cam @ r
    return r


def _zero(t):
    return t.numel() == 0 or t.abs().max().item() == 0


@pytest.fixture(scope="module")
def minilm_grads(minilm):
    """An independent capture of MiniLM with d y / dA for the hand-written default target."""
    model, _, batch = minilm
    with capture(model, grads=True) as att:
        out = model(**batch)
        y = _mean_pool_norm(out.last_hidden_state, batch["attention_mask"])
        y.sum().backward()
    model.zero_grad(set_to_none=True)
    return att, y.detach()


@pytest.fixture(scope="module")
def minilm_relevance(minilm):
    model, _, batch = minilm
    return generic_relevance(model, batch)


def test_minilm_update_rule_by_explicit_loops(minilm, minilm_grads, minilm_relevance):
    _, _, batch = minilm
    att, y = minilm_grads
    rel = minilm_relevance
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(rel.target, y, rtol=1e-5, atol=1e-6)  # the default target is the documented one
    assert rel.calls == [("tokens", "tokens")] * 6 and rel.position.tolist() == [0, 0]
    r = rel.matrix("tokens", "tokens")
    assert r.shape == (2, mask.shape[1], mask.shape[1]) and r.dtype == torch.float64
    from_capture = generic_relevance_from(att).matrix("tokens", "tokens")  # the same rules on our own capture
    for b in range(2):
        n = int(mask[b].sum())
        cams = [_by_hand_cam(a[b, :, :n, :n], g[b, :, :n, :n]) for a, g in zip(att.layers, att.grads)]
        expected = _self_rule(cams, n)
        np.testing.assert_allclose(r[b, :n, :n].numpy(), expected, rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(from_capture[b, :n, :n].numpy(), expected, rtol=1e-9, atol=1e-12)
        assert _zero(from_capture[b, n:]) and _zero(from_capture[b, :, n:])
        row = expected[0].copy()
        row[0] -= 1.0  # the [CLS] row without the identity
        np.testing.assert_allclose(rel.scores[b, :n].numpy(), row, rtol=1e-4, atol=1e-9)
        assert (rel.scores[b, :n] >= 0).all() and rel.scores[b, :n].sum() > 0
        # padded tokens: no row, no column, zero score
        assert _zero(r[b, n:]) and _zero(r[b, :, n:]) and _zero(rel.scores[b, n:])
    assert mask[0].sum() < mask.shape[1]  # sequence 0 really has padding


def test_gradients_paired_with_the_attention_of_the_same_layer(minilm_grads, minilm_relevance):
    """Regression: Ā of layer l uses ∇A of layer l; a pairing shifted by one layer gives other maps and R."""
    att, _ = minilm_grads
    rel = minilm_relevance
    assert rel.names == att.names
    for layer, name in enumerate(rel.names):
        assert f"encoder.layer.{layer}." in name
    b, n = 1, int(att.attention_mask[1].sum())
    shifted = []
    for layer in range(6):
        own = _by_hand_cam(att.layers[layer][b], att.grads[layer][b])
        np.testing.assert_allclose(rel.cams[layer][b].numpy(), own, rtol=1e-4, atol=1e-10)
        other = _by_hand_cam(att.layers[layer][b], att.grads[(layer + 1) % 6][b])
        assert not np.allclose(rel.cams[layer][b].numpy(), other, rtol=1e-2, atol=1e-8)
        shifted.append(other[:n, :n])
    assert not np.allclose(rel.matrix("tokens", "tokens")[b, :n, :n].numpy(), _self_rule(shifted, n), rtol=1e-3, atol=1e-7)


def _perturbing_attention(where, eps):
    """Eager attention (float64) that adds eps to one probability of one module: where = (module, b, h, i, j)."""

    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        scores = query @ key.transpose(2, 3) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, :, : key.shape[-2]]
        probs = torch.softmax(scores, dim=-1)
        if module is where[0]:
            probs = probs.clone()
            probs[where[1:]] += eps
        return (probs @ value).transpose(1, 2).contiguous(), probs

    return forward


@pytest.mark.parametrize("layer,b,h,i,j", [(3, 0, 2, 0, 2), (1, 1, 7, 4, 9)])
def test_gradient_against_finite_difference(minilm, layer, b, h, i, j):
    """d y / dA from the capture equals a central difference of y through a perturbed forward pass."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    model, _, batch = minilm
    m64 = copy.deepcopy(model).double()
    with capture(m64, grads=True) as att:
        out = m64(**batch)
        _mean_pool_norm(out.last_hidden_state, batch["attention_mask"]).sum().backward()
    assert att.names[layer] == f"encoder.layer.{layer}.attention.self"
    grad = att.grads[layer][b, h, i, j].item()
    module = m64.get_submodule(att.names[layer])
    values = []
    for eps in (1e-5, -1e-5):
        impl = f"attnlab_test_perturb_{'p' if eps > 0 else 'm'}"
        AttentionInterface.register(impl, _perturbing_attention((module, b, h, i, j), eps))
        AttentionMaskInterface.register(impl, eager_mask)
        m64.set_attn_implementation(impl)
        with torch.no_grad():
            hidden = m64(**batch).last_hidden_state
        values.append(_mean_pool_norm(hidden, batch["attention_mask"])[b].item())
    fd = (values[0] - values[1]) / 2e-5
    assert abs(grad) > 1e-6
    assert grad == pytest.approx(fd, rel=1e-4, abs=1e-9)


def test_hand_checked_encoder_decoder_rules():
    """Two source tokens, one target token; every number below worked out by hand."""
    enc = torch.tensor([[[0.5, 0.0], [0.25, 0.25]]], dtype=torch.float64)  # Ā of the encoder self-attention
    dec = torch.tensor([[[0.5]]], dtype=torch.float64)  # decoder self-attention
    cross = torch.tensor([[[0.2, 0.4]]], dtype=torch.float64)  # decoder queries, encoder keys
    masks = {"encoder": torch.tensor([[True, True]]), "decoder": torch.tensor([[True]])}
    calls = [("encoder", "encoder"), ("decoder", "decoder"), ("decoder", "encoder")]
    r = propagate_relevance([enc, dec, cross], calls, masks)
    # R_ee = I + Ā_e; R_dd = 1 + 0.5; R_de: R̄_dd = 0.5/0.5 + 1 = 2, R̄_ee = [[1, 0], [.5, .5]] + I,
    # R_de = 2 · [0.2, 0.4] · [[2, 0], [0.5, 1.5]] = 2 · [0.6, 0.6]
    np.testing.assert_allclose(r[("encoder", "encoder")][0].numpy(), [[1.5, 0.0], [0.25, 1.25]])
    np.testing.assert_allclose(r[("decoder", "decoder")][0].numpy(), [[1.5]])
    np.testing.assert_allclose(r[("decoder", "encoder")][0].numpy(), [[1.2, 1.2]])
    assert _zero(r[("encoder", "decoder")])
    # rule 11 with a non-zero R^{qs}: a second cross call on a bi-modal state where keys saw queries
    r2 = propagate_relevance([cross], [("decoder", "encoder")], masks)
    np.testing.assert_allclose(r2[("decoder", "encoder")][0].numpy(), [[0.2, 0.4]])  # R̄ = I on both sides
    # a padded source token takes no relevance even when Ā gives it weight
    pad = {"encoder": torch.tensor([[True, False]]), "decoder": torch.tensor([[True]])}
    r3 = propagate_relevance([enc, dec, cross], calls, pad)
    np.testing.assert_allclose(r3[("encoder", "encoder")][0].numpy(), [[1.5, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(r3[("decoder", "encoder")][0].numpy(), [[2 * 0.2 * 2, 0.0]])


def _tiny_bart():
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=40, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return BartForConditionalGeneration(config).eval()


def test_encoder_decoder_cross_attention_by_explicit_products():
    model = _tiny_bart()
    ids = torch.tensor([[0, 5, 6, 7, 8, 2], [0, 9, 10, 2, 1, 1]])
    dec = torch.tensor([[2, 0, 5, 6], [2, 0, 9, 1]])
    inputs = {"input_ids": ids, "attention_mask": (ids != 1).long(), "decoder_input_ids": dec,
              "decoder_attention_mask": (dec != 1).long()}
    rel = generic_relevance(model, inputs)
    assert rel.calls == [("encoder", "encoder")] * 2 + [("decoder", "decoder"), ("decoder", "encoder")] * 2
    assert rel.output == "decoder" and rel.input == "encoder" and rel.position.tolist() == [3, 2]
    assert rel.matrix("encoder", "encoder").shape == (2, 6, 6)
    assert rel.matrix("decoder", "decoder").shape == (2, 4, 4)
    assert rel.matrix("decoder", "encoder").shape == (2, 4, 6) and rel.scores.shape == (2, 6)
    # independent capture: y = logit of the predicted token at the last real decoder position
    with capture(model, grads=True) as att:
        logits = model(**inputs).logits
        rows = logits[torch.arange(2), torch.tensor([3, 2])]
        rows.gather(-1, rows.argmax(-1, keepdim=True)).sum().backward()
    model.zero_grad(set_to_none=True)
    for b, (ne, nd) in enumerate([(6, 4), (4, 3)]):
        cams = [_by_hand_cam(a[b], g[b]) for a, g in zip(att.layers, att.grads)]
        r_ee, r_dd, r_de = np.eye(ne), np.eye(nd), np.zeros((nd, ne))
        for cam in cams[:2]:
            r_ee = r_ee + cam[:ne, :ne] @ r_ee
        for self_cam, cross_cam in zip(cams[2::2], cams[3::2]):
            r_dd, r_de = r_dd + self_cam[:nd, :nd] @ r_dd, r_de + self_cam[:nd, :nd] @ r_de
            bars = []
            for m in (r_dd, r_ee):
                hat = m - np.eye(len(m))
                bars.append(hat / hat.sum(1, keepdims=True) + np.eye(len(m)))
            r_de = r_de + bars[0].T @ cross_cam[:nd, :ne] @ bars[1]
        np.testing.assert_allclose(rel.matrix("encoder", "encoder")[b, :ne, :ne].numpy(), r_ee, rtol=1e-4, atol=1e-12)
        np.testing.assert_allclose(rel.matrix("decoder", "decoder")[b, :nd, :nd].numpy(), r_dd, rtol=1e-4, atol=1e-12)
        np.testing.assert_allclose(rel.matrix("decoder", "encoder")[b, :nd, :ne].numpy(), r_de, rtol=1e-4, atol=1e-12)
        np.testing.assert_allclose(rel.scores[b, :ne].numpy(), r_de[nd - 1], rtol=1e-4, atol=1e-12)
        assert _zero(rel.scores[b, ne:]) and _zero(rel.matrix("decoder", "encoder")[b, nd:])
        assert _zero(rel.matrix("decoder", "encoder")[b, :, ne:])
    assert _zero(rel.matrix("encoder", "decoder"))


def test_causal_lm_last_real_token_and_padding():
    model = tiny_llama(seed=1)
    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
    inputs = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    rel = generic_relevance(model, inputs)
    assert rel.position.tolist() == [3, 5] and rel.calls == [("tokens", "tokens")] * 2
    with capture(model, grads=True) as att:
        logits = model(**inputs).logits
        rows = logits[torch.arange(2), torch.tensor([3, 5])]
        y = rows.gather(-1, rows.argmax(-1, keepdim=True)).squeeze(-1)
        y.sum().backward()
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(rel.target, y.detach())
    for b, n in enumerate([4, 6]):
        cams = [_by_hand_cam(a[b, :, :n, :n], g[b, :, :n, :n]) for a, g in zip(att.layers, att.grads)]
        expected = _self_rule(cams, n)
        assert np.allclose(np.triu(expected, 1), 0)  # causal: no relevance from later tokens
        row = expected[n - 1].copy()
        row[n - 1] -= 1.0
        np.testing.assert_allclose(rel.scores[b, :n].numpy(), row, rtol=1e-4, atol=1e-12)
        assert _zero(rel.scores[b, n:])


def test_bad_target_and_position(minilm):
    model, _, batch = minilm
    with pytest.raises(ValueError, match="target"):
        generic_relevance(model, batch, target=lambda out: out.last_hidden_state.sum())
    with pytest.raises(ValueError, match="position"):
        generic_relevance(model, batch, position=99)


# -- P111 ------------------------------------------------------------------------------------
class _OneLayer(nn.Module):
    """x -> softmax attention (attnlab, width 16, 2 heads) -> mean over real tokens -> linear head (3 classes)."""

    def __init__(self):
        super().__init__()
        self.attn = attnlab.build("softmax", dim=16, heads=2)
        self.head = nn.Linear(16, 3)

    def forward(self, x, attention_mask):
        o = self.attn(x, attention_mask=attention_mask)
        m = attention_mask.to(o.dtype)[..., None]
        return self.head((o * m).sum(1) / m.sum(1))


def _alpha_beta(x, w, r_out):
    """LRP-α1β0 through y = x wᵀ + b for one vector x: R_x[j] = Σ_i x±_j w±_ij R_i / Σ_j' (x⁺w⁺ + x⁻w⁻)_ij'."""
    r = np.zeros(len(x))
    for i in range(w.shape[0]):
        parts = np.array([x[j] * (max(w[i, j], 0) if x[j] > 0 else min(w[i, j], 0)) for j in range(len(x))])
        if parts.sum() != 0:
            r += parts * r_out[i] / parts.sum()
    return r


def _lrp_by_hand(model, x, keep, b):
    """R^(A) (heads, n, n), ∇A (heads, n, n) and input relevance (n,) of sequence b, written out in numpy."""
    at = model.attn
    wq, wk, wv, wo = (m.weight.detach().numpy() for m in (at.q_proj, at.k_proj, at.v_proj, at.out_proj))
    bq, bk, bv, bo = (m.bias.detach().numpy() for m in (at.q_proj, at.k_proj, at.v_proj, at.out_proj))
    wh, bh = model.head.weight.detach().numpy(), model.head.bias.detach().numpy()
    xs, m = x[b].detach().numpy(), keep[b].numpy()
    n, heads, hd = xs.shape[0], 2, 8
    q, k, v = xs @ wq.T + bq, xs @ wk.T + bk, xs @ wv.T + bv
    a, z = np.zeros((heads, n, n)), np.zeros((heads, n, hd))
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        s = q[:, sl] @ k[:, sl].T / np.sqrt(hd)
        s[:, ~m] = -np.inf
        e = np.exp(s - s.max(1, keepdims=True))
        a[h] = e / e.sum(1, keepdims=True)
        z[h] = a[h] @ v[:, sl]
    zm = np.concatenate([z[h] for h in range(heads)], axis=1)  # (n, heads·hd)
    o = zm @ wo.T + bo
    count = m.sum()
    p = (o * m[:, None]).sum(0) / count
    logits = p @ wh.T + bh
    c = int(np.argmax(logits))
    r_logit = np.zeros(3)
    r_logit[c] = 1.0
    r_p = _alpha_beta(p, wh, r_logit)
    r_o = np.array([[m[t] * o[t, d] / count * r_p[d] / p[d] for d in range(16)] for t in range(n)])
    r_zm = np.array([_alpha_beta(zm[t], wo, r_o[t]) for t in range(n)])
    r_a = np.zeros((heads, n, n))
    for h in range(heads):
        for i in range(n):
            for j in range(n):
                for e in range(hd):
                    col = h * hd + e
                    if z[h, i, e] != 0:
                        r_a[h, i, j] += 0.5 * a[h, i, j] * v[j, col] * r_zm[i, col] / z[h, i, e]
    dy_do = np.array([m[t] / count * wh[c] for t in range(n)])  # (n, 16)
    dy_dzm = dy_do @ wo
    grad_a = np.zeros((heads, n, n))
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        grad_a[h] = dy_dzm[:, sl] @ v[:, sl].T
    return r_a, grad_a * m[None, :, None] * m[None, None, :]


def test_lrp_hand_checked_on_an_attnlab_layer():
    torch.manual_seed(0)
    model = _OneLayer().double().eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    keep = torch.tensor([[True, True, True, False, False], [True] * 5])
    rel = lrp_relevance(model, {"x": x, "attention_mask": keep})
    assert rel.names == ["attn"] and len(rel.attention_relevance) == 1
    for b in range(2):
        r_a, grad_a = _lrp_by_hand(model, x, keep, b)
        np.testing.assert_allclose(rel.attention_relevance[0][b].numpy(), r_a * keep[b].numpy()[None, :, None], atol=1e-10)
        cam = np.maximum(grad_a * r_a, 0).mean(0)
        np.testing.assert_allclose(rel.cams[0][b].numpy(), cam, atol=1e-12)
        c = np.diag(keep[b].double().numpy()) + cam  # C = I + Ā for one layer
        np.testing.assert_allclose(rel.matrix("tokens", "tokens")[b].numpy(), c, atol=1e-12)
        np.testing.assert_allclose(rel.scores[b].numpy(), cam[0], atol=1e-12)
        # conservation (no α1β0 denominator is 0 at this seed): all relevance reaches the input tokens
        assert rel.input_relevance[b].sum().item() == pytest.approx(1.0, abs=1e-9)
        assert _zero(rel.input_relevance[b][~keep[b]]) and _zero(rel.attention_relevance[0][b][:, ~keep[b]])


def test_lrp_minilm_rollout_by_explicit_products(minilm, minilm_grads):
    model, _, batch = minilm
    att, _ = minilm_grads
    rel = lrp_relevance(model, batch)
    mask = batch["attention_mask"].bool()
    assert rel.names == att.names and all(f"encoder.layer.{i}." in nm for i, nm in enumerate(rel.names))
    for b in range(2):
        n = int(mask[b].sum())
        cams = [_by_hand_cam(r[b, :, :n, :n], g[b, :, :n, :n]) for r, g in zip(rel.attention_relevance, att.grads)]
        c = np.eye(n)
        for cam in cams:
            c = (np.eye(n) + cam) @ c  # C = (I + Ā_6) ⋯ (I + Ā_1)
        np.testing.assert_allclose(rel.matrix("tokens", "tokens")[b, :n, :n].numpy(), c, rtol=1e-4, atol=1e-12)
        row = c[0].copy()
        row[0] -= 1.0
        np.testing.assert_allclose(rel.scores[b, :n].numpy(), row, rtol=1e-4, atol=1e-12)
        assert rel.scores[b, :n].sum() > 0
        assert _zero(rel.scores[b, n:]) and _zero(rel.input_relevance[b, n:])
        for r in rel.attention_relevance:
            assert _zero(r[b, :, n:]) and _zero(r[b, :, :, n:])
    # shifted pairing (∇A of the next layer) gives other maps
    other = _by_hand_cam(rel.attention_relevance[2][1], att.grads[3][1])
    assert not np.allclose(rel.cams[2][1].numpy(), other, rtol=1e-2, atol=1e-10)
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


def test_lrp_conserves_relevance_on_a_causal_lm():
    model = tiny_llama(seed=2).double()
    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
    rel = lrp_relevance(model, {"input_ids": ids, "attention_mask": (ids != 0).long()})
    assert rel.position.tolist() == [3, 5]
    np.testing.assert_allclose(rel.input_relevance.sum(-1).numpy(), [1.0, 1.0], atol=1e-8)
    assert _zero(rel.input_relevance[0, 4:]) and _zero(rel.scores[0, 4:])
    assert all((c[0, 4:] == 0).all() and (c[0, :, 4:] == 0).all() for c in rel.cams)


def test_lrp_refuses_cross_attention():
    model = _tiny_bart()
    ids = torch.tensor([[0, 5, 6, 2]])
    with pytest.raises(ValueError, match="self-attention only"):
        lrp_relevance(model, {"input_ids": ids, "decoder_input_ids": torch.tensor([[2, 0]])})


def test_normalised_addition_by_hand():
    """P111's skip-connection rule, per sequence: with opposite-sign z-rule shares the sums are rescaled."""
    a = torch.tensor([[4.0, 0.0], [1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[-3.0, 1.0], [1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    with _LRPMode():
        y = a + b
    (y / y.detach()).sum().backward()  # R_y = 1 everywhere
    ra, rb = (a * a.grad).detach().numpy(), (b * b.grad).detach().numpy()
    # row 0: z-rule shares a: [4, 0] (sum 4), b: [-3, 1] (sum -2), ΣR = 2 -> a keeps 4/6·2, b 2/6·2
    np.testing.assert_allclose(ra[0], [4 / 3, 0.0])
    np.testing.assert_allclose(rb[0], [1.0, -1 / 3])
    # row 1: same-sign shares stay the z-rule's: a·R/y, b·R/y
    np.testing.assert_allclose(ra[1], [0.5, 2 / 3])
    np.testing.assert_allclose(rb[1], [0.5, 1 / 3])
