"""capture: transformers models (MiniLM, a tiny Llama with left/right padding) and attnlab modules."""
import pytest
import torch
from torch import nn

import attnlab
from attnlab.analysis import capture, tiny_llama
from attnlab.analysis.capture import IMPLEMENTATION


def _real_block(t, mask):
    keep = mask[:, None, :, None] & mask[:, None, None, :]
    return t * keep


def test_minilm_matches_eager_attentions_on_real_tokens(minilm_capture):
    att, eager, mask = minilm_capture
    assert len(att) == 6 and att.num_heads == 12
    assert att.names[0] == "encoder.layer.0.attention.self"
    assert torch.equal(att.attention_mask, mask)
    for a, e in zip(att.layers, eager):
        torch.testing.assert_close(a, _real_block(e, mask), rtol=0, atol=1e-6)
        # padded queries and keys carry no mass, real rows sum to 1
        pad = ~mask
        assert a[0][:, pad[0]].abs().max() == 0 and a[0][:, :, pad[0]].abs().max() == 0
        rows = a.sum(-1)[mask[:, None, :].expand(-1, a.shape[1], -1)]
        torch.testing.assert_close(rows, torch.ones_like(rows), rtol=0, atol=1e-5)


def test_minilm_sequence_crop_and_stack(minilm_capture):
    att, eager, mask = minilm_capture
    n0 = int(mask[0].sum())
    crop = att.sequence(0)
    assert crop[2].shape == (12, n0, n0)
    torch.testing.assert_close(crop[2], eager[2][0, :, :n0, :n0], rtol=0, atol=1e-6)
    assert att.stack().shape == (6, 2, 12, mask.shape[1], mask.shape[1])
    assert att.select(r"layer\.5\.").names == ["encoder.layer.5.attention.self"]


def test_implementation_restored_also_after_an_error(minilm):
    model, _, batch = minilm
    before = model.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model):
            assert model.config._attn_implementation == IMPLEMENTATION
            raise RuntimeError("boom")
    assert model.config._attn_implementation == before


def test_the_mask_builder_is_registered_with_the_implementation(minilm_capture):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    # without it transformers builds no padding mask for an unknown implementation
    assert IMPLEMENTATION in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


@pytest.mark.parametrize("side", ["left", "right"])
def test_tiny_llama_padding_matches_eager(side):
    model = tiny_llama(3)
    torch.manual_seed(0)
    ids = torch.randint(3, 64, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    if side == "left":
        mask[0, :4] = 0
    else:
        mask[0, 5:] = 0
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        with capture(model) as att:
            model(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    assert len(att) == 2 and att.layers[0].shape == (2, 4, 9, 9)
    assert torch.equal(att.attention_mask, real) and torch.equal(att.tokens, ids)
    for a, e in zip(att.layers, eager):
        torch.testing.assert_close(a, _real_block(e, real), rtol=0, atol=1e-6)
        assert a[0][:, ~real[0]].abs().max() == 0 and a[0][:, :, ~real[0]].abs().max() == 0
        assert torch.triu(a, 1).abs().max() == 0  # causal


def test_tiny_llama_grads_paired_with_their_layer():
    """Regression: gradient of layer l is d loss / d A_l of the same layer (eager run with retain_grad)."""
    model = tiny_llama(5, layers=3)
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0
    out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    for a in out.attentions:
        a.retain_grad()
    out.logits[:, -1, 5].sum().backward()
    with capture(model, grads=True) as att:
        model(input_ids=ids, attention_mask=mask).logits[:, -1, 5].sum().backward()
    real = mask.bool()
    assert len(att.grads) == 3
    for g, e in zip(att.grads, out.attentions):
        torch.testing.assert_close(g, _real_block(e.grad, real), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(att.grads[0], att.grads[1])


def test_grads_need_a_capture_with_grads():
    model = tiny_llama(0, layers=1)
    with capture(model) as att:
        model(input_ids=torch.tensor([[3, 4, 5]]))
    with pytest.raises(ValueError, match="grads=True"):
        _ = att.grads


class _Padded(nn.Module):
    """Two attnlab layers applied with a key padding mask."""

    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x, kpm):
        x = x + self.a(x, attention_mask=kpm)
        return x + self.b(x, attention_mask=kpm)


def test_attnlab_sequential_equals_materialize():
    torch.manual_seed(0)
    model = nn.Sequential(attnlab.build("softmax", dim=16, heads=2), attnlab.build("alibi", dim=16, heads=2, causal=True))
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        with capture(model) as att:
            model(x)
        first = model[0].materialize(x)
        second = model[1].materialize(model[0](x))
    assert att.names == ["0", "1"]
    torch.testing.assert_close(att.layers[0], first)
    torch.testing.assert_close(att.layers[1], second)


def test_attnlab_padding_and_grads():
    torch.manual_seed(1)
    model = _Padded(attnlab.build("softmax", dim=16, heads=2), attnlab.build("softmax", dim=16, heads=2))
    x = torch.randn(2, 5, 16)
    kpm = torch.tensor([[True, True, True, False, False], [True] * 5])
    plain = model(x, kpm)
    with capture(model, grads=True) as att:
        y = model(x, kpm)
        (y[:, :3] ** 2).sum().backward()
    torch.testing.assert_close(y, plain)  # the gradient path leaves the output unchanged
    a0 = att.layers[0].detach()
    assert a0[0, :, 3:].abs().max() == 0 and a0[0, :, :, 3:].abs().max() == 0
    # independent gradient of the first layer's matrix: out = out_proj(merge(A v)), A a leaf
    layer = model.a
    leaf = layer.materialize(x, attention_mask=kpm).detach().requires_grad_()
    _, _, v = layer.project(x)
    h = x + layer.out_proj(layer.merge_heads(leaf @ v))
    h2 = h + model.b(h, attention_mask=kpm)
    (h2[:, :3] ** 2).sum().backward()
    keep = kpm[:, None, :, None] & kpm[:, None, None, :]
    torch.testing.assert_close(att.grads[0], leaf.grad * keep, rtol=1e-4, atol=1e-6)



def test_decoupled_attention_maps_come_from_its_embeddings():
    """decoupled-attention's q, k come from its forward's `embeddings`: capture must hand them to materialize."""
    from attnlab.mechanisms.mixers.deconstructed_attention import InterleavedStack

    torch.manual_seed(2)
    model = InterleavedStack("decoupled-attention", dim=16, heads=2, layers=2, softmax_every=0)
    x = torch.randn(2, 5, 16)
    real = torch.tensor([[True, True, True, False, False], [True] * 5])
    with torch.no_grad():
        with capture(model, qk=True) as att:
            model(x, attention_mask=real)
        h = x + model.mixers[0](model.norms1[0](x), attention_mask=real, embeddings=model.norms1[0](x))
        h = h + model.mlps[0](model.norms2[0](h))
        layer, e = model.mixers[1], model.norms1[1](x)  # layer 1: x = LN(h) differs from its embeddings LN(x)
        own = layer.materialize(model.norms1[1](h), embeddings=e, attention_mask=real)
        # the formula in float64: softmax((W_q e)(W_k e)ᵀ/√d) over the real keys, padded rows and columns 0
        q = layer.split_heads(layer.q_proj(e)).double()
        k = layer.split_heads(layer.k_proj(e)).double()
        scores = (q @ k.transpose(-1, -2) / layer.head_dim**0.5).masked_fill(~real[:, None, None, :], -torch.inf)
        keep = real[:, None, :, None] & real[:, None, None, :]
        formula = scores.softmax(-1) * keep
        without = layer.materialize(model.norms1[1](h), attention_mask=real)  # q, k from x instead
    assert att.names == ["mixers.0", "mixers.1"]
    torch.testing.assert_close(att.layers[1], own * keep, rtol=0, atol=1e-6)
    torch.testing.assert_close(att.layers[1].double(), formula, rtol=0, atol=1e-5)
    assert (att.layers[1] - without * keep).abs().max() > 1e-2  # the test can tell the two apart
    # capture(qk=True) records the queries and keys the scores came from: those of the embeddings
    torch.testing.assert_close(att.queries[1].double(), q * real[:, None, :, None], rtol=0, atol=1e-6)
    torch.testing.assert_close(att.keys[1].double(), k * real[:, None, :, None], rtol=0, atol=1e-6)


def test_nothing_to_capture_is_an_error():
    with pytest.raises(TypeError, match="nothing to capture"):
        with capture(nn.Linear(3, 3)):
            pass
