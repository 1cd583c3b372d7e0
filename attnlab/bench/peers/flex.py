"""FlexAttention as a peer: softmax, alibi, sliding-window, multiscale and neighborhood as score_mod / mask_mod patterns.

Peer path: `torch.nn.attention.flex_attention` compiled with torch.compile
(`attnlab.kernels.flex.compiled_flex`, inductor's CPU template), FlexAttention's fast path:
it compiles once per pattern and shape (about 15–40 s cold, seconds with torch's on-disk
cache warm) and the compiled function is kept for the rest of the process. `prepare` builds
the block mask (`create_block_mask`) once, outside the timed call. Forward only: FlexAttention
has no backward on CPU. `FlexPeer(compile=False)` runs the same mods unfused (the tests).

The mappings: softmax has no score_mod (causal: mask_mod q_idx >= kv_idx); alibi the
score_mod s − m_h·|q_idx − kv_idx| with attnlab's slopes (`attnlab.functional.alibi_slopes`);
sliding-window the band |q_idx − kv_idx| <= radius (and q_idx >= kv_idx when causal, Mistral's form);
multiscale a per-head band |q_idx − kv_idx| <= radii[h] (a global head has no limit);
neighborhood the mask_mod of NATTEN's clamped windows (`neighborhood.neighborhood_keep`).

Checked equal: the output on the run's q, k, v must agree with the mapped mechanism's
`module.attend` within `TOLERANCE` (1e-4 float32, 1e-8 float64) before it is timed.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ...kernels.flex import compiled_flex, eager_flex
from .base import Peer
from .neighborhood import neighborhood_args, neighborhood_keep, neighborhood_unsupported


class FlexPeer(Peer):
    """torch.nn.attention.flex_attention: score_mod and block-mask patterns, compiled (CPU forward only)."""

    name = "flex"
    package = "torch"
    module = "torch.nn.attention.flex_attention"
    summary = "PyTorch FlexAttention, compiled with torch.compile (inductor's CPU template)."
    mechanisms = {
        "softmax": "no score_mod; causal: mask_mod q_idx >= kv_idx",
        "alibi": "score_mod s − m_h·|q_idx − kv_idx| with attnlab's slopes m_h (alibi_slopes)",
        "sliding-window": "band mask_mod |q_idx − kv_idx| <= radius, & q_idx >= kv_idx when causal",
        "multiscale": "per-head band mask_mod |q_idx − kv_idx| <= radii[h] (global heads: no limit), & causal",
        "neighborhood": "mask_mod of NATTEN's clamped windows per axis (kernel_size, dilation, causal), 1-D and 2-D",
    }
    modes = ("fwd",)
    mode_notes = {"fwd+bwd": "FlexAttention has no backward on CPU (torch raises 'FlexAttention does not support "
                             "backward on CPU')"}

    def __init__(self, *, compile: bool = True) -> None:
        self.compile = compile

    def unsupported_params(self, config: Mapping[str, Any]) -> str | None:
        if config["mechanism"] == "neighborhood":
            return neighborhood_unsupported(config)
        if config.get("grid"):
            return f"{config['mechanism']} on a grid is not mapped"
        return None

    def mods(self, config: Mapping[str, Any], device: torch.device) -> tuple[Callable | None, Callable | None, bool]:
        """(score_mod, mask_mod, mask varies by head) of a configuration."""
        mechanism, causal, heads = config["mechanism"], config["causal"], config["heads"]

        def causal_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return q_idx >= kv_idx

        if mechanism == "softmax":
            return None, causal_mask if causal else None, False
        if mechanism == "alibi":
            from ...functional import alibi_slopes

            slopes = alibi_slopes(heads, device=device)

            def alibi(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
                return score - slopes[h] * (q_idx - kv_idx).abs()

            return alibi, causal_mask if causal else None, False
        if mechanism == "sliding-window":
            radius = int(config["params"]["radius"])

            def window(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
                keep = (q_idx - kv_idx).abs() <= radius
                return keep & (q_idx >= kv_idx) if causal else keep

            return None, window, False
        if mechanism == "multiscale":
            from ...mechanisms.dense.multiscale import GLOBAL, check_radii, default_radii

            given = config["params"].get("radii")
            radii = default_radii(heads) if given is None else check_radii(given, heads)
            limit = torch.tensor([config["n"] if w == GLOBAL else w for w in radii], device=device)

            def band(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
                keep = (q_idx - kv_idx).abs() <= limit[h]
                return keep & (q_idx >= kv_idx) if causal else keep

            return None, band, True
        if mechanism == "neighborhood":
            grid, kernel, dilation = neighborhood_args(config)

            def neighborhood(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
                return neighborhood_keep(q_idx, kv_idx, grid, kernel, dilation, causal)

            return None, neighborhood, False
        raise ValueError(f"mechanism: flex has no mapping of {mechanism!r}")

    def prepare(self, q: Tensor, k: Tensor, v: Tensor, config: Mapping[str, Any]) -> Callable[[], Tensor]:
        from torch.nn.attention.flex_attention import create_block_mask

        score_mod, mask_mod, per_head = self.mods(config, q.device)
        n = q.shape[2]
        block_mask = None
        if mask_mod is not None:
            block_mask = create_block_mask(mask_mod, None, q.shape[1] if per_head else None, n, n, device=q.device)
        fn = compiled_flex() if self.compile else eager_flex()
        return lambda: fn(q, k, v, score_mod=score_mod, block_mask=block_mask)
