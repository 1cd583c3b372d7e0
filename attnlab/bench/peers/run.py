"""Running peers: their configurations, both sides computed and checked, then timed; stored and resumed.

For every peer configuration `run_peer_configs`

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

Peers run in the calling process (FlexAttention's compiled function is kept for the rest
of it). Peak memory is the rise of the resident set (`attnlab.bench.timing`); as in the
speed worker, glibc is told to return every block of 64 KiB or more to the system on free
(`mallopt(M_MMAP_THRESHOLD, 65536)`, the runtime form of MALLOC_MMAP_THRESHOLD_=65536)
when the process did not start with that setting.
"""
from __future__ import annotations

import contextlib
import ctypes
import inspect
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...core.errors import ParameterError
from ...core.module import Attention
from ...core.registry import get
from .. import compare
from ..compare import twin
from ..progress import progress, say
from ..speed_configs import SUITE, SpeedOptions, empty_metrics, machine_memory_bytes, predict_over_budget
from ..speed_worker import BACKWARD_FLOPS_FACTOR, TARGET_S, flops_of
from ..store import Result, ResultStore, canonical, config_hash
from ..timing import MMAP_THRESHOLD_ENV, Timing, measure
from .base import BASE_IMPL, RETRY_NOTES, TOLERANCE, Peer, spec_or_none
from .registry import all_peers, select_peers

_SHAPE_KEYS = ("mode", "causal", "dtype", "batch", "heads", "head_dim", "threads")
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


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
    spec = spec_or_none(config["mechanism"])
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


@dataclass(frozen=True)
class CheckedCalls:
    """Both sides of a peer configuration, computed once and compared: the timed calls (forward under no_grad,
    or forward + backward of a fixed gradient), their largest difference (output, and gradients of q, k, v
    for "fwd+bwd") against `tolerance`, and the seconds of attnlab's first call."""

    ours: Callable[[], Any]
    theirs: Callable[[], Any]
    diff: float
    tolerance: float
    ours_first_s: float
    mask: Tensor | None

    @property
    def agree(self) -> bool:
        return self.diff <= self.tolerance


def _gradient(q: Tensor) -> Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(q.shape, generator=gen, dtype=torch.float32).to(q.dtype)


def attnlab_call(config: Mapping[str, Any]) -> Callable[[], Any]:
    """attnlab's timed call of `config` alone (forward under no_grad, or forward + backward of a fixed gradient),
    on the inputs `make_inputs` draws."""
    backward = config["mode"] == "fwd+bwd"
    q, k, v = make_inputs(config)
    leaves = _leaves(q, k, v, backward)
    return _call(attnlab_prepare(*leaves, config), leaves, _gradient(q) if backward else None)


def checked_calls(peer: Peer, config: Mapping[str, Any]) -> CheckedCalls:
    """attnlab's and the peer's timed calls on the inputs of `config`, each run once and compared (that call is
    their warm-up, and FlexAttention's compilation)."""
    backward = config["mode"] == "fwd+bwd"
    q, k, v = make_inputs(config)
    mask = peer.attnlab_mask(config, q.device) if "attn_mask" in config["params"] else None
    ours_leaves = _leaves(q, k, v, backward)
    theirs_leaves = _leaves(q, k, v, backward)
    ours = attnlab_prepare(*ours_leaves, config, attn_mask=mask)
    theirs = peer.prepare(*theirs_leaves, config)
    grad = _gradient(q) if backward else None
    start = time.perf_counter()
    expected = _outputs(ours, ours_leaves, grad)
    ours_first_s = time.perf_counter() - start
    diff = max_abs_diff(expected, _outputs(theirs, theirs_leaves, grad))
    return CheckedCalls(_call(ours, ours_leaves, grad), _call(theirs, theirs_leaves, grad), diff,
                        TOLERANCE[config["dtype"]], ours_first_s, mask)


def measure_pair(
    peer: Peer, config: Mapping[str, Any], *, budget_s: float, repeats: int, measure_attnlab: bool = True
) -> tuple[str, dict[str, Any], tuple[str, dict[str, Any]] | None]:
    """Check and time one peer configuration in this process: (status, metrics, attnlab's (status, metrics) or None).

    Both sides run once for the agreement check (`checked_calls`); attnlab's side is measured only when the
    peer agreed and `measure_attnlab`, and is "over_time" when its check call alone took more than `budget_s`.
    """
    calls = checked_calls(peer, config)
    what = "output and gradients" if config["mode"] == "fwd+bwd" else "output"
    if not calls.agree:
        diff = calls.diff
        note = f"{what} differ from attnlab's by {diff:.3g} > tolerance {calls.tolerance:g}: not timed"
        return "disagree", empty_metrics(note, max_abs_diff=diff if math.isfinite(diff) else None), None
    flops = flops_for(config, calls.mask)
    timing = _timed(calls.theirs, budget_s, repeats)
    note = f"{peer.name} {peer.version() or ''}".strip() + f"; {what} agree with attnlab's within {calls.tolerance:g}"
    metrics = _metrics(timing, flops, calls.diff, note)
    if not measure_attnlab:
        return "ok", metrics, None
    side = "dense SDPA with the pattern's explicit attn_mask" if calls.mask is not None else "module.attend"
    if calls.ours_first_s > budget_s:
        return "ok", metrics, ("over_time", empty_metrics(
            f"in-process beside {peer.name} ({side}): one call took {calls.ours_first_s:.3g} s, over the budget of "
            f"{budget_s:g} s"
        ))
    timing = _timed(calls.ours, budget_s, repeats)
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
        spec = spec_or_none(config["mechanism"])
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
    from ..env import run_environment

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
