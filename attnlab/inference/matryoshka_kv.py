"""MatryoshkaKV (P004, Lin et al., 2024): KV-cache compression along the feature axis by trainable orthogonal
projections truncated to nested ranks.

Per layer and head, two orthogonal matrices U_k, U_v ∈ R^{d×d} and the means μ_k, μ_v ∈ R^d of the keys and values.
The cache keeps r_k-, r_v-dimensional codes, and attention runs on them (queries are not centred):

    K̃ = (K − μ_k) U_k[:, :r],   Ṽ = (V − μ_v) U_v[:, :r],   Q̃ = Q U_k[:, :r]
    P = softmax(Q̃ K̃ᵀ / √d + B + M)
    out = P Ṽ U_v[:, :r]ᵀ + (P 1) μ_vᵀ

√d is the head dimension before compression; B a score bias (ALiBi, KERPLE), M the mask. Centring the keys
changes each score row by the constant −q U_r U_rᵀ μ_k, which the softmax ignores (at every rank: the key mean
matters only through the PCA basis it gives); at r = d, U U_vᵀ = I and the output is exactly the uncompressed
attention. (P 1) is 1 for every row with a visible key, 0 for a fully masked row, which gives zeros.

Initialisation: U = the principal directions of the cached keys (values) of a calibration run, by decreasing
variance, so that U[:, :r] is the rank-r PCA basis for every r (nested ranks). Training keeps U orthogonal by the
Cayley map on a skew-symmetric matrix:

    U = U_pca · Q(X),   Q(X) = (I − A/2)⁻¹ (I + A/2),   A = X − Xᵀ,   X = 0 at the start (U = U_pca)

and X is trained by distillation to the uncompressed model, the rank of each step sampled from the nested set
(every head of every layer at the same r/d), the model's own weights frozen.

Rank allocation: from a table of per-head output errors at each rank of the nested set, greedily lower by one
level the head whose error grows least until the total rank fits the budget (`allocate_ranks`).

Deviations from the paper: one rank per head shared by keys and values (the paper may give them different
rates); the distillation loss is the KL divergence between the output distributions (logits on the last axis) or
the squared error, on the model outputs only (no intermediate-layer terms); U_pca is computed here by an
eigendecomposition of the covariance of the calibration keys/values of each head.

Where it applies: attnlab modules whose core is plain softmax attention with score terms (`softmax`, `alibi`,
`kerple`, ...: the class does not override `SoftmaxAttention.attend_fast`), wrapped by `MatryoshkaAttention`;
transformers models through the attention implementation `transformers_compressed` registers (keys are
compressed after the model's rotation, as the cache holds them).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.errors import ParameterError, ShapeError
from ..core.module import Attention
from ..core.registry import Paper, Spec, add
from ..kernels.sdpa import sdpa
from ..mechanisms.dense.softmax import SoftmaxAttention

P004 = Paper("P004", "MatryoshkaKV: Adaptive KV Compression via Trainable Orthogonal Projection", 2024, "2410.14731")


# ----------------------------------------------------------------------------------------------- the projection


def cayley(x: Tensor) -> Tensor:
    """Q = (I − A/2)⁻¹ (I + A/2) with A = X − Xᵀ, orthogonal for every real square X (batched over leading axes)."""
    if x.dim() < 2 or x.shape[-1] != x.shape[-2]:
        raise ShapeError(f"x: expected square matrices (..., d, d), got shape {tuple(x.shape)}")
    a = x - x.transpose(-1, -2)
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    return torch.linalg.solve(eye - a / 2, eye + a / 2)


def principal_basis(x: Tensor, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(basis (heads, d, d), mean (heads, d)) of features x (batch, heads, n, d): the columns of basis are the
    eigenvectors of the covariance of the centred features of each head, by decreasing eigenvalue, each signed
    so that its largest-magnitude entry is positive. `keep` (batch, n), True = a real token, selects the tokens."""
    if x.dim() != 4:
        raise ShapeError(f"x: expected (batch, heads, n, head_dim), got shape {tuple(x.shape)}")
    feats = x.detach().transpose(0, 1).reshape(x.shape[1], -1, x.shape[-1]).double()  # (heads, batch·n, d)
    if keep is not None:
        if keep.shape != (x.shape[0], x.shape[2]):
            raise ShapeError(f"keep: expected shape {(x.shape[0], x.shape[2])}, got {tuple(keep.shape)}")
        feats = feats[:, keep.reshape(-1).to(torch.bool)]
    if feats.shape[1] < 2:
        raise ValueError(f"x: expected at least 2 tokens to estimate a covariance, got {feats.shape[1]}")
    mean = feats.mean(dim=1)
    centred = feats - mean[:, None]
    cov = centred.transpose(1, 2) @ centred / (feats.shape[1] - 1)
    values, vectors = torch.linalg.eigh(cov)  # ascending
    vectors = vectors.flip(-1)
    peak = vectors.abs().argmax(dim=1, keepdim=True)
    vectors = vectors * torch.gather(vectors, 1, peak).sign()
    return vectors.to(x.dtype), mean.to(x.dtype)


class MatryoshkaProjection(nn.Module):
    """Orthogonal U_k = basis_k · Q(X_k), U_v = basis_v · Q(X_v) per head (Cayley Q), and the means μ_k, μ_v.

    basis_*: (heads, d, d) orthogonal (the PCA bases); mean_*: (heads, d). X_k, X_v start at zero.
    """

    def __init__(self, basis_k: Tensor, mean_k: Tensor, basis_v: Tensor, mean_v: Tensor) -> None:
        super().__init__()
        heads, d = mean_k.shape
        for name, t, shape in (("basis_k", basis_k, (heads, d, d)), ("basis_v", basis_v, (heads, d, d)),
                               ("mean_v", mean_v, (heads, d))):
            if tuple(t.shape) != shape:
                raise ShapeError(f"{name}: expected shape {shape} (as mean_k {tuple(mean_k.shape)}), got {tuple(t.shape)}")
        self.register_buffer("basis_k", basis_k.detach().clone())
        self.register_buffer("basis_v", basis_v.detach().clone())
        self.register_buffer("mean_k", mean_k.detach().clone())
        self.register_buffer("mean_v", mean_v.detach().clone())
        self.x_k = nn.Parameter(torch.zeros_like(basis_k))
        self.x_v = nn.Parameter(torch.zeros_like(basis_v))

    @property
    def heads(self) -> int:
        return self.mean_k.shape[0]

    @property
    def head_dim(self) -> int:
        return self.mean_k.shape[1]

    def u_k(self) -> Tensor:
        return self.basis_k @ cayley(self.x_k)

    def u_v(self) -> Tensor:
        return self.basis_v @ cayley(self.x_v)


def check_ranks(ranks: int | Sequence[int] | Tensor, heads: int, head_dim: int) -> Tensor:
    """The rank of each head as a long tensor (heads,), each in 1..head_dim."""
    t = torch.as_tensor(ranks)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"ranks: expected integers, got {t.dtype}")
    if t.dim() == 0:
        t = t.expand(heads)
    if tuple(t.shape) != (heads,):
        raise ShapeError(f"ranks: expected an int or one rank per head ({heads},), got shape {tuple(t.shape)}")
    if bool((t < 1).any()) or bool((t > head_dim).any()):
        raise ParameterError(f"ranks: expected each rank in 1..{head_dim}, got {t.tolist()}")
    return t.to(torch.long).clone()


# ------------------------------------------------------------------------------------------- the attention core


def matryoshka_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    u_k: Tensor,
    u_v: Tensor,
    mean_k: Tensor,
    mean_v: Tensor,
    ranks: Tensor,
    *,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """softmax(Q U_k,r ((K − μ_k) U_k,r)ᵀ·scale + B + M) (V − μ_v) U_v,r U_v,rᵀ + (P 1) μ_v on (batch, heads, n, d).

    u_k, u_v (heads, d, d) orthogonal, mean_k, mean_v (heads, d), ranks (heads,); scale defaults to 1/√d (the
    uncompressed head dimension); mask True = attend, or additive. Heads of lower rank than the largest have
    their columns beyond their rank zeroed, which equals truncation.
    """
    d = q.shape[-1]
    r_max = int(ranks.max())
    cols = (torch.arange(r_max, device=q.device)[None] < ranks.to(q.device)[:, None]).to(q.dtype)  # (heads, r_max)
    uk = u_k[..., :r_max] * cols[:, None]
    uv = u_v[..., :r_max] * cols[:, None]
    qc = torch.einsum("bhnd,hdr->bhnr", q, uk)
    kc = torch.einsum("bhnd,hdr->bhnr", k - mean_k[:, None], uk)
    vc = torch.einsum("bhnd,hdr->bhnr", v - mean_v[:, None], uv)
    ones = torch.ones(*vc.shape[:-1], 1, dtype=vc.dtype, device=vc.device)
    o = sdpa(qc, kc, torch.cat([vc, ones], dim=-1), mask, bias, 1.0 / math.sqrt(d) if scale is None else scale)
    return torch.einsum("bhnr,hdr->bhnd", o[..., :r_max], uv) + o[..., r_max:] * mean_v[:, None]


def matryoshka_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    u_k: Tensor,
    u_v: Tensor,
    mean_k: Tensor,
    mean_v: Tensor,
    ranks: Tensor,
    *,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """`matryoshka_attention` in float64, head by head from the formula: the truncated bases sliced to each
    head's rank, the probabilities materialised, fully masked rows set to zero."""
    batch, heads, n_q, d = q.shape
    n_k = k.shape[2]
    s = 1.0 / math.sqrt(d) if scale is None else scale
    full = torch.zeros(batch, heads, n_q, n_k, dtype=torch.float64, device=q.device)
    visible = torch.ones(batch, heads, n_q, n_k, dtype=torch.bool, device=q.device)
    if mask is not None:
        m = mask.expand(batch, heads, n_q, n_k)
        if m.dtype == torch.bool:
            visible = m.clone()
        else:
            full = full + m.double()
            visible = m > float("-inf")
    if bias is not None:
        full = full + bias.double().expand(batch, heads, n_q, n_k)
    out = torch.zeros(batch, heads, n_q, d, dtype=torch.float64, device=q.device)
    for h in range(heads):
        r = int(ranks[h])
        uk = u_k[h, :, :r].double()
        uv = u_v[h, :, :r].double()
        code_q = q[:, h].double() @ uk
        code_k = (k[:, h].double() - mean_k[h].double()) @ uk
        code_v = (v[:, h].double() - mean_v[h].double()) @ uv
        scores = code_q @ code_k.transpose(-1, -2) * s + full[:, h]
        scores = scores.masked_fill(~visible[:, h], float("-inf"))
        row_max = scores.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        e = torch.exp(scores - row_max)
        z = e.sum(dim=-1, keepdim=True)
        p = torch.where(z > 0, e / torch.where(z > 0, z, torch.ones_like(z)), torch.zeros_like(e))
        out[:, h] = p @ code_v @ uv.T + p.sum(dim=-1, keepdim=True) * mean_v[h].double()
    return out.to(q.dtype)


# ------------------------------------------------------------------------------------------ the attnlab wrapper


def check_compressible(module: nn.Module) -> SoftmaxAttention:
    """The module if its core is plain softmax attention with score terms, else TypeError saying why."""
    if not isinstance(module, SoftmaxAttention):
        raise TypeError(f"module: expected a softmax-family attnlab module (SoftmaxAttention), got {type(module).__name__}")
    for method in ("attend_fast", "attend_reference"):
        if getattr(type(module), method) is not getattr(SoftmaxAttention, method):
            raise TypeError(
                f"module: {type(module).__name__} overrides SoftmaxAttention.{method} (q and k are transformed inside "
                "its core, after the KV cache), so its cached keys cannot be compressed by a fixed projection"
            )
    return module


class MatryoshkaAttention(nn.Module):
    """A softmax-family attnlab module whose core runs on MatryoshkaKV-compressed keys and values.

    `base`: the module (its projections, score terms, masks and output projection are used as they are);
    `projection`: the per-head U_k, U_v, μ_k, μ_v; `ranks` (buffer, (heads,)): the rank of each head, d = exact.
    """

    def __init__(self, base: nn.Module, projection: MatryoshkaProjection) -> None:
        super().__init__()
        self.base = check_compressible(base)
        if (projection.heads, projection.head_dim) != (self.base.heads, self.base.head_dim):
            raise ShapeError(
                f"projection: expected {self.base.heads} heads of dimension {self.base.head_dim} (as base), "
                f"got {projection.heads} of {projection.head_dim}"
            )
        self.projection = projection
        self.register_buffer("ranks", torch.full((projection.heads,), projection.head_dim, dtype=torch.long))

    def set_ranks(self, ranks: int | Sequence[int] | Tensor) -> None:
        self.ranks.copy_(check_ranks(ranks, self.projection.heads, self.projection.head_dim))

    def core(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        ranks: Tensor | None = None,
        impl: str = "fast",
    ) -> Tensor:
        """The per-head outputs (batch, heads, n, d) before the output projection, at `ranks` (default self.ranks)."""
        base = self.base
        x, context = base.batch_major(x, context)
        base._check_inputs(x, context)
        keep = base.keep_mask(x, context, attention_mask, key_padding_mask)
        q, k, v = base.project(x, context)
        mask = base.masks(q, k, keep, attn_mask).dense
        bias = base.score_bias(q, k)
        p = self.projection
        r = self.ranks if ranks is None else check_ranks(ranks, p.heads, p.head_dim)
        if impl not in ("fast", "reference"):
            raise ValueError(f"impl: expected 'fast' or 'reference', got {impl!r}")
        attend = matryoshka_attention if impl == "fast" else matryoshka_attention_reference
        return attend(q, k, v, p.u_k(), p.u_v(), p.mean_k, p.mean_v, r, mask=mask, bias=bias, scale=base.scale)

    def forward(self, x: Tensor, *, impl: str = "fast", **masks: Any) -> Tensor:
        """As the base module's forward (same masks and layout), with compressed keys and values."""
        out = self.base.out_proj(self.base.merge_heads(self.core(x, impl=impl, **masks)))
        return out if self.base.batch_first else out.transpose(0, 1)


def compressible_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every attnlab attention module of `model`, each checked by `check_compressible`: a model
    holding one whose cache cannot be compressed (RoPE, linear attention, ...) is refused, naming it."""
    found = []
    for name, m in model.named_modules():
        if isinstance(m, Attention):
            try:
                found.append((name, check_compressible(m)))
            except TypeError as e:
                raise TypeError(f"{e} (at {name or 'the model itself'!r})") from None
    return found


def wrappers(model: nn.Module) -> list[MatryoshkaAttention]:
    """The `MatryoshkaAttention` modules of a compressed model, in module order (the layers)."""
    return [m for m in model.modules() if isinstance(m, MatryoshkaAttention)]


def compress(model: nn.Module, batches: Iterable[Any], *, call: Callable[[nn.Module, Any], Any] | None = None) -> nn.Module:
    """A copy of `model` with every compressible attnlab module wrapped in `MatryoshkaAttention`, its projections
    initialised by the PCA of the keys and values the original model computes on `batches` (calibration);
    the copy's own weights are frozen, only the Cayley parameters train. `call(model, batch)` runs a batch
    (default `model(batch)`); the keys of padded tokens (an `attention_mask`/`key_padding_mask` keyword of the
    module call) are left out of the PCA."""
    found = compressible_modules(model)
    if not found:
        raise TypeError(f"model: {type(model).__name__} holds no attnlab attention module to compress")
    keys: dict[str, list[Tensor]] = {name: [] for name, _ in found}
    values: dict[str, list[Tensor]] = {name: [] for name, _ in found}

    def recorder(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> None:
            x, context = module.batch_major(args[0], kwargs.get("context"))
            keep = module.keep_mask(x, context, kwargs.get("attention_mask"), kwargs.get("key_padding_mask"))
            _, k, v = module.project(x, context)
            if keep is not None:
                k, v = k.transpose(1, 2)[keep], v.transpose(1, 2)[keep]  # (tokens, heads, d)
                k, v = k.transpose(0, 1)[None], v.transpose(0, 1)[None]
            keys[name].append(k.detach().transpose(1, 2).reshape(-1, k.shape[1], k.shape[-1]))
            values[name].append(v.detach().transpose(1, 2).reshape(-1, v.shape[1], v.shape[-1]))
        return hook

    handles = [m.register_forward_hook(recorder(name), with_kwargs=True) for name, m in found]
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch) if call is None else call(model, batch)
    finally:
        for h in handles:
            h.remove()
    if not keys[found[0][0]]:
        raise ValueError("batches: expected at least one calibration batch, got none")
    student = copy.deepcopy(model)
    for p in student.parameters():
        p.requires_grad_(False)
    for name, _ in found:
        k = torch.cat(keys[name]).transpose(0, 1)[None]  # (1, heads, tokens, d)
        v = torch.cat(values[name]).transpose(0, 1)[None]
        basis_k, mean_k = principal_basis(k)
        basis_v, mean_v = principal_basis(v)
        wrapped = MatryoshkaAttention(student.get_submodule(name), MatryoshkaProjection(basis_k, mean_k, basis_v, mean_v))
        if not name:  # the model is the attention module itself
            return wrapped
        parent_name, _, child = name.rpartition(".")
        setattr(student.get_submodule(parent_name), child, wrapped)
    return student


def set_ranks(model: nn.Module, ranks: int | Sequence[Sequence[int]] | Tensor) -> None:
    """Set the ranks of every wrapper: one int for all, or (layers, heads) per wrapper and head."""
    found = wrappers(model)
    if isinstance(ranks, int):
        for w in found:
            w.set_ranks(ranks)
        return
    table = torch.as_tensor(ranks)
    if table.dim() != 2 or table.shape[0] != len(found):
        raise ShapeError(f"ranks: expected an int or a (layers={len(found)}, heads) table, got shape {tuple(table.shape)}")
    for w, row in zip(found, table, strict=True):
        w.set_ranks(row)


# ----------------------------------------------------------------------------------------------- distillation


def kl_to_teacher(student_out: Tensor, teacher_out: Tensor) -> Tensor:
    """KL(teacher ‖ student) of the distributions softmax(logits) on the last axis, averaged over the rest."""
    log_s = F.log_softmax(student_out, dim=-1)
    log_t = F.log_softmax(teacher_out, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(dim=-1).mean()


def distill(
    teacher: nn.Module,
    student: nn.Module,
    batches: Iterable[Any],
    *,
    levels: Sequence[int],
    lr: float = 1e-2,
    loss: Callable[[Tensor, Tensor], Tensor] = kl_to_teacher,
    call: Callable[[nn.Module, Any], Tensor] | None = None,
    seed: int = 0,
) -> list[float]:
    """Train the Cayley parameters of `student` (from `compress(teacher, ...)`) to match `teacher`, one Adam step
    per batch, every head at a rank drawn uniformly from `levels` (the nested set) at each step. Returns the
    loss of each step. The ranks are reset to the full dimension at the end."""
    found = wrappers(student)
    if not found:
        raise TypeError("student: expected a model compressed by `compress` (it holds no MatryoshkaAttention)")
    d = found[0].projection.head_dim
    levels = [check_ranks(r, 1, d)[0].item() for r in levels]
    if not levels:
        raise ValueError("levels: expected at least one rank, got none")
    params = [p for w in found for p in (w.projection.x_k, w.projection.x_v)]
    optim = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    run = call or (lambda m, b: m(b))
    history = []
    for batch in batches:
        r = levels[int(torch.randint(len(levels), (1,), generator=gen))]
        for w in found:
            w.set_ranks(r)
        with torch.no_grad():
            target = run(teacher, batch)
        value = loss(run(student, batch), target)
        optim.zero_grad()
        value.backward()
        optim.step()
        history.append(float(value.detach()))
    for w in found:
        w.set_ranks(d)
    return history


# ------------------------------------------------------------------------------------------- rank allocation


def head_errors(
    student: nn.Module, batches: Iterable[Any], levels: Sequence[int], *, call: Callable[[nn.Module, Any], Any] | None = None
) -> Tensor:
    """(layers, heads, len(levels)): the relative error ‖o_r − o_d‖ / ‖o_d‖ of each head's attention output at each
    rank r of `levels` against full rank d, on the inputs each wrapper gets when the model runs at full rank."""
    found = wrappers(student)
    inputs: list[list[tuple[tuple[Any, ...], dict[str, Any]]]] = [[] for _ in found]
    handles = [w.register_forward_pre_hook(lambda m, a, kw, i=i: inputs[i].append((a, dict(kw))), with_kwargs=True)
               for i, w in enumerate(found)]
    saved = [w.ranks.clone() for w in found]
    try:
        with torch.no_grad():
            for w in found:
                w.set_ranks(w.projection.head_dim)
            for batch in batches:
                student(batch) if call is None else call(student, batch)
    finally:
        for h in handles:
            h.remove()
    errors = torch.zeros(len(found), found[0].projection.heads, len(levels), dtype=torch.float64)
    with torch.no_grad():
        for i, w in enumerate(found):
            num = torch.zeros(len(levels), w.projection.heads, dtype=torch.float64)
            den = torch.zeros(w.projection.heads, dtype=torch.float64)
            for args, kwargs in inputs[i]:
                kwargs.pop("impl", None)
                exact = w.core(*args, ranks=torch.full_like(w.ranks, w.projection.head_dim), **kwargs)
                den += exact.double().pow(2).sum(dim=(0, 2, 3))
                for j, r in enumerate(levels):
                    approx = w.core(*args, ranks=torch.full_like(w.ranks, r), **kwargs)
                    num[j] += (approx - exact).double().pow(2).sum(dim=(0, 2, 3))
            errors[i] = (num / den.clamp_min(torch.finfo(torch.float64).tiny)).sqrt().T
            w.ranks.copy_(saved[i])
    return errors


def allocate_ranks(errors: Tensor, levels: Sequence[int], budget: int) -> Tensor:
    """Greedy rank allocation: every head starts at the largest level; while the total rank exceeds `budget`, the
    head whose error would grow least by going one level down goes down. errors (..., len(levels)), levels
    ascending, budget the allowed total rank. Returns the ranks, shape errors.shape[:-1]."""
    lv = list(levels)
    if not lv or any(b <= a for a, b in zip(lv, lv[1:], strict=False)) or lv[0] < 1:
        raise ParameterError(f"levels: expected strictly increasing positive ranks, got {lv}")
    if errors.shape[-1] != len(lv):
        raise ShapeError(f"errors: expected {len(lv)} levels on the last axis (as levels), got shape {tuple(errors.shape)}")
    flat = errors.reshape(-1, len(lv)).double()
    heads = flat.shape[0]
    if budget < lv[0] * heads:
        raise ParameterError(f"budget: expected at least {lv[0] * heads} (every head at rank {lv[0]}), got {budget}")
    level = [len(lv) - 1] * heads
    total = lv[-1] * heads
    while total > budget:
        best, best_cost = -1, math.inf
        for h in range(heads):
            if level[h] == 0:
                continue
            cost = float(flat[h, level[h] - 1] - flat[h, level[h]])
            if cost < best_cost:
                best, best_cost = h, cost
        total -= lv[level[best]] - lv[level[best] - 1]
        level[best] -= 1
    return torch.tensor([lv[i] for i in level], dtype=torch.long).reshape(errors.shape[:-1])


# ------------------------------------------------------------------------------------------- transformers models


IMPLEMENTATION = "attnlab_matryoshka"
_ACTIVE: list[dict[int, tuple[MatryoshkaProjection, Tensor]]] = []  # id(attention module) -> projection, ranks
_COLLECT: list[dict[int, list[tuple[Tensor, Tensor]]]] = []  # id(attention module) -> (key, value) per call


def _compressed_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                          scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, None]:
    """The "attnlab_matryoshka" implementation: query (batch, heads, n_q, d), key/value (batch, kv_heads, n_k, d);
    records key/value when collecting, compresses them when a projection is set for the module. Evaluation only:
    attention dropout is refused."""
    if dropout:
        raise ValueError(f"dropout: {IMPLEMENTATION} runs without attention dropout, got {dropout} (call model.eval())")
    if _COLLECT:
        _COLLECT[-1].setdefault(id(module), []).append((key.detach(), value.detach()))
    rep = query.shape[1] // key.shape[1]
    if rep > 1:
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    mask = None if attention_mask is None else attention_mask[:, :, :, : key.shape[-2]]
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    entry = _ACTIVE[-1].get(id(module)) if _ACTIVE else None
    if entry is None:
        out = sdpa(query, key, value, mask, None, scale)
    else:
        p, ranks = entry
        out = matryoshka_attention(query, key, value, p.u_k(), p.u_v(), p.mean_k, p.mean_v, ranks, mask=mask, scale=scale)
    return out.transpose(1, 2).contiguous(), None


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of a transformers model whose forward dispatches through AttentionInterface (they hold a
    `config` and `scaling` or `is_causal`, the convention of transformers 5's attention classes)."""
    return [m for m in model.modules() if hasattr(m, "config") and (hasattr(m, "scaling") or hasattr(m, "is_causal"))
            and type(m).__name__.endswith(("Attention", "SelfAttention"))]


@contextmanager
def _implementation(model: nn.Module) -> Iterator[None]:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(IMPLEMENTATION, _compressed_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(IMPLEMENTATION)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def transformers_projections(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> list[MatryoshkaProjection]:
    """PCA-initialised projections, one per attention layer of a transformers model (in module order), from the keys
    and values its layers hand to the attention implementation on `batches` (keyword dicts of the model call).
    Padded tokens are left out when a batch holds an `attention_mask`."""
    layers = _attention_modules(model)
    if not layers:
        raise TypeError(f"model: found no attention module of {type(model).__name__} that dispatches through AttentionInterface")
    _COLLECT.append({})
    try:
        with _implementation(model), torch.no_grad():
            keeps = []
            for batch in batches:
                model(**batch)
                keeps.append(batch.get("attention_mask"))
        seen = _COLLECT[-1]
    finally:
        _COLLECT.pop()
    out = []
    for m in layers:
        calls = seen.get(id(m), [])
        if len(calls) != len(keeps):
            raise ValueError(f"model: attention module {type(m).__name__} ran {len(calls)} times on {len(keeps)} batches")
        ks, vs = [], []
        for (k, v), keep in zip(calls, keeps, strict=True):
            sel = (slice(None),) if keep is None else (keep.to(torch.bool),)
            ks.append(k.transpose(1, 2)[sel].reshape(-1, k.shape[1], k.shape[-1]))
            vs.append(v.transpose(1, 2)[sel].reshape(-1, v.shape[1], v.shape[-1]))
        basis_k, mean_k = principal_basis(torch.cat(ks).transpose(0, 1)[None])
        basis_v, mean_v = principal_basis(torch.cat(vs).transpose(0, 1)[None])
        out.append(MatryoshkaProjection(basis_k, mean_k, basis_v, mean_v))
    return out


@contextmanager
def transformers_compressed(
    model: nn.Module, projections: Sequence[MatryoshkaProjection], ranks: int | Sequence[Sequence[int]]
) -> Iterator[None]:
    """Run a transformers model with MatryoshkaKV-compressed keys and values inside the context: `projections` from
    `transformers_projections`, `ranks` one int or (layers, kv_heads). The previous attention implementation comes
    back on exit."""
    layers = _attention_modules(model)
    if len(projections) != len(layers):
        raise ShapeError(f"projections: expected one per attention layer ({len(layers)}), got {len(projections)}")
    table = {}
    for i, (m, p) in enumerate(zip(layers, projections, strict=True)):
        r = ranks if isinstance(ranks, int) else ranks[i]
        table[id(m)] = (p, check_ranks(r, p.heads, p.head_dim))
    _ACTIVE.append(table)
    try:
        with _implementation(model):
            yield
    finally:
        _ACTIVE.remove(table)


add(Spec(
    name="matryoshka-kv", kind="inference", paper=P004, factory=compress, family="F",
    summary="KV-cache feature compression: per layer/head orthogonal projections (PCA init, Cayley-trained by "
            "distillation over nested ranks), greedy per-head rank allocation under a budget.",
))
