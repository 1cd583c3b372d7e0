"""lucidrains' local-attention as a peer: its block-window pattern, and multiscale with one window.

Peer path: `local_attention.LocalAttention(window_size, causal, look_backward,
look_forward, exact_windowsize, autopad=False, dim=None)` (pure PyTorch einsums over
blocks; its only path), built in `prepare`; the timed call is `attn(q, k, v)`, forward
and forward + backward.

Checked equal: the output (and for "fwd+bwd" the gradients of q, k, v) on the run's q, k,
v must agree with attnlab's within `TOLERANCE` (1e-4 float32, 1e-8 float64) before it is
timed. attnlab's side is "multiscale"'s `module.attend` with one window for every head, or
for local-attention's own pattern (params["attn_mask"]["pattern"] == `LOCAL_PATTERN`,
added at every N of a run's dense softmax) "softmax" given the explicit mask
`local_attention_mask` (dense SDPA over the N×N mask).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...core.errors import ParameterError
from .base import Peer

LOCAL_PATTERN = "local-attention"  # params["attn_mask"]["pattern"] of local-attention's block-window mask


def local_attention_mask(
    n: int, window_size: int, look_backward: int, look_forward: int, causal: bool, device: torch.device | None = None
) -> Tensor:
    """bool (n, n), True = attend: the keys lucidrains' `LocalAttention` lets query i see.

    Positions are cut into blocks of `window_size`; query i (block b = i // window_size)
    sees the keys of blocks b − look_backward … b + look_forward that exist, and with
    `causal` only keys j ≤ i. (That is `LocalAttention(window_size, causal, look_backward,
    look_forward, exact_windowsize=False, autopad=False, dim=None)`: no rotary embedding,
    scale head_dim^−½, n a multiple of window_size.)
    """
    pos = torch.arange(n, device=device)
    block = pos // window_size
    delta = block[None, :] - block[:, None]  # key block − query block
    keep = (delta >= -look_backward) & (delta <= look_forward)
    if causal:
        keep &= pos[None, :] <= pos[:, None]
    return keep


class LocalAttentionPeer(Peer):
    """lucidrains' local-attention: `LocalAttention`, blocked windows with look-back and look-ahead.

    What it computes (local-attention 1.11, with dim=None so no rotary embedding,
    autopad=False, shared_qk=False, dropout 0): positions in blocks of `window_size`; each
    query attends to the keys of its block, of `look_backward` blocks before and
    `look_forward` blocks after (those that exist), with causal masking j ≤ i when causal;
    softmax(q·k·head_dim^−½) over them. With `exact_windowsize=True` it keeps only keys
    within window_size·look_backward before and window_size·look_forward after the query.

    Two correspondences:
    * attnlab "softmax" with an explicit attn_mask (`local_attention_mask`), params
      {"attn_mask": {"pattern": "local-attention", "window_size", "look_backward",
      "look_forward"}}: exact, but attnlab's side here is dense SDPA over the N×N mask
      (O(N²)) until the block-sparse engine (issue 5) lands;
    * attnlab "multiscale" with one window ω for every head: LocalAttention(window_size=ω,
      look_backward=1, look_forward=0 if causal else 1, exact_windowsize=True) keeps exactly
      |i − j| ≤ ω (and j ≤ i), as a band of width ω never leaves the neighbouring blocks.
    Either needs n to be a multiple of the window.
    """

    name = "local-attention"
    package = "local-attention"
    module = "local_attention"
    summary = "lucidrains' blocked local attention (pure PyTorch einsums; forward and backward)."
    mechanisms = {
        "softmax": "with params.attn_mask = local-attention's block-window mask: LocalAttention(window_size, causal, "
                   "look_backward, look_forward); attnlab side dense SDPA with that mask",
        "multiscale": "one window ω for all heads: LocalAttention(window_size=ω, look_backward=1, "
                      "look_forward=0 if causal else 1, exact_windowsize=True)",
    }
    window_size: ClassVar[int] = 128

    def _window(self, config: Mapping[str, Any]) -> tuple[int, int, int, bool]:
        """(window_size, look_backward, look_forward, exact_windowsize)."""
        params = config["params"]
        if config["mechanism"] == "multiscale":
            radii = params.get("radii")
            if radii is None or len(set(radii)) != 1 or radii[0] in (None, -1):
                raise ParameterError(
                    f"radii: local-attention needs one finite radius for every head, got {radii!r}"
                )
            return int(radii[0]), 1, 0 if config["causal"] else 1, True
        mask = params.get("attn_mask")
        if not isinstance(mask, Mapping) or mask.get("pattern") != LOCAL_PATTERN:
            raise ParameterError(f"attn_mask: expected the {LOCAL_PATTERN!r} pattern, got {mask!r}")
        return int(mask["window_size"]), int(mask["look_backward"]), int(mask["look_forward"]), False

    def unsupported_params(self, config: Mapping[str, Any]) -> str | None:
        if config.get("grid"):
            return "local-attention works on 1-D sequences"
        try:
            window, back, forward, _ = self._window(config)
        except ParameterError as err:
            return str(err)
        if window < 1 or config["n"] % window:
            return f"n={config['n']} is not a multiple of window_size={window} (local-attention without autopad)"
        if config["causal"] and forward:
            return "look_forward must be 0 when causal"
        if back < 0 or forward < 0:
            return f"look_backward and look_forward must be >= 0, got {back}, {forward}"
        return None

    def native_configs(self, shape: Mapping[str, Any]) -> list[dict[str, Any]]:
        pattern = {"pattern": LOCAL_PATTERN, "window_size": self.window_size, "look_backward": 1,
                   "look_forward": 0 if shape["causal"] else 1}
        return [{**shape, "mechanism": "softmax", "impl": self.name, "params": {"attn_mask": pattern},
                 "n": shape["n"], "grid": None}]

    def attnlab_mask(self, config: Mapping[str, Any], device: torch.device) -> Tensor | None:
        window, back, forward, _ = self._window(config)
        return local_attention_mask(config["n"], window, back, forward, config["causal"], device)

    def prepare(self, q: Tensor, k: Tensor, v: Tensor, config: Mapping[str, Any]) -> Callable[[], Tensor]:
        from local_attention import LocalAttention

        window, back, forward, exact = self._window(config)
        attn = LocalAttention(window, causal=config["causal"], look_backward=back, look_forward=forward,
                              exact_windowsize=exact, autopad=False, dim=None).to(q.device)
        return lambda: attn(q, k, v)
