"""Claims by id and the verdict a rule gives seed values, for the claim tests (imported by name: pytest puts this
folder on sys.path)."""
from __future__ import annotations

from attnlab.repro.claim import Claim, all_claims, t_interval


def claim(claim_id: str) -> Claim:
    """The registered claim `claim_id`."""
    return next(c for c in all_claims() if c.id == claim_id)


def verdict_of(claim_id: str, values: list[float]) -> str:
    """The verdict of `claim_id`'s rule on the t-interval of `values` (one per seed)."""
    _, low, high = t_interval(values)
    return claim(claim_id).rule.verdict(low, high)
