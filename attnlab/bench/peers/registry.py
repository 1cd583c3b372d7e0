"""The peers attnlab knows (`PEER_CLASSES`), and selecting them by name."""
from __future__ import annotations

import difflib
from collections.abc import Iterable

from ...core.errors import ParameterError
from .base import Peer
from .flex import FlexPeer
from .linear_attention_transformer import LinearAttentionTransformerPeer
from .local_attention import LocalAttentionPeer
from .natten import NattenPeer

PEER_CLASSES: dict[str, type[Peer]] = {
    cls.name: cls for cls in (FlexPeer, NattenPeer, LocalAttentionPeer, LinearAttentionTransformerPeer)
}


def all_peers() -> dict[str, Peer]:
    """Every peer attnlab knows, installed or not."""
    return {name: cls() for name, cls in PEER_CLASSES.items()}


def available_peers() -> dict[str, Peer]:
    """The peers that can run here."""
    return {name: peer for name, peer in all_peers().items() if peer.available()}


def select_peers(names: Iterable[str]) -> dict[str, Peer]:
    """The peers named (installed or not: an unavailable one is recorded with its reason); unknown names raise."""
    known = all_peers()
    out = {}
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=2)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ParameterError(f"peers: unknown peer {name!r}{hint} (known: {', '.join(known)})")
        out[name] = known[name]
    return out
