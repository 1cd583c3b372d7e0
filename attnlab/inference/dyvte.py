"""DyVTE (P231): dynamic visual-token exit — drop every visual token (and its keys/values) after a learned layer.

A multimodal decoder reads visual tokens V (n_v of them) and text tokens T (n_t) through L blocks. After block l a
light router reads the text states h_T^l (batch, n_t, dim) only,

    z = [mean_t h_T^l, h_T^l[last]] ∈ R^{2·dim},   logits = W₂ GELU(W₁ z + b₁) + b₂ ∈ R²,

and the visual tokens exit when logits[1] > logits[0] (the official code's router, P231 notes): blocks l+1 … L−1 then
run on the text tokens alone, so no later query attends to a visual key and the visual KV of those layers is never
built. The exit layer of a sample is the first l whose router fires (none: all L blocks see every token).

Here the stack is exact and physical: samples are grouped by exit layer and the dropped tokens are sliced away (not
masked), so the compute saved is the compute not done. Routers are trained on labels from the model itself (a sample
may exit after l when the prediction with exit at l equals the full model's; `exit_labels`), the model frozen, which is
the paper's recipe in spirit; its three-stage attention analysis is not reproduced.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from attnlab.core.errors import ShapeError
from attnlab.core.registry import Paper, Spec, add
from attnlab.core.validate import check_int, check_rank, check_tensor

DYVTE = Paper("P231", "Accelerating Multimodal Large Language Models via Dynamic Visual-Token Exit and the Empirical "
              "Findings", 2024, None)


class ExitRouter(nn.Module):
    """logits = W₂ GELU(W₁ [mean of text states, last text state] + b₁) + b₂, two classes (1 = exit)."""

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        dim = check_int("dim", dim)
        hidden = dim if hidden is None else check_int("hidden", hidden)
        self.net = nn.Sequential(nn.Linear(2 * dim, hidden), nn.GELU(), nn.Linear(hidden, 2))

    def forward(self, text: Tensor) -> Tensor:
        """text (batch, n_t, dim) -> logits (batch, 2)."""
        check_tensor("text", text)
        check_rank("text", text, 3, "(batch, n_text, dim)")
        return self.net(torch.cat([text.mean(1), text[:, -1]], dim=-1))


class VisualTokenExit(nn.Module):
    """L blocks (each (batch, n, dim) -> (batch, n, dim)) with a router after each of the first L−1; the visual tokens
    are the first `n_visual` positions, the text tokens the rest.

        out, exits = stack(x, n_visual)                   # routers decide; out = final text states (batch, n_t, dim)
        out, exits = stack(x, n_visual, exit_layers=e)    # e (batch,) long: -1 = no exit, l = drop after block l
    """

    def __init__(self, blocks: Sequence[nn.Module], dim: int, hidden: int | None = None) -> None:
        super().__init__()
        if len(blocks) < 2:
            raise ValueError(f"blocks: expected at least 2 blocks (a router sits between two), got {len(blocks)}")
        self.blocks = nn.ModuleList(blocks)
        self.routers = nn.ModuleList(ExitRouter(dim, hidden) for _ in range(len(blocks) - 1))
        self.dim = dim

    @property
    def layers(self) -> int:
        return len(self.blocks)

    def trace(self, x: Tensor) -> list[Tensor]:
        """The states after every block with no exit: L tensors (batch, n, dim)."""
        states = []
        for block in self.blocks:
            x = block(x)
            states.append(x)
        return states

    def run(self, x: Tensor, n_visual: int, exit_layer: int) -> tuple[Tensor, list[int]]:
        """All samples exit after block `exit_layer` (-1: none): (final text states, tokens each block saw)."""
        seen = []
        for i, block in enumerate(self.blocks):
            seen.append(x.shape[1])
            x = block(x)
            if i == exit_layer:
                x = x[:, n_visual:]
        return (x if exit_layer >= 0 else x[:, n_visual:]), seen

    def forward(self, x: Tensor, n_visual: int, exit_layers: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (batch, n, dim) with the visual tokens first -> (final text states (batch, n − n_visual, dim), the exit
        layer of each sample (batch,), -1 = none). Without `exit_layers` the routers decide (`routed`): the first block
        l < L−1 after which the router reads logit 1 > logit 0 on the text states."""
        check_tensor("x", x)
        check_rank("x", x, 3, "(batch, n, dim)")
        check_int("n_visual", n_visual, 0, x.shape[1] - 1, meaning="(visual tokens first; at least one text token)")
        if exit_layers is None:
            return self.routed(x, n_visual)
        check_tensor("exit_layers", exit_layers)
        if exit_layers.shape != (x.shape[0],) or exit_layers.dtype != torch.long:
            raise ShapeError(f"exit_layers: expected a long tensor of shape {(x.shape[0],)}, got "
                             f"{tuple(exit_layers.shape)} {exit_layers.dtype}")
        if bool(((exit_layers < -1) | (exit_layers >= self.layers - 1)).any()):
            raise ValueError(f"exit_layers: expected values in [-1, {self.layers - 2}], got {exit_layers.tolist()}")
        out = x.new_empty(x.shape[0], x.shape[1] - n_visual, x.shape[2])
        for layer in exit_layers.unique().tolist():
            rows = (exit_layers == layer).nonzero().flatten()
            out[rows] = self.run(x[rows], n_visual, layer)[0]
        return out, exit_layers

    def routed(self, x: Tensor, n_visual: int) -> tuple[Tensor, Tensor]:
        """One pass with the routers deciding on the way: after block l the samples whose router fires (and that
        still hold their visual tokens) continue as a text-only group. Returns (final text states, exit layers)."""
        exits = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        rows, h = torch.arange(x.shape[0], device=x.device), x  # the samples still holding visual tokens
        exited: list[tuple[Tensor, Tensor]] = []  # (samples, their text states) per exit layer
        for i, block in enumerate(self.blocks):
            exited = [(r, block(t)) for r, t in exited]
            if len(rows) == 0:
                continue
            h = block(h)
            if i < self.layers - 1:
                fire = self.routers[i](h[:, n_visual:]).argmax(-1) == 1
                if bool(fire.any()):
                    exits[rows[fire]] = i
                    exited.append((rows[fire], h[fire][:, n_visual:]))
                    rows, h = rows[~fire], h[~fire]
        out = x.new_empty(x.shape[0], x.shape[1] - n_visual, x.shape[2])
        out[rows] = h[:, n_visual:]
        for r, t in exited:
            out[r] = t
        return out, exits


def exit_labels(stack: VisualTokenExit, x: Tensor, n_visual: int, predict: nn.Module) -> Tensor:
    """Router targets (batch, L−1): 1 where exiting after block l leaves `predict(final text states)`'s argmax
    equal to the full model's."""
    with torch.no_grad():
        full = predict(stack.run(x, n_visual, -1)[0]).argmax(-1)
        return torch.stack([(predict(stack.run(x, n_visual, layer)[0]).argmax(-1) == full).long()
                            for layer in range(stack.layers - 1)], 1)


def block_flops(n: int, dim: int, mlp_ratio: int = 4) -> float:
    """Multiply-adds of one pre-norm transformer block on n tokens: 4·n·dim² (q, k, v, out) + 2·n²·dim (scores and
    weighted values, full n² — an upper bound for a causal block) + 2·mlp_ratio·n·dim² (MLP)."""
    return 4.0 * n * dim * dim + 2.0 * n * n * dim + 2.0 * mlp_ratio * n * dim * dim


def compute_saved(exit_layers: Tensor, layers: int, n_visual: int, n_text: int, dim: int, mlp_ratio: int = 4) -> float:
    """1 − (block FLOPs with the exits) / (block FLOPs without), summed over the samples."""
    n = n_visual + n_text
    full = layers * block_flops(n, dim, mlp_ratio)
    spent = 0.0
    for e in exit_layers.tolist():
        kept = layers if e < 0 else e + 1
        spent += kept * block_flops(n, dim, mlp_ratio) + (layers - kept) * block_flops(n_text, dim, mlp_ratio)
    return 1.0 - spent / (full * max(len(exit_layers), 1))


add(Spec(
    name="dyvte", kind="inference", paper=DYVTE, factory=VisualTokenExit, family="F",
    summary="visual tokens (and their KV) exit after the first layer whose router, reading [mean, last] text states, "
            "says so; later layers run on text only",
))
