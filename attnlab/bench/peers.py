"""Peers: the same shapes through another library, in the same run, checked before timed.

    attnlab bench speed --mechanisms softmax,alibi,multiscale --peers flex,natten,local-attention

A `Peer` adapts one library: which attnlab mechanisms it corresponds to and how their
parameters map, what it supports (modes, causal, dtypes), and `prepare(q, k, v, config)`,
a callable that computes the library's output in attnlab's layout (batch, heads, n,
head_dim). For every peer configuration `run_peer_configs`

1. computes attnlab's output on the same q, k, v — the registered mechanism's attention
   core `module.attend` with the mapped parameters, as `attnlab bench speed` times it —
   and the peer's (with the gradients of q, k, v for "fwd+bwd");
2. records "disagree" with the largest absolute difference, and no time, when it exceeds
   the tolerance (`TOLERANCE`: 1e-4 for float32 on standard-normal q, k, v, whose
   outputs are O(1); 1e-8 for float64);
3. otherwise times the peer with `attnlab.bench.timing.measure` as the speed worker does
   (peak memory from the first timed call; the check's call was the warm-up), and
   measures attnlab's side too unless the database has it, so that `peer_ratios` gives
   attnlab time / peer time for every configuration.

A peer configuration is the attnlab one (the agreed record of the "speed" suite) with
"impl" set to the peer's name. Peers serve the attnlab configurations of a run
(`peer_configs`) and may add their own at the same shapes (`Peer.native_configs`): NATTEN
adds 1-D and 2-D neighborhood attention, local-attention its block-window pattern,
linear-attention-transformer efficient attention. A configuration a peer cannot run is
recorded "unsupported" with the reason; reasons that a later run may remove (the package
is not installed, the attnlab mechanism is not registered yet) are tried again by every
run, other results are resumed like those of `attnlab bench speed`.

Peers run in the calling process: FlexAttention compiles once per pattern and shape
(about 15–40 s cold, seconds with torch's on-disk cache warm), and the compiled function
is kept for the rest of the process. Peak memory is the rise of the resident set
(`attnlab.bench.timing`); as in the speed worker, glibc is told to return every block of
64 KiB or more to the system on free (`mallopt(M_MMAP_THRESHOLD, 65536)`, the runtime
form of MALLOC_MMAP_THRESHOLD_=65536) when the process did not start with that setting.

Install the peers (the `peers` extra) without touching torch: NATTEN builds from source
and its build requires torch, so build it against the installed one; without a GPU it
builds no extension (about 10 s):

    pip install --no-build-isolation 'attnlab[peers]'

(or, from a checkout, `pip install --no-build-isolation -e '.[peers]'`). With build
isolation pip would first download a full torch into a temporary build environment.
"""
from __future__ import annotations

import contextlib
import ctypes
import difflib
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import textwrap
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core.errors import ParameterError, UnknownNameError
from ..core.module import Attention
from ..core.registry import Spec, get
from ..kernels.flex import compiled_flex, eager_flex
from . import compare
from .compare import twin
from .progress import progress, say
from .speed import (
    BACKWARD_FLOPS_FACTOR,
    SUITE,
    TARGET_S,
    SpeedOptions,
    bench_params,
    empty_metrics,
    flops_of,
    grid_for,
    machine_memory_bytes,
    predict_over_budget,
)
from .store import Result, ResultStore, canonical, config_hash
from .timing import MMAP_THRESHOLD_ENV, Timing, measure

BASE_IMPL = "attnlab"
TOLERANCE = {"float64": 1e-8, "float32": 1e-4}
NOT_INSTALLED = "peer not installed"
NOT_REGISTERED = "attnlab mechanism"
RETRY_NOTES = (NOT_INSTALLED, NOT_REGISTERED)  # unsupported for now: tried again by every run
LOCAL_PATTERN = "local-attention"  # params["attn_mask"]["pattern"] of local-attention's block-window mask
_SHAPE_KEYS = ("mode", "causal", "dtype", "batch", "heads", "head_dim", "threads")
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _not_registered(name: str) -> str:
    return f"{NOT_REGISTERED} {name!r} not registered"


def _spec_or_none(name: str) -> Spec | None:
    try:
        return get(name)
    except UnknownNameError:
        return None


def _axes(value: Any, rank: int, name: str) -> tuple[int, ...]:
    """An int or per-axis sequence as a tuple of `rank` ints."""
    if isinstance(value, (list, tuple)):
        if len(value) != rank:
            raise ParameterError(f"{name}: expected {rank} values (one per grid axis), got {list(value)}")
        return tuple(int(x) for x in value)
    return (int(value),) * rank


# -- the patterns, as masks ---------------------------------------------------------------------
def local_attention_mask(
    n: int, window_size: int, look_backward: int, look_forward: int, causal: bool, device: torch.device | None = None
) -> Tensor:
    """bool (n, n), True = attend: the keys lucidrains' `LocalAttention` lets query i see.

    Positions are cut into blocks of `window_size`; query i (block b = i // window_size)
    sees the keys of blocks b − look_backward … b + look_forward that exist, and with
    `causal` only keys j ≤ i. (That is `LocalAttention(window_size, causal, look_backward,
    look_forward, exact_windowsize=False, autopad=False, dim=None)`: no rotary embedding,
    scale head_dim^−½, n a multiple of window_size.)
    """
    pos = torch.arange(n, device=device)
    block = pos // window_size
    delta = block[None, :] - block[:, None]  # key block − query block
    keep = (delta >= -look_backward) & (delta <= look_forward)
    if causal:
        keep &= pos[None, :] <= pos[:, None]
    return keep


def neighborhood_axis_keep(q: Tensor, k: Tensor, length: int, kernel: int, dilation: int, causal: bool) -> Tensor:
    """Whether key coordinate k is in the neighborhood of query coordinate q on one axis, as NATTEN defines it.

    Positions split into `dilation` groups by their residue; within a group (coordinates
    c = position // dilation, group length L) a non-causal query at c sees the `kernel`
    keys around c, the window shifted (clamped) to stay inside the group: centre
    clamp(c, ⌊kernel/2⌋, L − 1 − right), left ⌊kernel/2⌋, right ⌊kernel/2⌋ (odd kernel) or
    ⌊kernel/2⌋ − 1 (even). A causal query sees the group's keys c − kernel < c_k ≤ c: its
    window is not shifted, so the first queries see fewer keys. Works elementwise on
    tensors (FlexAttention's mask_mod calls it with 0-d tensors).
    """
    same_group = (q % dilation) == (k % dilation)
    qc, kc = q // dilation, k // dilation
    if causal:
        return same_group & (kc <= qc) & (qc - kc < kernel)
    group_length = (length - q % dilation + dilation - 1) // dilation
    left = kernel // 2
    right = kernel // 2 + kernel % 2 - 1
    centre = torch.minimum(torch.clamp(qc, min=left), group_length - 1 - right)
    return same_group & (kc >= centre - left) & (kc <= centre + right)


def neighborhood_keep(
    q_idx: Tensor, k_idx: Tensor, grid: Sequence[int], kernel: Sequence[int], dilation: Sequence[int], causal: bool
) -> Tensor:
    """NATTEN's neighborhood on a row-major grid, for flat query and key indices (elementwise)."""
    keep: Tensor | None = None
    stride = math.prod(grid)
    for axis, length in enumerate(grid):
        stride //= length
        qa, ka = (q_idx // stride) % length, (k_idx // stride) % length
        axis_keep = neighborhood_axis_keep(qa, ka, length, kernel[axis], dilation[axis], causal)
        keep = axis_keep if keep is None else keep & axis_keep
    assert keep is not None
    return keep


# -- peers ------------------------------------------------------------------------------------
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
        if _spec_or_none(mechanism) is None:
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


def _natural_params(spec: Spec | None, params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` completed with the mechanism's benchmark defaults (so they match `attnlab bench speed`'s records)."""
    base = bench_params(spec) if spec is not None else {}
    return json_params({**base, **params})


def json_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters as they are stored (tuples as lists)."""
    return json.loads(canonical(dict(params)))


def _grid_or_line(config: Mapping[str, Any]) -> tuple[int, ...]:
    return tuple(config["grid"]) if config.get("grid") else (config["n"],)


def _neighborhood_args(config: Mapping[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(grid, kernel per axis, dilation per axis) of a neighborhood configuration."""
    grid = _grid_or_line(config)
    params = config["params"]
    if "kernel_size" not in params:
        raise ParameterError(f"neighborhood: params expected a 'kernel_size', got {sorted(params)}")
    kernel = _axes(params["kernel_size"], len(grid), "kernel_size")
    dilation = _axes(params.get("dilation") or 1, len(grid), "dilation")
    return grid, kernel, dilation


def _neighborhood_unsupported(config: Mapping[str, Any]) -> str | None:
    try:
        grid, kernel, dilation = _neighborhood_args(config)
    except ParameterError as err:
        return str(err)
    if len(grid) > 2:
        return f"neighborhood on a {len(grid)}-D grid is not mapped (1-D and 2-D are)"
    for axis, (length, ks, d) in enumerate(zip(grid, kernel, dilation)):
        if ks < 1 or d < 1 or ks * d > length:
            return f"axis {axis}: kernel_size {ks} × dilation {d} must be within 1..{length} (the axis length)"
    extra = sorted(k for k, v in config["params"].items() if k not in ("kernel_size", "dilation") and v not in (None, False))
    if extra:
        return f"neighborhood parameters {extra} have no counterpart here (mapped: kernel_size, dilation, causal)"
    return None


class FlexPeer(Peer):
    """torch.nn.attention.flex_attention: score_mod and block-mask patterns, compiled (CPU forward only)."""

    name = "flex"
    package = "torch"
    module = "torch.nn.attention.flex_attention"
    summary = "PyTorch FlexAttention, compiled with torch.compile (inductor's CPU template)."
    mechanisms = {
        "softmax": "no score_mod; causal: mask_mod q_idx >= kv_idx",
        "alibi": "score_mod s − m_h·|q_idx − kv_idx| with attnlab's slopes m_h (alibi_slopes)",
        "multiscale": "per-head band mask_mod |q_idx − kv_idx| <= windows[h] (global heads: no limit), & causal",
        "neighborhood": "mask_mod of NATTEN's clamped windows per axis (kernel_size, dilation, causal), 1-D and 2-D",
    }
    modes = ("fwd",)
    mode_notes = {"fwd+bwd": "FlexAttention has no backward on CPU (torch raises 'FlexAttention does not support "
                             "backward on CPU')"}

    def __init__(self, *, compile: bool = True) -> None:
        self.compile = compile

    def unsupported_params(self, config: Mapping[str, Any]) -> str | None:
        if config["mechanism"] == "neighborhood":
            return _neighborhood_unsupported(config)
        if config.get("grid"):
            return f"{config['mechanism']} on a grid is not mapped"
        return None

    def mods(self, config: Mapping[str, Any], device: torch.device) -> tuple[Callable | None, Callable | None, bool]:
        """(score_mod, mask_mod, mask varies by head) of a configuration."""
        mechanism, causal, heads = config["mechanism"], config["causal"], config["heads"]

        def causal_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return q_idx >= kv_idx

        if mechanism == "softmax":
            return None, causal_mask if causal else None, False
        if mechanism == "alibi":
            from ..functional import alibi_slopes

            slopes = alibi_slopes(heads, device=device)

            def alibi(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
                return score - slopes[h] * (q_idx - kv_idx).abs()

            return alibi, causal_mask if causal else None, False
        if mechanism == "multiscale":
            from ..mechanisms.dense.multiscale import GLOBAL, check_windows, default_windows

            given = config["params"].get("windows")
            windows = default_windows(heads) if given is None else check_windows(given, heads)
            limit = torch.tensor([config["n"] if w == GLOBAL else w for w in windows], device=device)

            def band(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
                keep = (q_idx - kv_idx).abs() <= limit[h]
                return keep & (q_idx >= kv_idx) if causal else keep

            return None, band, True
        if mechanism == "neighborhood":
            grid, kernel, dilation = _neighborhood_args(config)

            def neighborhood(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
                return neighborhood_keep(q_idx, kv_idx, grid, kernel, dilation, causal)

            return None, neighborhood, False
        raise ValueError(f"mechanism: flex has no mapping of {mechanism!r}")

    def prepare(self, q: Tensor, k: Tensor, v: Tensor, config: Mapping[str, Any]) -> Callable[[], Tensor]:
        from torch.nn.attention.flex_attention import create_block_mask

        score_mod, mask_mod, per_head = self.mods(config, q.device)
        n = q.shape[2]
        block_mask = None
        if mask_mod is not None:
            block_mask = create_block_mask(mask_mod, None, q.shape[1] if per_head else None, n, n, device=q.device)
        fn = compiled_flex() if self.compile else eager_flex()
        return lambda: fn(q, k, v, score_mod=score_mod, block_mask=block_mask)


class NattenPeer(Peer):
    """NATTEN 0.21 neighborhood attention (natten.na1d / na2d, backend "flex-fna")."""

    name = "natten"
    package = "natten"
    module = "natten"
    summary = ("NATTEN's neighborhood attention; on CPU its only backend is flex-fna, and NATTEN does not allow "
               "compiling it there (it needs a GPU of compute capability >= 7.0), so it runs FlexAttention's "
               "unfused forward and builds its block mask at every call.")
    mechanisms = {
        "neighborhood": "na1d / na2d(q, k, v, kernel_size, dilation, is_causal=(causal,)·rank, stride=1, "
                        "backend='flex-fna'); q, k, v as (batch, *grid, heads, head_dim)",
    }
    modes = ("fwd",)
    mode_notes = {"fwd+bwd": "NATTEN's CPU backend (flex-fna) has no backward: FlexAttention does not support "
                             "backward on CPU"}

    def unsupported_params(self, config: Mapping[str, Any]) -> str | None:
        return _neighborhood_unsupported(config)

    def native_configs(self, shape: Mapping[str, Any]) -> list[dict[str, Any]]:
        spec = _spec_or_none("neighborhood")
        n = shape["n"]
        out = []
        for grid, kernel in ((None, 13), (grid_for(n, 2), [7, 7])):
            if grid is not None and min(grid) < 7:
                continue
            params = _natural_params(spec, {"kernel_size": kernel})
            out.append({**shape, "mechanism": "neighborhood", "impl": self.name, "params": params,
                        "n": math.prod(grid) if grid else n, "grid": grid})
        return out

    def prepare(self, q: Tensor, k: Tensor, v: Tensor, config: Mapping[str, Any]) -> Callable[[], Tensor]:
        import natten

        grid, kernel, dilation = _neighborhood_args(config)
        b, h, n, d = q.shape
        op = {1: natten.na1d, 2: natten.na2d}[len(grid)]
        qn, kn, vn = (t.transpose(1, 2).reshape(b, *grid, h, d) for t in (q, k, v))
        causal = (bool(config["causal"]),) * len(grid)

        def run() -> Tensor:
            out = op(qn, kn, vn, kernel_size=kernel, dilation=dilation, is_causal=causal, backend="flex-fna")
            return out.reshape(b, n, h, d).transpose(1, 2)

        return run


class LocalAttentionPeer(Peer):
    """lucidrains' local-attention: `LocalAttention`, blocked windows with look-back and look-ahead.

    What it computes (local-attention 1.11, with dim=None so no rotary embedding,
    autopad=False, shared_qk=False, dropout 0): positions in blocks of `window_size`; each
    query attends to the keys of its block, of `look_backward` blocks before and
    `look_forward` blocks after (those that exist), with causal masking j ≤ i when causal;
    softmax(q·k·head_dim^−½) over them. With `exact_windowsize=True` it keeps only keys
    within window_size·look_backward before and window_size·look_forward after the query.

    Two correspondences:
    * attnlab "softmax" with an explicit attn_mask (`local_attention_mask`), params
      {"attn_mask": {"pattern": "local-attention", "window_size", "look_backward",
      "look_forward"}}: exact, but attnlab's side here is dense SDPA over the N×N mask
      (O(N²)) until the block-sparse engine (issue 5) lands;
    * attnlab "multiscale" with one window ω for every head: LocalAttention(window_size=ω,
      look_backward=1, look_forward=0 if causal else 1, exact_windowsize=True) keeps exactly
      |i − j| ≤ ω (and j ≤ i), as a band of width ω never leaves the neighbouring blocks.
    Either needs n to be a multiple of the window.
    """

    name = "local-attention"
    package = "local-attention"
    module = "local_attention"
    summary = "lucidrains' blocked local attention (pure PyTorch einsums; forward and backward)."
    mechanisms = {
        "softmax": "with params.attn_mask = local-attention's block-window mask: LocalAttention(window_size, causal, "
                   "look_backward, look_forward); attnlab side dense SDPA with that mask",
        "multiscale": "one window ω for all heads: LocalAttention(window_size=ω, look_backward=1, "
                      "look_forward=0 if causal else 1, exact_windowsize=True)",
    }
    window_size: ClassVar[int] = 128

    def _window(self, config: Mapping[str, Any]) -> tuple[int, int, int, bool]:
        """(window_size, look_backward, look_forward, exact_windowsize)."""
        params = config["params"]
        if config["mechanism"] == "multiscale":
            windows = params.get("windows")
            if windows is None or len(set(windows)) != 1 or windows[0] in (None, -1):
                raise ParameterError(
                    f"windows: local-attention needs one finite window for every head, got {windows!r}"
                )
            return int(windows[0]), 1, 0 if config["causal"] else 1, True
        mask = params.get("attn_mask")
        if not isinstance(mask, Mapping) or mask.get("pattern") != LOCAL_PATTERN:
            raise ParameterError(f"attn_mask: expected the {LOCAL_PATTERN!r} pattern, got {mask!r}")
        return int(mask["window_size"]), int(mask["look_backward"]), int(mask["look_forward"]), False

    def unsupported_params(self, config: Mapping[str, Any]) -> str | None:
        if config.get("grid"):
            return "local-attention works on 1-D sequences"
        try:
            window, back, forward, _ = self._window(config)
        except ParameterError as err:
            return str(err)
        if window < 1 or config["n"] % window:
            return f"n={config['n']} is not a multiple of window_size={window} (local-attention without autopad)"
        if config["causal"] and forward:
            return "look_forward must be 0 when causal"
        if back < 0 or forward < 0:
            return f"look_backward and look_forward must be >= 0, got {back}, {forward}"
        return None

    def native_configs(self, shape: Mapping[str, Any]) -> list[dict[str, Any]]:
        pattern = {"pattern": LOCAL_PATTERN, "window_size": self.window_size, "look_backward": 1,
                   "look_forward": 0 if shape["causal"] else 1}
        return [{**shape, "mechanism": "softmax", "impl": self.name, "params": {"attn_mask": pattern},
                 "n": shape["n"], "grid": None}]

    def attnlab_mask(self, config: Mapping[str, Any], device: torch.device) -> Tensor | None:
        window, back, forward, _ = self._window(config)
        return local_attention_mask(config["n"], window, back, forward, config["causal"], device)

    def prepare(self, q: Tensor, k: Tensor, v: Tensor, config: Mapping[str, Any]) -> Callable[[], Tensor]:
        from local_attention import LocalAttention

        window, back, forward, exact = self._window(config)
        attn = LocalAttention(window, causal=config["causal"], look_backward=back, look_forward=forward,
                              exact_windowsize=exact, autopad=False, dim=None).to(q.device)
        return lambda: attn(q, k, v)


class LinearAttentionTransformerPeer(Peer):
    """lucidrains' linear-attention-transformer: `linear_attn`, P228 efficient attention (bidirectional).

    `linear_attn(q, k, v)` = (softmax_feature(q)·head_dim^−½)(softmax_token(k)ᵀ v): P228's
    ρ_q(Q)(ρ_k(K)ᵀV) times head_dim^−½, so the adapter multiplies its output by √head_dim
    (one elementwise product, timed with it). attnlab's "efficient" with
    normalization="softmax" is that ρ_q(Q)(ρ_k(K)ᵀV).

    Causal is not mapped: `causal_linear_attn` computes Σ_{j≤i} (ρ_q(q_i)·e^{k_j}) v_j /
    Σ_{j≤i} ρ_q(q_i)·e^{k_j}, one normaliser per query, where attnlab's causal efficient
    attention normalises each key feature over the prefix (Σ_c ρ_q(q_i)_c e^{k_jc} /
    Σ_{j'≤i} e^{k_j'c}): a different function, not a different implementation.
    """

    name = "linear-attention-transformer"
    package = "linear-attention-transformer"
    module = "linear_attention_transformer"
    summary = "lucidrains' efficient (linear) attention functions, pure PyTorch."
    mechanisms = {"efficient": "normalization='softmax', not causal: linear_attn(q, k, v)·√head_dim"}
    causal = False
    causal_note = ("its causal_linear_attn normalises once per query, attnlab's causal efficient attention each key "
                   "feature over the prefix: different functions")

    def native_configs(self, shape: Mapping[str, Any]) -> list[dict[str, Any]]:
        spec = _spec_or_none("efficient")
        return [{**shape, "mechanism": "efficient", "impl": self.name, "params": _natural_params(spec, {}),
                 "n": shape["n"], "grid": None}]

    def unsupported_params(self, config: Mapping[str, Any]) -> str | None:
        if config.get("grid"):
            return "efficient attention is mapped on 1-D sequences"
        normalization = config["params"].get("normalization", "softmax")
        if normalization != "softmax":
            return f"normalization {normalization!r} has no counterpart (linear_attn is the softmax normalisation)"
        return None

    def prepare(self, q: Tensor, k: Tensor, v: Tensor, config: Mapping[str, Any]) -> Callable[[], Tensor]:
        from linear_attention_transformer.linear_attention_transformer import linear_attn

        rescale = math.sqrt(q.shape[-1])
        return lambda: linear_attn(q, k, v) * rescale


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


# -- configurations -------------------------------------------------------------------------
def peer_configs(attnlab_configs: Iterable[Mapping[str, Any]], peers: Mapping[str, Peer]) -> list[dict[str, Any]]:
    """The peer configurations of a run: each attnlab configuration a peer has a counterpart of, with impl
    set to the peer, then the peers' own configurations at the shapes of the run (those of dense softmax)
    whose parameters they can map."""
    configs = [dict(c) for c in attnlab_configs if c.get("impl", BASE_IMPL) == BASE_IMPL]
    out: dict[str, dict[str, Any]] = {}
    for config in configs:
        for peer in peers.values():
            if peer.maps(config):
                mine = {**config, "impl": peer.name}
                out.setdefault(config_hash(mine), mine)
    for config in configs:
        if config["mechanism"] != "softmax" or config.get("grid"):
            continue
        shape = {key: config[key] for key in (*_SHAPE_KEYS, "n", "budget") if key in config}
        for peer in peers.values():
            for mine in peer.native_configs(shape):
                if peer.unsupported_params(mine) is None:  # e.g. a window that does not divide this N
                    out.setdefault(config_hash(mine), mine)
    return list(out.values())


# -- computing both sides ---------------------------------------------------------------------
def make_inputs(config: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v (batch, heads, n, head_dim) drawn as `attnlab bench speed` draws them (generator seed 0)."""
    dtype = getattr(torch, config["dtype"])
    shape = (config["batch"], config["heads"], config["n"], config["head_dim"])
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype) for _ in range(3))
    return q, k, v


def attnlab_prepare(
    q: Tensor, k: Tensor, v: Tensor, config: Mapping[str, Any], attn_mask: Tensor | None = None
) -> Callable[[], Tensor]:
    """attnlab's output on q, k, v (batch, heads, n, head_dim) for `config`: the registered mechanism's
    `module.attend`, given the grid as `attnlab bench speed` gives it, and an explicit attn_mask if any."""
    spec = get(config["mechanism"])
    heads, head_dim = config["heads"], config["head_dim"]
    params = {key: value for key, value in config["params"].items() if key != "attn_mask"}
    kwargs = {"dim": heads * head_dim, "heads": heads, "head_dim": head_dim, **params}
    if spec.supports is not None and spec.supports.causal:
        kwargs["causal"] = config["causal"]
    elif config["causal"]:
        raise ValueError(f"causal: {spec.name} has no causal mode")
    torch.manual_seed(0)
    module = spec.build(**kwargs).to(q.dtype)
    if not isinstance(module, Attention):
        raise TypeError(f"{spec.name}: peers compare attention cores on q, k, v; {type(module).__name__} has none")
    grid = config.get("grid")
    takes_grid = bool(grid) and "grid" in inspect.signature(module.attend).parameters
    extra: dict[str, Any] = {"grid": tuple(grid)} if takes_grid else {}
    if attn_mask is not None:
        extra["attn_mask"] = attn_mask
    b, h, n, d = q.shape
    positions = tuple(grid) if grid and not takes_grid else (n,)

    def run() -> Tensor:
        out = module.attend(*(t.reshape(b, h, *positions, d) for t in (q, k, v)), **extra)
        return out.reshape(b, h, n, d)

    return run


def _leaves(q: Tensor, k: Tensor, v: Tensor, backward: bool) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(t.detach().clone().requires_grad_(backward) for t in (q, k, v))  # type: ignore[return-value]


def _call(forward: Callable[[], Tensor], leaves: Sequence[Tensor], grad: Tensor | None) -> Callable[[], Any]:
    """The timed call: the forward under no_grad, or forward + backward of `grad` (fwd+bwd)."""
    if grad is None:
        def fwd() -> Tensor:
            with torch.no_grad():
                return forward()

        return fwd

    def fwd_bwd() -> None:
        for t in leaves:
            t.grad = None
        forward().backward(grad)

    return fwd_bwd


def _outputs(forward: Callable[[], Tensor], leaves: Sequence[Tensor], grad: Tensor | None) -> list[Tensor]:
    """The output (and with `grad`, the gradients of the leaves) of one call."""
    if grad is None:
        with torch.no_grad():
            return [forward().detach()]
    for t in leaves:
        t.grad = None
    out = forward()
    out.backward(grad)
    return [out.detach()] + [t.grad.detach() if t.grad is not None else torch.zeros_like(t) for t in leaves]


def max_abs_diff(ours: Sequence[Tensor], theirs: Sequence[Tensor]) -> float:
    """The largest absolute difference over matching tensors (inf on a shape mismatch or a non-finite value)."""
    worst = 0.0
    for a, b in zip(ours, theirs, strict=True):
        if a.shape != b.shape:
            return math.inf
        diff = (a.double() - b.double()).abs()
        if not bool(torch.isfinite(diff).all()):
            return math.inf
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
    return worst


def flops_for(config: Mapping[str, Any], mask: Tensor | None) -> float | None:
    """FLOPs of one call: 4·heads·head_dim per attended pair of an explicit mask, else the registry's count."""
    factor = BACKWARD_FLOPS_FACTOR if config["mode"] == "fwd+bwd" else 1.0
    if mask is not None:
        pairs = float(mask.sum())
        return 4.0 * config["heads"] * config["head_dim"] * pairs * config["batch"] * factor
    spec = _spec_or_none(config["mechanism"])
    return flops_of(spec, config) if spec is not None else None


# -- running ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def return_freed_memory() -> bool:
    """Have glibc unmap freed blocks of 64 KiB or more (as MALLOC_MMAP_THRESHOLD_=65536 does); False if not glibc."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") == MMAP_THRESHOLD_ENV["MALLOC_MMAP_THRESHOLD_"]:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(MMAP_THRESHOLD_ENV["MALLOC_MMAP_THRESHOLD_"])))
    except (OSError, AttributeError):
        return False


def _timed(call: Callable[[], Any], budget_s: float, repeats: int) -> Timing:
    """Timed calls as `attnlab bench speed` makes them, peak memory from the first; no warm-up here, the
    agreement check's call was it."""
    return measure(call, warmup=0, repeats=repeats, budget_s=min(TARGET_S, budget_s), limit_s=budget_s, memory=True)


def _metrics(timing: Timing, flops: float | None, diff: float | None, note: str) -> dict[str, Any]:
    if timing.peak_mem_bytes is None:
        note += "; peak memory not measured: /proc/self/clear_refs is not writable here"
    metrics = empty_metrics(note)
    metrics.update(
        median_s=timing.median_s, min_s=timing.min_s, max_s=timing.max_s, repeats=timing.repeats,
        peak_mem_bytes=timing.peak_mem_bytes, flops=flops, flops_per_s=flops / timing.median_s if flops else None,
        max_abs_diff=diff, load_1m=os.getloadavg()[0],
    )
    return metrics


def measure_pair(
    peer: Peer, config: Mapping[str, Any], *, budget_s: float, repeats: int, measure_attnlab: bool = True
) -> tuple[str, dict[str, Any], tuple[str, dict[str, Any]] | None]:
    """Check and time one peer configuration in this process: (status, metrics, attnlab's (status, metrics) or None).

    Both sides run once for the agreement check (that call is their warm-up, and
    FlexAttention's compilation); attnlab's side is measured only when the peer agreed
    and `measure_attnlab`, and is "over_time" when its check call alone took more than
    `budget_s`.
    """
    backward = config["mode"] == "fwd+bwd"
    q, k, v = make_inputs(config)
    mask = peer.attnlab_mask(config, q.device) if "attn_mask" in config["params"] else None
    ours_leaves = _leaves(q, k, v, backward)
    theirs_leaves = _leaves(q, k, v, backward)
    ours = attnlab_prepare(*ours_leaves, config, attn_mask=mask)
    theirs = peer.prepare(*theirs_leaves, config)
    grad = None
    if backward:
        gen = torch.Generator().manual_seed(1)
        grad = torch.randn(q.shape, generator=gen, dtype=torch.float32).to(q.dtype)
    start = time.perf_counter()
    expected = _outputs(ours, ours_leaves, grad)
    ours_first_s = time.perf_counter() - start
    diff = max_abs_diff(expected, _outputs(theirs, theirs_leaves, grad))
    tolerance = TOLERANCE[config["dtype"]]
    what = "output and gradients" if backward else "output"
    if not diff <= tolerance:
        note = f"{what} differ from attnlab's by {diff:.3g} > tolerance {tolerance:g}: not timed"
        return "disagree", empty_metrics(note, max_abs_diff=diff if math.isfinite(diff) else None), None
    flops = flops_for(config, mask)
    timing = _timed(_call(theirs, theirs_leaves, grad), budget_s, repeats)
    note = f"{peer.name} {peer.version() or ''}".strip() + f"; {what} agree with attnlab's within {tolerance:g}"
    metrics = _metrics(timing, flops, diff, note)
    if not measure_attnlab:
        return "ok", metrics, None
    side = "dense SDPA with the pattern's explicit attn_mask" if mask is not None else "module.attend"
    if ours_first_s > budget_s:
        return "ok", metrics, ("over_time", empty_metrics(
            f"in-process beside {peer.name} ({side}): one call took {ours_first_s:.3g} s, over the budget of {budget_s:g} s"
        ))
    timing = _timed(_call(ours, ours_leaves, grad), budget_s, repeats)
    return "ok", metrics, ("ok", _metrics(timing, flops, None, f"measured in-process beside {peer.name}: {side}"))


def _retry(result: Result) -> bool:
    note = str(result.metrics.get("note") or "")
    return result.status == "unsupported" and note.startswith(RETRY_NOTES)


def run_peer_configs(
    configs: Sequence[Mapping[str, Any]],
    store: ResultStore,
    env: Mapping[str, Any],
    *,
    peers: Mapping[str, Peer] | None = None,
    budget_s: float = 10.0,
    repeats: int = 20,
    memory_budget_bytes: int | None = None,
    rerun: bool = False,
    quiet: bool = False,
) -> list[Result]:
    """Check and time every peer configuration (impl = a peer's name); the results (peers' and attnlab's
    sides), stored and resumed.

    Each result is recorded with `env` plus the peer's package and version. attnlab's
    side of a configuration (`twin`) is measured here, beside the peer, when the database
    does not have it (a `attnlab bench speed` run before this one usually has). A series
    (peer, mechanism, params, mode, causal, shape, grid rank) skips an N predicted to
    exceed the time or memory budget from its previous N, as `attnlab bench speed` does;
    a peer runs in this process, so a call that overruns cannot be killed. `rerun`
    measures the peer configurations again, and attnlab's side of the peers' own patterns.
    """
    peers = dict(peers) if peers is not None else all_peers()
    memory_budget = memory_budget_bytes if memory_budget_bytes is not None else machine_memory_bytes() // 2
    return_freed_memory()
    stored = {r.config_hash: r for r in store.results(SUITE)}
    history: dict[str, list[tuple[int, Mapping[str, Any]]]] = {}
    ordered = sorted(configs, key=lambda c: (c["impl"], c["mechanism"], canonical(c["params"]), c["mode"], c["n"]))
    for config in progress(ordered, total=len(ordered), desc="peers", quiet=quiet):
        name = config["impl"]
        if name not in peers:
            raise ParameterError(f"impl: expected a peer ({', '.join(peers)}), got {name!r}")
        peer = peers[name]
        series = canonical({key: value for key, value in config.items() if key not in ("n", "grid")} | {
            "rank": len(config["grid"]) if config.get("grid") else 1})
        existing = stored.get(config_hash(config))
        replace_old = replace_twin = False  # replaced when the new result is recorded, not before
        if existing is not None and (rerun or _retry(existing)):
            existing = None
            replace_old = True
            replace_twin = rerun and "attn_mask" in config["params"]  # attnlab's side of a peer's own pattern
        if existing is not None or (not replace_old and store.done(SUITE, config)):
            if existing is not None and existing.status == "ok":
                history.setdefault(series, []).append((config["n"], existing.metrics))
            continue
        peer_env = {**env, "peer": name, "peer_package": peer.package, "peer_version": peer.version()}
        why = peer.unsupported(config)
        spec = _spec_or_none(config["mechanism"])
        skip = ("unsupported", why) if why else predict_over_budget(
            config, history.get(series, []), spec.exponent if spec else None, budget_s, memory_budget
        )
        attnlab_result = None
        if skip:
            status, metrics = skip[0], empty_metrics(skip[1])
        else:
            try:
                with _threads(config["threads"]):
                    status, metrics, attnlab_result = measure_pair(
                        peer, config, budget_s=budget_s, repeats=repeats,
                        measure_attnlab=replace_twin or not store.done(SUITE, twin(config)),
                    )
            except MemoryError as err:
                status, metrics = "over_memory", empty_metrics(f"MemoryError: {err}"[:600])
            except Exception as err:  # the run goes on; the message is the result
                status, metrics = "error", empty_metrics(f"{type(err).__name__}: {err}"[:600])
        if status == "ok" and metrics["peak_mem_bytes"] is not None and metrics["peak_mem_bytes"] > memory_budget:
            status = "over_memory"
            metrics["note"] = f"peak {metrics['peak_mem_bytes'] / 2**20:.0f} MiB exceeds the memory budget"
        metrics.update(budget_s=budget_s, memory_budget_bytes=memory_budget)
        if status != "ok":
            say(f"peers: {name} {config['mechanism']} n={config['n']} {config['mode']}: {status}: "
                f"{metrics.get('note', '')}", quiet=quiet)
        if status == "ok":
            metrics["flags"] = compare.flags(metrics, peer_env)
        store.record(SUITE, config, status, metrics, peer_env, replace=replace_old)
        if status == "ok":
            history.setdefault(series, []).append((config["n"], metrics))
        if attnlab_result is not None:
            attnlab_result[1].update(budget_s=budget_s, memory_budget_bytes=memory_budget)
            if attnlab_result[0] == "ok":
                attnlab_result[1]["flags"] = compare.flags(attnlab_result[1], env)
            store.record(SUITE, twin(config), *attnlab_result, dict(env), replace=replace_twin)
    wanted = {config_hash(c) for c in configs} | {config_hash(twin(c)) for c in configs}
    return [r for r in store.results(SUITE) if r.config_hash in wanted]


def _run_env(options: SpeedOptions) -> dict[str, Any]:
    """The environment of a peers run: options.run_id's, measured at the run's threads."""
    from .env import run_environment

    with _threads(options.resolved_threads()):
        return run_environment(options.run_id)


def run_peers(
    store: ResultStore,
    attnlab_configs: Iterable[Mapping[str, Any]],
    names: Iterable[str],
    options: SpeedOptions,
    env: Mapping[str, Any] | None = None,
) -> list[Result]:
    """`attnlab bench speed --peers`: the named peers on the shapes of a run's attnlab configurations."""
    peers = select_peers(names)
    for name, peer in peers.items():
        why = peer.why_unavailable()
        if why:
            say(f"peers: {name} unavailable: {why}", quiet=options.quiet)
    configs = peer_configs(attnlab_configs, peers)
    return run_peer_configs(
        configs, store, env if env is not None else _run_env(options),
        peers=peers, budget_s=options.budget_s, repeats=options.repeats,
        memory_budget_bytes=options.memory_budget_bytes, rerun=options.rerun, quiet=options.quiet,
    )


# -- ratios ----------------------------------------------------------------------------------
def peer_ratios(results: Iterable[Result], run_id: str | None = None) -> list[dict[str, Any]]:
    """Per peer result: attnlab's median time over the peer's at the same configuration (`compare.peer_ratios`:
    None unless both are ok and comparable)."""
    return compare.peer_ratios(results, run_id)


def _short_params(params: Mapping[str, Any]) -> str:
    mask = params.get("attn_mask")
    if isinstance(mask, Mapping):
        rest = {k: v for k, v in params.items() if k != "attn_mask"}
        text = f"mask {mask.get('pattern')} w={mask.get('window_size')} b={mask.get('look_backward')} " \
               f"f={mask.get('look_forward')}"
        return text + (f" {canonical(rest)}" if rest else "")
    return canonical(dict(params)) if params else ""


def peer_table(results: Iterable[Result], run_id: str | None = None) -> str:
    """A text table of attnlab/peer time ratios (>1: the peer is faster), one block per peer, one line per
    peer configuration (within 100 columns: parameters and notes are listed below the lines that need them);
    a ratio with a side reused from the store (not measured in run `run_id`) is marked "*", one between
    incomparable environments is "n/c"."""
    rows = peer_ratios(results, run_id)
    if not rows:
        return "peers: no peer results"
    header = ["mechanism", "params", "N", "mode", "peer ms", "attnlab ms", "attnlab/peer", "status"]
    blocks = []
    for peer in sorted({row["impl"] for row in rows}):
        lines, notes, params_ids = [], [], {}
        mine = [r for r in rows if r["impl"] == peer]
        for row in sorted(mine, key=lambda r: (r["mechanism"], canonical(r["params"]), r["mode"], r["n"])):
            status = row["status"]
            if status == "disagree" and row["max_abs_diff"] is not None:
                status = f"disagree ({len(notes) + 1})"
                notes.append(f"({len(notes) + 1}) max |attnlab - peer| {row['max_abs_diff']:.3g}")
            elif status != "ok" and row["note"]:
                notes.append(f"({len(notes) + 1}) {row['note']}")
                status = f"{status} ({len(notes)})"
            key = _short_params(row["params"])
            params_ids.setdefault(key, f"p{len(params_ids) + 1}")
            ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}" + (
                "*" if row["reused"] or row["attnlab_reused"] else "")
            lines.append([
                row["mechanism"] + (" causal" if row["causal"] else ""), params_ids[key],
                "×".join(map(str, row["grid"])) if row["grid"] else str(row["n"]), row["mode"],
                f"{row['peer_median_s'] * 1e3:.4g}" if row["peer_median_s"] is not None else "-",
                f"{row['attnlab_median_s'] * 1e3:.4g}" if row["attnlab_median_s"] is not None else "-",
                "n/c" if row["incomparable"] else ratio, status,
            ])
        widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
        out = [f"{peer}:"] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *lines]]
        out.insert(2, "  ".join("-" * w for w in widths))
        out += [textwrap.fill(f"{pid}: {text or '(defaults)'}", 100, subsequent_indent="    ")
                for text, pid in params_ids.items()]
        out += [textwrap.fill(note, 100, subsequent_indent="    ") for note in notes]
        blocks.append("\n".join(out))
    return "\n\n".join(blocks)
