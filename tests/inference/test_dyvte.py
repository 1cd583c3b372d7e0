"""DyVTE (P231): the exit mechanics — visual tokens dropped exactly after the exit layer, nothing changed without one."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import attnlab
from attnlab.inference.dyvte import ExitRouter, VisualTokenExit, block_flops, compute_saved

N_VISUAL, N_TEXT, DIM = 6, 3, 16


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.attn = attnlab.build("softmax", dim=DIM, heads=2, causal=True)
        self.mlp = nn.Linear(DIM, DIM)

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + torch.tanh(self.mlp(x))


def make_stack(layers=4):
    torch.manual_seed(0)
    return VisualTokenExit([Block() for _ in range(layers)], DIM).double()


def manual(stack, x, exit_layer):
    """Blocks 0..exit_layer on every token, then the text tokens alone; the final text states."""
    for i, block in enumerate(stack.blocks):
        x = block(x)
        if i == exit_layer:
            x = x[:, N_VISUAL:]
    return x if exit_layer >= 0 else x[:, N_VISUAL:]


def test_no_exit_is_the_plain_model():
    stack = make_stack()
    x = torch.randn(3, N_VISUAL + N_TEXT, DIM, dtype=torch.float64)
    out, exits = stack(x, N_VISUAL, torch.full((3,), -1))
    plain = x
    for block in stack.blocks:
        plain = block(plain)
    assert torch.equal(out, plain[:, N_VISUAL:]) and exits.tolist() == [-1, -1, -1]
    # routers that never fire give the same
    for router in stack.routers:
        nn.init.zeros_(router.net[2].weight)
        router.net[2].bias.data = torch.tensor([1.0, 0.0], dtype=torch.float64)
    out, exits = stack(x, N_VISUAL)
    assert torch.equal(out, plain[:, N_VISUAL:]) and exits.tolist() == [-1, -1, -1]


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_tokens_dropped_exactly_after_the_exit_layer(layer):
    stack = make_stack()
    x = torch.randn(2, N_VISUAL + N_TEXT, DIM, dtype=torch.float64)
    out, _ = stack(x, N_VISUAL, torch.full((2,), layer))
    torch.testing.assert_close(out, manual(stack, x, layer), atol=0, rtol=0)
    _, seen = stack.run(x, N_VISUAL, layer)
    assert seen == [N_VISUAL + N_TEXT] * (layer + 1) + [N_TEXT] * (stack.layers - layer - 1)
    # the visual tokens did matter after that layer in the full model: exiting changes the output
    assert not torch.allclose(out, manual(stack, x, -1))


def test_mixed_exits_in_one_batch():
    stack = make_stack()
    x = torch.randn(4, N_VISUAL + N_TEXT, DIM, dtype=torch.float64)
    exits = torch.tensor([2, -1, 0, 2])
    out, _ = stack(x, N_VISUAL, exits)
    for b, e in enumerate(exits.tolist()):
        torch.testing.assert_close(out[b : b + 1], manual(stack, x[b : b + 1], e), atol=1e-14, rtol=0)


def test_router_reads_mean_and_last_text_state_and_fires_on_logit_1():
    torch.manual_seed(1)
    router = ExitRouter(DIM, hidden=5).double()
    text = torch.randn(3, N_TEXT, DIM, dtype=torch.float64)
    w1, b1, w2, b2 = router.net[0].weight, router.net[0].bias, router.net[2].weight, router.net[2].bias
    z = torch.cat([text.sum(1) / N_TEXT, text[:, N_TEXT - 1]], -1)
    hidden = 0.5 * (z @ w1.T + b1) * (1 + torch.erf((z @ w1.T + b1) / 2**0.5))
    torch.testing.assert_close(router(text), hidden @ w2.T + b2)
    # the stack exits at the first layer whose router says 1
    stack = make_stack()
    for i, r in enumerate(stack.routers):
        nn.init.zeros_(r.net[2].weight)
        r.net[2].bias.data = torch.tensor([0.0, 1.0] if i >= 1 else [1.0, 0.0], dtype=torch.float64)
    x = torch.randn(2, N_VISUAL + N_TEXT, DIM, dtype=torch.float64)
    out, exits = stack(x, N_VISUAL)
    assert exits.tolist() == [1, 1]
    torch.testing.assert_close(out, manual(stack, x, 1), atol=0, rtol=0)


def test_compute_saved():
    n = N_VISUAL + N_TEXT
    assert compute_saved(torch.tensor([-1, -1]), 4, N_VISUAL, N_TEXT, DIM) == 0.0
    want = 1 - (block_flops(n, DIM) + 3 * block_flops(N_TEXT, DIM)) / (4 * block_flops(n, DIM))
    assert compute_saved(torch.tensor([0]), 4, N_VISUAL, N_TEXT, DIM) == pytest.approx(want, rel=1e-12)
    assert compute_saved(torch.tensor([0, -1]), 4, N_VISUAL, N_TEXT, DIM) == pytest.approx(want / 2, rel=1e-12)
    assert block_flops(10, 8) == 4 * 10 * 64 + 2 * 100 * 8 + 8 * 10 * 64


def test_bad_inputs():
    stack = make_stack()
    x = torch.randn(2, N_VISUAL + N_TEXT, DIM, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"exit_layers: expected values in \[-1, 2\]"):
        stack(x, N_VISUAL, torch.tensor([3, 0]))
    with pytest.raises(ValueError, match="exit_layers: expected a long tensor of shape"):
        stack(x, N_VISUAL, torch.tensor([0]))
    with pytest.raises(ValueError, match="n_visual: expected an int in"):
        stack(x, N_VISUAL + N_TEXT)
    with pytest.raises(ValueError, match="blocks: expected at least 2 blocks"):
        VisualTokenExit([Block()], DIM)


def test_registered():
    spec = attnlab.get("dyvte", "inference")
    assert spec.paper.id == "P231" and spec.factory is VisualTokenExit


def test_routed_single_pass_equals_running_with_its_exit_layers():
    stack = make_stack()
    torch.manual_seed(3)
    for r in stack.routers:
        nn.init.normal_(r.net[0].weight, std=2.0)
        nn.init.normal_(r.net[2].weight, std=2.0)
    x = torch.randn(16, N_VISUAL + N_TEXT, DIM, dtype=torch.float64)
    out, exits = stack(x, N_VISUAL)
    assert len(set(exits.tolist())) >= 3  # a mixed batch: several groups leave at different layers
    torch.testing.assert_close(out, stack(x, N_VISUAL, exits)[0], atol=1e-14, rtol=0)
    # each sample's exit is the first layer whose router fires on its own full-model text states
    states = stack.trace(x)
    fires = torch.stack([r(h[:, N_VISUAL:]).argmax(-1) == 1 for r, h in zip(stack.routers, states, strict=False)], 1)
    want = [row.nonzero().min().item() if row.any() else -1 for row in fires]
    assert exits.tolist() == want
