"""Non-Parametric Transformers, NPT (Kossen et al., Self-Attention Between Datapoints, 2021).

NPT takes a whole dataset (or a minibatch of datapoints) as its input: a table H ∈ R^{n×f×e} of n
datapoints (rows), f attributes (columns), each cell embedded in e channels. It alternates two
self-attention layers:

    ABD (attention between datapoints): the rows flattened, H ∈ R^{n×(f·e)}, attend to each other
        ABD(H) = MHSelfAtt(H)  with  q_i, k_i, v_i ∈ R^{f·e}  (row i's whole embedding)
        A^h_ij = softmax_j(q^h_i · k^h_j / √(f·e/heads))         (the (batch, heads, n, n) of `materialize`)
    ABA (attention between attributes): the f cells of each row attend to each other, separately per row
        ABA(H)_i = MHSelfAtt(H_i)  with  H_i ∈ R^{f×e}
        B^h_{i,ab} = softmax_b(q^h_{ia} · k^h_{ib} / √(e/heads))  (the (batch, n, heads, f, f) of `materialize_attributes`)

each wrapped as a transformer block, pre-layer-norm (the official code's default, model_pre_layer_norm;
LN over the f·e channels of a row for ABD, over the e channels of a cell for ABA):

    MHSelfAtt(H) = H' + rFF(LN(H')),   H' = H + MHSA(LN(H)),   rFF(z) = W₂ GELU(W₁ z + b₁) + b₂  (width 4×)

MHSA(Z) = concat_h(A^h Z W^V_h) W^O with separate W^Q, W^K, W^V, W^O per layer. `depth` ABD→ABA pairs
are stacked (the paper's "stacking depth" 2·depth, starting with ABD as the official code does).
ABD is equivariant to the order of the rows (no positions); ABA never mixes two rows.

Masked reconstruction (the paper's training objective) acts on the cells, not on the attention: a
masked cell's value is hidden and a mask indicator set in its input encoding, and the loss is the
reconstruction of the masked cells (features masked at random, test targets always). `NPTModel`
gives this: categorical columns encoded as one-hot ⊕ mask bit, a linear embedding per column (the
official code's per-column in-embedding), the NPT stack, a linear read-out to each column's classes,
and `masked_loss` (mean cross-entropy over the masked cells). The lookup task
(`attnlab.tasks.table_lookup`) trains it to copy a masked target from the row's duplicate.

Padding: `row_mask` (batch, rows), True = real row (see `tables.base`): padded rows are no keys of
ABD, their outputs are zeros; a table with no real row gives zeros.

Forms. `form="standard"` (default) is the block above with Vaswani et al.'s MHSA, scale 1/√(head width),
which is how we read the paper's MHSelfAtt (the PDF's exact residual form was not re-checked here).
The official code (npt/model/npt_modules.py, class MAB, Set-Transformer based, default configuration)
differs in three ways, all three taken by `form="official"`:
    queries from LN(H) but keys and values from the un-normalised H;
    logits scaled by 1/√(width of the layer) (f·e for ABD, e for ABA), not 1/√(head width);
    the residual through a learnt linear map, H' = H W^res + MHSA (model_sep_res_embed).
Dropout, feature-type/index embeddings, numerical columns and image patching of the official code are left out.
Cost: O(n²·f·e + n·f²·e²) per ABD (the projections of width f·e),
O(n·f²·e + n·f·e²) per ABA: quadratic in the rows.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ParameterError, ShapeError
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_choice, check_int
from .base import TableAttention, TableWeights

NPT_PAPER = Paper(
    "P030", "Self-Attention Between Datapoints: Going Beyond Individual Input-Output Pairs in Deep Learning", 2021,
    "2106.02584",
)
EXPANSION = 4  # the rFF's hidden width, × its input width
LN_EPS = 1e-5


# -- functional ops ----------------------------------------------------------------------------
def npt_datapoint_attention(
    q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None = None, *, scale: float | None = None
) -> Tensor:
    """ABD's core: q, k, v (batch, heads, rows, width) -> softmax_j(scale·q_i·k_j) v_j over the real rows j
    (keep (batch, rows), True = real; scale 1/√width by default); a table with no real row attends over all its
    rows (its output is discarded by the module)."""
    mask = None
    if keep is not None:
        keep = keep | ~keep.any(-1, keepdim=True)
        mask = keep[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def npt_datapoint_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None = None, *, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """float64 ABD core from the formula: (out, A (batch, heads, rows, rows)); A is 0 at padded rows (keys and
    queries), a table with no real row has A = 0 and out = 0."""
    q, k, v = q.double(), k.double(), v.double()
    logits = torch.einsum("bhid,bhjd->bhij", q, k) * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if keep is not None:
        logits = logits.masked_fill(~keep[:, None, None, :], float("-inf"))
    weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    if keep is not None:
        weights = weights * keep[:, None, :, None]
    return torch.einsum("bhij,bhjd->bhid", weights, v), weights


def npt_attribute_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None) -> Tensor:
    """ABA's core: q, k, v (batch, rows, heads, attributes, width) -> softmax_b(scale·q_a·k_b) v_b within each row
    (scale 1/√width by default)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def npt_attribute_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """float64 ABA core from the formula: (out, B (batch, rows, heads, attributes, attributes))."""
    q, k, v = q.double(), k.double(), v.double()
    factor = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    weights = torch.softmax(torch.einsum("brhad,brhcd->brhac", q, k) * factor, dim=-1)
    return torch.einsum("brhac,brhcd->brhad", weights, v), weights


# -- the layers --------------------------------------------------------------------------------
def _layer_norm_reference(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()


def _linear_reference(x: Tensor, layer: nn.Linear) -> Tensor:
    return x @ layer.weight.double().T + layer.bias.double()


class _SelfAttentionBlock(nn.Module):
    """Pre-LN transformer block of width `width` with `heads` heads: H' = H + MHSA(LN H), out = H' + rFF(LN H');
    form "official": H' = H W^res + MHSA with queries from LN H, keys and values from H, scale 1/√width."""

    def __init__(self, width: int, heads: int, form: str = "standard") -> None:
        super().__init__()
        self.width, self.heads, self.official = width, heads, form == "official"
        self.scale = 1.0 / math.sqrt(width if self.official else width // heads)
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=LN_EPS), nn.LayerNorm(width, eps=LN_EPS)
        self.query, self.key, self.value, self.out = (nn.Linear(width, width) for _ in range(4))
        self.residual = nn.Linear(width, width) if self.official else None
        self.hidden, self.back = nn.Linear(width, EXPANSION * width), nn.Linear(EXPANSION * width, width)

    def project(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q from LN(h); k, v from LN(h) (from h in the official form); split per head."""
        z = self.norm1(h)
        source = h if self.official else z
        return self.split(self.query(z)), self.split(self.key(source)), self.split(self.value(source))

    def skip(self, h: Tensor) -> Tensor:
        return h if self.residual is None else self.residual(h)

    def split(self, z: Tensor) -> Tensor:
        """(..., tokens, width) -> (..., heads, tokens, width / heads)."""
        return z.unflatten(-1, (self.heads, -1)).transpose(-3, -2)

    def merge(self, z: Tensor) -> Tensor:
        return z.transpose(-3, -2).flatten(-2)

    def feed_forward(self, h: Tensor) -> Tensor:
        return h + self.back(F.gelu(self.hidden(self.norm2(h))))

    def feed_forward_reference(self, h: Tensor) -> Tensor:
        z = _linear_reference(_layer_norm_reference(h, self.norm2), self.hidden)
        return h + _linear_reference(0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0))), self.back)

    def projections_reference(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q of LN(h), k and v of LN(h) (of h in the official form) per head: (..., heads, tokens, width / heads),
        float64, by explicit reshaping."""
        z = _layer_norm_reference(h.double(), self.norm1)
        heads = []
        for proj, source in ((self.query, z), (self.key, h if self.official else z), (self.value, h if self.official else z)):
            p = _linear_reference(source.double(), proj)
            heads.append(torch.stack(p.chunk(self.heads, dim=-1), dim=-3))
        return heads[0], heads[1], heads[2]

    def skip_reference(self, h: Tensor) -> Tensor:
        return h if self.residual is None else _linear_reference(h, self.residual)

    def concat_reference(self, o: Tensor) -> Tensor:
        return torch.cat(o.unbind(-3), dim=-1)


class DatapointAttention(_SelfAttentionBlock):
    """ABD: the rows (batch, rows, attributes, dim), flattened to attributes·dim channels, attend to each other."""

    def forward(self, x: Tensor, keep: Tensor | None) -> Tensor:
        h = x.flatten(2)
        q, k, v = self.project(h)
        h = self.skip(h) + self.out(self.merge(npt_datapoint_attention(q, k, v, keep, scale=self.scale)))
        return self.feed_forward(h).view_as(x)

    def reference(self, x: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
        """float64: (out (batch, rows, attributes, dim), A (batch, heads, rows, rows))."""
        batch, rows, attributes, dim = x.shape
        h = x.double().reshape(batch, rows, attributes * dim)
        q, k, v = self.projections_reference(h)
        o, weights = npt_datapoint_attention_reference(q, k, v, keep, scale=self.scale)
        h = self.skip_reference(h) + _linear_reference(self.concat_reference(o), self.out)
        return self.feed_forward_reference(h).reshape(batch, rows, attributes, dim), weights


class AttributeAttention(_SelfAttentionBlock):
    """ABA: the cells of each row (batch, rows, attributes, dim) attend to each other, rows never mix."""

    def forward(self, x: Tensor, keep: Tensor | None) -> Tensor:
        q, k, v = self.project(x)
        return self.feed_forward(self.skip(x) + self.out(self.merge(npt_attribute_attention(q, k, v, scale=self.scale))))

    def reference(self, x: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
        """float64: (out, B (batch, rows, heads, attributes, attributes)), B = 0 at padded rows."""
        h = x.double()
        q, k, v = self.projections_reference(h)
        o, weights = npt_attribute_attention_reference(q, k, v, scale=self.scale)
        if keep is not None:
            weights = weights * keep[:, :, None, None, None]
        out = self.feed_forward_reference(self.skip_reference(h) + _linear_reference(self.concat_reference(o), self.out))
        return out, weights


@register(
    name="npt",
    kind="table",
    paper=NPT_PAPER,
    family="B",
    cost="O(n²·f·e + n·f²·e²)",
    exponent=2.0,
    supports=Supports(key_padding=True, order_invariant=True),
    params=(
        Param("attributes", int, 4, "f, the attributes (columns) of every table; ABD's width is f·dim", low=1),
        Param("depth", int, 1, "ABD→ABA pairs stacked (the paper's stacking depth is 2·depth)", low=1),
        Param("form", str, "standard", "'standard' pre-LN MHSA blocks, or 'official': the official code's attention "
              "block (keys/values from the un-normalised input, scale 1/√width, linear residual)",
              choices=("standard", "official")),
    ),
    test_params={"attributes": 3, "depth": 2},
    functional=(
        "npt_datapoint_attention", "npt_datapoint_attention_reference",
        "npt_attribute_attention", "npt_attribute_attention_reference",
    ),
)
class NonParametricTransformer(TableAttention):
    """NPT: attention between datapoints (ABD) and between attributes (ABA), alternated, pre-LN blocks."""

    def __init__(self, dim: int, heads: int = 8, *, attributes: int = 4, depth: int = 1, form: str = "standard") -> None:
        super().__init__(dim, heads, attributes=attributes)
        self.depth = check_int("depth", depth)
        self.form = check_choice("form", form, ("standard", "official"))
        blocks: list[nn.Module] = []
        for _ in range(depth):
            blocks += [DatapointAttention(attributes * dim, heads, form), AttributeAttention(dim, heads, form)]
        self.layers = nn.ModuleList(blocks)

    def table_fast(self, x: Tensor, keep: Tensor | None) -> Tensor:
        for layer in self.layers:
            x = layer(x, keep)
        return x

    def table_reference(self, x: Tensor, keep: Tensor | None) -> TableWeights:
        rows: list[Tensor] = []
        attributes: list[Tensor] = []
        h = x.double()
        for layer in self.layers:
            assert isinstance(layer, (DatapointAttention, AttributeAttention))
            h, weights = layer.reference(h, keep)
            (rows if isinstance(layer, DatapointAttention) else attributes).append(weights)
        return TableWeights(h.to(x.dtype), tuple(rows), tuple(attributes))


class NPTModel(nn.Module):
    """NPT for categorical tables with masked reconstruction: cells (batch, rows, f) of class indices and a mask
    (batch, rows, f), True = the cell is hidden; input per cell one-hot(value, zeroed when masked) ⊕ mask bit,
    a linear embedding per column to `dim`, the NPT stack, a linear read-out per column to its classes."""

    def __init__(self, categories: tuple[int, ...], dim: int, heads: int = 1, depth: int = 1, form: str = "standard") -> None:
        super().__init__()
        if not isinstance(categories, (tuple, list)) or not categories:
            raise ParameterError(f"categories: expected a non-empty tuple of class counts per column, got {categories!r}")
        self.categories = tuple(check_int("categories", c, 2) for c in categories)
        self.embed = nn.ModuleList(nn.Linear(c + 1, dim) for c in self.categories)
        self.encoder = NonParametricTransformer(dim, heads, attributes=len(self.categories), depth=depth, form=form)
        self.read_out = nn.ModuleList(nn.Linear(dim, c) for c in self.categories)

    def check_cells(self, values: Tensor, masked: Tensor) -> None:
        f = len(self.categories)
        if values.dim() != 3 or values.shape[-1] != f or values.dtype != torch.long:
            raise ShapeError(f"values: expected a long tensor (batch, rows, {f}), got {values.dtype} {tuple(values.shape)}")
        if masked.shape != values.shape or masked.dtype != torch.bool:
            raise ShapeError(f"masked: expected a bool tensor of shape {tuple(values.shape)}, got {masked.dtype} "
                             f"{tuple(masked.shape)}")
        high = torch.tensor(self.categories, device=values.device)
        if bool(((values < 0) | (values >= high)).any()):
            raise ValueError(f"values: expected classes in [0, categories) per column {self.categories}")

    def forward(self, values: Tensor, masked: Tensor, *, row_mask: Tensor | None = None) -> list[Tensor]:
        """The logits of every column, a list of (batch, rows, categories[j])."""
        self.check_cells(values, masked)
        dtype = next(self.parameters()).dtype
        cells = []
        for j, (c, embed) in enumerate(zip(self.categories, self.embed)):
            hidden = masked[..., j : j + 1]
            one_hot = F.one_hot(values[..., j], c).to(dtype).masked_fill(hidden, 0.0)
            cells.append(embed(torch.cat([one_hot, hidden.to(dtype)], -1)))
        h = self.encoder(torch.stack(cells, 2), row_mask=row_mask)
        return [read(h[:, :, j]) for j, read in enumerate(self.read_out)]

    def masked_loss(self, values: Tensor, masked: Tensor, *, row_mask: Tensor | None = None) -> Tensor:
        """Mean cross-entropy of the masked cells of real rows (the paper's masked reconstruction loss)."""
        logits = self(values, masked, row_mask=row_mask)
        scored = masked if row_mask is None else masked & row_mask[..., None].bool()
        total = sum(
            F.cross_entropy(lg[scored[..., j]], values[..., j][scored[..., j]], reduction="sum")
            for j, lg in enumerate(logits)
        )
        return total / scored.sum().clamp_min(1)
