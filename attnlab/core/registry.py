"""The catalogue: every mechanism, analysis method, task, initialisation and inference
technique of attnlab, each with the paper it comes from.

    @register(name="alibi", paper=Paper("P212", "...", 2022, "2205.09921"), family="C", ...)
    class ALiBiAttention(Attention): ...

    attnlab.build("alibi", dim=64, heads=4)
"""
from __future__ import annotations

import difflib
import functools
import inspect
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from .errors import ParameterError, UnknownNameError

Kind = Literal[
    "mechanism", "pooling", "block", "set", "graph", "table", "analysis", "task", "init", "recipe", "inference", "repro"
]
KINDS: tuple[str, ...] = (
    "mechanism", "pooling", "block", "set", "graph", "table", "analysis", "task", "init", "recipe", "inference", "repro"
)
"""mechanism: token-to-token attention (batch, n, dim) -> (batch, n, dim) with materialize (batch, heads, n_q, n_k);
pooling: (batch, n, dim) -> (batch, m, dim), m queries over the tokens, materialize (batch, heads, m, n);
block: a residual block (batch, n, dim) -> (batch, n, dim) whose token mixer is any registered mechanism;
set: points with coordinates, (batch, n, dim) and (batch, n, d_pos) -> (batch, n, dim), equivariant to their order;
graph: node features (nodes, dim) and edges (2, edges) -> (nodes, dim), messages only along edges;
table: a table of datapoints × attributes (batch, rows, attributes, dim) -> the same shape;
the other kinds register functions or recipes with the paper they come from."""
FAMILIES = {
    "A": "attention operator",
    "B": "token mixer",
    "C": "positions, heads, gating, pooling",
    "D": "initialisation",
    "E": "analysis",
    "F": "inference, KV cache",
    "G": "synthetic task",
}
_MISSING: Any = inspect.Parameter.empty
BUILDABLE: tuple[str, ...] = ("mechanism", "pooling", "block", "set", "graph", "table")
"""The kinds whose entries are modules `attnlab.build` makes; set, graph and table modules also give the speed harness
their inputs (`bench_inputs(batch, n, dtype, generator) -> (tensors, keywords)`)."""
Fn = TypeVar("Fn", bound=Callable[..., Any])


@dataclass(frozen=True)
class Paper:
    """A paper: `id` is its Pnnn in shared/PAPERS.md, or None for one outside the seeds."""

    id: str | None
    title: str
    year: int
    arxiv: str | None = None

    def cite(self) -> str:
        ref = f"{self.id} " if self.id else ""
        arx = f", arXiv:{self.arxiv}" if self.arxiv else ""
        return f"{ref}{self.title} ({self.year}{arx})"


@dataclass(frozen=True)
class Param:
    """A parameter a user may set, with its type, default and range."""

    name: str
    type: type | tuple[type, ...]
    default: Any = _MISSING
    doc: str = ""
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    optional: bool = False  # None is accepted
    knob: bool = False  # a speed knob: it changes the cost, not the result (up to rounding)
    allow_inf: bool = False  # ±inf is a meaningful value (NaN never is)

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    def validate(self, owner: str, value: Any) -> Any:
        if value is None and self.optional:
            return value
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in types:
            raise ParameterError(f"{owner}: parameter {self.name!r} expected {self.type_name()}, got bool {value!r}")
        if (tuple in types or list in types) and isinstance(value, (list, tuple)):
            value = tuple(value)
        if not isinstance(value, types):
            raise ParameterError(
                f"{owner}: parameter {self.name!r} expected {self.type_name()}, got {type(value).__name__} {value!r}"
            )
        if self.choices is not None and value not in self.choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in self.choices], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ParameterError(
                f"{owner}: parameter {self.name!r} expected one of {list(self.choices)}, got {value!r}{hint}"
            )
        items = value if isinstance(value, tuple) else (value,)
        for item in items:
            if isinstance(item, float) and not (math.isfinite(item) or (self.allow_inf and not math.isnan(item))):
                raise ParameterError(f"{owner}: parameter {self.name!r} expected a finite float, got {value!r}")
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                if self.low is not None and item < self.low:
                    raise ParameterError(f"{owner}: parameter {self.name!r} expected >= {self.low}, got {value!r}")
                if self.high is not None and item > self.high:
                    raise ParameterError(f"{owner}: parameter {self.name!r} expected <= {self.high}, got {value!r}")
        return value

    def type_name(self) -> str:
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        name = " or ".join(t.__name__ for t in types)
        return f"{name} or None" if self.optional else name

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type_name(),
            "default": None if self.required else _jsonable(self.default),
            "required": self.required,
            "doc": self.doc,
            "low": self.low,
            "high": self.high,
            "choices": list(self.choices) if self.choices else None,
        }


@dataclass(frozen=True)
class Supports:
    """What a mechanism supports."""

    causal: bool = False
    causal_only: bool = False  # causal by construction (a left-to-right scan): causal=True is the only value
    key_padding: bool = False
    attn_mask: bool = False  # arbitrary bool/additive (n_q, n_k) masks
    cross: bool = False  # n_q != n_k, keys from a context
    grids: tuple[int, ...] = (1,)  # ranks of the position grid
    decode: bool = False  # incremental decoding (KV cache or recurrent state)
    materialize: bool = True
    # the keys and values are m summaries of the tokens (pooled, convolved), not the tokens: the module
    # has key_count(grid) -> m and key_values(x) -> (k, v), each (batch, heads, m, head_dim);
    # materialize gives (batch, heads, n_q, m) over those keys, the core output being A @ v, and
    # attend(q, k, v) takes k, v of m rows (the speed harness times it so)
    summary_keys: bool = False
    # the tokens are a set: permuting them permutes the output alike (mechanisms, blocks) or leaves it unchanged
    # (pooling); checked by the conformance suite
    order_invariant: bool = False
    dtypes: tuple[str, ...] = ("float32", "float64", "bfloat16")
    # exact sequence-parallel forms over torch.distributed (attnlab.distributed): "ring", "tree" (softmax
    # family), "state" (state passing, linear family), "halo" (halo exchange, local windows); () = not shardable
    sharding: tuple[str, ...] = ()

    def flags(self) -> list[str]:
        names = ("causal", "key_padding", "attn_mask", "cross", "decode", "materialize", "summary_keys", "order_invariant")
        out = [name for name in names if getattr(self, name)]
        if self.causal_only:
            out[0] = "causal only"
        out.append("grid " + "/".join(f"{g}d" for g in self.grids))
        if self.sharding:
            out.append("sharded by " + "/".join(self.sharding))
        return out


COMMON_PARAMS: tuple[Param, ...] = (
    Param("dim", int, doc="model width", low=1),
    Param("heads", int, 8, "number of heads", low=1),
    Param("head_dim", int, None, "width of a head (default dim // heads)", low=1, optional=True),
    Param("qkv_bias", bool, True, "bias in the q, k, v projections"),
)
CAUSAL_PARAM = Param("causal", bool, False, "mask the future (bottom-right aligned when n_q < n_k)")
BATCH_FIRST_PARAM = Param(
    "batch_first", bool, True, "tokens (batch, n, dim); False: (n, batch, dim) in and out, as nn.MultiheadAttention"
)
CAUSAL_ONLY_PARAM = Param("causal", bool, True, "causal by construction: True is the only value", choices=(True,))
POOLING_PARAMS: tuple[Param, ...] = (Param("dim", int, doc="model width", low=1),)
MODULE_PARAMS: tuple[Param, ...] = (
    Param("dim", int, doc="model width", low=1),
    Param("heads", int, 8, "number of heads", low=1),
)
BLOCK_PARAMS: tuple[Param, ...] = (
    Param("dim", int, doc="model width", low=1),
    Param("heads", int, 8, "number of heads of the mixer", low=1),
    Param("mixer", str, "softmax", "the token mixer: any registered mechanism (`attnlab list`)"),
    Param("mixer_params", dict, None, "further parameters of the mixer, e.g. {'kernel_size': 7}", optional=True),
)


@dataclass(frozen=True)
class Spec:
    """A catalogue entry."""

    name: str
    kind: str
    paper: Paper
    factory: Callable[..., Any]
    summary: str = ""
    family: str | None = None
    cost: str | None = None  # e.g. "O(N²d)"
    exponent: float | None = None  # declared cost exponent in N
    supports: Supports | None = None
    params: tuple[Param, ...] = ()
    normalized: bool = False  # materialize rows sum to 1 (softmax-normalised)
    test_params: dict[str, Any] = field(default_factory=dict)  # a small config for the conformance suite
    test_positions: tuple[int, ...] | None = None  # positions of the suite's inputs, e.g. (9,) or (4, 5)
    # (n, heads, head_dim, causal) -> forward FLOPs, batch 1; keyword arguments named as the entry's parameters
    # (and `grid`) are passed when the count declares them, else it counts at the defaults
    flops: Callable[..., float] | None = None
    functional: tuple[str, ...] = ()  # names of its functional ops in `attnlab.functional` (fast path, reference)
    renamed: dict[str, str] = field(default_factory=dict)  # old parameter name -> "new_name (its meaning)"
    backend: Callable[[], str] | None = None  # which fast path serves on this installation, and why (for `info`)

    @property
    def source(self) -> str:
        """The module that defines the entry, e.g. attnlab.mechanisms.dense.softmax."""
        return getattr(self.factory, "__module__", "") or ""

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise self._unknown_param(name)

    def _unknown_param(self, name: str) -> ParameterError:
        names = [p.name for p in self.params]
        if name in self.renamed:
            return ParameterError(
                f"{self.name}: parameter {name!r} was renamed {self.renamed[name]} (parameters: {', '.join(names)})"
            )
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return ParameterError(f"{self.name}: unknown parameter {name!r}{hint} (parameters: {', '.join(names)})")

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        """Check every parameter against its Param; fill defaults; raise on unknown or missing ones."""
        known = {p.name for p in self.params}
        for key in params:
            if key not in known:
                raise self._unknown_param(key)
        out: dict[str, Any] = {}
        for p in self.params:
            if p.name in params:
                out[p.name] = p.validate(self.name, params[p.name])
            elif p.required:
                raise ParameterError(f"{self.name}: parameter {p.name!r} is required ({p.doc or p.type_name()})")
        return out

    def build(self, **params: Any) -> Any:
        return self.factory(**self.validate(params))

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "summary": self.summary,
            "paper": {"id": self.paper.id, "title": self.paper.title, "year": self.paper.year, "arxiv": self.paper.arxiv},
            "family": self.family,
            "cost": self.cost,
            "exponent": self.exponent,
            "normalized": self.normalized,
            "params": [p.as_dict() for p in self.params],
            "source": self.source,
            "functional": [f"attnlab.functional.{f}" for f in self.functional],
            "knobs": [p.name for p in self.params if p.knob],
            "backend": self.backend() if self.backend is not None else None,
        }
        if self.supports is not None:
            s = self.supports
            d["supports"] = {
                "causal": s.causal,
                "causal_only": s.causal_only,
                "key_padding": s.key_padding,
                "attn_mask": s.attn_mask,
                "cross": s.cross,
                "grids": list(s.grids),
                "decode": s.decode,
                "materialize": s.materialize,
                "summary_keys": s.summary_keys,
                "order_invariant": s.order_invariant,
                "dtypes": list(s.dtypes),
                "sharding": list(s.sharding),
            }
        return d


_CATALOGUE: dict[tuple[str, str], Spec] = {}


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def add(spec: Spec) -> Spec:
    key = (spec.kind, spec.name)
    if key in _CATALOGUE and _CATALOGUE[key].factory is not spec.factory:
        raise ValueError(f"register: a {spec.kind} named {spec.name!r} is registered already")
    if spec.kind not in KINDS:
        raise ValueError(f"register: kind expected one of {KINDS}, got {spec.kind!r}")
    if spec.family is not None and spec.family not in FAMILIES:
        raise ValueError(f"register: family expected one of {sorted(FAMILIES)}, got {spec.family!r}")
    _CATALOGUE[key] = spec
    return spec


def remove(name: str, kind: str = "mechanism") -> None:
    """Take an entry out of the catalogue (for tests that plant one)."""
    _CATALOGUE.pop((kind, name), None)


def register(
    *,
    name: str,
    paper: Paper,
    family: str,
    cost: str,
    exponent: float,
    supports: Supports,
    params: Iterable[Param] = (),
    summary: str = "",
    normalized: bool = True,
    test_params: dict[str, Any] | None = None,
    test_positions: tuple[int, ...] | None = None,
    flops: Callable[..., float] | None = None,
    functional: Iterable[str] | None = None,
    renamed: Mapping[str, str] | None = None,
    kind: str = "mechanism",
    backend: Callable[[], str] | None = None,
) -> Callable[[type], type]:
    """Class decorator registering a module: an attention mechanism, or a `pooling` or `block` (KINDS).

    A mechanism's parameters are the common ones (dim, heads, head_dim, qkv_bias, causal when
    supported, batch_first when the constructor takes it) followed by `params`; a pooling's are
    dim then `params`; a block's are dim, heads, mixer, mixer_params, causal when supported,
    then `params`; a set's, graph's or table's are dim, heads, causal when supported, then `params`.
    `functional`: the names of its functional ops (in `attnlab.functional`); by default
    `<name>_attention` and `<name>_attention_reference` where the class's module defines them.
    `renamed`: old parameter name -> "new_name (its meaning)"; `build` and the constructor name the
    new parameter when given the old one (see `renamed_keywords`).
    `backend`: () -> one line saying which fast path serves on this installation (a compiled loop or
    its PyTorch path, and why), printed by `attnlab info`.
    """

    def wrap(cls: type) -> type:
        if supports.causal_only and not supports.causal:
            raise ValueError(f"register {name!r}: causal_only needs causal=True in Supports")
        if kind not in BUILDABLE:
            raise ValueError(f"register {name!r}: kind expected one of {BUILDABLE}, got {kind!r}")
        causal = (CAUSAL_ONLY_PARAM,) if supports.causal_only else (CAUSAL_PARAM,) if supports.causal else ()
        common = {"mechanism": COMMON_PARAMS, "pooling": POOLING_PARAMS, "block": BLOCK_PARAMS}.get(kind, MODULE_PARAMS)
        common += () if kind == "pooling" else causal
        if "batch_first" in inspect.signature(cls).parameters:
            common += (BATCH_FIRST_PARAM,)
        spec = Spec(
            name=name,
            kind=kind,
            paper=paper,
            factory=cls,
            summary=summary or (inspect.getdoc(cls) or "").split("\n")[0],
            family=family,
            cost=cost,
            exponent=exponent,
            supports=supports,
            params=common + tuple(params),
            normalized=normalized,
            test_params=dict(test_params or {}),
            test_positions=test_positions,
            flops=flops,
            functional=tuple(functional) if functional is not None else default_functional(name, cls),
            renamed=dict(renamed or {}),
            backend=backend,
        )
        if renamed:
            cls.__init__ = renamed_keywords(cls.__name__, renamed)(cls.__init__)  # type: ignore[misc]
        add(spec)
        cls.spec = spec  # type: ignore[attr-defined]
        return cls

    return wrap


def renamed_keywords(owner: str, renamed: Mapping[str, str]) -> Callable[[Fn], Fn]:
    """Decorator: a call passing a keyword of `renamed` (old name -> "new_name (its meaning)") raises
    TypeError naming the new parameter, where Python would only say "unexpected keyword argument"."""

    def wrap(fn: Fn) -> Fn:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            stale = sorted(renamed.keys() & kwargs.keys())
            if stale:
                raise TypeError(f"{owner}: keyword {stale[0]!r} was renamed {renamed[stale[0]]}")
            return fn(*args, **kwargs)

        return call  # type: ignore[return-value]

    return wrap


def default_functional(name: str, cls: type) -> tuple[str, ...]:
    """`<stem>_attention` and `<stem>_attention_reference` of the module defining `cls`, those it defines,
    the stem being `name` with "-" as "_" (a trailing "_attention" not doubled)."""
    module = sys.modules.get(cls.__module__)
    stem = name.replace("-", "_").removesuffix("_attention")
    names = (f"{stem}_attention", f"{stem}_attention_reference")
    found = (getattr(module, n, None) for n in names)
    return tuple(n for n, f in zip(names, found) if callable(f) and getattr(f, "__module__", None) == cls.__module__)


_LOADERS: list[Callable[[], None]] = []


def add_loader(load: Callable[[], None]) -> None:
    """Have `load()` run before every read of the catalogue (it must be cheap after its first run).

    The core imports nothing above it: `attnlab.catalogue`, imported by the `attnlab` package,
    registers here the loader of the built-in entries and the installed plugins.
    """
    if load not in _LOADERS:
        _LOADERS.append(load)


def _ensure_loaded() -> None:
    for load in tuple(_LOADERS):
        load()


def get(name: str, kind: str = "mechanism") -> Spec:
    """The catalogue entry `name`; an unknown name raises UnknownNameError with the close matches."""
    _ensure_loaded()
    try:
        return _CATALOGUE[(kind, name)]
    except KeyError:
        names = [n for (k, n) in _CATALOGUE if k == kind]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownNameError(f"unknown {kind} {name!r}{hint} (see `attnlab list`)") from None


BENCHED: tuple[str, ...] = ("mechanism", "pooling", "set", "graph", "table")
"""The kinds `attnlab bench speed` measures (a block is measured through its mixer)."""


def module_entry(name: str) -> Spec:
    """The entry named `name` among the module kinds (BUILDABLE: a mechanism first); UnknownNameError otherwise."""
    _ensure_loaded()
    for kind in BUILDABLE:
        if (kind, name) in _CATALOGUE:
            return _CATALOGUE[(kind, name)]
    return get(name)  # the unknown-name error, with the close mechanism names


def benched_entries() -> list[Spec]:
    """The entries `attnlab bench speed` measures by default: every mechanism, then every pooling."""
    return [s for kind in BENCHED for s in entries(kind)]


def build(name: str, **params: Any) -> Any:
    """Build the mechanism (or pooling, or block) `name` with validated parameters: `build("alibi", dim=64, heads=4)`."""
    return module_entry(name).build(**params)


def entries(kind: str | None = None) -> list[Spec]:
    """All catalogue entries of a kind (or every kind), sorted by kind then name."""
    _ensure_loaded()
    return sorted((s for (k, _), s in _CATALOGUE.items() if kind is None or k == kind), key=lambda s: (s.kind, s.name))


def list_mechanisms(family: str | None = None) -> list[Spec]:
    """The registered mechanisms, optionally of one family (A–G)."""
    if family is not None and family not in FAMILIES:
        raise ParameterError(f"family: expected one of {sorted(FAMILIES)}, got {family!r}")
    return [s for s in entries("mechanism") if family is None or s.family == family]


def papers() -> dict[str, list[Spec]]:
    """Paper id (Pnnn) -> the entries that implement it."""
    out: dict[str, list[Spec]] = {}
    for spec in entries():
        if spec.paper.id:
            out.setdefault(spec.paper.id, []).append(spec)
    return dict(sorted(out.items()))
