"""Claims about which keys a query reaches, and exact identities: counted from the attention a module applies.

The support of a mechanism is read from `materialize` (the (batch, heads, n, n) matrix its reference path
applies): a pair (i, j) is in it when the weight is non-zero. Receptive fields compose supports over layers
(boolean matrix products) or take input gradients through one layer. Identities compare two computations in
float64 on the same projected q, k, v.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch

from ...core.registry import build as build_module
from ...mechanisms.linear.focused import FLATTEN, depthwise_conv
from ...mechanisms.local.aggregated import TRANSNEXT
from ...mechanisms.local.circular_window import CLEAR
from ...mechanisms.sparse.power import POWER
from ..claim import Claim, Measurement, Rule, Series, register_claim
from ..measure import log10_floor
from .cost import P019, P147, P228, tokens

P170, P223, P238 = CLEAR, POWER, TRANSNEXT  # as the mechanisms cite them


def support(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The (n, n) bool support of the first head's attention on x (batch 1)."""
    with torch.no_grad():
        return module.materialize(x)[0, 0] != 0  # type: ignore[operator]


# -- P170: circular windows cost πr²/N of dense attention ---------------------------------------------------
CIRCLE_CONFIGS = {"smoke": ((12, 2.0),), "full": ((48, 3.0), (48, 4.0), (48, 5.0))}  # (image side, radius)


def circle_ratio(seed: int, size: str) -> Measurement:
    configs = CIRCLE_CONFIGS[size]
    side, radius = configs[seed % len(configs)]
    n = side * side
    torch.manual_seed(seed)
    module = build_module("circular-window", dim=16, heads=1, radius=radius, grid_shape=(side, side)).eval()
    pairs = int(support(module, tokens(n, 16, seed).view(1, side, side, 16)).sum())
    ratio = pairs / (n * n)
    predicted = math.pi * radius ** 2 / n
    return Measurement(ratio / predicted, (Series(f"side {side}, r {radius:g}", (predicted,), (ratio,)),),
                       {"side": float(side), "radius": radius, "measured ratio": ratio, "πr²/N": predicted})


register_claim(Claim(
    id="P170-flop-ratio", paper=P170,
    statement="Circular local attention of radius r costs a fraction πr²/N of full attention on an N-token image",
    statistic="(attended pairs / N²) ÷ (πr²/N), pairs read from the materialized attention on a 48 × 48 image",
    direction="≈ 1", rule=Rule(0.85, 1.15), run=circle_ratio, budget_s=60, xlabel="πr²/N", ylabel="pairs / N²",
    logx=False, logy=False,
    note="the seeds take r = 3, 4, 5 on a 48 × 48 image; windows cut at the image border make the count lower than "
    "πr² by about 8r/(3π·side) (6–9% here), which the ±15% band of the rule allows; the rule was set before the run",
))


# -- P223: PowerAttention's receptive field 2^d ---------------------------------------------------------------
POWER_BLOCKS = {"smoke": (2, 40, 3), "full": (3, 160, 6)}  # (smallest block size, blocks, deepest d)


def contiguous_reach(mask: torch.Tensor, depth: int) -> list[int]:
    """For depths 1..depth: how many positions back from the last query are all reachable (its contiguous
    receptive field, the query itself included), composing the support `mask` (n, n) over layers."""
    n = mask.shape[0]
    m = mask.double()
    reach = torch.zeros(n, dtype=torch.float64)
    reach[-1] = 1.0
    out = []
    for _ in range(depth):
        reach = ((reach @ m) + reach > 0).double()
        back = reach.flip(0)
        gaps = (back == 0).nonzero()
        out.append(int(gaps[0]) if len(gaps) else n)
    return out


def power_reach(seed: int, size: str) -> Measurement:
    low, blocks, depth = POWER_BLOCKS[size]
    block = low + seed % 3
    n = block * blocks
    torch.manual_seed(seed)
    power = build_module("power-attention", dim=16, heads=1, block_size=block)
    window = build_module("sliding-window", dim=16, heads=1, causal=True, radius=block, block_size=block)
    x = tokens(n, 16, seed)
    depths = tuple(float(d) for d in range(1, depth + 1))
    fields = contiguous_reach(support(power, x), depth)
    if max(fields) >= n:
        raise RuntimeError(f"P223: the receptive field reached the sequence start (n = {n}); use more blocks")
    slope = float(torch.tensor([math.log2(f) for f in fields]).diff().mean()) if depth > 1 else 0.0
    slide = contiguous_reach(support(window, x), depth)
    return Measurement(slope, (Series("power-attention", depths, tuple(map(float, fields))),
                               Series("sliding-window (radius = block)", depths, tuple(map(float, slide)))),
                       {"block size": float(block), f"field at d={depth}": float(fields[-1])})


register_claim(Claim(
    id="P223-receptive-field", paper=P223,
    statement="d layers of PowerAttention give a receptive field of 2^d, complete and continuous",
    statistic="mean growth of log2(contiguous receptive field of the last token) per layer, d = 1…6",
    direction="≈ 1 (doubling per layer; a sliding window grows linearly)", rule=Rule(0.9, 1.1), run=power_reach,
    budget_s=30, xlabel="layers d", ylabel="contiguous receptive field (tokens)", logx=False,
    note="support read from the materialized causal attention (block sizes 3, 4, 5 by seed), composed over layers; "
    "'contiguous' counts positions back from the query up to the first unreachable one, so gaps end it",
))


# -- P238: one aggregated-attention layer sees the whole image ------------------------------------------------
AGG_SIDES = {"smoke": (6,), "full": (12, 16, 20)}


def gradient_field(module: torch.nn.Module, side: int, dim: int, seed: int) -> float:
    """Share of the pixels whose input gradient of the centre pixel's output is non-zero (one layer)."""
    x = tokens(side * side, dim, seed).view(1, side, side, dim).double().requires_grad_(True)
    module(x)[0, side // 2, side // 2].sum().backward()
    return float((x.grad[0].abs().sum(-1) > 0).double().mean())  # type: ignore[union-attr]


def aggregated_field(seed: int, size: str) -> Measurement:
    sides = AGG_SIDES[size]
    side = sides[seed % len(sides)]
    dim = 16
    torch.manual_seed(seed)
    agg = build_module("aggregated", dim=dim, heads=1, kernel_size=3, pool_size=2, cpb_hidden=16).double()
    local = build_module("neighborhood", dim=dim, heads=1, kernel_size=3, grid_rank=2).double()
    covered = gradient_field(agg, side, dim, seed)
    window = gradient_field(local, side, dim, seed)
    return Measurement(covered, (Series("aggregated", (float(side),), (covered,)),
                                 Series("neighborhood 3×3", (float(side),), (window,))),
                       {"side": float(side), "window share": window})


register_claim(Claim(
    id="P238-global-field", paper=P238,
    statement="Aggregated attention gives each token global perception in a single layer",
    statistic="share of the image's pixels with a non-zero input gradient of the centre pixel's output, one layer",
    direction="= 1 (a 3 × 3 window layer: 9/N)", rule=Rule(0.99, math.inf), run=aggregated_field, budget_s=60,
    xlabel="image side", ylabel="share of pixels reached", logx=False, logy=False, method="exact",
    note="3 × 3 sliding window + 2 × 2 pooled keys, float64 (an exact-zero test); the seeds take sides 12, 16, 20",
))


# -- P147: Combiner's full support ----------------------------------------------------------------------------
COMBINER_LENGTHS = {"smoke": (16, 36), "full": (64, 256, 1024)}


def combiner_support(seed: int, size: str) -> Measurement:
    lengths = COMBINER_LENGTHS[size]
    shares, direct = [], []
    for n in lengths:
        torch.manual_seed(seed)
        module = build_module("combiner", dim=16, heads=1).double()
        shares.append(float(support(module, tokens(n, 16, seed).double()).double().mean()))
        block = math.isqrt(n)
        direct.append(block / n)
    xs = tuple(map(float, lengths))
    return Measurement(min(shares), (Series("combiner", xs, tuple(shares)),
                                     Series("its direct blocks alone (√L/L)", xs, tuple(direct))))


register_claim(Claim(
    id="P147-full-support", paper=P147,
    statement="Combiner gives full attention: every query reaches every key in one layer",
    statistic="smallest share (over L = 64, 256, 1024) of the (query, key) pairs with a non-zero weight",
    direction="= 1 (its sparse base pattern alone: √L/L)", rule=Rule(0.999, math.inf), run=combiner_support,
    budget_s=60, xlabel="L", ylabel="share of pairs with weight > 0", logy=False, method="exact",
    note="weights read from the materialized attention in float64 on random inputs",
))


# -- exact identities -----------------------------------------------------------------------------------------
IDENTITY_LENGTHS = {"smoke": (16,), "full": (64, 256, 1024)}


def identity_gap(lengths: Sequence[int], label: str,
                 pair: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> Measurement:
    """log10 of the largest max |got − want| / max |want| over `lengths`, (got, want) = `pair(n)`; the
    relative differences (0 drawn as 1e-300) against n as the curve `label`."""
    errors = []
    for n in lengths:
        got, want = pair(n)
        errors.append(float((got - want).abs().max() / want.abs().max()))
    xs = tuple(map(float, lengths))
    return Measurement(log10_floor(max(errors)), (Series(label, xs, tuple(max(e, 1e-300) for e in errors)),))


def scaling_identity(seed: int, size: str) -> Measurement:
    """max |efficient(scaling) − (QKᵀ/N)V| / max |(QKᵀ/N)V|, in float64, over the lengths."""

    def pair(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)
        module = build_module("efficient", dim=32, heads=2, normalization="scaling").double()
        with torch.no_grad():
            q, k, v = module.project(tokens(n, 32, seed).double())
            # the dot-product form with scaling normalisation
            return module.attend(q, k, v), (q @ k.transpose(-1, -2) / n) @ v

    return identity_gap(IDENTITY_LENGTHS[size], "efficient (scaling)", pair)


register_claim(Claim(
    id="P228-equality", paper=P228,
    statement="With scaling normalisation, efficient attention ρq(Q)(ρk(K)ᵀV) equals dot-product attention (QKᵀ/N)V",
    statistic="log10 of the largest relative difference of the two in float64 (N = 64, 256, 1024)",
    direction="at rounding level (< 1e-10)", rule=Rule(-math.inf, -10.0), run=scaling_identity, budget_s=20,
    ylabel="max relative difference", method="exact", note="the same projected q, k, v; the seeds set them",
))


ODD_LENGTHS = {"smoke": (15,), "full": (63, 255, 1023)}


def neighborhood_identity(seed: int, size: str) -> Measurement:
    """max |neighborhood(k = N) − softmax| / max |softmax| in float64: a window as long as the sequence."""

    def pair(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)
        nbh = build_module("neighborhood", dim=32, heads=2, kernel_size=n).double()
        dense = build_module("softmax", dim=32, heads=2).double()
        with torch.no_grad():
            q, k, v = nbh.project(tokens(n, 32, seed).double())
            return nbh.attend(q, k, v), dense.attend(q, k, v)

    return identity_gap(ODD_LENGTHS[size], "neighborhood, k = N", pair)


register_claim(Claim(
    id="P019-full-window", paper=P019,
    statement="Neighborhood attention with a window of k = N keys recovers full self-attention",
    statistic="log10 of the largest relative difference from dense softmax attention in float64 (N = 63, 255, 1023)",
    direction="at rounding level (< 1e-10)", rule=Rule(-math.inf, -10.0), run=neighborhood_identity, budget_s=60,
    ylabel="max relative difference", method="exact", note="the same projected q, k, v; no relative position bias",
))


# -- P034: linear attention has rank ≤ d; the depthwise conv on V restores full rank -----------------------------
RANK_WIDTHS = (8, 16, 24)
RANK_TOKENS = {"smoke": 24, "full": 96}


@functools.lru_cache(maxsize=8)
def mixing_ranks(seed: int, size: str) -> dict[str, float]:
    """Ranks of the token-mixing matrices of channel c, ∂out[:, c]/∂v[:, c], in focused linear attention's fast
    path: of the attention core alone, and of the core plus the depthwise conv on V (as the module's forward adds it)."""
    d, n = RANK_WIDTHS[seed % len(RANK_WIDTHS)], RANK_TOKENS[size]
    torch.manual_seed(seed)
    module = build_module("focused-linear", dim=d, heads=1).double()
    with torch.no_grad():
        q, k, v = module.project(tokens(n, d, seed).double())

    def core(values: torch.Tensor) -> torch.Tensor:
        return module.attend(q, k, values)

    def with_conv(values: torch.Tensor) -> torch.Tensor:
        return core(values) + depthwise_conv(values, module.dwc.weight, module.dwc.bias, positions=(n,))

    out = {}
    for name, fn in (("core", core), ("core + DWC", with_conv)):
        jac = torch.func.jacrev(fn)(v)[0, 0, :, :, 0, 0]  # (n, d, n, d)
        ranks = [int(torch.linalg.matrix_rank(jac[:, c, :, c])) for c in range(d)]
        out[name] = float(max(ranks) if name == "core" else min(ranks))
    return {"head_dim": float(d), "tokens": float(n), **out}


def linear_rank(seed: int, size: str) -> Measurement:
    r = mixing_ranks(seed, size)
    ratio = r["core"] / r["head_dim"]
    return Measurement(ratio, (Series("core rank / d", (r["head_dim"],), (ratio,)),), r)


def conv_rank(seed: int, size: str) -> Measurement:
    r = mixing_ranks(seed, size)
    return Measurement(r["core + DWC"] / r["tokens"],
                       (Series("core + DWC rank / N", (r["head_dim"],), (r["core + DWC"] / r["tokens"],)),), r)


P034_NOTE = ("token-mixing matrix of channel c = the Jacobian of the fast path's output channel c with respect to "
             "the values' channel c, float64, 1-D sequence, DWC kernel 5; the seeds set head_dim = 8, 16, 24 (N = 96)")
register_claim(Claim(
    id="P034-linear-rank", paper=FLATTEN,
    statement="Linear attention's attention matrix has rank at most d (the head width)",
    statistic="largest rank over channels of the attention core's token-mixing matrix, divided by head_dim",
    direction="≤ 1", rule=Rule(-math.inf, 1.0), run=linear_rank, budget_s=30, xlabel="head_dim", ylabel="rank / d",
    logx=False, logy=False, method="exact", note=P034_NOTE,
))
register_claim(Claim(
    id="P034-dwc-full-rank", paper=FLATTEN,
    statement="The depthwise convolution on V restores a full-rank token mixing to focused linear attention",
    statistic="smallest rank over channels of the token-mixing matrix of core + DWC, divided by N",
    direction="= 1 (full rank; the core alone: d/N)", rule=Rule(0.99, math.inf), run=conv_rank, budget_s=30,
    xlabel="head_dim", ylabel="rank / N", logx=False, logy=False, method="exact", note=P034_NOTE,
))
