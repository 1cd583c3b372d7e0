"""P016 Point Transformer: the paper's formula by hand on points with known neighbours, translation invariance of the
relative-position term, and agreement with point-transformer-pytorch and PyG `PointTransformerConv`."""
from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.mechanisms.sets.point_transformer import PointTransformerAttention

DIM = 8


def _module(heads: int = DIM, neighbours: int = 3, seed: int = 0) -> PointTransformerAttention:
    torch.manual_seed(seed)
    return attnlab.build("point-transformer", dim=DIM, heads=heads, neighbours=neighbours).double().eval()


def _line(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Features, and points on the x axis at 0, 1, 3, 7, 15, 31: the nearest ones of each point are known."""
    gen = torch.Generator().manual_seed(1)
    pos = torch.zeros(1, n, 3, dtype=torch.float64)
    pos[0, :, 0] = torch.tensor([2.0**i - 1 for i in range(n)])
    return torch.randn(1, n, DIM, generator=gen, dtype=torch.float64), pos


@pytest.mark.parametrize("heads", [DIM, 2])
def test_output_is_the_vector_attention_formula_over_the_nearest_points(heads: int) -> None:
    m = _module(heads=heads)
    x, pos = _line()
    y = m(x, pos)
    neighbours = {0: [0, 1, 2], 2: [2, 1, 0], 4: [4, 3, 2]}  # k = 3, itself included
    with torch.no_grad():
        for i, nearest in neighbours.items():
            deltas = [m.position_mlp(pos[0, i] - pos[0, j]) for j in nearest]
            logits = torch.stack([m.attention_mlp(m.query(x[0, i]) - m.key(x[0, j]) + d) for j, d in zip(nearest, deltas)])
            weights = torch.softmax(logits, 0).repeat_interleave(DIM // heads, -1)  # per channel, over the 3 points
            want = sum(w * (m.value(x[0, j]) + d) for w, j, d in zip(weights, nearest, deltas))
            torch.testing.assert_close(y[0, i], want, rtol=1e-12, atol=1e-12)
    a = m.materialize(x, pos)
    assert (a[0, :, 0, 3:] == 0).all() and (a[0, :, 4, :2] == 0).all() and (a[0, :, 4, 5] == 0).all()


def test_relative_term_is_translation_invariant_and_the_positions_matter() -> None:
    m = _module(neighbours=4)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 10, DIM, generator=gen, dtype=torch.float64)
    pos = torch.rand(2, 10, 3, generator=gen, dtype=torch.float64)
    shift = torch.tensor([[[5.0, -3.0, 11.0]], [[-0.5, 0.25, 2.0]]], dtype=torch.float64)
    for impl in ("fast", "reference"):
        y = m(x, pos, impl=impl)
        torch.testing.assert_close(m(x, pos + shift, impl=impl), y, rtol=1e-10, atol=1e-10)
        assert (m(x, 2 * pos, impl=impl) - y).abs().max() > 1e-3  # δ_ij = θ(p_i − p_j) does reach the output
    torch.testing.assert_close(m.materialize(x, pos + shift), m.materialize(x, pos), rtol=1e-10, atol=1e-10)


def test_equals_point_transformer_pytorch_with_mapped_weights() -> None:
    peer_module = pytest.importorskip("point_transformer_pytorch")
    m = _module(heads=DIM, neighbours=4)
    peer = peer_module.PointTransformerLayer(dim=DIM, pos_mlp_hidden_dim=64, attn_mlp_hidden_mult=4, num_neighbors=4).double()
    with torch.no_grad():
        peer.to_qkv.weight.copy_(torch.cat([m.query.weight, m.key.weight, m.value.weight]))
        peer.pos_mlp.load_state_dict(m.position_mlp.state_dict())
        peer.attn_mlp.load_state_dict(m.attention_mlp.state_dict())
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 11, DIM, generator=gen, dtype=torch.float64)
    pos = torch.randn(2, 11, 3, generator=gen, dtype=torch.float64)
    keep = torch.ones(2, 11, dtype=torch.bool)
    keep[1, 7:] = False
    torch.testing.assert_close(m(x, pos), peer(x, pos), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m(x, pos, attention_mask=keep)[keep], peer(x, pos, mask=keep)[keep], rtol=1e-10, atol=1e-10)


def test_equals_torch_geometric_point_transformer_conv_with_mapped_weights() -> None:
    pytest.importorskip("torch_geometric")
    from torch_geometric.nn import PointTransformerConv

    m = _module(heads=DIM, neighbours=5)
    peer = PointTransformerConv(DIM, DIM, pos_nn=m.position_mlp, attn_nn=m.attention_mlp, add_self_loops=True).double()
    with torch.no_grad():
        peer.lin.weight.copy_(m.value.weight)  # α
        peer.lin_src.weight.copy_(m.key.weight)  # ψ, on the source x_j
        peer.lin_dst.weight.copy_(m.query.weight)  # φ, on the target x_i
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 12, DIM, generator=gen, dtype=torch.float64)
    pos = torch.randn(1, 12, 3, generator=gen, dtype=torch.float64)
    distance = ((pos[0, :, None] - pos[0, None]) ** 2).sum(-1)
    nearest = distance.argsort(1)[:, :5]  # each row starts with the point itself
    targets = torch.arange(12).repeat_interleave(4)
    edge_index = torch.stack([nearest[:, 1:].reshape(-1), targets])  # j → i for the 4 others; PyG adds i → i
    torch.testing.assert_close(m(x, pos)[0], peer(x[0], pos[0], edge_index), rtol=1e-10, atol=1e-10)
