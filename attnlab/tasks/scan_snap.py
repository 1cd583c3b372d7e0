"""Scan-and-snap next-token data and the 1-layer attention + decoder model (P020, Tian et al. 2023).

The data. A sequence is T − 1 context tokens, then a "last" token x_T (the query), and the label is the
next token n. There are K last tokens and J next tokens per last token (K·J next tokens in all); next
token n belongs to one last token m(n) and the context tokens of a sequence are drawn i.i.d. from a
next-token-specific distribution

    P(x_l = v | n) = w_v / Σ_u w_u  over  v ∈ C ∪ C_{m(n)} ∪ D_n,    0 elsewhere,    l = 1 … T − 1

with C the "common" tokens shared by every next token (weight w_v = `common_weight`), C_m the tokens
common to the next tokens of last token m (weight `common_weight`), and D_n the "distinct" tokens of n
only (the sets D_n are disjoint), whose weights rise linearly from `distinct_min` to `distinct_max`
(so the distinct tokens have different co-occurrence with n). The next token is uniform over the K·J
next tokens. The vocabulary is laid out [C | C_1 … C_K | D_1 … D_{KJ} | last tokens | next tokens].
This is the official generator (luckmatters `decoder_only.py`, `Dataset2`), including its per-last-token
common tokens C_m, which PAPERS.md's short description folds into "common".

The model (the official `Model2`, which the paper analyses): one-hot tokens, no positional encoding;
the query (last token x_T) attends to the context tokens with logits Z[x_T, x_l]; the attended one-hot
mixture is ℓ2-normalised and decoded by Y:

    b_l = exp(Z[x_T, x_l]) / Σ_l' exp(Z[x_T, x_l'])     (l over the T − 1 context positions)
    f = Σ_l b_l e_{x_l} / ‖Σ_l b_l e_{x_l}‖,    logits = Y f,    loss = cross-entropy(logits, n)

with Y, Z ∈ R^{M×M} both initialised to zero (so attention starts uniform), trained with separate
learning rates η_Y (decoder) and η_Z (attention). The paper predicts that Z[x_T, ·] grows on the
distinct tokens (faster for the tokens rarer under the other next tokens), decays on the common ones,
and freezes ("snaps") earlier when η_Z/η_Y is larger; `attention_by_type` and `train_scan_snap` log the
attention weight per token type over training.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..core.registry import Paper, Param, Spec, add
from ._checks import check_count
from ._training import train_logged

SCAN_AND_SNAP = Paper(
    "P020", "Scan and Snap: Understanding Training Dynamics and Token Composition in 1-layer Transformer", 2023,
    "2305.16380",
)


def _weight(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite float > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ScanSnapData:
    """`context` (examples, T − 1), `last` (examples,), `next_token` (examples,) LongTensors; `probs`
    (K·J, M) float64, the exact P(context token = v | next token n) by row n (row n belongs to next-token
    id `next_ids[n]`); `last_ids` (K·J,) the last token of each next token; index tensors `common`,
    `common_per_last` (K, |C_m|) and `distinct` (K·J, |D_n|); `vocab_size` M."""

    context: Tensor
    last: Tensor
    next_token: Tensor
    probs: Tensor
    next_ids: Tensor
    last_ids: Tensor
    common: Tensor
    common_per_last: Tensor
    distinct: Tensor
    vocab_size: int

    def __len__(self) -> int:
        return self.context.shape[0]

    @property
    def tokens(self) -> Tensor:
        """(examples, T): the context then the last token."""
        return torch.cat([self.context, self.last[:, None]], 1)


def scan_snap_data(
    num_examples: int,
    context_length: int = 5,
    num_last: int = 2,
    num_next_per_last: int = 2,
    num_common: int = 10,
    num_common_per_last: int = 5,
    num_distinct: int = 10,
    common_weight: float = 1.0,
    distinct_min: float = 0.1,
    distinct_max: float = 1.0,
    seed: int = 0,
) -> ScanSnapData:
    """`num_examples` sequences of the scan-and-snap distribution (see the module doc); T − 1 = `context_length`.

    Defaults are the official config (`decoder_only.yaml`: L = 6, so 5 context tokens).
    """
    n = check_count("num_examples", num_examples, 1)
    length = check_count("context_length", context_length, 1)
    k = check_count("num_last", num_last, 1)
    j = check_count("num_next_per_last", num_next_per_last, 1)
    c = check_count("num_common", num_common, 0)
    cm = check_count("num_common_per_last", num_common_per_last, 0)
    d = check_count("num_distinct", num_distinct, 1)
    w_common = _weight("common_weight", common_weight)
    lo, hi = _weight("distinct_min", distinct_min), _weight("distinct_max", distinct_max)
    if hi < lo:
        raise ValueError(f"distinct_max: expected >= distinct_min = {lo}, got {hi}")
    per_last_start, distinct_start = c, c + k * cm
    last_start = distinct_start + k * j * d
    next_start = last_start + k
    vocab = next_start + k * j
    probs = np.zeros((k * j, vocab))
    probs[:, :c] = w_common
    for idx in range(k * j):
        m = idx // j
        probs[idx, per_last_start + m * cm: per_last_start + (m + 1) * cm] = w_common
        probs[idx, distinct_start + idx * d: distinct_start + (idx + 1) * d] = np.linspace(lo, hi, d)
    probs /= probs.sum(1, keepdims=True)
    rng = np.random.default_rng(seed)
    which = rng.integers(0, k * j, size=n)
    cdf = np.cumsum(probs[which], 1)
    u = rng.random((n, length, 1)) * cdf[:, None, -1:]
    context = np.minimum((u >= cdf[:, None, :]).sum(-1), vocab - 1)
    last_ids = last_start + np.arange(k * j) // j
    return ScanSnapData(
        context=torch.from_numpy(context.astype(np.int64)),
        last=torch.from_numpy(last_ids[which].astype(np.int64)),
        next_token=torch.from_numpy((next_start + which).astype(np.int64)),
        probs=torch.from_numpy(probs),
        next_ids=torch.arange(next_start, vocab),
        last_ids=torch.from_numpy(last_ids.astype(np.int64)),
        common=torch.arange(c),
        common_per_last=torch.arange(per_last_start, distinct_start).reshape(k, cm),
        distinct=torch.arange(distinct_start, last_start).reshape(k * j, d),
        vocab_size=vocab,
    )


class ScanSnapModel(nn.Module):
    """1-layer attention without positions + decoder on one-hot tokens (module doc): Z (attention) and
    Y (decoder), both M×M and zero at init unless `zero_init` is False (then N(0, init_std²))."""

    def __init__(self, vocab_size: int, zero_init: bool = True, init_std: float = 0.1) -> None:
        super().__init__()
        self.vocab_size = check_count("vocab_size", vocab_size, 2)
        scale = 0.0 if zero_init else _weight("init_std", init_std)
        self.attention = nn.Parameter(scale * torch.randn(self.vocab_size, self.vocab_size))  # Z[query, key]
        self.decoder = nn.Parameter(scale * torch.randn(self.vocab_size, self.vocab_size))  # Y[output, input]

    def attention_weights(self, context: Tensor, last: Tensor) -> Tensor:
        """b (examples, T − 1): softmax_l Z[x_T, x_l]."""
        return self.attention[last[:, None], context].softmax(-1)

    def forward(self, context: Tensor, last: Tensor) -> Tensor:
        """Next-token logits (examples, M): Y f with f the ℓ2-normalised attended one-hot mixture."""
        weights = self.attention_weights(context, last)
        mixture = torch.zeros(context.shape[0], self.vocab_size, dtype=weights.dtype, device=weights.device)
        mixture = mixture.scatter_add(1, context, weights)
        return (mixture / mixture.norm(dim=1, keepdim=True)) @ self.decoder.T


def attention_by_type(model: ScanSnapModel, data: ScanSnapData) -> dict[str, float]:
    """Mean over examples of the attention mass the query puts on each token type of its context:
    "common" (C), "common_per_last" (C_m), "distinct" (D_n of the example's own next token)."""
    with torch.no_grad():
        weights = model.attention_weights(data.context.to(model.attention.device), data.last.to(model.attention.device)).cpu()
    kinds = torch.zeros(data.vocab_size, dtype=torch.long)  # 0 common, 1 common per last, 2 distinct
    kinds[data.common_per_last.flatten()] = 1
    kinds[data.distinct.flatten()] = 2
    kind = kinds[data.context]
    return {name: float((weights * (kind == i)).sum(1).mean()) for i, name in enumerate(("common", "common_per_last", "distinct"))}


def train_scan_snap(
    model: ScanSnapModel,
    data: ScanSnapData,
    steps: int,
    lr_decoder: float,
    lr_attention: float,
    batch_size: int = 128,
    log_every: int = 10,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Plain SGD (the paper's analysis; the official config defaults to Adam) on the cross-entropy with separate learning rates η_Y = `lr_decoder`, η_Z = `lr_attention`
    (minibatches drawn from `data` with a seeded torch.Generator). Returns the log: every `log_every`
    steps (and at step 0), {"step", "loss", "common", "common_per_last", "distinct"}."""
    steps = check_count("steps", steps, 1)
    batch_size = check_count("batch_size", batch_size, 1)
    log_every = check_count("log_every", log_every, 1)
    for name, lr in (("lr_decoder", lr_decoder), ("lr_attention", lr_attention)):
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not np.isfinite(lr) or lr < 0:
            raise ValueError(f"{name}: expected a finite float >= 0, got {lr!r}")
    optimizer = torch.optim.SGD([{"params": [model.decoder], "lr": lr_decoder},
                                 {"params": [model.attention], "lr": lr_attention}])
    generator = torch.Generator().manual_seed(seed)
    device = model.attention.device

    def step_loss(step: int) -> tuple[Tensor, Callable[[], dict[str, float]]]:
        rows = torch.randint(0, len(data), (batch_size,), generator=generator)
        logits = model(data.context[rows].to(device), data.last[rows].to(device))
        loss = nn.functional.cross_entropy(logits, data.next_token[rows].to(device))
        return loss, lambda: attention_by_type(model, data)

    return train_logged(optimizer, steps, log_every, step_loss)


add(
    Spec(
        name="scan-snap",
        kind="task",
        paper=SCAN_AND_SNAP,
        factory=scan_snap_data,
        family="G",
        summary="next-token data whose context tokens mix common (shared) and distinct (next-token-specific) tokens; "
        "1-layer attention + decoder with separate learning rates, attention per token type over training",
        params=(
            Param("num_examples", int, doc="number of sequences", low=1),
            Param("context_length", int, 5, "T − 1 context tokens before the last token", low=1),
            Param("num_last", int, 2, "K last (query) tokens", low=1),
            Param("num_next_per_last", int, 2, "J next tokens per last token", low=1),
            Param("num_common", int, 10, "|C|, common tokens shared by every next token", low=0),
            Param("num_common_per_last", int, 5, "|C_m|, tokens shared by the next tokens of one last token", low=0),
            Param("num_distinct", int, 10, "|D_n|, distinct tokens of each next token", low=1),
            Param("common_weight", float, 1.0, "unnormalised weight of a common token", low=0.0),
            Param("distinct_min", float, 0.1, "smallest unnormalised weight of a distinct token", low=0.0),
            Param("distinct_max", float, 1.0, "largest unnormalised weight of a distinct token", low=0.0),
            Param("seed", int, 0, "seed of the sequences"),
        ),
    )
)
