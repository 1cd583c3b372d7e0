"""What the peer adapters share: the `Peer` interface, the agreement tolerance, install hints.

A `Peer` adapts one library: which attnlab mechanisms it corresponds to and how their
parameters map, what it supports (modes, causal, dtypes), and `prepare(q, k, v, config)`,
a callable that computes the library's output in attnlab's layout (batch, heads, n,
head_dim). Its output (and for "fwd+bwd" the gradients of q, k, v) must agree with
attnlab's within `TOLERANCE` before it is timed (`attnlab.bench.peers.run`).

A peer that is not installed, or whose import fails, is recorded "unsupported" with a
note starting with `NOT_INSTALLED` (and tried again by every run). Install the peers (the
`peers` extra) without touching torch: NATTEN builds from source and its build requires
torch, so build it against the installed one; without a GPU it builds no extension
(about 10 s):

    pip install --no-build-isolation 'attnlab[peers]'

(or, from a checkout, `pip install --no-build-isolation -e '.[peers]'`). With build
isolation pip would first download a full torch into a temporary build environment.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...core.errors import UnknownNameError
from ...core.registry import Spec, get
from ..speed_configs import bench_params
from ..store import canonical

BASE_IMPL = "attnlab"
TOLERANCE = {"float64": 1e-8, "float32": 1e-4}
NOT_INSTALLED = "peer not installed"
NOT_REGISTERED = "attnlab mechanism"
RETRY_NOTES = (NOT_INSTALLED, NOT_REGISTERED)  # unsupported for now: tried again by every run


def _not_registered(name: str) -> str:
    return f"{NOT_REGISTERED} {name!r} not registered"


def spec_or_none(name: str) -> Spec | None:
    """The registered mechanism `name`, or None when it is not registered (yet)."""
    try:
        return get(name)
    except UnknownNameError:
        return None


class Peer(ABC):
    """Another library's attention, lined up with attnlab mechanisms.

    `mechanisms` maps each attnlab mechanism the peer corresponds to onto the mapping of
    its parameters (text, for `attnlab bench speed --help` and the report); `modes`,
    `causal` and `dtypes` say what the peer supports.
    """

    name: ClassVar[str]
    package: ClassVar[str]  # the distribution on PyPI
    module: ClassVar[str]  # the module imported
    summary: ClassVar[str]
    mechanisms: ClassVar[dict[str, str]]
    modes: ClassVar[tuple[str, ...]] = ("fwd", "fwd+bwd")
    causal: ClassVar[bool] = True
    dtypes: ClassVar[tuple[str, ...]] = ("float32", "float64")
    causal_note: ClassVar[str] = ""  # why causal is not mapped
    mode_notes: ClassVar[dict[str, str]] = {}  # mode -> why it is unsupported

    def why_unavailable(self) -> str | None:
        """None when the peer can run here, else the reason."""
        if importlib.util.find_spec(self.module) is None:
            return f"{NOT_INSTALLED}: {self.package} (pip install {self.package}; see the `peers` extra)"
        try:
            importlib.import_module(self.module)
        except Exception as err:  # a broken install is a reason, not a crash of the run
            return f"{NOT_INSTALLED}: importing {self.module} failed: {type(err).__name__}: {err}"
        return None

    def available(self) -> bool:
        """Whether the peer can run here (`why_unavailable` says why not)."""
        return self.why_unavailable() is None

    def version(self) -> str | None:
        try:
            return importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            return None

    def unsupported(self, config: Mapping[str, Any]) -> str | None:
        """Why the peer cannot run `config`, or None."""
        why = self.why_unavailable()
        if why:
            return why
        mechanism = config["mechanism"]
        if mechanism not in self.mechanisms:
            return f"{self.name} has no counterpart of attnlab mechanism {mechanism!r} (it has: {', '.join(self.mechanisms)})"
        if spec_or_none(mechanism) is None:
            return _not_registered(mechanism)
        if config["mode"] not in self.modes:
            return self.mode_notes.get(config["mode"], f"{self.name} supports modes {', '.join(self.modes)}")
        if config["causal"] and not self.causal:
            return f"causal {mechanism} is not mapped: {self.causal_note or 'the peer has no causal mode'}"
        if config["dtype"] not in self.dtypes:
            return f"{self.name} is compared in dtypes {', '.join(self.dtypes)}, not {config['dtype']}"
        return self.unsupported_params(config)

    def unsupported_params(self, config: Mapping[str, Any]) -> str | None:
        """Why the peer cannot map this configuration's parameters, or None."""
        return None

    def maps(self, config: Mapping[str, Any]) -> bool:
        """Whether the peer has a counterpart of this attnlab configuration (mechanism and parameters)."""
        return config["mechanism"] in self.mechanisms and self.unsupported_params(config) is None

    def native_configs(self, shape: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Configurations the peer adds at a run's shape (the attnlab config of dense softmax at some N)."""
        return []

    def attnlab_mask(self, config: Mapping[str, Any], device: torch.device) -> Tensor | None:
        """The explicit attn_mask of attnlab's side, for a configuration that carries params["attn_mask"]."""
        return None

    @abstractmethod
    def prepare(self, q: Tensor, k: Tensor, v: Tensor, config: Mapping[str, Any]) -> Callable[[], Tensor]:
        """A callable computing the peer's output on q, k, v (batch, heads, n, head_dim), in that layout."""

    def describe(self) -> str:
        maps = "; ".join(f"{m}: {text}" for m, text in self.mechanisms.items())
        return f"{self.name} ({self.package}): {self.summary} Corresponds to {maps}."


def natural_params(spec: Spec | None, params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` completed with the mechanism's benchmark defaults (so they match `attnlab bench speed`'s records)."""
    base = bench_params(spec) if spec is not None else {}
    return json_params({**base, **params})


def json_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters as they are stored (tuples as lists)."""
    return json.loads(canonical(dict(params)))
