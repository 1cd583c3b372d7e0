"""P171 SuperGAT: the four attention forms by hand, no message along a non-edge for every form, the edge loss by hand
and its negative sampling, and agreement with PyG `SuperGATConv` (MX, SD) including its edge loss."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnlab
from attnlab.mechanisms.graphs.supergat import SuperGATAttention, sample_negative_edges

DIM, HEADS = 8, 2
FORMS = ("GO", "DP", "SD", "MX")
# node 0 receives from 1 and 2; node 1 from 2; node 2 from 3; node 3 from 0; node 4 sends to 0; node 5 is isolated
EDGES = torch.tensor([[1, 2, 2, 3, 0, 4], [0, 0, 1, 2, 3, 0]])


def _module(form: str, seed: int = 0, **kw: object) -> SuperGATAttention:
    torch.manual_seed(seed)
    m = attnlab.build("supergat", dim=DIM, heads=HEADS, attention_form=form, **kw).double().eval()
    with torch.no_grad():
        m.bias.normal_()  # a non-zero bias, so that mapping it is tested
    return m


def _nodes(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _logit(m: SuperGATAttention, h: torch.Tensor, i: int, j: int, head: int) -> torch.Tensor:
    """e_ij of the paper's forms, written out for one pair and head."""
    hi, hj = h[i, head], h[j, head]
    dot = hi @ hj
    if m.attention_form == "DP":
        return dot
    if m.attention_form == "SD":
        return dot / math.sqrt(DIM // HEADS)
    original = m.att_target[head] @ hi + m.att_source[head] @ hj
    return original if m.attention_form == "GO" else original * torch.sigmoid(dot)


@pytest.mark.parametrize("form", FORMS)
def test_node_output_is_the_softmax_of_the_form_over_its_in_edges_and_itself(form: str) -> None:
    m = _module(form)
    x = _nodes()
    y, a = m(x, EDGES), m.materialize(x, EDGES)
    with torch.no_grad():
        h = m.linear(x).view(6, HEADS, DIM // HEADS)
        for head in range(HEADS):
            senders = [1, 2, 4, 0]  # node 0's in-edges, then its self-loop
            logits = torch.stack([F.leaky_relu(_logit(m, h, 0, j, head), 0.2) for j in senders])
            alpha = torch.softmax(logits, 0)
            torch.testing.assert_close(a[head, 0, senders], alpha, rtol=1e-12, atol=1e-12)
            want = sum(w * h[j, head] for w, j in zip(alpha, senders)) + m.bias.view(HEADS, -1)[head]
            torch.testing.assert_close(y[0].view(HEADS, -1)[head], want, rtol=1e-12, atol=1e-12)
    assert a[:, 0, [3, 5]].abs().max() == 0  # 3 → 0 and 5 → 0 are not edges
    torch.testing.assert_close(a[:, 5, 5], torch.ones(HEADS, dtype=torch.float64))  # isolated: its self-loop only
    torch.testing.assert_close(y[5], m.linear(x[5]) + m.bias)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("self_loops", [True, False])
def test_no_message_along_a_non_edge_for_every_form(form: str, self_loops: bool) -> None:
    m = _module(form, add_self_loops=self_loops)
    x = _nodes().requires_grad_(True)
    reach = torch.zeros(6, 6, dtype=torch.bool)  # [i, j]: may x_j reach y_i
    reach[EDGES[1], EDGES[0]] = True
    reach |= torch.diag(reach.any(1) | self_loops)  # i's own features: its query (and its message under self-loops)
    for impl in ("fast", "reference"):
        y = m(x, EDGES, impl=impl)
        for i in range(6):
            (g,) = torch.autograd.grad((y[i] ** 2).sum(), x, retain_graph=True)
            assert g.abs().sum(-1)[~reach[i]].max() == 0, f"node {i} hears a node with no edge to it"
            senders = EDGES[0, EDGES[1] == i]
            assert senders.numel() == 0 or g.abs().sum(-1)[senders].min() > 0, f"node {i} does not hear a neighbour"
    if not self_loops:
        torch.testing.assert_close(m(x, EDGES)[[4, 5]], m.bias.expand(2, DIM))  # no in-edge: a zero message, no NaN


@pytest.mark.parametrize("form", ["MX", "SD"])
@pytest.mark.parametrize("self_loops", [True, False])
def test_equals_torch_geometric_supergat_conv_with_mapped_weights(form: str, self_loops: bool) -> None:
    pytest.importorskip("torch_geometric")
    from torch_geometric.nn import SuperGATConv

    m = _module(form, add_self_loops=self_loops)
    peer = SuperGATConv(DIM, DIM // HEADS, heads=HEADS, attention_type=form, add_self_loops=self_loops).double()
    with torch.no_grad():
        peer.lin.weight.copy_(m.linear.weight)
        peer.bias.copy_(m.bias)
        if form == "MX":
            peer.att_l.copy_(m.att_source[None])  # a_s, on the source h_j
            peer.att_r.copy_(m.att_target[None])  # a_t, on the target h_i
    x = _nodes(seed=5)
    peer.eval()
    edges = EDGES if self_loops else EDGES[:, :-1]  # without self-loops PyG gives a receiving-nothing node only its bias
    torch.testing.assert_close(m(x, edges), peer(x, edges), rtol=1e-10, atol=1e-10)
    # the self-supervised edge loss, with the same negative pairs on both sides (PyG computes it in training mode)
    negatives = sample_negative_edges(m.prepare(x, edges)[1], 6, 4, torch.Generator().manual_seed(0))
    peer.train()
    peer(x, edges, neg_edge_index=negatives)
    torch.testing.assert_close(m.edge_loss(x, edges, negatives), peer.get_attention_loss(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("form", FORMS)
def test_edge_loss_by_hand(form: str) -> None:
    m = _module(form)
    x = _nodes()
    negatives = torch.tensor([[5, 3], [1, 4]])  # 5 → 1 and 3 → 4: not edges
    with torch.no_grad():
        h = m.linear(x).view(6, HEADS, DIM // HEADS)

        def score(i: int, j: int) -> torch.Tensor:  # φ_ij: the GO logit for GO, the DP (SD) logit otherwise
            dot = torch.stack([h[i, k] @ h[j, k] for k in range(HEADS)])
            if form == "GO":
                return torch.stack([_logit(m, h, i, j, k) for k in range(HEADS)]).mean()
            return (dot / math.sqrt(DIM // HEADS) if form == "SD" else dot).mean()

        positives = [(int(i), int(j)) for j, i in EDGES.T] + [(i, i) for i in range(6)]
        terms = [-torch.log(torch.sigmoid(score(i, j))) for i, j in positives]
        terms += [-torch.log(1 - torch.sigmoid(score(int(i), int(j)))) for j, i in negatives.T]
        torch.testing.assert_close(m.edge_loss(x, EDGES, negatives), torch.stack(terms).mean(), rtol=1e-12, atol=1e-12)


def test_negative_sampling_draws_distinct_non_edges_reproducibly() -> None:
    m = _module("MX", negative_ratio=1.5)
    x = _nodes()
    edges = m.prepare(x, EDGES)[1]  # 6 edges + 6 self-loops
    drawn = sample_negative_edges(edges, 6, int(1.5 * 12), torch.Generator().manual_seed(7))
    assert drawn.shape == (2, 18)
    pairs = {(int(j), int(i)) for j, i in drawn.T}
    assert len(pairs) == 18
    linked = {(int(j), int(i)) for j, i in edges.T} | {(int(i), int(j)) for j, i in edges.T}
    assert not pairs & linked and all(j != i for j, i in pairs)
    same = sample_negative_edges(edges, 6, 18, torch.Generator().manual_seed(7))
    assert torch.equal(drawn, same)
    loss = m.edge_loss(x, EDGES, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(loss, m.edge_loss(x, EDGES, drawn))
    with pytest.raises(ValueError, match=r"^negative_ratio: expected at most 18 negative pairs .*, got 19"):
        sample_negative_edges(edges, 6, 19, None)  # 30 ordered pairs, 12 of them linked one way or the other
    with pytest.raises(ValueError, match="^negative_edge_index: expected node indices in"):
        m.edge_loss(x, EDGES, torch.tensor([[0], [6]]))
