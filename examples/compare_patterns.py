"""Compare what different mechanisms do with the same tokens, through their attention matrices
(explicit for softmax and local ones, implicit for linear and recurrent ones): entropy and mean
distance of each head's attention, the share of attention on the first token, and rank collapse
(P010) of 6-layer random stacks without and with skip connections.

    .venv/bin/python examples/compare_patterns.py [MECHANISM ...]
    # default: softmax alibi sliding-window neighborhood linear retention mamba

Random weights: the numbers describe the mechanisms' built-in biases (windows, decay, positions),
not anything learnt.
"""
from __future__ import annotations

import sys

import torch

import attnlab
from attnlab.analysis import attention_entropy, mean_attention_distance, rank_collapse_experiment, sink_scores

DIM, HEADS, N = 64, 4, 32
# a band well below N (and the 16 tokens of the rank-collapse stacks), so that sliding-window stays local: its
# default radius (256) would be full attention here (neighborhood's default kernel of 7 is local already)
LOCAL = {"sliding-window": {"radius": 4}}


def params(name: str) -> dict[str, object]:
    spec = attnlab.get(name)
    return {**({} if spec.supports.causal_only else {"causal": True}), **LOCAL.get(name, {})}


def main(names: list[str]) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, N, DIM, dtype=torch.float64)
    print(f"{'mechanism':15s} {'entropy':>8s} {'distance':>9s} {'on tok 0':>9s} {'res L6 attn':>12s} {'res L6 +skip':>13s}")
    for name in names:
        layer = attnlab.build(name, dim=DIM, heads=HEADS, **params(name)).double().eval()
        with torch.no_grad():
            a = layer.materialize(x).abs()               # implicit matrices may hold negative weights
        a = a / a.sum(-1, keepdim=True).clamp(min=1e-300)  # compare shapes of rows, whatever their scale
        entropy = attention_entropy(a).mean().item()     # nats; uniform over the i + 1 causal keys: ≈ 2.55
        distance = mean_attention_distance(a).mean().item()
        first = sink_scores(a)[..., 0].mean().item()
        res = rank_collapse_experiment(name, depth=6, dim=32, heads=HEADS, n=16,
                                       variants=("attention", "attention+skip"), **params(name))
        print(f"{name:15s} {entropy:8.2f} {distance:9.2f} {first:9.3f} "
              f"{res['attention'][-1, 0].item():12.1e} {res['attention+skip'][-1, 0].item():13.2f}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["softmax", "alibi", "sliding-window", "neighborhood", "linear", "retention", "mamba"])
