"""The logged training loop the family G tasks' learning-dynamics runs share."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def train_logged(
    optimizer: torch.optim.Optimizer,
    steps: int,
    log_every: int,
    step_loss: Callable[[int], tuple[Tensor, Callable[[], dict[str, float]]]],
) -> list[dict[str, float]]:
    """Steps 0 … `steps`: `step_loss(step)` gives the step's loss and what to log with it; every `log_every` steps
    and at the last one, {"step", "loss", **measures()} is logged before the update (the last step makes none)."""
    log = []
    for step in range(steps + 1):
        loss, measures = step_loss(step)
        if step % log_every == 0 or step == steps:
            log.append({"step": float(step), "loss": float(loss.detach()), **measures()})
        if step == steps:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return log
