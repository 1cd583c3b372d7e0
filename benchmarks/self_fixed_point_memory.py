"""SELF fixed-point attention (P091): memory of the backward at 10 vs 100 iterations, implicit vs unrolled.

    .venv/bin/python benchmarks/self_fixed_point_memory.py
    .venv/bin/python benchmarks/self_fixed_point_memory.py --tokens 256 --dim 128 --iterations 10 100 300

The registered module (`self-fixed-point`, eps = 0 so that it runs its `max_iterations` unless the state stops
changing exactly) differentiates the fixed point implicitly: autograd keeps one evaluation of the map F whatever
the iteration count. The baseline iterates the same map (q, k from Z + X, v from X, W_o inside the loop, from the
module's weights) under autograd and backpropagates through every iteration. Per row: the iterations taken
(forward; backward solve), the bytes autograd saves for the backward (counted with
torch.autograd.graph.saved_tensors_hooks), and the rise of the process's peak resident memory during forward +
backward (`attnlab.bench.timing.peak_memory`; tracemalloc does not see torch's allocator). float32, one thread.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import attnlab
from attnlab.bench.timing import peak_memory

MIB = 2.0**20


def unrolled(m: torch.nn.Module, x: Tensor, iterations: int) -> Tensor:
    """Z^{K+1} of the injected map from Z⁰ = 0, every iteration under autograd (backprop through time)."""
    b, n, _ = x.shape
    heads = m.heads
    v = m.v_proj(x).view(b, n, heads, -1).transpose(1, 2)
    z = torch.zeros_like(x)
    for _ in range(iterations + 1):
        q = m.q_proj(z + x).view(b, n, heads, -1).transpose(1, 2)
        k = m.k_proj(z + x).view(b, n, heads, -1).transpose(1, 2)
        u = F.scaled_dot_product_attention(q, k, v)
        z = m.out_proj(u.transpose(1, 2).reshape(b, n, -1))
    return z


def saved_bytes(call: Callable[[], Tensor]) -> int:
    """Bytes of the tensors autograd saves for the backward of `call()` (each saved tensor counted once)."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = call()
    del out
    return sum(seen.values())


def measure(m: torch.nn.Module, x: Tensor, method: str, iterations: int) -> tuple[str, str, int, int | None]:
    """(forward iterations, backward iterations, saved bytes, peak RSS rise) of one forward + backward."""

    def call() -> Tensor:
        return m(x) if method == "implicit" else unrolled(m, x, iterations)

    def step() -> None:
        m.zero_grad(set_to_none=True)
        call().square().mean().backward()

    step()  # warm-up: code loaded on first use is not the method's memory
    saved = saved_bytes(call)
    peak = peak_memory(step)
    if method == "unrolled":
        return str(iterations), "-", saved, peak
    info = m.last_info
    assert info is not None and info.backward_iterations is not None
    return str(int(info.iterations.max())), str(int(info.backward_iterations.max())), saved, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--scale", type=float, default=2.0, help="input scale (larger: sharper attention, slower convergence)")
    parser.add_argument("--iterations", type=int, nargs="+", default=[10, 100])
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = args.scale * torch.randn(args.batch, args.tokens, args.dim, generator=torch.Generator().manual_seed(0))
    print(f"B={args.batch} N={args.tokens} dim={args.dim} heads={args.heads} float32")
    print(f"{'K':>5} {'method':>9} {'fwd it':>7} {'bwd it':>7} {'saved MiB':>10} {'peak MiB':>9}")
    for iterations in args.iterations:
        torch.manual_seed(0)
        m = attnlab.build("self-fixed-point", dim=args.dim, heads=args.heads, eps=0.0, max_iterations=iterations)
        for method in ("implicit", "unrolled"):
            fwd, bwd, saved, peak = measure(m, x, method, iterations)
            peak_mib = "n/a" if peak is None else f"{peak / MIB:.1f}"
            print(f"{iterations:>5} {method:>9} {fwd:>7} {bwd:>7} {saved / MIB:>10.2f} {peak_mib:>9}")


if __name__ == "__main__":
    main()
