"""Claims about deep stacks at random initialisation: rank collapse (P010).

`attnlab.analysis.rank_collapse.rank_collapse_experiment` builds random-init stacks of softmax attention with and
without skip connections and MLPs (float64, no layer norm: the paper's setting) on X ~ N(0, 1) and returns the
relative residual ‖res(X_l)‖/‖res(X_0)‖ to the nearest rank-1 matrix after each layer.
"""
from __future__ import annotations

import math

from ...analysis.rank_collapse import P010, VARIANTS, rank_collapse_experiment
from ..claim import Claim, Measurement, Rule, Series, register_claim
from ..measure import log10_floor

DEPTH = {"smoke": 2, "full": 6}


def collapse(variant: str, seed: int, size: str) -> Measurement:
    depth = DEPTH[size]
    curves = rank_collapse_experiment("softmax", depth=depth, dim=32, heads=4, n=16, seed=seed, batch=4)
    layers = tuple(float(i) for i in range(depth + 1))
    series = tuple(Series(v, layers, tuple(max(float(r), 1e-300) for r in curves[v].mean(-1))) for v in VARIANTS)
    final = float(curves[variant][-1].mean())
    return Measurement(log10_floor(final), series, {f"log10 residual at {depth} layers, {v}":
                                                    log10_floor(float(curves[v][-1].mean())) for v in VARIANTS})


COMMON = dict(paper=P010, budget_s=30, xlabel="layer", ylabel="‖res(X_l)‖ / ‖res(X_0)‖", logx=False,
              note="softmax attention, 4 heads, width 32, 16 tokens, batch 4, PyTorch default init, float64, Frobenius "
              "norm; a residual of exactly 0 counts as 1e-300")
register_claim(Claim(
    id="P010-pure-collapse", statement="Pure attention (no skip, no MLP) loses rank doubly exponentially with depth",
    statistic="log10 of the relative residual to rank 1 after 6 layers of pure attention",
    direction="strongly negative (< −3: a thousandfold loss)", rule=Rule(-math.inf, -3.0),
    run=lambda seed, size: collapse("attention", seed, size), **COMMON,  # type: ignore[arg-type]
))
register_claim(Claim(
    id="P010-skip-keeps-rank", statement="Skip connections stop the rank collapse of attention stacks",
    statistic="log10 of the relative residual to rank 1 after 6 layers of attention with skip connections",
    direction="near 0 (> −1: at least a tenth of the residual kept)", rule=Rule(-1.0, math.inf),
    run=lambda seed, size: collapse("attention+skip", seed, size), **COMMON,  # type: ignore[arg-type]
))
