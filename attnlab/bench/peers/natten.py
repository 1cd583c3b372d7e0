"""NATTEN as a peer of neighborhood attention, 1-D and 2-D.

Peer path: NATTEN 0.21's `natten.na1d` / `natten.na2d(q, k, v, kernel_size, dilation,
is_causal=(causal,)·rank, stride=1, backend="flex-fna")`. On CPU flex-fna is its only
backend, and NATTEN does not allow compiling it there (it needs a GPU of compute
capability >= 7.0), so it runs FlexAttention's unfused forward and builds its block mask at
every call (inside the timed call). q, k, v go to NATTEN's layout (batch, *grid, heads,
head_dim) in `prepare`, outside the timed call; the output comes back to (batch, heads, n,
head_dim) inside it. Forward only: flex-fna has no backward on CPU.

NATTEN also adds its own configurations at every N of a run's dense softmax: 1-D with
kernel 13, and 2-D with kernel 7×7 on the square grid nearest N (when its side is 7 or more).

Checked equal: the output on the run's q, k, v must agree with attnlab's "neighborhood"
`module.attend` (kernel_size, dilation and causal mapped one to one, the grid given as
`attnlab bench speed` gives it) within `TOLERANCE` (1e-4 float32, 1e-8 float64) before it
is timed. The rule both compute is `neighborhood.neighborhood_keep`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from ..speed_configs import grid_for
from .base import Peer, natural_params, spec_or_none
from .neighborhood import neighborhood_args, neighborhood_unsupported


class NattenPeer(Peer):
    """NATTEN 0.21 neighborhood attention (natten.na1d / na2d, backend "flex-fna")."""

    name = "natten"
    package = "natten"
    module = "natten"
    summary = ("NATTEN's neighborhood attention; on CPU its only backend is flex-fna, and NATTEN does not allow "
               "compiling it there (it needs a GPU of compute capability >= 7.0), so it runs FlexAttention's "
               "unfused forward and builds its block mask at every call.")
    mechanisms = {
        "neighborhood": "na1d / na2d(q, k, v, kernel_size, dilation, is_causal=(causal,)·rank, stride=1, "
                        "backend='flex-fna'); q, k, v as (batch, *grid, heads, head_dim)",
    }
    modes = ("fwd",)
    mode_notes = {"fwd+bwd": "NATTEN's CPU backend (flex-fna) has no backward: FlexAttention does not support "
                             "backward on CPU"}

    def unsupported_params(self, config: Mapping[str, Any]) -> str | None:
        return neighborhood_unsupported(config)

    def native_configs(self, shape: Mapping[str, Any]) -> list[dict[str, Any]]:
        spec = spec_or_none("neighborhood")
        n = shape["n"]
        out = []
        for grid, kernel in ((None, 13), (grid_for(n, 2), [7, 7])):
            if grid is not None and min(grid) < 7:
                continue
            params = natural_params(spec, {"kernel_size": kernel})
            out.append({**shape, "mechanism": "neighborhood", "impl": self.name, "params": params,
                        "n": math.prod(grid) if grid else n, "grid": grid})
        return out

    def prepare(self, q: Tensor, k: Tensor, v: Tensor, config: Mapping[str, Any]) -> Callable[[], Tensor]:
        import natten

        grid, kernel, dilation = neighborhood_args(config)
        b, h, n, d = q.shape
        op = {1: natten.na1d, 2: natten.na2d}[len(grid)]
        qn, kn, vn = (t.transpose(1, 2).reshape(b, *grid, h, d) for t in (q, k, v))
        causal = (bool(config["causal"]),) * len(grid)

        def run() -> Tensor:
            out = op(qn, kn, vn, kernel_size=kernel, dilation=dilation, is_causal=causal, backend="flex-fna")
            return out.reshape(b, n, h, d).transpose(1, 2)

        return run
