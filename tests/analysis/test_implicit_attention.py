"""P065 / P031: the implicit attention of linear and recurrent mechanisms goes through the same
analysis as softmax attention — capture (via `materialize`), rollout and gradient-weighted relevance.

Independent computations here: the matrices are taken from each layer's `materialize` on the
layer's own input (not from the capture), rollout is the explicit product of the residual-mixed,
head-averaged matrices, and the P035 update is written out as a loop over layers.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import attnlab
from attnlab.analysis import capture, rollout
from attnlab.analysis.relevance import generic_relevance

NAMES = ("linear", "retention", "gated-linear", "mamba")


class Stack(nn.Module):
    """Residual blocks of attnlab mechanisms, all causal, with a key padding mask."""

    def __init__(self, names: tuple[str, ...], dim: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(attnlab.build(n, dim=dim, heads=2, causal=True) for n in names)

    def forward(self, x: torch.Tensor, kpm: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x, attention_mask=kpm)
        return x


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 16, generator=gen, dtype=torch.float64)
    kpm = torch.ones(2, 7, dtype=torch.bool)
    kpm[1, 5:] = False
    return x, kpm


def _layer_inputs(model: Stack, x: torch.Tensor, kpm: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for block in model.blocks:
        out.append(x)
        x = x + block(x, attention_mask=kpm)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_capture_records_the_implicit_matrix_of_each_layer(name):
    torch.manual_seed(0)
    model = Stack((name, "linear")).double().eval()
    x, kpm = _inputs()
    with torch.no_grad():
        with capture(model) as att:
            model(x, kpm)
        inputs = _layer_inputs(model, x, kpm)
        expected = [blk.materialize(h, attention_mask=kpm) for blk, h in zip(model.blocks, inputs)]
    assert len(att) == 2
    for got, want in zip(att.layers, expected):
        keep = kpm[:, None, :, None] & kpm[:, None, None, :]
        torch.testing.assert_close(got, want * keep)
        assert got[1, :, 5:].abs().max() == 0 and got[1, :, :, 5:].abs().max() == 0
        assert torch.triu(got, diagonal=1).abs().max() == 0  # causal: nothing from the future


def test_rollout_over_linear_and_recurrent_layers_is_the_explicit_product():
    """Negative weights (mamba, retention) are clamped to 0 per head before the fusion."""
    torch.manual_seed(1)
    model = Stack(NAMES).double().eval()
    x, kpm = _inputs()
    with torch.no_grad():
        with capture(model) as att:
            model(x, kpm)
        inputs = _layer_inputs(model, x, kpm)
        mats = [blk.materialize(h, attention_mask=kpm) for blk, h in zip(model.blocks, inputs)]
    r = rollout(att)
    for b in range(2):
        n = int(kpm[b].sum())
        total = torch.eye(n, dtype=torch.float64)
        for a in mats:
            m = 0.5 * a[b, :, :n, :n].clamp(min=0).mean(0) + 0.5 * torch.eye(n, dtype=torch.float64)
            total = (m / m.sum(-1, keepdim=True)) @ total
        torch.testing.assert_close(r[b, :n, :n], total)
        assert r[b, n:].abs().sum() == 0 and r[b, :, n:].abs().sum() == 0
    assert min(float(a.min()) for a in mats) < 0  # the clamp is exercised


def test_generic_relevance_over_implicit_attention_follows_the_update_rule():
    torch.manual_seed(2)
    model = Stack(("linear", "mamba", "retention")).double().eval()
    x, kpm = _inputs()
    target = lambda out: out[:, 0].pow(2).sum(-1) + out[:, 3].sum(-1)  # noqa: E731
    rel = generic_relevance(model, {"x": x, "kpm": kpm}, target=target, position=3)
    with capture(model, grads=True) as att:
        target(model(x, kpm)).sum().backward()
    for b in range(2):
        n = int(kpm[b].sum())
        r = torch.eye(n, dtype=torch.float64)
        for a, g in zip(att.layers, att.grads):
            cam = (a[b, :, :n, :n] * g[b, :, :n, :n]).clamp(min=0).mean(0).detach()
            r = r + cam @ r
        want = r[3].clone()
        want[3] -= 1.0
        torch.testing.assert_close(rel.scores[b, :n], want)
        assert rel.scores[b, n:].abs().sum() == 0
    assert rel.scores[:, 4:].abs().max() == 0  # causal layers: later tokens are no source of token 3


def test_relevance_gradient_of_a_linear_layer_is_the_gradient_of_its_matrix():
    """d y / d A of the first (linear attention) layer, against the layer rewritten as A v."""
    torch.manual_seed(4)
    model = Stack(("linear", "retention")).double().eval()
    x, kpm = _inputs()
    with capture(model, grads=True) as att:
        model(x, kpm)[:, 2].pow(2).sum().backward()
    first = model.blocks[0]
    leaf = first.materialize(x, attention_mask=kpm).detach().requires_grad_()
    _, _, v = first.project(x)
    h = x + first.out_proj(first.merge_heads(leaf @ v))
    (h + model.blocks[1](h, attention_mask=kpm))[:, 2].pow(2).sum().backward()
    keep = kpm[:, None, :, None] & kpm[:, None, None, :]
    torch.testing.assert_close(att.grads[0], leaf.grad * keep)


def test_mamba_gradient_of_its_hidden_attention_is_the_gradient_through_the_gated_channels():
    """d y / d A of a mamba layer: A (one matrix per head) applied to every channel of the head,
    gated and projected, written out here from the layer's own parts."""
    torch.manual_seed(5)
    model = Stack(("mamba", "linear")).double().eval()
    x, kpm = _inputs()
    with capture(model, grads=True) as att:
        model(x, kpm)[:, 4].pow(2).sum().backward()
    first = model.blocks[0]
    leaf = first.materialize(x, attention_mask=kpm).detach().requires_grad_()
    with torch.no_grad():
        p = first.ssm_inputs(x, kpm)
        base = first(x, attention_mask=kpm)
    b, n, d = p.x.shape
    heads = first.heads
    y = torch.stack([(leaf[:, c // (d // heads)] @ p.x[:, :, c, None])[..., 0] for c in range(d)], dim=-1)  # (b, n, d) by channel
    path = first.out_proj(y * torch.nn.functional.silu(p.z))
    h = x + base + path - path.detach()
    (h + model.blocks[1](h, attention_mask=kpm))[:, 4].pow(2).sum().backward()
    keep = kpm[:, None, :, None] & kpm[:, None, None, :]
    torch.testing.assert_close(att.grads[0], leaf.grad * keep)


def test_grads_reach_the_matrix_of_a_grid_mechanism():
    """A 2-D mechanism takes tokens (batch, H, W, dim): its path flattens them like its matrix."""
    torch.manual_seed(6)
    layer = attnlab.build("axial", dim=16, heads=2).double().eval()
    x = torch.randn(2, 3, 4, 16, dtype=torch.float64)
    with capture(layer, grads=True) as att:
        layer(x)[:, 1, 2].pow(2).sum().backward()
    leaf = layer.materialize(x).detach().requires_grad_()
    _, _, v = layer.project(x.reshape(2, 12, 16))
    out = layer.out_proj(layer.merge_heads(leaf @ v)).reshape(2, 3, 4, 16)
    out[:, 1, 2].pow(2).sum().backward()
    torch.testing.assert_close(att.grads[0], leaf.grad)
