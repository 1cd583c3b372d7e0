"""dependency-vit (P081): reversed attention aggregates down the columns, the induced tree is a forest, leaf pruning."""
from __future__ import annotations

import math

import torch

import attnlab
from attnlab.mechanisms.dense.dependency_vit import (
    induce_tree,
    leaf_mask,
    reversed_attention,
    reversed_attention_reference,
)


def test_column_wise_aggregation_by_hand() -> None:
    """Two tokens, d = 1, scale 1: child 0's logits over parents (1, 2), child 1's (0, 0); out_j = Σ_i P_ij g_i v_i."""
    q = torch.tensor([[1.0], [0.0]], dtype=torch.float64).view(1, 1, 2, 1)
    k = torch.tensor([[1.0], [2.0]], dtype=torch.float64).view(1, 1, 2, 1)
    v = torch.tensor([[1.0], [10.0]], dtype=torch.float64).view(1, 1, 2, 1)
    gate = torch.tensor([0.5, 1.0], dtype=torch.float64).view(1, 2, 1)
    e = math.e
    p = [[1 / (1 + e), e / (1 + e)], [0.5, 0.5]]  # P[i][j]: child i's distribution over parents j
    want = torch.tensor([[p[0][0] * 0.5 * 1 + p[1][0] * 1.0 * 10], [p[0][1] * 0.5 * 1 + p[1][1] * 1.0 * 10]],
                        dtype=torch.float64).view(1, 1, 2, 1)
    weights_t = torch.tensor([[p[0][0] * 0.5, p[1][0] * 1.0], [p[0][1] * 0.5, p[1][1] * 1.0]], dtype=torch.float64)
    for chunk in (1, 2):
        torch.testing.assert_close(reversed_attention(q, k, v, gate, scale=1.0, chunk_size=chunk), want)
    out, w = reversed_attention_reference(q, k, v, gate, scale=1.0)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(w[0, 0], weights_t)  # W = (P ⊙ g 1ᵀ)ᵀ, the parents as rows


def test_module_weights_are_the_transposed_gated_softmax() -> None:
    """materialize == (softmax(q kᵀ/√d) ⊙ g)ᵀ with g = σ(controller) × softmax over heads of the selector; the forward
    is out_proj of that matrix times v; padded tokens neither send nor receive."""
    torch.manual_seed(0)
    m = attnlab.build("dependency-vit", dim=8, heads=2, selector_temperature=0.5).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1, 4:] = False
    q, k, v = m.project(x)
    control = torch.sigmoid(m.controller(x))[..., 0]  # (batch, n)
    share = torch.softmax(m.selector(x) / 0.5, dim=-1)  # (batch, n, heads)
    g = control[:, None, :] * share.permute(0, 2, 1)  # (batch, heads, n)
    torch.testing.assert_close(g.sum(1), control)  # the selector splits the controller's message over the heads
    logits = q @ k.transpose(-1, -2) / math.sqrt(4)
    logits = logits.masked_fill(~keep[:, None, None, :], -math.inf)
    p = torch.softmax(logits, dim=-1) * keep[:, None, :, None]
    want = (p * g[..., None]).transpose(-1, -2)
    w = m.materialize(x, attention_mask=keep)
    torch.testing.assert_close(w, want)
    torch.testing.assert_close(m(x, attention_mask=keep), m.out_proj(m.merge_heads(want @ v)))
    assert w[1, :, :, 4:].abs().max() == 0 and w[1, :, 4:, :].abs().max() == 0


def _is_forest(parents: torch.Tensor, keep: torch.Tensor) -> None:
    n = parents.shape[1]
    for b in range(parents.shape[0]):
        for i in range(n):
            if not keep[b, i]:
                assert parents[b, i] == -1
                continue
            node = i
            for _ in range(n):  # the parent links reach a root (its own parent) in fewer than n steps
                assert 0 <= parents[b, node] < n and keep[b, parents[b, node]], "a parent that is not a real token"
                if parents[b, node] == node:
                    break
                node = int(parents[b, node])
            assert parents[b, node] == node, f"node {i} of element {b} is on a cycle"


def test_induced_tree_is_a_forest_on_random_inputs() -> None:
    """Random weights (symmetric ones, whose argmax often pairs two nodes in a cycle) with padding: every node reaches
    a root; a node that is not a root has its argmax parent; each root that is not its own argmax opened a cycle at
    its weakest edge."""
    gen = torch.Generator().manual_seed(0)
    opened = 0
    for trial in range(30):
        n = 3 + trial % 8
        w = torch.rand(3, 2, n, n, generator=gen, dtype=torch.float64)
        if trial % 2:
            w = w + w.transpose(-1, -2)
        keep = torch.rand(3, n, generator=gen) > 0.2
        keep[:, 0] = True
        parents = induce_tree(w, keep)
        _is_forest(parents, keep)
        dep = w.sum(1).masked_fill(~keep[:, :, None], -math.inf)
        best = dep.argmax(1)
        for b in range(3):
            for i in range(n):
                if keep[b, i] and parents[b, i] != best[b, i]:
                    assert parents[b, i] == i  # only cycle openings differ from the argmax, and they become roots
                    cycle, node = [i], int(best[b, i])
                    while node != i:
                        cycle.append(node)
                        node = int(best[b, node])
                    strength = [float(dep[b, best[b, c], c]) for c in cycle]
                    assert strength[0] == min(strength)
                    opened += 1
    assert opened > 5  # the cycle opening was exercised


def test_tree_and_leaves_by_hand() -> None:
    """0 ↔ 1 pick each other (edge weights 0.9 and 0.6): 1, the weaker, becomes a root; 2 picks itself; 3 picks 0.
    Parents [1, 1, 2, 0]; node 3 is nobody's parent: the only leaf."""
    w = torch.full((1, 4, 4), 0.01, dtype=torch.float64)  # W[j, i]: child i's message to parent j
    w[0, 1, 0], w[0, 0, 1], w[0, 2, 2], w[0, 0, 3] = 0.9, 0.6, 0.5, 0.7
    parents = induce_tree(w)
    assert parents.tolist() == [[1, 1, 2, 0]]
    assert leaf_mask(parents).tolist() == [[False, False, False, True]]
    assert leaf_mask(torch.tensor([[1, 1, -1, 0]])).tolist() == [[False, False, False, True]]  # padding is no leaf


def test_pruning_leaves_keeps_kept_outputs_within_the_bound() -> None:
    """Two hubs and six tokens that send little (g = 0.001) and receive little (logits favour the hubs by 6): the
    leaves of the induced tree are the six; dropping them changes the hubs' outputs by at most
    Σ_l P_lj g_l |v_l| + Σ_i P_ij g_i |v_i| r_i/(1 − r_i) (module docstring), measured here at below 1% of the output's norm."""
    gen = torch.Generator().manual_seed(1)
    n, d = 8, 4
    k = torch.randn(1, 1, n, d, generator=gen, dtype=torch.float64) * 0.1
    k[0, 0, :2, 0] = 1.0  # the hubs' keys align with every query
    q = torch.randn(1, 1, n, d, generator=gen, dtype=torch.float64) * 0.1
    q[0, 0, :, 0] = 6.0 * math.sqrt(d)  # logit of a hub ≈ 6 above the others (scale 1/√d)
    v = torch.randn(1, 1, n, d, generator=gen, dtype=torch.float64)
    gate = torch.full((1, n, 1), 1e-3, dtype=torch.float64)
    gate[0, :2] = 1.0
    out, w = reversed_attention_reference(q, k, v, gate)
    parents = induce_tree(w)
    leaves = leaf_mask(parents)[0]
    assert leaves.tolist() == [False, False] + [True] * 6
    kept = ~leaves
    pruned_out = reversed_attention(q[:, :, kept], k[:, :, kept], v[:, :, kept], gate[:, kept])
    error = (pruned_out - out[:, :, kept]).abs()[0, 0]
    p = torch.softmax(q[0, 0] @ k[0, 0].T / math.sqrt(d), dim=-1)  # P_ij
    r = p[:, leaves].sum(-1)  # mass each child puts on pruned parents
    g, av = gate[0, :, 0], v[0, 0].abs()
    sent = (p[leaves][:, kept] * g[leaves, None]).T @ av[leaves]  # the pruned children's messages to each hub
    renorm = (p[kept][:, kept] * (g[kept] * r[kept] / (1 - r[kept]))[:, None]).T @ av[kept]
    bound = sent + renorm
    assert (error <= bound + 1e-12).all()
    assert (error.norm(dim=-1) / out[0, 0, kept].norm(dim=-1)).max() < 1e-2
    # the same tokens sending with g = 1 are not prunable within that tolerance: the bound's first term is the reason
    loud = torch.ones_like(gate)
    loud_out = reversed_attention(q, k, v, loud)[:, :, kept]
    loud_pruned = reversed_attention(q[:, :, kept], k[:, :, kept], v[:, :, kept], loud[:, kept])
    assert ((loud_pruned - loud_out).norm(dim=-1) / loud_out.norm(dim=-1)).max() > 1e-1
