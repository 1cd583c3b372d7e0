"""RIN, Recurrent Interface Networks (Jabri, Fleet, Chen, "Scalable Adaptive Computation for Iterative
Generation", 2022): the N data tokens are an interface X that a small latent array Z reads from and writes to;
global computation happens on the M ≪ N latents only.

One RIN block (pre-norm residual layers, multi-head attention with `heads` heads of `head_dim`):

    read     Z ← Z + W_o softmax(q(LN Z) k(LN X)ᵀ / √d) v(LN X);   Z ← Z + MLP(LN Z)      latents attend to X
    process  `process_layers` × [ Z ← Z + MHSA(LN Z);  Z ← Z + MLP(LN Z) ]               latent self-attention
    write    X ← X + W_o softmax(q(LN X) k(LN Z)ᵀ / √d) v(LN Z);   X ← X + MLP(LN X)      X attends to Z

`blocks` blocks are stacked, each with its own weights, Z and X carried from one to the next; Z starts at the
learned latents Z_init (M × `latent_dim`). Cost O(blocks·(M·N·d + process_layers·M²·d + N·d²)): linear in N.

Latent self-conditioning (the paper's §3.3): the latents Z_prev of a previous forward (the previous diffusion
step's), with their gradient stopped, warm-start the latents: Z⁰ = Z_init + LN(MLP(sg(Z_prev))), the LayerNorm's
scale initialised at 0 (so an untrained conditioning path starts as Z⁰ = Z_init). `run(x, previous_latents=Z_prev)`
returns (tokens, latents) so a training loop can feed the latents back; the paper's self-conditioning rate (use
Z_prev on a random half of the training steps, a zero-cost second forward under no_grad otherwise) is the loop's
choice, not the layer's. `forward(x)` is `run(x)[0]` without self-conditioning.

Kind. RIN is registered as a "mechanism": tokens in, tokens out ((batch, *grid, dim), a 1-D or 2-D grid of
interface tokens), the latents internal state. A "pooling" would drop the written interface (the output the
paper's model predicts from) and a "block" would need a token mixer to wrap, which RIN does not have: its only
token mixing is the read/write through the latents. The interface has no positions inside the block (the paper
adds them to the tokens beforehand), so RIN is permutation-equivariant in the tokens (`order_invariant`).

`materialize` (batch, heads, N, N) is the first block's token-to-token attention through the latents,
W_write · W_read (W_read (M × N) the latents over the tokens, W_write (N × M) the tokens over the latents): rows
sum to 1; it does not explain the output (the MLPs and the process layers sit between read and write).
`attention_maps` gives every block's read, process and write weights. Padded tokens are no keys of the read
(they are still written to; their outputs are meaningless); a sample with no real token reads nothing, so each
of its tokens' outputs depends on that token alone. Deviations: the paper's time-step and class tokens joined to
the latents are left to the caller (concatenate them to the latents' input); MLP hidden `mlp_ratio`·width, GELU.
"""
from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor, nn

from ...core.errors import ParameterError, ShapeError
from ...core.masks import module_keep_mask
from ...core.memory import check_memory
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_finite, check_module_dtype, check_tensor
from ..pooling.base import Impl, check_pooling_tokens
from ..pooling.common import check_pooling_qkv, layer_norm64
from ._common import CrossAttention, FeedForward, LatentLayer, check_positive_int, cross_attention_core, softmax64

RIN = Paper("P144", "Scalable Adaptive Computation for Iterative Generation", 2022, "2212.11972")


def rin_attention(q: Tensor, k: Tensor, v: Tensor, *, attention_mask: Tensor | None = None) -> Tensor:
    """RIN's read and write core, softmax(q kᵀ/√d) v per head: the read with q the latents' (batch, heads, M, d) and
    k, v the tokens' (batch, heads, N, d) (attention_mask (batch, N), True = real token), the write with q the tokens'
    and k, v the latents'. O(M·N) memory; a query with no key reads 0."""
    q, k, v = check_pooling_qkv(q, k, v, attention_mask)
    return cross_attention_core(q, k, v, attention_mask)


def rin_attention_reference(q: Tensor, k: Tensor, v: Tensor, *, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(out, weights (batch, heads, n_q, n_k)) of `rin_attention` in float64 by einsum and exp/sum."""
    q, k, v = check_pooling_qkv(q, k, v, attention_mask)
    logits = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) / math.sqrt(q.shape[-1])
    w = softmax64(logits, None if attention_mask is None else attention_mask.bool()[:, None, None, :])
    return torch.einsum("bhij,bhjd->bhid", w, v.double()).to(v.dtype), w.to(v.dtype)


class RINBlock(nn.Module):
    """Read (latents ← tokens), process (latent self-attention), write (tokens ← latents), each with an MLP."""

    def __init__(self, dim: int, latent_dim: int, heads: int, head_dim: int, process_layers: int, mlp_ratio: int, qkv_bias: bool) -> None:
        super().__init__()
        self.read = CrossAttention(latent_dim, dim, heads, head_dim, qkv_bias=qkv_bias)
        self.read_ff = FeedForward(latent_dim, mlp_ratio * latent_dim)
        self.process = nn.ModuleList(
            LatentLayer(latent_dim, heads, head_dim, mlp_ratio * latent_dim, qkv_bias=qkv_bias) for _ in range(process_layers)
        )
        self.write = CrossAttention(dim, latent_dim, heads, head_dim, qkv_bias=qkv_bias)
        self.write_ff = FeedForward(dim, mlp_ratio * dim)

    def forward(self, x: Tensor, z: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
        z = z + self.read(z, x, keep)
        z = z + self.read_ff(z)
        for layer in cast("list[LatentLayer]", list(self.process)):
            z = layer(z)
        x = x + self.write(x, z)
        return x + self.write_ff(x), z

    def reference(self, x: Tensor, z: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor, dict[str, Tensor | list[Tensor]]]:
        read, w_read = self.read.reference(z, x, keep)
        z = z.double() + read
        z = z + self.read_ff.reference(z)
        w_process = []
        for layer in cast("list[LatentLayer]", list(self.process)):
            z, w = layer.reference(z)
            w_process.append(w)
        write, w_write = self.write.reference(x, z)
        x = x.double() + write
        return x + self.write_ff.reference(x), z, {"read": w_read, "process": w_process, "write": w_write}


def rin_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Matmul FLOPs of one sample at the default parameters (M = 64 latents of width dim, 2 blocks, 2 process
    layers, MLP 4·width), dim = width D = heads·head_dim: per block the read 4·N·D² + 4·M·D² + 4·M·N·D and its MLP
    16·M·D², per process layer 8·M·D² + 4·M²·D + 16·M·D², the write 4·N·D² + 4·M·D² + 4·N·M·D and its MLP 16·N·D²."""
    d, m, blocks, layers = heads * head_dim, 64, 2, 2
    read = 4.0 * n * d * d + 4.0 * m * d * d + 4.0 * m * n * d + 16.0 * m * d * d
    process = 8.0 * m * d * d + 4.0 * m * m * d + 16.0 * m * d * d
    write = 4.0 * n * d * d + 4.0 * m * d * d + 4.0 * n * m * d + 16.0 * n * d * d
    return blocks * (read + layers * process + write)


@register(
    name="rin",
    paper=RIN,
    family="B",
    cost="O(blocks·(M N d + L M² d + N d²))",
    exponent=1.0,
    supports=Supports(key_padding=True, grids=(1, 2), order_invariant=True),
    params=(
        Param("num_latents", int, 64, "M, the number of latents", low=1),
        Param("latent_dim", int, None, "width of the latents (default dim)", low=1, optional=True),
        Param("blocks", int, 2, "read-process-write blocks (own weights each)", low=1),
        Param("process_layers", int, 2, "latent self-attention layers per block", low=0),
        Param("mlp_ratio", int, 4, "MLP hidden width = mlp_ratio·width", low=1),
    ),
    summary="RIN: latents read the tokens, process by self-attention, write back; latent self-conditioning",
    test_params={"num_latents": 4, "blocks": 2, "process_layers": 1, "mlp_ratio": 2},
    flops=rin_flops,
)
class RecurrentInterfaceNetwork(nn.Module):
    """Interface tokens (batch, *grid, dim) -> (batch, *grid, dim) through `blocks` read-process-write blocks."""

    def __init__(
        self, dim: int, heads: int = 8, *, head_dim: int | None = None, qkv_bias: bool = True, num_latents: int = 64,
        latent_dim: int | None = None, blocks: int = 2, process_layers: int = 2, mlp_ratio: int = 4,
    ) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("heads", heads)
        if head_dim is None:
            if dim % heads:
                raise ParameterError(f"heads: expected a divisor of dim={dim} (or give head_dim), got {heads}")
            head_dim = dim // heads
        check_positive_int("head_dim", head_dim)
        self.num_latents = check_positive_int("num_latents", num_latents)
        latent_dim = dim if latent_dim is None else check_positive_int("latent_dim", latent_dim)
        check_positive_int("blocks", blocks)
        check_positive_int("process_layers", process_layers, 0)
        check_positive_int("mlp_ratio", mlp_ratio)
        self.dim, self.heads, self.head_dim, self.latent_dim = dim, heads, head_dim, latent_dim
        self.latents = nn.Parameter(torch.randn(num_latents, latent_dim) * 0.02)
        self.self_cond = FeedForward(latent_dim, mlp_ratio * latent_dim)
        self.self_cond_norm = nn.LayerNorm(latent_dim)
        nn.init.zeros_(self.self_cond_norm.weight)
        self.layers = nn.ModuleList(
            RINBlock(dim, latent_dim, heads, head_dim, process_layers, mlp_ratio, qkv_bias) for _ in range(blocks)
        )

    def _prepare(
        self, x: Tensor, attention_mask: Tensor | None, key_padding_mask: Tensor | None, previous_latents: Tensor | None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        grid = tuple(check_tensor("x", x).shape[1:-1])
        flat = check_pooling_tokens(x, self.dim)
        if len(grid) > 2:
            raise ShapeError(f"x: expected a 1-D or 2-D grid of tokens (batch, n, dim) or (batch, h, w, dim), got shape {tuple(x.shape)}")
        check_module_dtype("x", flat, self)
        keep = module_keep_mask(attention_mask, key_padding_mask, flat.shape[0], flat.shape[1], grid)
        if previous_latents is not None:
            previous_latents = check_tensor("previous_latents", previous_latents)
            want = (flat.shape[0], self.num_latents, self.latent_dim)
            if tuple(previous_latents.shape) != want:
                raise ShapeError(f"previous_latents: expected shape {want}, got {tuple(previous_latents.shape)}")
            if previous_latents.dtype != flat.dtype:
                raise TypeError(f"previous_latents: expected dtype {flat.dtype}, got {previous_latents.dtype}")
            check_finite("previous_latents", previous_latents)
            previous_latents = previous_latents.detach()  # sg(Z_prev): no gradient reaches the previous step
        return flat, keep, previous_latents

    def initial_latents(self, batch: int, previous_latents: Tensor | None) -> Tensor:
        """Z⁰ = Z_init, or Z_init + LN(MLP(sg(Z_prev))) with previous latents (already detached by `run`)."""
        z = self.latents.expand(batch, *self.latents.shape)
        if previous_latents is None:
            return z
        return z + self.self_cond_norm(self.self_cond(previous_latents))

    def run(
        self, x: Tensor, *, previous_latents: Tensor | None = None, attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None, impl: Impl = "fast",
    ) -> tuple[Tensor, Tensor]:
        """(tokens (batch, *grid, dim), latents (batch, M, latent_dim)); `previous_latents` self-condition (stop-grad)."""
        if impl not in ("fast", "reference"):
            raise ValueError(f"impl: expected 'fast' or 'reference', got {impl!r}")
        flat, keep, prev = self._prepare(x, attention_mask, key_padding_mask, previous_latents)
        if impl == "fast":
            h, z = flat, self.initial_latents(flat.shape[0], prev)
            for block in self.layers:
                h, z = block(h, z, keep)
            return h.reshape(x.shape), z
        h, z, _ = self._reference(flat, keep, prev)
        return h.to(x.dtype).reshape(x.shape), z.to(x.dtype)

    def _reference(self, x: Tensor, keep: Tensor | None, prev: Tensor | None) -> tuple[Tensor, Tensor, list[dict[str, Tensor | list[Tensor]]]]:
        check_memory("impl='reference'", (x.shape[0], self.heads, self.num_latents, x.shape[1]), 8 * 2 * len(self.layers))
        z = self.latents.double().expand(x.shape[0], *self.latents.shape)
        if prev is not None:
            z = z + layer_norm64(self.self_cond.reference(prev), self.self_cond_norm)
        h, maps = x.double(), []
        for block in self.layers:
            assert isinstance(block, RINBlock)
            h, z, w = block.reference(h, z, keep)
            maps.append(w)
        return h, z, maps

    def forward(
        self, x: Tensor, *, attention_mask: Tensor | None = None, key_padding_mask: Tensor | None = None, impl: Impl = "fast"
    ) -> Tensor:
        """Interface tokens (batch, *grid, dim) -> written tokens of the same shape (no self-conditioning)."""
        return self.run(x, attention_mask=attention_mask, key_padding_mask=key_padding_mask, impl=impl)[0]

    def attention_maps(
        self, x: Tensor, *, previous_latents: Tensor | None = None, attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> list[dict[str, Tensor | list[Tensor]]]:
        """Per block {"read": (batch, heads, M, N), "process": [(batch, heads, M, M)…], "write": (batch, heads, N, M)}."""
        flat, keep, prev = self._prepare(x, attention_mask, key_padding_mask, previous_latents)
        maps = self._reference(flat, keep, prev)[2]
        return [{k: [t.to(x.dtype) for t in v] if isinstance(v, list) else v.to(x.dtype) for k, v in m.items()} for m in maps]

    def materialize(
        self, x: Tensor, *, attention_mask: Tensor | None = None, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        """The first block's token-to-token attention through the latents, W_write · W_read (batch, heads, N, N)."""
        n = check_pooling_tokens(x, self.dim).shape[1]
        check_memory("materialize", (x.shape[0], self.heads, n, n), 8)
        first = self.attention_maps(x, attention_mask=attention_mask, key_padding_mask=key_padding_mask)[0]
        write, read = first["write"], first["read"]
        assert isinstance(write, Tensor) and isinstance(read, Tensor)
        return write @ read
