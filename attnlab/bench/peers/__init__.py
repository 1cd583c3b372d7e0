"""Peers: the same shapes through another library, in the same run, checked before timed.

    attnlab bench speed --mechanisms softmax,alibi,multiscale --peers flex,natten,local-attention

A `Peer` (`base`) adapts one library: which attnlab mechanisms it corresponds to and how
their parameters map, what it supports (modes, causal, dtypes), and `prepare(q, k, v,
config)`, a callable that computes the library's output in attnlab's layout (batch, heads,
n, head_dim). One module per peer, each saying which path of the library it times and how
its output is checked equal to attnlab's:

    flex                          PyTorch FlexAttention, compiled (softmax, alibi, multiscale, neighborhood)
    natten                        NATTEN's na1d / na2d (neighborhood)
    local_attention               lucidrains' LocalAttention (its block-window pattern, multiscale)
    linear_attention_transformer  lucidrains' linear_attn (efficient attention)

`registry` lists them (`all_peers`, `select_peers`), `neighborhood` is NATTEN's rule shared
by flex and natten, `run` checks and times them (`run_peer_configs`, `run_peers`), `table`
gives the ratios attnlab time / peer time (`peer_ratios`, `peer_table`).

A peer configuration is the attnlab one (the agreed record of the "speed" suite) with
"impl" set to the peer's name. Peers serve the attnlab configurations of a run
(`peer_configs`) and may add their own at the same shapes (`Peer.native_configs`): NATTEN
adds 1-D and 2-D neighborhood attention, local-attention its block-window pattern,
linear-attention-transformer efficient attention. A configuration a peer cannot run is
recorded "unsupported" with the reason; reasons that a later run may remove (the package
is not installed, the attnlab mechanism is not registered yet) are tried again by every
run, other results are resumed like those of `attnlab bench speed`. Installing the peers
(the `peers` extra, `pip install --no-build-isolation 'attnlab[peers]'`): see `base`.
"""
from __future__ import annotations

from ..compare import twin
from .base import (
    BASE_IMPL,
    NOT_INSTALLED,
    NOT_REGISTERED,
    RETRY_NOTES,
    TOLERANCE,
    Peer,
    json_params,
    natural_params,
    spec_or_none,
)
from .flex import FlexPeer
from .linear_attention_transformer import LinearAttentionTransformerPeer
from .local_attention import LOCAL_PATTERN, LocalAttentionPeer, local_attention_mask
from .natten import NattenPeer
from .neighborhood import neighborhood_args, neighborhood_axis_keep, neighborhood_keep, neighborhood_unsupported
from .registry import PEER_CLASSES, all_peers, available_peers, select_peers
from .run import (
    M_MMAP_THRESHOLD,
    attnlab_prepare,
    flops_for,
    make_inputs,
    max_abs_diff,
    measure_pair,
    peer_configs,
    return_freed_memory,
    run_peer_configs,
    run_peers,
)
from .table import peer_ratios, peer_table

__all__ = [
    "BASE_IMPL", "LOCAL_PATTERN", "M_MMAP_THRESHOLD", "NOT_INSTALLED", "NOT_REGISTERED", "PEER_CLASSES", "RETRY_NOTES",
    "TOLERANCE", "FlexPeer", "LinearAttentionTransformerPeer", "LocalAttentionPeer", "NattenPeer", "Peer", "all_peers",
    "attnlab_prepare", "available_peers", "flops_for", "json_params", "local_attention_mask", "make_inputs",
    "max_abs_diff", "measure_pair", "natural_params", "neighborhood_args", "neighborhood_axis_keep", "neighborhood_keep",
    "neighborhood_unsupported", "peer_configs", "peer_ratios", "peer_table", "return_freed_memory", "run_peer_configs",
    "run_peers", "select_peers", "spec_or_none", "twin",
]
