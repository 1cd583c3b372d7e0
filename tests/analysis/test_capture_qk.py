"""capture(model, qk=True): per-head queries and keys of MiniLM, a padded tiny Llama and attnlab modules."""
import pytest
import torch
from torch import nn

import attnlab
from attnlab.analysis import capture, tiny_llama


def _softmax_rows(q, k, scale, allowed):
    """softmax over the allowed keys of q·k·scale, by an explicit loop over (batch, head, query)."""
    b, h, n_q, _ = q.shape
    out = torch.zeros(b, h, n_q, k.shape[2], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(n_q):
                keys = [j for j in range(k.shape[2]) if allowed[bi][i][j]]
                if not keys:
                    continue
                s = torch.stack([q[bi, hi, i].double() @ k[bi, hi, j].double() * scale for j in keys])
                out[bi, hi, i, keys] = torch.softmax(s, 0)
    return out


def test_minilm_queries_and_keys_remake_the_attention(minilm):
    model, _, batch = minilm
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
        with capture(model, qk=True) as att:
            model(**batch)
    real = batch["attention_mask"].bool()
    assert len(att.queries) == 6 and att.queries[0].shape == (2, 12, real.shape[1], 32)
    for layer in (0, 3):
        self_att = model.encoder.layer[layer].attention.self
        q_lin = self_att.query(hidden[layer]).view(2, -1, 12, 32).transpose(1, 2)
        k_lin = self_att.key(hidden[layer]).view(2, -1, 12, 32).transpose(1, 2)
        rq = real[:, None, :, None]
        torch.testing.assert_close(att.queries[layer], q_lin * rq, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(att.keys[layer], k_lin * rq, rtol=1e-5, atol=1e-5)
        assert att.records[layer].scale == pytest.approx(32**-0.5)
        allowed = [[[bool(real[b, i] and real[b, j]) for j in range(real.shape[1])] for i in range(real.shape[1])] for b in range(2)]
        remade = _softmax_rows(att.queries[layer], att.keys[layer], att.records[layer].scale, allowed)
        torch.testing.assert_close(att.layers[layer].double(), remade, rtol=0, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_tiny_llama_rope_gqa_queries_and_keys_remake_the_attention(side):
    model = tiny_llama(4)  # 4 query heads, 2 key/value heads, RoPE
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 8, dtype=torch.long)
    if side == "left":
        mask[0, :3] = 0
    else:
        mask[0, 5:] = 0
    with torch.no_grad(), capture(model, qk=True) as att:
        model(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    for layer in range(2):
        q, k = att.queries[layer], att.keys[layer]
        assert q.shape == (2, 4, 8, 8) and k.shape == (2, 4, 8, 8)
        torch.testing.assert_close(k[:, 0], k[:, 1], rtol=0, atol=0)  # heads 0 and 1 share key/value head 0
        assert not torch.allclose(k[:, 1], k[:, 2])
        assert q[0][:, ~real[0]].abs().max() == 0 and k[0][:, ~real[0]].abs().max() == 0
        allowed = [[[bool(real[b, i] and real[b, j] and j <= i) for j in range(8)] for i in range(8)] for b in range(2)]
        remade = _softmax_rows(q, k, att.records[layer].scale, allowed)
        torch.testing.assert_close(att.layers[layer].double(), remade, rtol=0, atol=1e-5)


class _Padded(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x, kpm):
        x = x + self.a(x, attention_mask=kpm)
        return x + self.b(x, attention_mask=kpm)


def test_attnlab_modules_record_their_projections():
    torch.manual_seed(3)
    first = attnlab.build("softmax", dim=16, heads=2)
    second = attnlab.build("softmax", dim=16, heads=2, causal=True)
    model = _Padded(first, second).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    kpm = torch.tensor([[True, True, True, False, False], [True] * 5])
    with torch.no_grad():
        with capture(model, qk=True) as att:
            model(x, kpm)
        h = x + first(x, attention_mask=kpm)
    inputs = (x, h)
    for layer, (module, causal) in enumerate(((first, False), (second, True))):
        w_q = module.q_proj.weight.view(2, 8, 16)
        w_k = module.k_proj.weight.view(2, 8, 16)
        q = torch.einsum("bnd,hed->bhne", inputs[layer], w_q) + module.q_proj.bias.view(1, 2, 1, 8)
        k = torch.einsum("bnd,hed->bhne", inputs[layer], w_k) + module.k_proj.bias.view(1, 2, 1, 8)
        torch.testing.assert_close(att.records[layer].query, q)
        torch.testing.assert_close(att.records[layer].key, k)
        assert att.keys[layer][0, :, 3:].abs().max() == 0  # padded keys zeroed in the masked view
        assert att.records[layer].scale == pytest.approx(8**-0.5)
        allowed = [[[bool(kpm[b, j]) and (j <= i or not causal) for j in range(5)] for i in range(5)] for b in range(2)]
        remade = _softmax_rows(att.queries[layer], att.keys[layer], att.records[layer].scale, allowed)
        torch.testing.assert_close(att.layers[layer], remade * kpm[:, None, :, None], rtol=0, atol=1e-10)


def test_queries_need_a_capture_with_qk():
    model = tiny_llama(0, layers=1)
    with torch.no_grad(), capture(model) as att:
        model(input_ids=torch.tensor([[3, 4, 5]]))
    assert att.records[0].query is None
    with pytest.raises(ValueError, match="qk=True"):
        _ = att.queries
    with pytest.raises(ValueError, match="qk=True"):
        _ = att.keys
    assert att.select("layers").qk_requested is False
