"""Attention rollout and attention flow against raw attention as explanations (P008), on a small trained model.

The task: a class token, then n tokens drawn uniformly from 8 symbols; the label says whether symbol "a"
occurs more often than symbol "b". A 3-layer pre-norm transformer of attnlab softmax attention (width 32, 4 heads,
MLP, residual connections) is trained on fresh batches, then for held-out sequences three scores of each input
token are compared with its leave-one-out ablation importance (the drop of the predicted class's probability when
the token is replaced by a mask symbol): the class token's row of the last layer's attention (raw, heads
averaged), of the rollout, and of the attention flow (`attnlab.analysis.rollout`). The statistic is the mean over
sequences of Spearman's rank correlation of a score with the importance, minus that of raw attention.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor, nn

from ...analysis.rollout import PAPER as P008
from ...analysis.rollout import attention_flow, rollout
from ..claim import Claim, Measurement, Rule, Series, register_claim
from ._blocks import PreNormBlock

CLS, MASK, FIRST, SYMBOLS = 0, 1, 2, 8  # token ids: class, mask, then the symbols FIRST … FIRST + SYMBOLS − 1
A, B = FIRST, FIRST + 1
LENGTH = 12
SETTINGS = {"smoke": {"steps": 3, "examples": 4}, "full": {"steps": 250, "examples": 64}}


def sequences(count: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(tokens (count, 1 + LENGTH) with the class token first, labels (count,): 1 when #a > #b)."""
    body = torch.randint(FIRST, FIRST + SYMBOLS, (count, LENGTH), generator=gen)
    labels = ((body == A).sum(1) > (body == B).sum(1)).long()
    return torch.cat([torch.full((count, 1), CLS), body], 1), labels


class Classifier(nn.Module):
    """Embeddings, pre-norm layers, a linear head on the class token; also returns each layer's attention."""

    def __init__(self, dim: int = 32, heads: int = 4, layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(FIRST + SYMBOLS, dim)
        self.position = nn.Parameter(torch.randn(1 + LENGTH, dim) * 0.02)
        self.layers = nn.ModuleList(PreNormBlock(dim, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 2)

    def forward(self, tokens: Tensor, *, attentions: bool = False) -> tuple[Tensor, list[Tensor]]:
        h = self.embed(tokens) + self.position
        maps = []
        for layer in self.layers:
            if attentions:
                h, a = layer.forward_with_map(h)
                maps.append(a)
            else:
                h = layer(h)
        return self.head(self.norm(h[:, 0])), maps


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either is constant."""
    from scipy.stats import rankdata

    rx, ry = rankdata(x), rankdata(y)
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


@functools.lru_cache(maxsize=4)
def correlations(seed: int, size: str) -> dict[str, float]:
    """Train the classifier (seeded), then the mean Spearman correlation of raw, rollout and flow with ablation."""
    setting = SETTINGS[size]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Classifier()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(setting["steps"]):
        tokens, labels = sequences(64, gen)
        loss = nn.functional.cross_entropy(model(tokens)[0], labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    tokens, labels = sequences(setting["examples"], gen)
    with torch.no_grad():
        logits, maps = model(tokens, attentions=True)
        predicted = logits.argmax(-1)
        p = logits.softmax(-1).gather(1, predicted[:, None])[:, 0]
        ablated = tokens[:, None, :].repeat(1, LENGTH, 1)  # (examples, positions, 1 + LENGTH)
        ablated[:, torch.arange(LENGTH), torch.arange(LENGTH) + 1] = MASK
        p_ablated = model(ablated.flatten(0, 1))[0].softmax(-1).view(-1, LENGTH, 2)
        importance = (p[:, None] - p_ablated.gather(2, predicted[:, None, None].expand(-1, LENGTH, 1))[..., 0]).numpy()
    maps64 = [m.double() for m in maps]
    scores = {"raw": maps64[-1].mean(1)[:, 0, 1:].numpy(), "rollout": rollout(maps64)[:, 0, 1:].numpy(),
              "flow": attention_flow(maps64, outputs=[0], workers=1)[:, 0, 1:].numpy()}
    out = {"accuracy": float((predicted == labels).double().mean())}
    for name, score in scores.items():
        rho = [spearman(score[i], importance[i]) for i in range(len(tokens))]
        kept = [r for r in rho if not math.isnan(r)]
        out[name] = float(np.mean(kept)) if kept else math.nan
    return out


def advantage(method: str, seed: int, size: str) -> Measurement:
    c = correlations(seed, size)
    if math.isnan(c[method]) or math.isnan(c["raw"]):
        raise ValueError(f"P008: every importance or score was constant (seed {seed}, size {size})")
    names = ("raw", "rollout", "flow")
    return Measurement(c[method] - c["raw"], (Series("Spearman ρ with ablation", (0.0, 1.0, 2.0),
                                                     tuple(c[n] for n in names)),), dict(c))


NOTE = ("task: is symbol a more frequent than b among 12 tokens (class token first); 3-layer pre-norm softmax "
        "transformer, width 32, 4 heads, 250 Adam steps of 64 fresh sequences; 64 held-out sequences; x axis of the "
        "figure: 0 raw (last layer), 1 rollout, 2 flow; residual weight 0.5 and mean head fusion (the paper's)")
for method in ("rollout", "flow"):
    register_claim(Claim(
        id=f"P008-{method}-beats-raw", paper=P008,
        statement=f"Attention {method} correlates better than raw attention with ablation importance",
        statistic=f"mean Spearman ρ({method}, ablation) − mean Spearman ρ(raw last-layer attention, ablation)",
        direction="> 0", rule=Rule(0.0, math.inf),
        run=functools.partial(advantage, method), budget_s=240, method="train", xlabel="score (0 raw, 1 rollout, "
        "2 flow)", ylabel="mean Spearman ρ", logx=False, logy=False, note=NOTE,
    ))
