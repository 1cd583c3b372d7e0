"""Claims about how the cost of a mechanism grows with the number of tokens N (counted FLOPs, memory, time).

A growth claim is measured as the least-squares exponent b of cost ≈ a·N^b over a range of N. FLOPs are counted
from the operations the module runs (`measure.counted_flops`), so they are deterministic: the seeds change the
model width (32, 48 or 64) and the inputs, which a linear or N^1.5 cost must not care about. Each figure draws
dense softmax attention beside the mechanism, counted the same way on its reference path (the N × N product).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ...core.registry import Paper
from ...core.registry import build as build_module
from ...mechanisms.linear.efficient import EFFICIENT
from ...mechanisms.local.neighborhood import NAT
from ...mechanisms.mixers.channel_group import DAVIT
from ...mechanisms.mixers.swiftformer import SWIFTFORMER
from ...mechanisms.mixers.xcit import XCIT
from ...mechanisms.sparse.combiner import COMBINER
from ...mechanisms.sparse.fit import FIT
from ...mechanisms.sparse.routing import ROUTING
from ...testing import LargestStorage
from ..claim import Claim, Measurement, Rule, Series, register_claim
from ..measure import core_flops, forward_flops, loglog_slope, median_times

# the papers as the mechanisms cite them (one citation per paper across the catalogue)
P019 = NAT
P039 = ROUTING
P096 = DAVIT
P100 = SWIFTFORMER
P147 = COMBINER
P164 = FIT
P196 = XCIT
P228 = EFFICIENT

HEADS = 2
WIDTHS = (32, 48, 64)
LENGTHS = {"smoke": (64, 128, 256), "full": (256, 1024, 4096, 16384)}
DENSE_MAX = 2048  # the dense reference is counted up to here (its N × N float64 matrices)


def width(seed: int) -> int:
    return WIDTHS[seed % len(WIDTHS)]


def tokens(n: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(1, n, dim, generator=torch.Generator().manual_seed(seed))


def dense_series(lengths: Sequence[int], dim: int, seed: int) -> Series:
    """Dense softmax attention's core FLOPs (reference path: QKᵀ and AV) at the lengths up to DENSE_MAX."""
    ns = [n for n in lengths if n <= DENSE_MAX]
    module = build_module("softmax", dim=dim, heads=HEADS)
    flops = [core_flops(module, tokens(n, dim, seed), impl="reference") for n in ns]
    return Series("softmax (dense)", tuple(map(float, ns)), tuple(map(float, flops)))


def flop_growth(name: str, lengths: Sequence[int], seed: int, *, whole: bool,
                params: Callable[[int], dict[str, Any]] = lambda n: {}) -> Measurement:
    """The FLOP exponent of mechanism `name` over `lengths` (`whole`: the forward pass, else the attention core)."""
    dim = width(seed)
    counts = []
    for n in lengths:
        torch.manual_seed(seed)
        module = build_module(name, dim=dim, heads=HEADS, **params(n)).eval()
        x = tokens(n, dim, seed)
        counts.append(forward_flops(module, x) if whole else core_flops(module, x))
    mine = Series(name, tuple(map(float, lengths)), tuple(map(float, counts)))
    dense = dense_series(lengths, dim, seed)
    return Measurement(loglog_slope(lengths, counts), (mine, dense), {"dense exponent": loglog_slope(dense.x, dense.y)})


def linear_claim(paper: Paper, name: str, statement: str, *, whole: bool) -> Claim:
    what = "forward pass" if whole else "attention core"
    return register_claim(Claim(
        id=f"{paper.id}-linear-flops", paper=paper, statement=statement,
        statistic=f"log-log exponent of counted FLOPs of the {what} vs N (N = 256…16384)",
        direction="≈ 1 (linear; dense softmax ≈ 2)", rule=Rule(0.9, 1.1),
        run=lambda seed, size: flop_growth(name, LENGTHS[size], seed, whole=whole),
        budget_s=30, ylabel="FLOPs", note=f"FLOPs counted by torch's FlopCounterMode on the {what}; the seeds set "
        "the width (32/48/64) and the inputs",
    ))


linear_claim(P096, "channel-group", "Channel group attention keeps linear complexity in the number of tokens",
             whole=True)
linear_claim(P100, "swiftformer", "Efficient additive attention is linear in the number of tokens", whole=True)
linear_claim(P196, "xcit", "Cross-covariance attention (XCA) is linear in the number of tokens", whole=True)

register_claim(Claim(
    id="P039-routing-slope", paper=P039,
    statement="Routing attention with k = √n clusters reduces the complexity from O(n²d) to O(n^1.5 d)",
    statistic="log-log exponent of counted FLOPs of the attention core (clustering included) vs n, clusters = √n",
    direction="≈ 1.5 (dense softmax ≈ 2)", rule=Rule(1.4, 1.6),
    run=lambda seed, size: flop_growth("routing", LENGTHS[size], seed, whole=False,
                                       params=lambda n: {"clusters": math.isqrt(n)}),
    budget_s=60, ylabel="FLOPs", note="balanced clusters of n/k tokens; FLOPs counted by FlopCounterMode",
))

register_claim(Claim(
    id="P147-subquadratic", paper=P147,
    statement="Combiner gives full attention at sub-quadratic cost, O(L log L) or O(L√L)",
    statistic="log-log exponent of counted FLOPs of the attention core vs L (default blocks of √L)",
    direction="< 2 (paper: 1.5 for the √L factorisation)", rule=Rule(1.0, 1.75),
    run=lambda seed, size: flop_growth("combiner", LENGTHS[size], seed, whole=False),
    budget_s=60, ylabel="FLOPs", note="the rule's upper end 1.75 lies halfway between the claimed 1.5 and dense 2",
))


# -- P164: FIT's L^{4/3} ----------------------------------------------------------------------------------
FIT_CUBES = {"smoke": (6, 12), "full": (6, 12, 18, 24)}
FIT_LATENTS = (1, 8, 27)  # m with m^{2/3} an integer


def fit_growth(seed: int, size: str) -> Measurement:
    """FIT with m latents per group and group size n = L^{1/3} m^{2/3}: L = c³, n = c·m^{2/3} (exact divisors)."""
    latents = FIT_LATENTS[seed % len(FIT_LATENTS)]
    scale = round(latents ** (2 / 3))
    lengths = [c ** 3 for c in FIT_CUBES[size]]
    groups = {c ** 3: c * scale for c in FIT_CUBES[size]}
    m = flop_growth("fit", lengths, seed, whole=False,
                    params=lambda n: {"group_size": groups[n], "latents": latents})
    return Measurement(m.value, m.series, {**m.extra, "latents m": float(latents)})


register_claim(Claim(
    id="P164-slope", paper=P164,
    statement="With group size n ≈ L^{1/3} m^{2/3}, FIT's attention costs O(L^{4/3}) (full attention: O(L²))",
    statistic="log-log exponent of counted FLOPs of the attention core vs L (L = 216…13824)",
    direction="≈ 4/3", rule=Rule(4 / 3 - 0.1, 4 / 3 + 0.1), run=fit_growth, budget_s=60, ylabel="FLOPs",
    note="the seeds set m = 1, 8, 27 latents per group (and the width); local, global and cross-attention counted",
))


# -- P228: memory O(dN + d²) -----------------------------------------------------------------------------
def largest_allocation(name: str, n: int, dim: int, seed: int) -> int:
    module = build_module(name, dim=dim, heads=HEADS).eval()
    x = tokens(n, dim, seed)
    probe = LargestStorage()
    with torch.no_grad(), probe:
        module(x)
    return probe.largest


def memory_growth(seed: int, size: str) -> Measurement:
    dim = width(seed)
    lengths = LENGTHS[size]
    sizes = [largest_allocation("efficient", n, dim, seed) for n in lengths]
    return Measurement(loglog_slope(lengths, sizes),
                       (Series("efficient", tuple(map(float, lengths)), tuple(map(float, sizes))),))


register_claim(Claim(
    id="P228-memory", paper=P228,
    statement="Efficient attention needs memory O(dN + d²) instead of O(N²)",
    statistic="log-log exponent of the largest tensor allocated by a forward pass vs N",
    direction="≈ 1 (an N × N matrix: 2)", rule=Rule(0.9, 1.1), run=memory_growth, budget_s=30,
    ylabel="largest allocation (bytes)", note="every storage any op returns is seen (a TorchDispatchMode probe)",
))


# -- P019: wall time of neighborhood attention ------------------------------------------------------------
TIME_LENGTHS = {"smoke": (1024, 2048, 4096), "full": (32768, 65536, 131072, 262144)}
TIME_REPEATS = {"smoke": 1, "full": 7}


def neighborhood_time(seed: int, size: str) -> Measurement:
    dim = 64
    torch.manual_seed(seed)
    module = build_module("neighborhood", dim=dim, heads=1, kernel_size=7).eval()
    lengths = TIME_LENGTHS[size]
    calls = []
    for n in lengths:
        with torch.no_grad():
            q, k, v = module.project(tokens(n, dim, seed))
        calls.append(lambda q=q, k=k, v=v: module.attend(q, k, v))
    times = median_times(calls, repeats=TIME_REPEATS[size])
    return Measurement(loglog_slope(lengths, times), (Series("neighborhood k=7", tuple(map(float, lengths)),
                                                             tuple(times)),))


register_claim(Claim(
    id="P019-linear-time", paper=P019,
    statement="Neighborhood attention reduces self-attention from O(n²) to O(n·k): time grows linearly in n",
    statistic="log-log exponent of the median wall time of the attention core vs n (k = 7, n = 32768…262144)",
    direction="≈ 1 (dense: 2)", rule=Rule(0.8, 1.2), run=neighborhood_time, budget_s=120, method="time",
    ylabel="seconds", note="one torch thread, the lengths interleaved round by round after a warm-up, median of 7; "
    "on a shared machine. n starts at 32768 so that the fixed cost of a call does not flatten the fit",
))
