"""torch's FlexAttention, compiled in one place (one process-wide compiled function and dynamo settings).

Dynamo keeps one graph per shape and pattern; the recompile limit is raised so that a run over many
lengths and patterns does not reach it, and reaching it raises instead of falling back to the unfused
eager path (which would be slow and silently different from what was asked).
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

RECOMPILE_LIMIT = 256
ACCUMULATED_RECOMPILE_LIMIT = 1024


def flex_available() -> bool:
    """Whether this torch has FlexAttention (torch.nn.attention.flex_attention)."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def compiled_flex() -> Callable[..., Tensor]:
    """flex_attention under torch.compile(dynamic=False), built once per process."""
    import torch._dynamo.config as dynamo_config
    from torch.nn.attention.flex_attention import flex_attention

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, ACCUMULATED_RECOMPILE_LIMIT)
    dynamo_config.fail_on_recompile_limit_hit = True
    return torch.compile(flex_attention, dynamic=False)


def eager_flex() -> Callable[..., Tensor]:
    """flex_attention without compiling (the unfused path; its warning about that silenced)."""
    from torch.nn.attention.flex_attention import flex_attention

    def run(*args: Any, **kwargs: Any) -> Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return flex_attention(*args, **kwargs)

    return run
