"""BoTNet MHSA (P106): the content-position logits by hand, smaller grids, and timm's BottleneckAttn as a peer."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.mechanisms.positional.botnet import botnet_attention, botnet_attention_reference


def _heads(rows: int, cols: int, seed: int = 0, heads: int = 2, d: int = 4) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, heads, rows, cols, d, generator=gen, dtype=torch.float64) for _ in range(3))


def test_content_position_logits_by_hand() -> None:
    """On a 2 × 2 grid with k = 0 (only position logits): the logit of query (0, 1) for key (1, 0) is
    s·q·(R^H[+1] + R^W[−1]), each table indexed by offset + max − 1, written out entry by entry."""
    q, _, v = _heads(2, 2)
    k = torch.zeros_like(q)
    gen = torch.Generator().manual_seed(5)
    rel_rows = torch.randn(5, 4, generator=gen, dtype=torch.float64)  # max 3 rows: offsets −2…2, centre 2
    rel_cols = torch.randn(3, 4, generator=gen, dtype=torch.float64)  # max 2 columns: offsets −1…1, centre 1
    s = 1 / math.sqrt(4)
    logits = torch.empty(2, 4, 4, dtype=torch.float64)
    cells = [(0, 0), (0, 1), (1, 0), (1, 1)]
    for h in range(2):
        for i, (xi, yi) in enumerate(cells):
            for j, (xj, yj) in enumerate(cells):
                logits[h, i, j] = s * q[0, h, xi, yi] @ (rel_rows[2 + xj - xi] + rel_cols[1 + yj - yi])
    # query (0, 1) is raster index 1, key (1, 0) index 2: offsets (+1, −1)
    torch.testing.assert_close(logits[0, 1, 2], s * q[0, 0, 0, 1] @ (rel_rows[3] + rel_cols[0]))
    want = torch.softmax(logits, -1)
    for fn in (botnet_attention, lambda *a, **kw: botnet_attention_reference(*a, **kw)[0]):
        out = fn(q, k, v, rel_rows=rel_rows, rel_cols=rel_cols)
        torch.testing.assert_close(out.reshape(2, 4, 4), want @ v[0].reshape(2, 4, 4))
    weights = botnet_attention_reference(q, k, v, rel_rows=rel_rows, rel_cols=rel_cols)[1]
    torch.testing.assert_close(weights[0], want)
    unscaled = botnet_attention(q, k, v, rel_rows=rel_rows, rel_cols=rel_cols, scale_position_logits=False)
    torch.testing.assert_close(unscaled.reshape(2, 4, 4), torch.softmax(logits / s, -1) @ v[0].reshape(2, 4, 4))


def test_content_and_position_logits_add() -> None:
    """With the tables zero the weights are the content softmax; with them, the log-weights move by s·q·r per pair."""
    q, k, v = _heads(3, 2, seed=2)
    zeros_r, zeros_c = torch.zeros(5, 4, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64)
    plain = torch.softmax(torch.einsum("bhid,bhjd->bhij", q.reshape(1, 2, 6, 4), k.reshape(1, 2, 6, 4)) / 2, -1)
    torch.testing.assert_close(botnet_attention_reference(q, k, v, rel_rows=zeros_r, rel_cols=zeros_c)[1], plain)
    rel_rows = torch.randn(5, 4, dtype=torch.float64)
    w = botnet_attention_reference(q, k, v, rel_rows=rel_rows, rel_cols=zeros_c)[1]
    shift = (w.log() - plain.log())
    # query 0 at (0, 0): key j at row j // 2 gets s·q_0·R^H[row_j] (+ a per-row constant)
    want = torch.stack([q[0, :, 0, 0] @ rel_rows[2 + j // 2] / 2 for j in range(6)], -1)
    torch.testing.assert_close(shift[0, :, 0] - shift[0, :, 0, :1], want - want[:, :1])


def test_smaller_grid_uses_the_central_offsets() -> None:
    """A 2 × 3 grid in a module built for (4, 5) equals a module built for (2, 3) holding the central table rows."""
    big = attnlab.build("botnet", dim=8, heads=2, max_grid=(4, 5)).double()
    small = attnlab.build("botnet", dim=8, heads=2, max_grid=(2, 3)).double()
    state = dict(big.state_dict())
    state["rel_rows"], state["rel_cols"] = big.rel_rows[2:5], big.rel_cols[2:7]
    small.load_state_dict(state)
    x = torch.randn(2, 2, 3, 8, dtype=torch.float64)
    torch.testing.assert_close(big(x), small(x))
    with pytest.raises(ValueError, match="rel_rows: holds offsets up to ±1"):
        small(torch.randn(1, 3, 3, 8, dtype=torch.float64))


@pytest.mark.parametrize("scale_pos", [True, False])
def test_peer_timm_bottleneck_attn(scale_pos: bool) -> None:
    """timm's BottleneckAttn (feat_size = max_grid, qkv conv split into q, k, v; no output projection: W_o = I)."""
    bottleneck = pytest.importorskip("timm.layers.bottleneck_attn")
    torch.manual_seed(0)
    dim, heads, grid = 16, 2, (4, 5)
    peer = bottleneck.BottleneckAttn(dim, feat_size=grid, num_heads=heads, qkv_bias=True,
                                     scale_pos_embed=scale_pos).double().eval()
    with torch.no_grad():
        peer.pos_embed.height_rel.normal_()
        peer.pos_embed.width_rel.normal_()
    ours = attnlab.build("botnet", dim=dim, heads=heads, max_grid=grid, scale_position_logits=scale_pos).double()
    weight, bias = peer.qkv.weight[:, :, 0, 0], peer.qkv.bias
    with torch.no_grad():
        for i, proj in enumerate((ours.q_proj, ours.k_proj, ours.v_proj)):
            proj.weight.copy_(weight[i * dim : (i + 1) * dim])
            proj.bias.copy_(bias[i * dim : (i + 1) * dim])
        ours.out_proj.weight.copy_(torch.eye(dim))
        ours.out_proj.bias.zero_()
        ours.rel_rows.copy_(peer.pos_embed.height_rel)
        ours.rel_cols.copy_(peer.pos_embed.width_rel)
    x = torch.randn(2, dim, *grid, dtype=torch.float64)
    want = peer(x).permute(0, 2, 3, 1)
    tokens = x.permute(0, 2, 3, 1)
    torch.testing.assert_close(ours(tokens), want, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(ours(tokens, impl="reference"), want, atol=1e-10, rtol=1e-8)
