"""SuperGAT: graph attention forms and the self-supervised edge loss (Kim & Oh, 2021).

Per head, with h = W x (W: dim → dim, heads × F channels, F = dim/heads) and the edges j → i of node i
(its in-neighbours N(i), plus i itself under the default self-loop policy, see `graphs.base`):

    GO  e_ij = aᵀ[h_i ‖ h_j] = a_tᵀ h_i + a_sᵀ h_j            (GAT's original form)
    DP  e_ij = h_iᵀ h_j                                        (dot product)
    SD  e_ij = h_iᵀ h_j / √F                                   (scaled dot product)
    MX  e_ij = aᵀ[h_i ‖ h_j] · σ(h_iᵀ h_j)                     (mixed: GO gated by the DP edge probability)
    α_ij = softmax_{j ∈ N(i) ∪ {i}}(LeakyReLU(e_ij))           (negative slope 0.2)
    y_i  = ‖_heads Σ_j α_ij h_j + b

Self-supervised edge loss (link prediction with the attention's edge score φ_ij):

    φ_ij = e_ij^GO for GO, e_ij^DP for DP and MX, e_ij^SD for SD     (the raw score, before LeakyReLU)
    L_E  = BCE(σ(φ̄_ij), 1[j → i is an edge]) over the edges (E) and negatively sampled non-edges (E⁻),
           φ̄ the mean of φ over the heads, the BCE averaged over E ∪ E⁻;
    the training loss is L = L_task + λ_E Σ_layers L_E (λ_E is the caller's: `edge_loss` returns L_E).

Defaults and choices:
* The LeakyReLU applies to the logit of every form, as PyG `SuperGATConv` computes it and documents the
  formula; shared/PAPERS.md writes it inside GO only — `negative_slope=1.0` removes it (LeakyReLU = identity).
* The positives of L_E are the edges the attention runs over (self-loops included under the default policy),
  as PyG takes them (its `edge_sample_ratio` = 1). The negatives: `negative_ratio`·|E| pairs (j, i), j ≠ i,
  drawn uniformly among the pairs that are not edges in either direction (PyG treats the graph as
  undirected for sampling), with the caller's `generator` (seed it; the draw is random), or given as
  `negative_edge_index`. The paper's sampling ratio p_n is `negative_ratio` (PyG's default 0.5).
* The paper's nonlinearity after the layer and attention dropout are not part of the operator (PyG also
  leaves the nonlinearity out); the paper's recipe (choose GO/DP/SD/MX by homophily and mean degree) is
  the caller's choice of `attention_form`.

`materialize(x, edge_index)` gives the dense α (heads, nodes, nodes), α[h, i, j] for the edge j → i, zero off
the edges; y = α·h per head, plus b. Fast path: scatter softmax over the edges, O(E·dim) after W; reference:
dense (nodes × nodes) logits per head in float64, the softmax masked to the adjacency.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ParameterError
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_choice
from .base import GraphAttention, check_edge_index

SUPERGAT = Paper("P171", "How to Find Your Friendly Neighborhood: Graph Attention Design with Self-Supervision", 2021,
                 "2204.04879")
FORMS = ("GO", "DP", "SD", "MX")


def supergat_flops(n: int, heads: int, head_dim: int, causal: bool, degree: int = 8) -> float:
    """Forward FLOPs per graph of n nodes and average in-degree `degree` (+1 self-loop): W, the edge logits
    (GO and DP both, as MX needs), the weighted sum."""
    dim = heads * head_dim
    edges = n * (degree + 1)
    return 2.0 * n * dim * dim + edges * (6.0 * dim + 8.0 * heads)


def supergat_scores(h_target: Tensor, h_source: Tensor, form: str, att_source: Tensor, att_target: Tensor) -> tuple[Tensor, Tensor]:
    """Per edge and head, from h_i (edges, heads, F) and h_j: (e, the attention logit before LeakyReLU;
    φ, the edge score of the self-supervised loss)."""
    dot = (h_target * h_source).sum(-1)
    if form == "DP":
        return dot, dot
    if form == "SD":
        scaled = dot / math.sqrt(h_source.shape[-1])
        return scaled, scaled
    original = (h_source * att_source).sum(-1) + (h_target * att_target).sum(-1)
    if form == "GO":
        return original, original
    return original * torch.sigmoid(dot), dot


def supergat_attention(
    h: Tensor,
    edges: Tensor,
    *,
    form: str = "MX",
    att_source: Tensor | None = None,
    att_target: Tensor | None = None,
    negative_slope: float = 0.2,
) -> Tensor:
    """y_i = Σ_{j→i} softmax_j(LeakyReLU(e_ij)) h_j per head: h (nodes, heads, F), edges (2, E) sources/targets,
    a_s, a_t (heads, F) for GO and MX -> (nodes, heads, F); a node without incoming edges gets 0."""
    form = check_choice("form", form, FORMS)
    if form in ("GO", "MX") and (att_source is None or att_target is None):
        raise ParameterError(f"att_source, att_target: expected (heads, F) tensors for form {form!r}, got None")
    source, target = edges
    zeros = torch.zeros_like(h[0, :, 0])
    logits = F.leaky_relu(supergat_scores(h[target], h[source], form, zeros if att_source is None else att_source,
                                          zeros if att_target is None else att_target)[0], negative_slope)
    index = target[:, None].expand_as(logits)
    top = torch.full_like(h[:, :, 0], float("-inf")).scatter_reduce(0, index, logits, "amax").detach()
    expo = torch.exp(logits - top[target])
    total = torch.zeros_like(h[:, :, 0]).index_add(0, target, expo)
    alpha = expo / total[target]
    return torch.zeros_like(h).index_add(0, target, alpha[..., None] * h[source])


def supergat_attention_reference(
    h: Tensor,
    edges: Tensor,
    *,
    form: str = "MX",
    att_source: Tensor | None = None,
    att_target: Tensor | None = None,
    negative_slope: float = 0.2,
) -> tuple[Tensor, Tensor]:
    """The formula over all node pairs in float64, the softmax masked to the edges: (y (nodes, heads, F),
    α (heads, nodes, nodes) with α[h, i, j] the weight of the edge j → i)."""
    form = check_choice("form", form, FORMS)
    nodes, heads, width = h.shape
    g = h.double()
    adjacency = torch.zeros(nodes, nodes, dtype=torch.bool, device=h.device)
    adjacency[edges[1], edges[0]] = True  # row i (target), column j (source)
    outs, alphas = [], []
    for head in range(heads):
        hh = g[:, head]  # (nodes, F)
        dot = hh @ hh.T  # [i, j] = h_iᵀ h_j
        if form == "DP":
            e = dot
        elif form == "SD":
            e = dot / math.sqrt(width)
        else:
            if att_source is None or att_target is None:
                raise ParameterError(f"att_source, att_target: expected (heads, F) tensors for form {form!r}, got None")
            original = (hh @ att_target[head].double())[:, None] + (hh @ att_source[head].double())[None, :]
            e = original if form == "GO" else original * torch.sigmoid(dot)
        e = torch.where(e >= 0, e, negative_slope * e).masked_fill(~adjacency, float("-inf"))
        alpha = torch.softmax(e, dim=1).nan_to_num(0.0)  # a row without edges: zeros
        outs.append(alpha @ hh)
        alphas.append(alpha)
    return torch.stack(outs, 1).to(h.dtype), torch.stack(alphas).to(h.dtype)


def sample_negative_edges(edges: Tensor, nodes: int, count: int, generator: torch.Generator | None) -> Tensor:
    """`count` distinct pairs (j, i), j ≠ i, that are edges in neither direction, uniformly; (2, count)."""
    taken = torch.zeros(nodes * nodes, dtype=torch.bool)
    source, target = edges.cpu()
    taken[source * nodes + target] = True
    taken[target * nodes + source] = True
    taken[torch.arange(nodes) * (nodes + 1)] = True
    free = (~taken).nonzero().squeeze(1)
    if free.numel() < count:
        raise ValueError(f"negative_ratio: expected at most {free.numel()} negative pairs (the non-edges of the graph), "
                         f"got {count} to sample")
    chosen = free[torch.randperm(free.numel(), generator=generator)[:count]]
    return torch.stack([chosen // nodes, chosen % nodes]).to(edges.device)


@register(
    name="supergat",
    kind="graph",
    paper=SUPERGAT,
    family="A",
    cost="O(E·d + N·d²)",
    exponent=1.0,
    supports=Supports(materialize=True),
    summary="SuperGAT: graph attention with GO/DP/SD/MX logits and a self-supervised edge-prediction loss.",
    params=(
        Param("attention_form", str, "MX", "GO (GAT), DP (dot product), SD (scaled dot), MX (GO·σ(DP))", choices=FORMS),
        Param("negative_slope", float, 0.2, "LeakyReLU slope on the logits (1.0: none)", low=0.0),
        Param("add_self_loops", bool, True, "replace the self-loops of edge_index by one i → i per node"),
        Param("negative_ratio", float, 0.5, "negatives sampled per edge in edge_loss (the paper's p_n)", low=0.0),
        Param("bias", bool, True, "add a learned bias to the output"),
    ),
    test_params={"heads": 2},
    flops=supergat_flops,
)
class SuperGATAttention(GraphAttention):
    """SuperGAT layer: softmax over each node's in-edges of LeakyReLU(e_ij), e one of GO/DP/SD/MX; `edge_loss`
    gives the self-supervised link-prediction loss L_E."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        attention_form: str = "MX",
        negative_slope: float = 0.2,
        add_self_loops: bool = True,
        negative_ratio: float = 0.5,
        bias: bool = True,
    ) -> None:
        super().__init__(dim, heads, add_self_loops=add_self_loops)
        self.attention_form = check_choice("attention_form", attention_form, FORMS)
        self.negative_slope, self.negative_ratio = negative_slope, negative_ratio
        self.linear = nn.Linear(dim, dim, bias=False)
        if self.attention_form in ("GO", "MX"):
            self.att_source = nn.Parameter(torch.empty(heads, self.head_dim))
            self.att_target = nn.Parameter(torch.empty(heads, self.head_dim))
            bound = math.sqrt(6.0 / (1 + self.head_dim))  # Glorot, as GAT
            nn.init.uniform_(self.att_source, -bound, bound)
            nn.init.uniform_(self.att_target, -bound, bound)
        else:
            self.register_parameter("att_source", None)
            self.register_parameter("att_target", None)
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def _heads(self, x: Tensor) -> Tensor:
        return self.linear(x).unflatten(-1, (self.heads, self.head_dim))

    def _output(self, y: Tensor) -> Tensor:
        y = y.flatten(-2)
        return y if self.bias is None else y + self.bias

    def graph_fast(self, x: Tensor, edges: Tensor) -> Tensor:
        return self._output(supergat_attention(self._heads(x), edges, form=self.attention_form, att_source=self.att_source,
                                               att_target=self.att_target, negative_slope=self.negative_slope))

    def graph_reference(self, x: Tensor, edges: Tensor) -> tuple[Tensor, Tensor]:
        y, alpha = supergat_attention_reference(self._heads(x), edges, form=self.attention_form, att_source=self.att_source,
                                                att_target=self.att_target, negative_slope=self.negative_slope)
        return self._output(y), alpha

    def edge_loss(
        self,
        x: Tensor,
        edge_index: Tensor,
        negative_edge_index: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """L_E = BCE(σ(φ̄), 1[edge]) over the edges (after the self-loop policy) and the negative pairs: given, or
        int(negative_ratio·|E|) sampled with `generator`."""
        x, edges = self.prepare(x, edge_index)
        if negative_edge_index is None:
            count = int(self.negative_ratio * edges.shape[1])
            negative_edge_index = sample_negative_edges(edges, x.shape[0], count, generator)
        negatives = check_edge_index(negative_edge_index, x.shape[0], x.device, "negative_edge_index")
        h = self._heads(x)
        zeros = torch.zeros_like(h[0])
        a_s = zeros if self.att_source is None else self.att_source
        a_t = zeros if self.att_target is None else self.att_target
        pairs = torch.cat([edges, negatives], 1)
        score = supergat_scores(h[pairs[1]], h[pairs[0]], self.attention_form, a_s, a_t)[1].mean(-1)
        label = torch.zeros_like(score)
        label[: edges.shape[1]] = 1.0
        return F.binary_cross_entropy_with_logits(score, label)
