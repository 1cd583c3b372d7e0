"""Select and Pack Attention, SPA (Zhang et al., 2024): gated token selection, the selected tokens of all images
packed into variable-length batches with block-diagonal masks.

Per image b and token i, with the gate of a small MLP on the token:

    g_i   = σ(MLP(x_i))                          the gate (trained with BCE against selection labels)
    s_i   = 1[g_i > τ]                           selected (τ = `threshold`, 0.5 by default)
    out_i = s̃_i · Σ_{j ∈ S_b} softmax_j(q_iᵀk_j/√d_h) v_j     for i ∈ S_b = {selected tokens of image b}
    out_i = 0                                    for an unselected token: it skips the layer
    s̃_i   = s_i + g_i − stop_grad(g_i)           straight-through: the value of s_i, the gradient of g_i

The selected tokens of all the images are packed, one image after another, into packs of at most
`pack_length` tokens (default: the sequence length; an image is never split, one with more selected
tokens gets a pack of its own); each pack is one row of a new
batch, attended with a block-diagonal mask (a token sees only the selected tokens of its own image),
then the results are scattered back to their places. The attention inside an image is exactly the
dense attention over its selected tokens: packing changes the cost, never the result.

Unselected tokens "skip attention": the module's output there is 0 (also after `out_proj`, whose bias
is not added), so a residual block x + SPA(x) passes them unchanged. `selection_loss(x, labels)` is
the paper's BCE of the gates against the selection labels (e.g. from boxes or masks).

Compute: the paper reports a 16.4% reduction (and +0.6 mAP in detection, not checkable here). The
attention pairs SPA scores are Σ_b |S_b|² of the dense B·N²; the packed kernel computes
n_packs · L_max² of them (L_max: the fullest pack). `pair_counts(x)` returns both fractions for an
input without running the attention; `select_and_pack_flops(..., keep_ratio)` the FLOPs of a keep
ratio. `attnlab bench speed` hands `attend` the gate of random tokens (`side_input`) from an untrained
gate, which keeps a fraction set by its random initialisation (61–64% of the tokens, ~40% of the pairs,
in the harness's configuration at N = 256…4096; another seed or width gives another fraction): the
harness times the packed path on that selection, while the registry's
`flops` counts every token (keep ratio 1), so the harness's GFLOP/s is an upper bound. The saving of
a trained gate depends on the data and is what `pair_counts` reports.

Choices:

* Gate: an MLP dim → `gate_hidden` (default dim // 2) → 1 with GELU, then σ; `gate_hidden=0` is a
  linear gate. The straight-through factor s̃ multiplies the outputs of the selected queries; the
  outputs of unselected tokens are not computed, so their gate gets no gradient from the output
  (the BCE loss trains it), as the paper's gate is supervised.
* Padding: a padded token is never selected and is never a key. A fully padded image gives zeros.
* No causal mode, no cross-attention and no arbitrary attn_mask: the paper's setting is an image's
  patch tokens, and packing keeps only the per-image block structure.
* `attend(q, k, v)` without a gate (`side`) selects every real token.

The float64 reference loops over the images, attending each one's selected tokens from the formula,
without the packing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ShapeError
from ...core.module import Attention, Impl
from ...core.reference import masked_softmax
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_attention_mask, check_int, check_qkv, check_scale, check_tensor

SPA = Paper("P134", "Context-Aware Token Selection and Packing for Enhanced Vision Transformer (SPA)", 2024, "2410.23608")


def select_and_pack_flops(n: int, heads: int, head_dim: int, causal: bool, keep_ratio: float = 1.0) -> float:
    """Forward FLOPs of the attention over a fraction `keep_ratio` of the tokens (QKᵀ and AV: 4·(rN)²·d_h per head)."""
    kept = keep_ratio * n
    return heads * 4.0 * kept * kept * head_dim


@dataclass(frozen=True)
class Packing:
    """Where the selected tokens go: pack p's slot t holds flat token index[p, t] (b·n + i) of image segment[p, t];
    -1 marks an empty slot."""

    index: Tensor  # (n_packs, L_max) long
    segment: Tensor  # (n_packs, L_max) long
    selected: Tensor  # (batch,) long: selected tokens per image

    @property
    def computed_pairs(self) -> int:
        """Query-key pairs the packed kernel scores: n_packs · L_max²."""
        return self.index.shape[0] * self.index.shape[1] ** 2

    @property
    def useful_pairs(self) -> int:
        """Pairs inside the images' blocks: Σ_b |S_b|²."""
        return int((self.selected**2).sum())


def pack_tokens(selected: Tensor, pack_length: int | None = None) -> Packing:
    """Pack the selected tokens (batch, n) bool of each image, image after image, into packs of at most `pack_length`
    tokens (default n); an image is never split: one with more selected tokens than that gets a pack of its own."""
    check_tensor("selected", selected)
    if selected.dim() != 2 or selected.dtype != torch.bool:
        raise ShapeError(f"selected: expected a (batch, n) bool tensor, got shape {tuple(selected.shape)} and {selected.dtype}")
    batch, n = selected.shape
    capacity = n if pack_length is None else check_int("pack_length", pack_length)
    counts = selected.sum(1)
    packs: list[list[tuple[int, int]]] = [[]]
    for b in range(batch):
        tokens = (selected[b].nonzero()[:, 0] + b * n).tolist()
        if not tokens:
            continue
        if packs[-1] and len(packs[-1]) + len(tokens) > capacity:
            packs.append([])
        packs[-1].extend((t, b) for t in tokens)
    packs = [p for p in packs if p]
    width = max((len(p) for p in packs), default=0)
    index = torch.full((len(packs), width), -1, dtype=torch.long)
    segment = torch.full((len(packs), width), -1, dtype=torch.long)
    for row, pack in enumerate(packs):
        index[row, : len(pack)] = torch.tensor([t for t, _ in pack])
        segment[row, : len(pack)] = torch.tensor([b for _, b in pack])
    return Packing(index.to(selected.device), segment.to(selected.device), counts)


def _selection(gate: Tensor | None, threshold: float, q: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
    """(selected (batch, n) bool, straight-through factor (batch, n)): s = 1[g > τ] on real tokens, s̃ = s + g − sg(g)."""
    batch, n = q.shape[0], q.shape[2]
    real = torch.ones(batch, n, dtype=torch.bool, device=q.device) if keep is None else keep
    if gate is None:
        return real, real.to(q.dtype)
    check_tensor("gate", gate)
    if tuple(gate.shape) != (batch, n, 1):
        raise ShapeError(f"gate: expected (batch, n, 1) = {(batch, n, 1)}, got shape {tuple(gate.shape)}")
    g = gate[..., 0].to(q.dtype)
    selected = (g > threshold) & real
    return selected, selected.to(q.dtype) + (g - g.detach())


def select_and_pack_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gate: Tensor | None = None,
    *,
    threshold: float = 0.5,
    attention_mask: Tensor | None = None,
    pack_length: int | None = None,
    scale: float | None = None,
) -> Tensor:
    """SPA over (batch, heads, n, head_dim): the tokens with gate (batch, n, 1) above `threshold` (all real tokens when
    gate is None) attend to the selected tokens of their image, packed into packs of `pack_length` tokens with
    block-diagonal masks; unselected tokens give 0; `attention_mask` (batch, n), True = real token."""
    check_qkv(q, k, v, same_length=True)
    scale = check_scale(scale, q.shape[-1])
    batch, heads, n = q.shape[0], q.shape[1], q.shape[2]
    check_attention_mask(attention_mask, batch, n)
    selected, straight = _selection(gate, threshold, q, attention_mask)
    packing = pack_tokens(selected, pack_length)
    out = torch.zeros(batch * n, heads, v.shape[-1], dtype=v.dtype, device=v.device)
    if packing.index.numel():
        slot = packing.index >= 0
        take = packing.index.clamp_min(0)

        def packed(t: Tensor) -> Tensor:  # (batch, heads, n, d) -> (n_packs, heads, L_max, d)
            return t.transpose(1, 2).reshape(batch * n, heads, t.shape[-1])[take].transpose(1, 2)

        same = packing.segment[:, :, None] == packing.segment[:, None, :]
        blocks = (same & slot[:, :, None] & slot[:, None, :]) | torch.eye(slot.shape[1], dtype=torch.bool, device=q.device)
        result = F.scaled_dot_product_attention(packed(q), packed(k), packed(v), attn_mask=blocks[:, None], scale=scale)
        out = out.index_put((packing.index[slot],), result.transpose(1, 2)[slot])
    out = out.view(batch, n, heads, -1).transpose(1, 2)
    return out * straight[:, None, :, None]


def select_and_pack_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gate: Tensor | None = None,
    *,
    threshold: float = 0.5,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights (batch, heads, n, n)) of `select_and_pack_attention` in float64, image by image without packing:
    weights_ij = s̃_i softmax_j over the selected j of the image, 0 on the rows and columns of unselected tokens."""
    check_qkv(q, k, v, same_length=True)
    scale = check_scale(scale, q.shape[-1])
    batch, heads, n = q.shape[0], q.shape[1], q.shape[2]
    check_attention_mask(attention_mask, batch, n)
    real = torch.ones(batch, n, dtype=torch.bool, device=q.device) if attention_mask is None else attention_mask
    if gate is None:
        chosen, factor = real, real.double()
    else:
        check_tensor("gate", gate)
        if tuple(gate.shape) != (batch, n, 1):
            raise ShapeError(f"gate: expected (batch, n, 1) = {(batch, n, 1)}, got shape {tuple(gate.shape)}")
        g = gate[..., 0].double()
        chosen = (g > threshold) & real
        factor = chosen.double() + g - g.detach()
    logits = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * scale
    pair = chosen[:, None, :, None] & chosen[:, None, None, :]
    weights = masked_softmax(logits, pair.expand(batch, heads, n, n)) * factor[:, None, :, None]
    out = torch.einsum("bhij,bhjd->bhid", weights, v.double())
    return out.to(q.dtype), weights.to(q.dtype)


@register(
    name="select-and-pack",
    paper=SPA,
    family="A",
    cost="O(N_s² d)",
    exponent=2.0,
    supports=Supports(key_padding=True),
    normalized=False,
    summary="SPA: tokens with a gate above τ attend within their image, packed across images with block-diagonal masks.",
    params=(
        Param("threshold", float, 0.5, "a token is selected when its gate σ(MLP x) is above it", low=0.0, high=1.0),
        Param("gate_hidden", int, None, "hidden width of the gate MLP (default dim // 2; 0: a linear gate)", low=0,
              optional=True),
        Param("pack_length", int, None, "tokens per pack (default: the sequence length)", low=1, optional=True,
              knob=True),
    ),
    test_params={"pack_length": 12},
    flops=select_and_pack_flops,
    functional=("select_and_pack_attention", "select_and_pack_attention_reference"),
)
class SelectAndPackAttention(Attention):
    """SPA: a gate picks the informative tokens; they attend within their image, packed across the batch.

    Unselected tokens output 0 (they skip the layer); `selection_loss` trains the gate, `pair_counts`
    reports the compute saved.
    """

    mask_form = "padding"
    same_length = True
    takes_side_input = True

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        batch_first: bool = True,
        threshold: float = 0.5,
        gate_hidden: int | None = None,
        pack_length: int | None = None,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, batch_first=batch_first)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold: expected a float in [0, 1], got {threshold!r}")
        self.threshold = float(threshold)
        hidden = dim // 2 if gate_hidden is None else check_int("gate_hidden", gate_hidden, 0)
        self.gate: nn.Module = (
            nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1)) if hidden else nn.Linear(dim, 1)
        )
        self.pack_length = None if pack_length is None else check_int("pack_length", pack_length)

    def side_input(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """The gate g = σ(MLP(x)) of every token, (batch, n, 1)."""
        return torch.sigmoid(self.gate(x))

    def selected(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """The selected tokens (batch, n) bool of batch-major tokens x: gate above the threshold, real."""
        chosen = self.side_input(x)[..., 0] > self.threshold
        return chosen if keep is None else chosen & keep

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, side: Tensor | None = None) -> Tensor:
        return select_and_pack_attention(q, k, v, side, threshold=self.threshold, attention_mask=mask,
                                         pack_length=self.pack_length)

    def attend_reference(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, side: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return select_and_pack_attention_reference(q, k, v, side, threshold=self.threshold, attention_mask=mask)

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        impl: Impl = "fast",
    ) -> Tensor:
        """As `Attention.forward`, with 0 at the unselected tokens (out_proj's bias not added there)."""
        out = super().forward(x, context=context, attention_mask=attention_mask, key_padding_mask=key_padding_mask,
                              attn_mask=attn_mask, impl=impl)
        tokens = self.batch_major(x)[0]
        chosen = self.selected(tokens, self.keep_mask(tokens, None, attention_mask, key_padding_mask))[..., None]
        return out * (chosen if self.batch_first else chosen.transpose(0, 1)).to(out.dtype)

    def selection_loss(self, x: Tensor, labels: Tensor, *, attention_mask: Tensor | None = None) -> Tensor:
        """The gate's BCE against selection labels (batch, n) in {0, 1}, averaged over the real tokens."""
        tokens = self.batch_major(x)[0]
        check_tensor("labels", labels)
        if tuple(labels.shape) != tuple(tokens.shape[:2]):
            raise ShapeError(f"labels: expected (batch, n) = {tuple(tokens.shape[:2])}, got shape {tuple(labels.shape)}")
        loss = F.binary_cross_entropy(self.side_input(tokens)[..., 0], labels.to(tokens.dtype), reduction="none")
        if attention_mask is None:
            return loss.mean()
        real = attention_mask.to(loss.dtype)
        return (loss * real).sum() / real.sum().clamp_min(1.0)

    def pair_counts(self, x: Tensor, *, attention_mask: Tensor | None = None) -> dict[str, float]:
        """The compute of SPA on x, as fractions of the dense B·N² query-key pairs: `selected` (tokens kept),
        `pairs` (Σ_b |S_b|², the pairs SPA needs) and `packed_pairs` (n_packs · L_max², what the packed kernel scores)."""
        tokens = self.batch_major(x)[0]
        with torch.no_grad():
            chosen = self.selected(tokens, self.keep_mask(tokens, None, attention_mask, None))
        packing = pack_tokens(chosen, self.pack_length)
        batch, n = chosen.shape
        dense = float(batch * n * n) if batch * n else math.inf
        return {
            "selected": float(chosen.sum()) / max(batch * n, 1),
            "pairs": packing.useful_pairs / dense,
            "packed_pairs": packing.computed_pairs / dense,
        }
