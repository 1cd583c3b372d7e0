"""Sparse attention decomposition (P190): a head's score as a sum of singular terms, and the tracing of those terms
to the upstream heads that wrote them.

The score of head h between a query token x_q and a key token x_k (the inputs of its q and k projections) is

    s(x_q, x_k) = scale · (W_Q x_q + b_Q)·(W_K x_k + b_K) = x̃_qᵀ Ω̃ x̃_k,      x̃ = [x; 1] ∈ R^(d+1),
    Ω̃ = scale · [W_Q b_Q]ᵀ [W_K b_K] = Σ_t σ_t u_t v_tᵀ                       (SVD, r = min(head_dim, d + 1) terms)

so s = Σ_t σ_t (x̃_q·u_t)(x̃_k·v_t) exactly. Biases are handled exactly by the homogeneous coordinate: the paper's
Ω = W_Q W_Kᵀ is the top-left d × d block of Ω̃, and b_Q, b_K enter through its last row and column (the query bias
times the keys, the key bias times the queries, and b_Q·b_K). The SVD is taken from the thin factors: with
[W b]ᵀ = Q R (QR) on each side, Ω̃ = Q_Q (scale · R_Q R_Kᵀ) Q_Kᵀ and the SVD of the small r × r middle matrix gives
U = Q_Q U_m, V = Q_K V_m (what TransformerLens' FactoredMatrix does); the sign of each (u_t, v_t) pair is fixed so that
the largest entry of u_t is positive (a term's value does not depend on it).

* `terms_needed(terms, share)`: the fewest terms whose sum reaches `share` of the score — the terms of the score's
  sign taken from the largest, so the count is minimal; 0 for a zero score. "Few terms dominate" (the paper's claim)
  means this count is small next to r.
* Tracing (`trace_score`, on a `ToyLM`): the residual stream entering layer L is a sum of sources — the input
  (token) embeddings, the position embeddings, for every earlier layer each head's output W_O^h (A^h v^h), the
  output bias, and the MLP update when there is one (`ToyLM.trace`). The head reads LN(x) = γ ⊙ (x − mean x)/σ + β
  with σ the standard deviation of the whole residual at that position; with σ frozen (as the paper and
  TransformerLens' folded LayerNorm do) LN is linear in x, so x̃ = Σ_s [γ ⊙ (s − mean s)/σ; 0] + [β; 1] splits
  exactly over the sources, the constant [β; 1] being the source "bias" (it carries the q/k biases). Then the
  key-side attribution of term t to source s is σ_t (x̃_q·u_t)(s̃_k·v_t) and the query-side one
  σ_t (s̃_q·u_t)(x̃_k·v_t); each sums over the sources to the term. The upstream source with the largest key-side
  attribution over the dominant terms is the head that "communicates" with head h through the key.

Models (`head_forms`, `decompose`, `score_decomposition_summary`):

* attnlab modules of the softmax family whose scores are scale·q·k of their own q_proj / k_proj: "softmax",
  "decoupled-attention" (q and k from its `embeddings` input when given), and "alibi", "kerple", whose positional
  score terms b(i, j) are added outside the bilinear part and reported as `bias`. Refused, with the reason: mechanisms that rotate q/k by position (rope: the form depends
  on the query–key offset), mix neighbouring tokens into q/k (primer's depthwise convolutions: q is not a function of
  one token), or change the scores otherwise (selective, multiscale), and every mechanism whose map is not a softmax
  of q·k (linear, kernel, sparse, recurrent, ...).
* BERT-style transformers self-attention (`query` / `key` linear layers, `num_attention_heads`,
  `attention_head_size`, `scaling`; e.g. MiniLM): scores scale·q·k + the padding mask.

    from attnlab.analysis.qk_decomposition import head_forms, decompose, terms_needed, score_decomposition_summary
    calls = decompose(model, inputs)                 # one `AttentionCall` per attention call, in call order
    terms = calls[0].terms(head=3)                   # (batch, n_q, n_k, r); terms.sum(-1) + bias = the scores
    summary = score_decomposition_summary(model, inputs)   # plain data: terms to reach 90% per layer/head, top terms
    tr = trace_score(toy_lm, ids, layer=1, head=0, query=12, key=5)   # who wrote the dominant terms
    tr.source_shares("key")                          # {"L0.H1": 0.8, "token": 0.1, ...}
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.errors import ParameterError
from ..core.module import Attention
from ..core.registry import Paper, Param, Spec, add
from ..core.validate import is_int
from ..mechanisms.dense.softmax import SoftmaxAttention
from ..mechanisms.mixers.deconstructed_attention import DecoupledAttention
from .capture import capture
from .induction_model import head_scores, induction_model, repeated_tokens
from .toy_lm import ToyLM

P190 = Paper("P190", "Sparse Attention Decomposition Applied to Circuit Tracing", 2024, "2410.00340")
SIDES = ("query", "key")


# -- the bilinear form of one head ------------------------------------------------------------------------------
@dataclass(frozen=True)
class QKForm:
    """score(x_q, x_k) = x̃_qᵀ Ω̃ x̃_k = Σ_t σ_t (x̃_q·u_t)(x̃_k·v_t), x̃ = [x; 1] (float64, on the weights' device)."""

    u: Tensor  # (d + 1, r) orthonormal columns: the query side
    sigma: Tensor  # (r,) singular values, descending
    v: Tensor  # (d + 1, r) orthonormal columns: the key side

    @property
    def rank(self) -> int:
        """r: the number of terms (some may be 0)."""
        return int(self.sigma.shape[0])

    @property
    def dim(self) -> int:
        """d: the width of the tokens the head reads."""
        return int(self.u.shape[0]) - 1

    def matrix(self) -> Tensor:
        """Ω̃ (d + 1, d + 1); its top-left d × d block is scale · W_Qᵀ W_K (the paper's Ω up to the scale)."""
        return (self.u * self.sigma) @ self.v.T

    def _homogeneous(self, x: Tensor, name: str) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"{name}: expected a tensor (..., d={self.dim}), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        x = x.to(self.u.device, torch.float64)
        return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)

    def query_coordinates(self, x: Tensor) -> Tensor:
        """x̃·u_t for every term: (..., d) -> (..., r)."""
        return self._homogeneous(x, "x") @ self.u

    def key_coordinates(self, x: Tensor) -> Tensor:
        """x̃·v_t for every term: (..., d) -> (..., r)."""
        return self._homogeneous(x, "x") @ self.v

    def terms(self, x_q: Tensor, x_k: Tensor) -> Tensor:
        """σ_t (x̃_q·u_t)(x̃_k·v_t): x_q (..., n_q, d), x_k (..., n_k, d) -> (..., n_q, n_k, r)."""
        a = self._homogeneous(x_q, "x_q") @ self.u
        b = self._homogeneous(x_k, "x_k") @ self.v
        if a.dim() < 2 or b.dim() < 2:
            raise ValueError(f"x_q, x_k: expected (..., n, d) tensors, got {tuple(x_q.shape)} and {tuple(x_k.shape)}")
        return (a * self.sigma).unsqueeze(-2) * b.unsqueeze(-3)

    def scores(self, x_q: Tensor, x_k: Tensor) -> Tensor:
        """The bilinear scores Σ_t of the terms: (..., n_q, n_k)."""
        return (self._homogeneous(x_q, "x_q") @ self.u * self.sigma) @ (self._homogeneous(x_k, "x_k") @ self.v).transpose(-1, -2)


def _augmented(w: Tensor, b: Tensor | None, name: str, bias_name: str) -> Tensor:
    """[W b] (head_dim, d + 1) in float64."""
    if not isinstance(w, Tensor) or w.dim() != 2:
        raise ValueError(f"{name}: expected a weight (head_dim, d), got "
                         f"{tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
    w = w.detach().to(torch.float64)
    if b is None:
        column = torch.zeros(w.shape[0], 1, dtype=torch.float64, device=w.device)
    elif not isinstance(b, Tensor) or tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"{bias_name}: expected a bias ({w.shape[0]},) or None, got "
                         f"{tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__}")
    else:
        column = b.detach().to(w.device, torch.float64)[:, None]
    return torch.cat([w, column], dim=1)


def qk_form(w_q: Tensor, w_k: Tensor, b_q: Tensor | None = None, b_k: Tensor | None = None, *,
            scale: float = 1.0) -> QKForm:
    """The `QKForm` of scale · (W_Q x_q + b_Q)·(W_K x_k + b_K); weights in nn.Linear layout (head_dim, d)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
        raise ParameterError(f"scale: expected a positive float, got {scale!r}")
    a_q = _augmented(w_q, b_q, "w_q", "b_q")
    a_k = _augmented(w_k, b_k, "w_k", "b_k").to(a_q.device)
    if a_q.shape != a_k.shape:
        raise ValueError(f"w_k: expected the shape of w_q {tuple(w_q.shape)}, got {tuple(w_k.shape)}")
    q_q, r_q = torch.linalg.qr(a_q.T)  # [W_Q b_Q]ᵀ = Q_Q R_Q
    q_k, r_k = torch.linalg.qr(a_k.T)
    u_m, sigma, v_m_t = torch.linalg.svd(float(scale) * r_q @ r_k.T)
    u, v = q_q @ u_m, q_k @ v_m_t.T
    sign = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return QKForm(u * sign, sigma, v * sign)


# -- which modules have such a form --------------------------------------------------------------------------------
def _is_bert_self_attention(module: nn.Module) -> bool:
    return (isinstance(getattr(module, "query", None), nn.Linear) and isinstance(getattr(module, "key", None), nn.Linear)
            and is_int(getattr(module, "num_attention_heads", None)) and is_int(getattr(module, "attention_head_size", None))
            and isinstance(getattr(module, "scaling", None), float))


def refusal(module: nn.Module) -> str | None:
    """None when `head_forms` decomposes `module`, else why it does not."""
    if isinstance(module, Attention):
        name = module.spec.name
        kind = type(module)
        if not isinstance(module, SoftmaxAttention):
            return (f"{name}: its map is not softmax(scale·q·k) of its q/k projections (feature maps, kernels, "
                    f"sparse or recurrent cores), so its scores are no bilinear form of the tokens")
        if kind.project is not Attention.project and not isinstance(module, DecoupledAttention):  # its q, k: of e
            return f"{name}: q and k are not projections of one token each (it overrides project, e.g. convolutions over positions)"
        if kind.attend_reference is not SoftmaxAttention.attend_reference or kind.scale is not SoftmaxAttention.scale:
            return (f"{name}: its core changes q, k or the scores beyond scale·q·k + a positional bias (e.g. a rotation "
                    f"by position makes the form depend on the query–key offset)")
        if not isinstance(module.q_proj, nn.Linear) or not isinstance(module.k_proj, nn.Linear):
            return f"{name}: q_proj / k_proj are not linear layers"
        return None
    if _is_bert_self_attention(module):
        kind = getattr(getattr(module, "config", None), "position_embedding_type", "absolute")
        if kind not in (None, "absolute"):
            return f"{type(module).__name__}: position_embedding_type={kind!r} adds relative-position scores"
        return None
    return (f"{type(module).__name__}: expected an attnlab softmax-family attention module or a BERT-style "
            f"self-attention (query/key linear layers)")


def head_forms(module: nn.Module) -> list[QKForm]:
    """The `QKForm` of every head of an attention module (see the module docstring for which are accepted)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected an attention nn.Module, got {type(module).__name__}")
    why = refusal(module)
    if why is not None:
        raise TypeError(f"module: {why}")
    if isinstance(module, Attention):
        q, k, heads, size, scale = module.q_proj, module.k_proj, module.heads, module.head_dim, module.scale
    else:
        q, k, scale = module.query, module.key, module.scaling  # type: ignore[assignment]
        heads, size = int(module.num_attention_heads), int(module.attention_head_size)  # type: ignore[arg-type]
    forms = []
    for h in range(heads):
        rows = slice(h * size, (h + 1) * size)
        forms.append(qk_form(q.weight[rows], k.weight[rows], None if q.bias is None else q.bias[rows],  # type: ignore[index]
                             None if k.bias is None else k.bias[rows], scale=float(scale)))  # type: ignore[index]
    return forms


def positional_bias(module: nn.Module, n_q: int, n_k: int) -> Tensor | None:
    """The score terms b(i, j) an attnlab softmax module adds to scale·q·k (heads, n_q, n_k) float64, or None."""
    terms = getattr(module, "score_terms", None)
    if not isinstance(module, SoftmaxAttention) or not terms:
        return None
    device = module.q_proj.weight.device
    return sum(term(n_q, n_k, device=device, dtype=torch.float64) for term in terms)  # type: ignore[return-value]


# -- terms of a score ----------------------------------------------------------------------------------------------
def _check_share(share: Any) -> float:
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise ParameterError(f"share: expected a float in (0, 1], got {share!r}")
    return float(share)


def _check_terms(terms: Any) -> Tensor:
    if not isinstance(terms, Tensor) or terms.dim() < 1 or terms.shape[-1] < 1:
        raise ValueError(f"terms: expected a tensor (..., r) with r >= 1, got "
                         f"{tuple(terms.shape) if isinstance(terms, Tensor) else type(terms).__name__}")
    return terms


def _ordered(terms: Tensor) -> tuple[Tensor, Tensor]:
    """(terms sorted from the largest in the direction of their sum, |sum|)."""
    total = terms.sum(-1, keepdim=True)
    sign = torch.where(total >= 0, 1.0, -1.0).to(terms.dtype)
    return (terms * sign).sort(-1, descending=True).values, (total * sign).squeeze(-1)


def terms_needed(terms: Tensor, share: float = 0.9) -> Tensor:
    """The fewest terms whose sum reaches `share` of the score Σ_t terms: (..., r) -> (...,) int64; 0 for a 0 score.

    The terms of the score's sign are taken from the largest, so no smaller set reaches the share."""
    share = _check_share(share)
    ordered, total = _ordered(_check_terms(terms))
    reached = ordered.cumsum(-1) >= share * total.unsqueeze(-1) * (1 - 1e-12)  # rounding: the full sum is `total`
    return torch.where(total > 0, reached.to(torch.int64).argmax(-1) + 1, torch.zeros_like(total, dtype=torch.int64))


def top_terms_share(terms: Tensor, k: int) -> Tensor:
    """Share of the score Σ_t terms reached by its k largest terms (in the score's direction): (..., r) -> (...,);
    NaN for a 0 score."""
    if not is_int(k) or k < 1:
        raise ParameterError(f"k: expected a positive int, got {k!r}")
    ordered, total = _ordered(_check_terms(terms))
    return ordered[..., :k].sum(-1) / total


# -- decomposing the attention calls of a model ------------------------------------------------------------------
@dataclass
class AttentionCall:
    """One attention call of a model: its heads' forms, the tokens its queries and keys were projected from, the
    positional score terms (or None) and the attention it applied (from `capture`, padding 0)."""

    name: str
    forms: list[QKForm]
    x_q: Tensor  # (batch, n_q, d) float64
    x_k: Tensor  # (batch, n_k, d) float64
    bias: Tensor | None  # (heads, n_q, n_k): score terms added outside the bilinear part (ALiBi, KERPLE, ...)
    weights: Tensor  # (batch, heads, n_q, n_k)
    query_mask: Tensor  # bool (batch, n_q), True = real query
    key_mask: Tensor  # bool (batch, n_k)

    def _head(self, head: int) -> QKForm:
        if not is_int(head) or not 0 <= head < len(self.forms):
            raise ParameterError(f"head: expected an int in [0, {len(self.forms)}), got {head!r}")
        return self.forms[head]

    def terms(self, head: int) -> Tensor:
        """(batch, n_q, n_k, r): the singular terms of every query–key pair of `head`."""
        return self._head(head).terms(self.x_q, self.x_k)

    def scores(self, head: int) -> Tensor:
        """(batch, n_q, n_k): Σ_t terms + the positional bias — the pre-softmax scores, before masking."""
        s = self._head(head).scores(self.x_q, self.x_k)
        return s if self.bias is None else s + self.bias[head].to(s.device)


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost attnlab attention modules and the BERT-style self-attention modules of a model."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, Attention) or _is_bert_self_attention(module):
            if not any(name.startswith(outer + ".") or outer == "" for outer, _ in found):
                found.append((name, module))
    return found


def _recorder(store: dict[str, list[tuple[Tensor, Tensor]]], name: str) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if isinstance(module, Attention):
            x = args[0] if args else kwargs["x"]
            if kwargs.get("embeddings") is not None:  # decoupled-attention: q and k are projected from the embeddings
                x = kwargs["embeddings"]
            x, context = module.batch_major(x, kwargs.get("context"))
            keys = x if context is None else context
        else:
            x = args[0] if args else kwargs["hidden_states"]
            keys = x
        store.setdefault(name, []).append((x.detach().to(torch.float64), keys.detach().to(torch.float64)))
    return hook


def decompose(model: nn.Module, inputs: Mapping[str, Any] | Tensor) -> list[AttentionCall]:
    """Run `model(**inputs)` (a mapping) or `model(inputs)` once and return one `AttentionCall` per attention call.

    TypeError when an attention call of the model comes from a module `head_forms` refuses (named, with why)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    modules = _attention_modules(model)
    refused = {name: why for name, m in modules if (why := refusal(m)) is not None}
    store: dict[str, list[tuple[Tensor, Tensor]]] = {}
    handles = [m.register_forward_pre_hook(_recorder(store, name), with_kwargs=True)
               for name, m in modules if name not in refused]
    try:
        with torch.no_grad(), capture(model) as att:
            model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    by_name = dict(modules)
    missing = sorted({r.name for r in att.records if r.name not in store})
    if missing:
        reasons = "; ".join(f"{n} ({refused.get(n, 'not an attention module this decomposition knows')})" for n in missing)
        raise TypeError(f"model: attention calls whose scores are no bilinear form of the tokens: {reasons}")
    calls = []
    for record in att.records:
        x_q, x_k = store[record.name].pop(0)
        module = by_name[record.name]
        calls.append(AttentionCall(record.name, head_forms(module), x_q, x_k,
                                   positional_bias(module, x_q.shape[1], x_k.shape[1]),
                                   record.masked(record.weights), record.query_mask, record.key_mask))
    return calls


# -- the explain panel -------------------------------------------------------------------------------------------
def score_decomposition_summary(model: nn.Module, inputs: Mapping[str, Any] | Tensor, *, share: float = 0.9,
                                pairs: int = 3, top: int = 3) -> dict[str, Any]:
    """What an `attnlab explain` panel of P190 shows for a batch of texts, as plain data.

    Per attention call (layer) and head: the rank r, the singular values, and for each text its `pairs` query–key
    pairs of largest attention weight (real tokens only; positions index the padded sequence) with the score, the
    number of terms reaching `share` of the bilinear score (`terms_needed`) and its `top` largest terms
    (index t, σ_t, value, share of the bilinear score). "terms_needed" (layers × heads) is the mean over those
    pairs: a head whose scores are sparsely coded needs few of its r terms."""
    share = _check_share(share)
    for name, value in (("pairs", pairs), ("top", top)):
        if not is_int(value) or value < 1:
            raise ParameterError(f"{name}: expected a positive int, got {value!r}")
    calls = decompose(model, inputs)
    layers, means = [], []
    for call in calls:
        heads, row = [], []
        real = call.query_mask[:, None, :, None] & call.key_mask[:, None, None, :]
        weights = torch.where(real, call.weights.double(), torch.full_like(call.weights, -1.0, dtype=torch.float64))
        for h, form in enumerate(call.forms):
            terms = call.terms(h)  # (batch, n_q, n_k, r)
            found = []
            for b in range(weights.shape[0]):
                flat = weights[b, h].flatten()
                count = min(pairs, int(real[b, 0].sum()))
                for index in flat.topk(count).indices.tolist():
                    i, j = divmod(index, weights.shape[-1])
                    c = terms[b, i, j]
                    bilinear = float(c.sum())
                    order = (c * (1.0 if bilinear >= 0 else -1.0)).argsort(descending=True)[:top].tolist()
                    found.append({
                        "text": b, "query": i, "key": j, "weight": float(call.weights[b, h, i, j]),
                        "score": bilinear + (0.0 if call.bias is None else float(call.bias[h, i, j])),
                        "bilinear": bilinear, "bias": None if call.bias is None else float(call.bias[h, i, j]),
                        "terms_needed": int(terms_needed(c, share)),
                        "top_terms": [{"term": t, "sigma": float(form.sigma[t]), "value": float(c[t]),
                                       "share": float(c[t]) / bilinear if bilinear else 0.0} for t in order],
                    })
            mean = sum(p["terms_needed"] for p in found) / max(1, len(found))
            row.append(mean)
            heads.append({"rank": form.rank, "sigma": form.sigma.tolist(), "terms_needed": mean, "pairs": found})
        layers.append({"name": call.name, "heads": heads})
        means.append(row)
    return {"share": share, "names": [c.name for c in calls], "terms_needed": means,
            "rank": [[f.rank for f in c.forms] for c in calls], "layers": layers}


# -- tracing on a ToyLM --------------------------------------------------------------------------------------------
@dataclass
class ScoreTrace:
    """The terms of one score of a `ToyLM` head split over the residual sources of the query and of the key."""

    layer: int
    head: int
    query: int
    key: int
    sources: list[str]
    sigma: Tensor  # (r,)
    terms: Tensor  # (r,): σ_t (x̃_q·u_t)(x̃_k·v_t)
    query_side: Tensor  # (S, r): σ_t (s̃_q·u_t)(x̃_k·v_t); sums over the sources to `terms`
    key_side: Tensor  # (S, r): σ_t (x̃_q·u_t)(s̃_k·v_t)
    bias: float = 0.0  # positional score term of the pair (ALiBi, ...), outside the terms
    notes: list[str] = field(default_factory=list)

    @property
    def score(self) -> float:
        """The pre-softmax score: Σ_t terms + bias."""
        return float(self.terms.sum()) + self.bias

    def dominant(self, share: float = 0.9) -> list[int]:
        """The fewest terms reaching `share` of the bilinear score, largest first."""
        k = int(terms_needed(self.terms, share))
        sign = 1.0 if float(self.terms.sum()) >= 0 else -1.0
        return (self.terms * sign).argsort(descending=True)[:k].tolist()

    def source_shares(self, side: str, share: float = 0.9) -> dict[str, float]:
        """Each source's share of the dominant terms' sum on one side ("query" or "key"), largest first."""
        if side not in SIDES:
            raise ParameterError(f"side: expected one of {SIDES}, got {side!r}")
        chosen = self.dominant(share)
        parts = (self.query_side if side == "query" else self.key_side)[:, chosen].sum(-1)
        total = float(self.terms[chosen].sum())
        shares = {s: float(p) / total if total else 0.0 for s, p in zip(self.sources, parts)}
        return dict(sorted(shares.items(), key=lambda kv: -kv[1]))


def residual_sources(model: ToyLM, ids: Tensor, layer: int, *, prefix: Tensor | None = None) -> dict[str, Tensor]:
    """The residual stream entering `layer` as a sum of sources (batch, n, dim), in the model's dtype: "input" (token
    embeddings, or the prefix then the tokens), "position", then per earlier layer l "L{l}.H{h}" (head h's output
    W_O^h A^h v^h), "L{l}.out_bias", and "L{l}.mlp" when the blocks have an MLP.

    ValueError when an earlier layer's update is not Σ_h W_O^h A^h v^h + b_O (then it cannot be split by head)."""
    if not isinstance(model, ToyLM):
        raise TypeError(f"model: expected a ToyLM, got {type(model).__name__}")
    if not is_int(layer) or not 0 <= layer < model.settings.layers:
        raise ParameterError(f"layer: expected an int in [0, {model.settings.layers}), got {layer!r}")
    with torch.no_grad():
        t = model.trace(ids, prefix=prefix)
        n = t.residual[0].shape[1]
        position = model.position(torch.arange(n, device=t.residual[0].device)).expand_as(t.residual[0])
        sources = {"input": t.residual[0] - position, "position": position}
        for up in range(layer):
            block = model.blocks[up]
            attn = block.attn
            if not isinstance(attn, Attention):
                raise ValueError(f"model: layer {up}'s attention is not an attnlab Attention module; it cannot be split by head")
            h_in = block.norm1(t.residual[up])
            weights = attn.materialize(h_in)
            v = attn.project(h_in)[2]
            z = weights.to(v.dtype) @ v  # (batch, heads, n, head_dim)
            w_o = attn.out_proj.weight
            size = attn.head_dim
            total = torch.zeros_like(t.attention[up])
            for h in range(attn.heads):
                out = z[:, h] @ w_o[:, h * size:(h + 1) * size].T
                sources[f"L{up}.H{h}"] = out
                total = total + out
            bias = attn.out_proj.bias
            sources[f"L{up}.out_bias"] = (torch.zeros_like(total) if bias is None else bias.expand_as(total))
            total = total + sources[f"L{up}.out_bias"]
            gap = float((total - t.attention[up]).abs().max())
            tol = 1e-9 if total.dtype == torch.float64 else 1e-4
            if gap > tol * max(1.0, float(t.attention[up].abs().max())):
                raise ValueError(f"model: layer {up}'s attention update is not Σ_h W_O^h A^h v^h + b_O (off by {gap:.3g}); "
                                 f"{attn.spec.name} cannot be split by head")
            if block.mlp is not None:
                sources[f"L{up}.mlp"] = t.mlp[up]
    return sources


def trace_score(model: ToyLM, ids: Tensor, *, layer: int, head: int, query: int, key: int, batch: int = 0,
                prefix: Tensor | None = None) -> ScoreTrace:
    """The score of (`query`, `key`) in head `head` of `layer` (sequence `batch` of ids), its singular terms and each
    term split over the residual sources of the query and of the key (`residual_sources`, LayerNorm linear with its
    σ frozen; module docstring). Computed on a float64 copy of the model: the splits add up exactly."""
    if not isinstance(model, ToyLM):
        raise TypeError(f"model: expected a ToyLM, got {type(model).__name__}")
    exact = copy.deepcopy(model).to(torch.float64).eval().requires_grad_(False)
    sources = residual_sources(exact, ids, layer, prefix=None if prefix is None else prefix.to(torch.float64))
    n = next(iter(sources.values())).shape[1]
    for name, value, high in (("batch", batch, ids.shape[0]), ("query", query, n), ("key", key, n)):
        if not is_int(value) or not 0 <= value < high:
            raise ParameterError(f"{name}: expected an int in [0, {high}), got {value!r}")
    block = exact.blocks[layer]
    form = head_forms(block.attn)[head] if is_int(head) and 0 <= head < exact.settings.heads else None
    if form is None:
        raise ParameterError(f"head: expected an int in [0, {exact.settings.heads}), got {head!r}")
    norm = block.norm1
    x = sum(sources.values())
    sd = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps)
    gamma = torch.ones_like(x[0, 0]) if norm.weight is None else norm.weight
    beta = torch.zeros_like(x[0, 0]) if norm.bias is None else norm.bias
    names = list(sources)
    parts = torch.stack([gamma * (s - s.mean(-1, keepdim=True)) / sd for s in sources.values()])[:, batch]  # (S, n, d)
    u, v = form.u.to(parts.device), form.v.to(parts.device)
    q_parts = torch.cat([parts[:, query] @ u[:-1], (beta @ u[:-1] + u[-1])[None]])  # (S + 1, r), the last: "bias"
    k_parts = torch.cat([parts[:, key] @ v[:-1], (beta @ v[:-1] + v[-1])[None]])
    a, b = q_parts.sum(0), k_parts.sum(0)
    sigma = form.sigma.to(parts.device)
    bias = positional_bias(block.attn, n, n)
    return ScoreTrace(layer, head, query, key, [*names, "bias"], sigma, sigma * a * b, sigma * q_parts * b,
                      sigma * a * k_parts, 0.0 if bias is None else float(bias[head, query, key]))


# -- the demonstration on the cached induction model ------------------------------------------------------------
def induction_circuit(model: ToyLM, ids: Tensor, *, share: float = 0.9) -> dict[str, Any]:
    """P190 on a 2-layer induction model: the layer-1 head with the largest induction score, the layer-0 head with the
    largest previous-token score, the terms each induction pair (query in the second half of [r r], key after the
    first copy of its token) needs to reach `share` of its score, and the key-side source shares of the dominant
    terms averaged over those pairs — the previous-token head should lead them (K-composition).

    ids: (batch, 2·half) sequences [r r] (`induction_model.repeated_tokens`)."""
    if not isinstance(model, ToyLM) or model.settings.layers < 2:
        raise TypeError(f"model: expected a ToyLM of >= 2 layers, got {type(model).__name__}")
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[1] % 2 or ids.shape[1] < 4:
        raise ValueError(f"ids: expected [r r] sequences (batch, 2·half), got {tuple(getattr(ids, 'shape', ()))}")
    half = ids.shape[1] // 2
    scores = head_scores(model, ids)
    induction = int(torch.tensor(scores["induction"][1]).argmax())
    previous = int(torch.tensor(scores["previous_token"][0]).argmax())
    shares: dict[str, float] = {}
    needed = []
    count = 0
    for b in range(ids.shape[0]):
        for i in range(half, 2 * half - 1):
            tr = trace_score(model, ids, layer=1, head=induction, query=i, key=i - half + 1, batch=b)
            needed.append(int(terms_needed(tr.terms, share)))
            for name, value in tr.source_shares("key", share).items():
                shares[name] = shares.get(name, 0.0) + value
            count += 1
    mean_shares = dict(sorted(((k, v / count) for k, v in shares.items()), key=lambda kv: -kv[1]))
    rank = head_forms(model.blocks[1].attn)[induction].rank
    return {"induction_head": induction, "previous_token_head": previous, "head_scores": scores, "rank": rank,
            "share": share, "terms_needed": needed, "median_terms_needed": float(torch.tensor(needed).median()),
            "key_source_shares": mean_shares, "top_key_source": next(iter(mean_shares)),
            "expected_key_source": f"L0.H{previous}"}


def induction_circuit_demo(recipe: Any = None, *, cache_dir: str | Path | None = None, batch: int = 4,
                           seed: int = 0) -> dict[str, Any]:
    """`induction_circuit` on the cached full-size induction model (`induction_model.induction_model(recipe)`, trained
    on a miss: about a minute on one core) and `batch` fresh [r r] sequences."""
    trained = induction_model(recipe, cache_dir=cache_dir)
    settings = trained.model.settings  # type: ignore[union-attr]
    ids = repeated_tokens(torch.Generator().manual_seed(seed), batch=batch, half=settings.context // 2, vocab=settings.vocab)
    return {**induction_circuit(trained.model, ids), "model": str(trained.path), "record": trained.record}  # type: ignore[arg-type]


_MODEL = Param("model", nn.Module, doc="an attnlab model of softmax-family modules or a BERT-style transformers model")
_INPUTS = Param("inputs", (Mapping, Tensor), doc="what the model is called with: model(**inputs) or model(inputs)")
add(Spec(name="qk-decomposition", kind="analysis", paper=P190, factory=score_decomposition_summary, family="E",
         summary="sparse attention decomposition: each head's score as Σ_t σ_t (x_q·u_t)(x_k·v_t) over the SVD of "
                 "W_Q W_Kᵀ (biases in homogeneous coordinates); terms needed to reach 90% of the score",
         params=(_MODEL, _INPUTS, Param("share", float, 0.9, "share of the score the counted terms reach", low=0.0, high=1.0),
                 Param("pairs", int, 3, "query–key pairs of largest weight per text and head", low=1),
                 Param("top", int, 3, "largest terms listed per pair", low=1))))
add(Spec(name="qk-term-trace", kind="analysis", paper=P190, factory=trace_score, family="E",
         summary="head-to-head communication: the dominant singular terms of a ToyLM head's score split over the "
                 "upstream heads' outputs (and embeddings) of the query and the key",
         params=(Param("model", ToyLM, doc="a ToyLM (attnlab.analysis.toy_lm)"),
                 Param("ids", Tensor, doc="token ids (batch, n)"),
                 Param("layer", int, doc="layer of the head", low=0), Param("head", int, doc="head", low=0),
                 Param("query", int, doc="query position", low=0), Param("key", int, doc="key position", low=0),
                 Param("batch", int, 0, "sequence of the batch", low=0))))
