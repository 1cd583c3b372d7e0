"""P031's unified implicit attention, an analysis entry: the attention matrix a gated selective-SSM layer
("mamba", attnlab/mechanisms/linear/selective_ssm.py) applies implicitly, gate · S6 hidden attention · SiLU · conv."""
from __future__ import annotations

from torch import Tensor, nn

from ..core.registry import Paper, Param, Spec, add

UNIFIED_ATTENTION = Paper(
    "P031", "Explaining Modern Gated-Linear RNNs via a Unified Implicit Attention Formulation", 2024, "2405.16504"
)


def unified_implicit_attention(
    module: nn.Module, x: Tensor, attention_mask: Tensor | None = None, per_channel: bool = False
) -> Tensor:
    """P031's unified implicit attention of a layer that offers it (`unified_attention`), e.g. "mamba"."""
    if not hasattr(module, "unified_attention"):
        raise TypeError(
            f"module: expected a layer with a unified implicit attention (e.g. attnlab.build('mamba', ...)), "
            f"got {type(module).__name__}"
        )
    return module.unified_attention(x, attention_mask=attention_mask, per_channel=per_channel)


add(
    Spec(
        name="unified-implicit-attention",
        kind="analysis",
        paper=UNIFIED_ATTENTION,
        factory=unified_implicit_attention,
        family="E",
        summary="unified implicit attention of a gated selective-SSM layer: gate · S6 hidden attention · SiLU · conv",
        params=(
            Param("module", nn.Module, doc="the layer, e.g. attnlab.build('mamba', dim=...)"),
            Param("x", Tensor, doc="tokens (batch, n, dim)"),
            Param("attention_mask", Tensor, None, "bool (batch, n), True = real token", optional=True),
            Param("per_channel", bool, False, "every channel's matrix instead of the mean per head"),
        ),
    )
)
