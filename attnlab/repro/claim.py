"""A claim of a paper, the statistic that tests it, and the rule that decides it, stated before any run.

A claim's `run(seed, size)` returns one `Measurement`: the statistic's value for that seed (and the curves its
figure draws). The runner collects the values over the seeds, forms the 95% t-interval of their mean

    mean ± t_{0.975, s−1} · sd / √s          (s seeds; one seed: the interval is unbounded)

and the claim's `Rule` maps the interval to a verdict:

    reproduced       the interval lies inside [low, high]
    not reproduced   the interval lies outside [low, high] (no common point)
    inconclusive     it straddles an end

A deterministic count gives the same value for every seed: its interval is that point. Claims register in the
catalogue as kind "repro" under their paper: `attnlab.get("P164-slope", "repro").build(seed=0, size="smoke")`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..core.registry import Paper, Param, Spec, add, entries

SIZES = ("smoke", "full")
"""smoke: the smallest sizes, to check that a claim runs (its value means nothing); full: the sizes of its rule."""
VERDICTS = ("reproduced", "not reproduced", "inconclusive")
METHODS = ("count", "time", "exact", "train")
"""How a claim measures: counts of the operations run (deterministic), wall time (pinned to one thread, sizes
interleaved, medians), a numerical identity, or a small training run."""
MAX_BUDGET_S = 300.0


@dataclass(frozen=True)
class Rule:
    """The pre-stated decision on the 95% interval of the statistic: inside [low, high] -> reproduced, outside ->
    not reproduced, across an end -> inconclusive. An end may be infinite (a one-sided claim)."""

    low: float = -math.inf
    high: float = math.inf

    def __post_init__(self) -> None:
        if math.isnan(self.low) or math.isnan(self.high) or not self.low < self.high:
            raise ValueError(f"Rule: expected low < high, got [{self.low}, {self.high}]")
        if math.isinf(self.low) and math.isinf(self.high):
            raise ValueError("Rule: expected at least one finite end, got (-inf, inf)")

    def verdict(self, low: float, high: float) -> str:
        """The verdict for the interval [low, high] of the statistic."""
        if math.isnan(low) or math.isnan(high) or low > high:
            raise ValueError(f"interval: expected low <= high, got [{low}, {high}]")
        if self.low <= low and high <= self.high:
            return "reproduced"
        if high < self.low or low > self.high:
            return "not reproduced"
        return "inconclusive"

    def text(self) -> str:
        """The rule in words, e.g. "reproduced if the 95% interval lies in [0.9, 1.1]"."""
        if math.isinf(self.low):
            band = f"at or below {self.high:g}"
        elif math.isinf(self.high):
            band = f"at or above {self.low:g}"
        else:
            band = f"in [{self.low:g}, {self.high:g}]"
        return f"reproduced if the 95% interval lies {band}, not reproduced if it lies wholly outside, else inconclusive"


@dataclass(frozen=True)
class Series:
    """One curve of a claim's figure: `label` (e.g. a mechanism), y against x."""

    label: str
    x: tuple[float, ...]
    y: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"Series {self.label!r}: expected as many x as y, got {len(self.x)} and {len(self.y)}")


@dataclass(frozen=True)
class Measurement:
    """What one seed of a claim measured: the statistic's `value`, the figure's curves, other numbers for the table."""

    value: float
    series: tuple[Series, ...] = ()
    extra: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Claim:
    """A paper's claim with its statistic, expected direction and pre-stated rule; `run(seed, size)` measures it.

    `budget_s`: the most a full run over `seeds` seeds may take on the 2-core machine (<= 300 s);
    `version`: raised when the protocol changes, so that a stored outcome of an older protocol is not reused.
    """

    id: str
    paper: Paper
    statement: str  # the claim as the paper states it
    statistic: str  # what is measured, e.g. "fitted log-log exponent of FLOPs vs N"
    direction: str  # the expected direction, e.g. "≈ 1 (linear)"
    rule: Rule
    run: Callable[[int, str], Measurement]
    budget_s: float
    method: str = "count"
    seeds: int = 3
    note: str = ""  # how it is measured, deviations from the paper's setting
    xlabel: str = "N"
    ylabel: str = ""
    logx: bool = True
    logy: bool = True
    version: int = 1

    def __post_init__(self) -> None:
        if self.paper.id is None or not self.id.startswith(self.paper.id + "-"):
            raise ValueError(f"Claim id: expected '<paper id>-<name>', got {self.id!r} for paper {self.paper.id!r}")
        if not 0 < self.budget_s <= MAX_BUDGET_S:
            raise ValueError(f"Claim {self.id}: budget_s expected in (0, {MAX_BUDGET_S:g}], got {self.budget_s!r}")
        if self.method not in METHODS:
            raise ValueError(f"Claim {self.id}: method expected one of {METHODS}, got {self.method!r}")
        if self.seeds < 3:
            raise ValueError(f"Claim {self.id}: seeds expected >= 3, got {self.seeds}")

    def __call__(self, seed: int = 0, size: str = "full") -> Measurement:
        """One seed's measurement (`size` "smoke" or "full")."""
        if size not in SIZES:
            raise ValueError(f"size: expected one of {SIZES}, got {size!r}")
        out = self.run(seed, size)
        if not isinstance(out, Measurement):
            raise TypeError(f"{self.id}: run expected to return a Measurement, got {type(out).__name__}")
        return out


def register_claim(claim: Claim) -> Claim:
    """Add `claim` to the catalogue as an entry of kind "repro" (its factory is the claim: build(seed=, size=) runs it)."""
    add(Spec(
        name=claim.id, kind="repro", paper=claim.paper, factory=claim, summary=claim.statement,
        params=(Param("seed", int, 0, "the seed of this run", low=0),
                Param("size", str, "full", "'smoke' (tiny, checks that it runs) or 'full'", choices=SIZES)),
    ))
    return claim


def all_claims() -> list[Claim]:
    """Every registered claim, by paper id then claim id."""
    found = [s.factory for s in entries("repro") if isinstance(s.factory, Claim)]
    return sorted(found, key=lambda c: (c.paper.id or "", c.id))


def select(target: str, claims: Sequence[Claim] | None = None) -> list[Claim]:
    """The claims of paper `target` ("P019") or the claim with that id ("P019-linear-time"); ValueError if none."""
    pool = all_claims() if claims is None else list(claims)
    chosen = [c for c in pool if target in (c.id, c.paper.id)]
    if not chosen:
        papers = sorted({c.paper.id or "" for c in pool})
        raise ValueError(f"claim: expected a paper id among {', '.join(papers)} or a claim id "
                         f"(`attnlab repro list`), got {target!r}")
    return chosen


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the two-sided `level` t-interval of the mean of `values` (unbounded for one value)."""
    from scipy.stats import t

    xs = [float(v) for v in values]
    if not xs or any(math.isnan(v) for v in xs):
        raise ValueError(f"values: expected one or more numbers (no NaN), got {xs!r}")
    mean = math.fsum(xs) / len(xs)
    if len(xs) == 1:
        return mean, -math.inf, math.inf
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in xs) / (len(xs) - 1))
    half = float(t.ppf(0.5 + level / 2, len(xs) - 1)) * sd / math.sqrt(len(xs))
    return mean, mean - half, mean + half
