"""The attention layers of a model and their q, k, v, o projections, for the recipes.

A recipe (an initialisation, a fine-tuning rule, a distillation loss) acts on the projections of
every attention layer of a model. `attention_layers(model)` finds them, in module order, in

* attnlab models: every `attnlab.core.module.Attention` (what `attnlab.build` makes for a
  mechanism, and the mixer of every block), projections `q_proj`, `k_proj`, `v_proj`, `out_proj`;
* transformers BERT-style encoders (MiniLM): the module holding `self.query`, `self.key`,
  `self.value` (`self.num_attention_heads` heads) and the output projection `output.dense`;
* other modules with `q_proj`, `k_proj`, `v_proj` and `o_proj` (or `out_proj`) and as many
  key as query heads (Llama-style without grouped keys).

Conventions: a projection is an `nn.Linear` with weight (out, in), y = x Wᵀ + b. In the papers'
notation x W, the head h's query matrix is W_q^h = weight_q[h·d_h:(h+1)·d_h]ᵀ (dim × d_h), and the
output projection's rows for head h are W_o^h = weight_o[:, h·d_h:(h+1)·d_h]ᵀ (d_h × dim).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..core.module import Attention


@dataclass(frozen=True)
class AttentionLayer:
    """One attention layer: `module` is the sublayer (its output replaces the attention output),
    q, k, v, o its projections, `heads` × `head_dim` the width of q, k, v."""

    name: str
    module: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    heads: int
    head_dim: int

    @property
    def dim(self) -> int:
        """The model width (input of q, k, v; output of o)."""
        return self.q.in_features

    def head_rows(self, h: int) -> slice:
        """The rows of q, k, v (and columns of o) of head h."""
        return slice(h * self.head_dim, (h + 1) * self.head_dim)

    def query_key(self, h: int) -> Tensor:
        """W_q^h W_k^hᵀ (dim × dim): the bilinear form of head h's scores, q·k = x W_q^h W_k^hᵀ x'ᵀ."""
        rows = self.head_rows(h)
        return self.q.weight[rows].T @ self.k.weight[rows]

    def value_output(self, h: int) -> Tensor:
        """W_v^h W_o^h (dim × dim): what head h writes to the output per unit of attention."""
        rows = self.head_rows(h)
        return self.v.weight[rows].T @ self.o.weight[:, rows].T


def _linear(module: nn.Module, name: str) -> nn.Linear | None:
    found = getattr(module, name, None)
    return found if isinstance(found, nn.Linear) else None


def _layer(name: str, module: nn.Module) -> AttentionLayer | None:
    if isinstance(module, Attention):
        return AttentionLayer(
            name, module, module.q_proj, module.k_proj, module.v_proj, module.out_proj, module.heads, module.head_dim
        )
    inner, output = getattr(module, "self", None), getattr(module, "output", None)
    if isinstance(inner, nn.Module) and isinstance(output, nn.Module):
        q, k, v, o = _linear(inner, "query"), _linear(inner, "key"), _linear(inner, "value"), _linear(output, "dense")
        heads = getattr(inner, "num_attention_heads", None)
        if q is not None and k is not None and v is not None and o is not None and isinstance(heads, int):
            return AttentionLayer(name, module, q, k, v, o, heads, q.out_features // heads)
    q, k, v = _linear(module, "q_proj"), _linear(module, "k_proj"), _linear(module, "v_proj")
    o = _linear(module, "o_proj") or _linear(module, "out_proj")
    if q is None or k is None or v is None or o is None:
        return None
    head_dim = getattr(module, "head_dim", None)
    if not isinstance(head_dim, int) or q.out_features % head_dim:
        return None
    if k.out_features != q.out_features:
        raise ValueError(
            f"model: expected as many key as query heads in {name!r}, got k_proj width {k.out_features} "
            f"and q_proj width {q.out_features} (grouped keys are not supported by the recipes)"
        )
    return AttentionLayer(name, module, q, k, v, o, q.out_features // head_dim, head_dim)


def attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """Every attention layer of `model` in module order (module docstring); none found raises ValueError."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    found: list[AttentionLayer] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue  # the projections of a layer found already (or a layer nested in it)
        layer = _layer(name, module)
        if layer is None:
            continue
        width = layer.heads * layer.head_dim
        if (layer.q.out_features, layer.k.out_features, layer.v.out_features, layer.o.in_features) != (width,) * 4:
            raise ValueError(
                f"model: expected q, k, v of width heads × head_dim = {width} in {name or 'the model'!r}, got "
                f"{layer.q.out_features}, {layer.k.out_features}, {layer.v.out_features} (o takes {layer.o.in_features})"
            )
        found.append(layer)
        inside.append(name)
    if not found:
        raise ValueError(
            f"model: expected a model with attention layers (attnlab Attention, BERT-style self/output, or "
            f"q_proj/k_proj/v_proj/o_proj), got {type(model).__name__} with none"
        )
    return found
