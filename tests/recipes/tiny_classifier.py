"""The small classifier the recipe tests wrap (imported by name: pytest puts this folder on sys.path)."""
from __future__ import annotations

import torch
from torch import nn

import attnlab


class Tiny(nn.Module):
    """Two pre-norm blocks (softmax mixers) and a classifier head on the mean token."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([attnlab.build("pre-norm-block", dim=dim, heads=heads) for _ in range(2)])
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))
