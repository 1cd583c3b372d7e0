"""The linear-family engine: chunked == recurrent == reference, hand values, delta-rule recall, numerics."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnlab.core.errors import ParameterError, ShapeError
from attnlab.kernels.linear_scan import (
    LinearState,
    _channel_scores,
    _ChannelDecayScores,
    linear_attention,
    linear_attention_recurrent,
    linear_attention_reference,
    linear_attention_step,
    linear_flops,
    normalizer_floor,
)
from attnlab.testing import LargestStorage

F64 = torch.float64
MODES = ["none", "scalar", "channel", "delta", "gated-delta"]


def inputs(mode, *, b=2, h=2, n=12, dk=3, dv=4, dtype=F64, seed=0, grad=False):
    """φ(q), φ(k) >= 0, v, and the gates of `mode`; delta modes get unit keys."""
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(b, h, n, dk, generator=g, dtype=dtype)
    k = torch.rand(b, h, n, dk, generator=g, dtype=dtype)
    v = torch.randn(b, h, n, dv, generator=g, dtype=dtype)
    log_decay = beta = None
    if mode in ("scalar", "gated-delta"):
        log_decay = -torch.rand(b, h, n, generator=g, dtype=dtype)
    if mode == "channel":
        log_decay = -torch.rand(b, h, n, dk, generator=g, dtype=dtype)
    if mode in ("delta", "gated-delta"):
        beta = torch.rand(b, h, n, generator=g, dtype=dtype)
        k = F.normalize(k, dim=-1)
    tensors = [q, k, v] + [t for t in (log_decay, beta) if t is not None]
    if grad:
        for t in tensors:
            t.requires_grad_(True)
    return q, k, v, log_decay, beta, tensors


def padding(b=2, n=12):
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[0, -3:] = False  # trailing padding
    keep[1, :2] = False  # leading padding
    keep[1, 6] = False  # a hole
    return keep


def value_and_grads(fn, tensors, out_shape, seed=3):
    out = fn()
    w = torch.randn(out_shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return out.detach(), torch.autograd.grad((out * w).sum(), tensors)


def close(a, b, atol=1e-10, rtol=1e-9):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# -- the three causal computations agree --------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 4, 5, 16])  # divides 12, does not, larger than n
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padded", [False, True])
def test_chunked_equals_recurrent_equals_reference(mode, chunk, padded):
    q, k, v, ld, beta, tensors = inputs(mode, grad=True)
    normalize = beta is None
    kw = dict(attention_mask=padding() if padded else None, log_decay=ld, beta=beta, normalize=normalize)
    shape = v.shape
    ref, g_ref = value_and_grads(lambda: linear_attention_reference(q, k, v, causal=True, **kw)[0], tensors, shape)
    rec, g_rec = value_and_grads(lambda: linear_attention_recurrent(q, k, v, **kw), tensors, shape)
    fast, g_fast = value_and_grads(lambda: linear_attention(q, k, v, causal=True, chunk_size=chunk, **kw), tensors, shape)
    close(rec, ref)
    close(fast, ref)
    for a, b_, r in zip(g_fast, g_rec, g_ref):
        close(b_, r)
        close(a, r)


@pytest.mark.parametrize("mode", MODES)
def test_bidirectional_equals_reference_forward_and_backward(mode):
    q, k, v, ld, beta, tensors = inputs(mode, grad=True)
    kw = dict(attention_mask=padding(), log_decay=ld, beta=beta, normalize=beta is None)
    ref, g_ref = value_and_grads(lambda: linear_attention_reference(q, k, v, **kw)[0], tensors, v.shape)
    fast, g_fast = value_and_grads(lambda: linear_attention(q, k, v, chunk_size=5, **kw), tensors, v.shape)
    close(fast, ref)
    for a, r in zip(g_fast, g_ref):
        close(a, r)


def test_bidirectional_plain_form_by_hand_with_more_keys_than_queries():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.rand(1, 1, 3, 2, generator=g, dtype=F64), torch.rand(1, 1, 5, 2, generator=g, dtype=F64), torch.randn(1, 1, 5, 3, generator=g, dtype=F64)
    keep = torch.tensor([[True, True, False, True, True]])
    out = linear_attention(q, k, v, attention_mask=keep)
    for i in range(3):
        num = sum((q[0, 0, i] @ k[0, 0, j]) * v[0, 0, j] for j in range(5) if keep[0, j])
        den = sum(q[0, 0, i] @ k[0, 0, j] for j in range(5) if keep[0, j])
        close(out[0, 0, i], num / den)


# -- hand values on two tokens --------------------------------------------------------------------
def tiny(*rows):
    return torch.tensor(rows, dtype=F64).reshape(1, 1, len(rows), -1)


def test_scalar_decay_by_hand():
    q, k, v = tiny(2.0, 3.0), tiny(0.5, 1.5), tiny(1.0, -2.0)
    log_decay = torch.log(torch.tensor([[[0.9, 0.5]]], dtype=F64))  # α_0 is never applied (empty memory)
    out = linear_attention(q, k, v, causal=True, log_decay=log_decay, normalize=False, chunk_size=1)
    close(out.flatten(), torch.tensor([2 * 0.5 * 1, 3 * (0.5 * 0.5 * 1 + 1.5 * -2)], dtype=F64))
    normed = linear_attention(q, k, v, causal=True, log_decay=log_decay, normalize=True)
    close(normed.flatten(), torch.tensor([1.0, (0.25 * 1 + 1.5 * -2) / (0.25 + 1.5)], dtype=F64))
    weights = linear_attention_reference(q, k, v, causal=True, log_decay=log_decay, normalize=False)[1]
    close(weights[0, 0], torch.tensor([[1.0, 0.0], [3 * 0.5 * 0.5, 3 * 1.5]], dtype=F64))
    both = linear_attention_reference(q, k, v, log_decay=log_decay, normalize=False)[1]  # backward scan: α_1 unused, α_0 used
    close(both[0, 0], torch.tensor([[1.0, 2 * 0.9 * 1.5], [3 * 0.5 * 0.5, 3 * 1.5]], dtype=F64))


def test_channel_decay_by_hand():
    q, k, v = tiny([1.0, 2.0], [3.0, -1.0]), tiny([0.5, 1.0], [2.0, 0.25]), tiny([4.0], [-1.0])
    log_decay = torch.log(torch.tensor([[[[1.0, 1.0], [0.5, 0.25]]]], dtype=F64))
    out = linear_attention(q, k, v, causal=True, log_decay=log_decay, normalize=False, chunk_size=2)
    first = (1 * 0.5 + 2 * 1.0) * 4
    second = 3 * (0.5 * 0.5 * 4 + 2.0 * -1) + -1 * (0.25 * 1.0 * 4 + 0.25 * -1)
    close(out.flatten(), torch.tensor([first, second], dtype=F64))


def test_gated_delta_rule_by_hand():
    # unit keys k0 = (0.6, 0.8), k1 = (1, 0); β = (0.5, 0.25); α1 = 0.5; values 2 and −1
    q, k, v = tiny([0.6, 0.8], [0.0, 1.0]), tiny([0.6, 0.8], [1.0, 0.0]), tiny([2.0], [-1.0])
    beta = torch.tensor([[[0.5, 0.25]]], dtype=F64)
    s0 = torch.tensor([0.6, 0.8], dtype=F64)  # β0 k0 v0
    out = linear_attention(q, k, v, causal=True, beta=beta, normalize=False, chunk_size=2)
    s1 = s0 - 0.25 * torch.tensor([1.0, 0.0], dtype=F64) * 0.6 + 0.25 * torch.tensor([1.0, 0.0], dtype=F64) * -1
    close(out.flatten(), torch.stack([q[0, 0, 0] @ s0, q[0, 0, 1] @ s1]))
    log_decay = torch.log(torch.tensor([[[1.0, 0.5]]], dtype=F64))
    gated = linear_attention(q, k, v, causal=True, beta=beta, log_decay=log_decay, normalize=False, chunk_size=1)
    s1 = 0.5 * (s0 - 0.25 * torch.tensor([1.0, 0.0], dtype=F64) * 0.6) + 0.25 * torch.tensor([1.0, 0.0], dtype=F64) * -1
    close(gated[0, 0, 1, 0], q[0, 0, 1] @ s1)
    weights = linear_attention_reference(q, k, v, causal=True, beta=beta, log_decay=log_decay, normalize=False)[1]
    # A_10 = β0 k0ᵀ T_1 q1 with T_1 = α1 (I − β1 k1 k1ᵀ); A_11 = β1 k1ᵀ q1
    t1 = 0.5 * (torch.eye(2, dtype=F64) - 0.25 * torch.outer(k[0, 0, 1], k[0, 0, 1]))
    close(weights[0, 0, 1], torch.stack([0.5 * k[0, 0, 0] @ t1 @ q[0, 0, 1], 0.25 * k[0, 0, 1] @ q[0, 0, 1]]))


# -- the delta rule as an associative memory ---------------------------------------------------------
def test_delta_rule_with_unit_step_retrieves_values_stored_under_orthonormal_keys():
    d = 4
    basis = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=F64))[0]
    values = torch.randn(d, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    order = torch.tensor([2, 0, 3, 1])
    # tokens 0..3 write (basis_i, values_i) with β = 1; tokens 4..7 read with q = basis[order] and write nothing
    k = torch.cat([basis, torch.zeros(d, d, dtype=F64)])[None, None]
    v = torch.cat([values, torch.zeros(d, 3, dtype=F64)])[None, None]
    q = torch.cat([basis, basis[order]])[None, None]
    beta = torch.cat([torch.ones(d), torch.zeros(d)]).to(F64)[None, None]
    for chunk in (3, 8):
        out = linear_attention(q, k, v, causal=True, beta=beta, normalize=False, chunk_size=chunk)
        close(out[0, 0, d:], values[order], atol=1e-12, rtol=0)


def test_delta_rule_overwrites_where_the_hebbian_memory_adds():
    key = torch.tensor([[0.6, 0.8], [0.6, 0.8]], dtype=F64)[None, None]
    v = torch.tensor([[1.0], [5.0]], dtype=F64)[None, None]
    delta = linear_attention(key, key, v, causal=True, beta=torch.ones(1, 1, 2, dtype=F64), normalize=False)
    hebbian = linear_attention(key, key, v, causal=True, normalize=False)
    assert delta[0, 0, 1, 0].item() == pytest.approx(5.0, abs=1e-12)
    assert hebbian[0, 0, 1, 0].item() == pytest.approx(6.0, abs=1e-12)


# -- the implicit matrix ---------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_materialized_matrix_times_v_is_the_output(mode, causal):
    q, k, v, ld, beta, _ = inputs(mode)
    kw = dict(causal=causal, attention_mask=padding(), log_decay=ld, beta=beta, normalize=beta is None)
    weights = linear_attention_reference(q, k, v, **kw)[1]
    close(weights @ v, linear_attention(q, k, v, chunk_size=5, **kw))
    assert weights[0, ..., -3:].abs().max() == 0  # padded keys carry no weight
    if causal:
        assert torch.triu(weights, diagonal=1).abs().max() == 0
    if beta is None:  # normalised rows sum to 1 (every row of element 0 sees a real key)
        close(weights[0].sum(-1), torch.ones_like(weights[0].sum(-1)))


@pytest.mark.parametrize("mode", ["scalar", "channel", "gated-delta"])
def test_padded_keys_are_skipped_not_decayed_through(mode):
    q, k, v, ld, beta, _ = inputs(mode, b=1)
    keep = torch.ones(1, 12, dtype=torch.bool)
    keep[0, [0, 5, 6]] = False
    real = keep[0]
    kw = dict(causal=True, normalize=beta is None, chunk_size=4)
    padded = linear_attention(q, k, v, attention_mask=keep, log_decay=ld, beta=beta, **kw)
    removed = linear_attention(
        q[:, :, real], k[:, :, real], v[:, :, real], log_decay=None if ld is None else ld[:, :, real],
        beta=None if beta is None else beta[:, :, real], **kw,
    )
    close(padded[:, :, real], removed)


# -- numerics -----------------------------------------------------------------------------------------
def test_per_channel_scores_gradcheck_and_sub_blocks():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 6, 3, generator=g, dtype=F64, requires_grad=True)
    k = torch.randn(2, 6, 3, generator=g, dtype=F64, requires_grad=True)
    cum = (-torch.rand(2, 6, 3, generator=g, dtype=F64)).cumsum(1).requires_grad_(True)
    assert torch.autograd.gradcheck(_ChannelDecayScores.apply, (q, k, cum))
    q, k = torch.randn(3, 48, 4, generator=g, dtype=F64), torch.randn(3, 48, 4, generator=g, dtype=F64)
    cum = (-2 * torch.rand(3, 48, 4, generator=g, dtype=F64)).cumsum(1)
    by_hand = torch.einsum("tc,sc,tsc->ts", q[0], k[0], torch.exp(cum[0][:, None] - cum[0][None, :])).tril()
    close(_channel_scores(q, k, cum)[0], by_hand)  # 48 = 3 sub-blocks of 16


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "scalar", "channel", "gated-delta"])  # gated-delta's path serves delta too
def test_float32_at_16k_tokens_is_within_tolerance_of_float64(mode):
    """Stated tolerance: max |out32 − out64| <= 1e-5 · max |out64| at N = 16,384 (h = 1, d = 16, chunk 64).

    The float64 side is the token-by-token recurrence (equal to the naive float64 matrix, tested
    above at small N; the matrix itself would be 2 GiB here). Observed: ~1e-7 (Hebbian), ~6e-7 (delta).
    """
    n = 16384
    q, k, v, ld, beta, _ = inputs(mode, b=1, h=1, n=n, dk=16, dv=16, dtype=torch.float32, seed=4)
    if ld is not None:
        ld = ld * 0.05  # a memory of ~40 tokens; without decay it spans all 16k
    normalize = beta is None
    out32 = linear_attention(q, k, v, causal=True, log_decay=ld, beta=beta, normalize=normalize)
    assert out32.dtype == torch.float32
    out64 = linear_attention_recurrent(
        q.double(), k.double(), v.double(), log_decay=None if ld is None else ld.double(),
        beta=None if beta is None else beta.double(), normalize=normalize,
    )
    err = (out32.double() - out64).abs().max().item()
    assert err <= 1e-5 * out64.abs().max().item(), f"{mode}: float32 error {err:.2e}"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_inputs_of_scale_1e3_give_finite_values_and_gradients(mode, causal):
    q, k, v, ld, beta, _ = inputs(mode, n=40, dtype=torch.float32)
    q, k, v = (1e3 * q).requires_grad_(), (1e3 * k if beta is None else k).requires_grad_(), (1e3 * v).requires_grad_()
    if ld is not None:
        ld = (1e3 * ld).requires_grad_()
    out = linear_attention(q, k, v, causal=causal, log_decay=ld, beta=beta, normalize=beta is None, chunk_size=16)
    grads = torch.autograd.grad(out.sum(), [t for t in (q, k, v, ld) if t is not None])
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    # the values: the float64 reference's on the same inputs, to float32 accuracy of the largest entry
    wide = [None if t is None else t.detach().double() for t in (q, k, v, ld, beta)]
    want = linear_attention_reference(*wide[:3], causal=causal, log_decay=wide[3], beta=wide[4], normalize=beta is None)[0]
    assert (out.double() - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_runs_and_stays_near_float64(mode):
    q, k, v, ld, beta, _ = inputs(mode, n=20)
    ref = linear_attention_reference(q, k, v, causal=True, log_decay=ld, beta=beta, normalize=beta is None)[0]
    low = {key: None if t is None else t.bfloat16() for key, t in (("log_decay", ld), ("beta", beta))}
    out = linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True, normalize=beta is None, chunk_size=8, **low)
    assert out.dtype == torch.bfloat16
    assert (out.double() - ref).abs().max() <= 0.05 * ref.abs().max()


def test_normalizer_floor_fully_padded_rows_give_zero_and_small_features_are_exact():
    assert normalizer_floor(torch.float32) == pytest.approx(torch.finfo(torch.float32).tiny ** 0.5)
    q, k, v, _, _, _ = inputs("none", dtype=torch.float32)
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[1] = False
    for causal in (False, True):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        out = linear_attention(qq, kk, v, causal=causal, attention_mask=keep)
        assert out[1].abs().max() == 0
        grads = torch.autograd.grad(out.sum(), (qq, kk))
        assert all(torch.isfinite(g).all() for g in grads)
        # features 1e-8 as large: weights ~1e-16, far above the floor, so the rows are unchanged
        small = linear_attention(1e-8 * q, 1e-8 * k, v, causal=causal)
        torch.testing.assert_close(small, linear_attention(q, k, v, causal=causal), atol=1e-5, rtol=1e-5)


# -- the state API ------------------------------------------------------------------------------------
def test_step_by_step_equals_the_causal_form_and_checks_its_state():
    q, k, v, ld, _, _ = inputs("channel")
    full = linear_attention(q, k, v, causal=True, log_decay=ld, chunk_size=5)
    state, outs = None, []
    for t in range(12):
        sl = slice(t, t + 1)
        out, state = linear_attention_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], state, log_decay=ld[:, :, sl])
        outs.append(out)
    close(torch.cat(outs, dim=2), full)
    assert isinstance(state, LinearState) and state.memory.shape == (2, 2, 3, 4) and state.normalizer.shape == (2, 2, 3)
    with pytest.raises(ShapeError, match="state"):
        linear_attention_step(q[:, :, :1], k[:, :, :1], v[:, :, :1, :2], state)
    with pytest.raises(ShapeError, match="q"):
        linear_attention_step(q[:, :, :2], k[:, :, :2], v[:, :, :2])


# -- no N × N tensor -------------------------------------------------------------------------------
def largest_allocation(mode, n, causal):
    q, k, v, ld, beta, tensors = inputs(mode, b=1, h=1, n=n, dk=8, dv=8, dtype=torch.float32, grad=True)
    with LargestStorage() as probe:
        out = linear_attention(q, k, v, causal=causal, log_decay=ld, beta=beta, normalize=beta is None, chunk_size=64)
        torch.autograd.grad(out.sum(), tensors)
    return probe.largest


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_no_allocation_grows_quadratically_with_n(mode, causal):
    """Forward and backward: the largest tensor at 4,096 tokens is at most ~2× the one at 2,048,
    and far below one n × n float32 matrix (64 MiB)."""
    small, large = largest_allocation(mode, 2048, causal), largest_allocation(mode, 4096, causal)
    assert large <= 2.1 * small, f"{small} -> {large} bytes"
    assert large < 4 * 4096 * 4096 / 8


# -- bad inputs --------------------------------------------------------------------------------------
def test_bad_inputs_name_the_argument():
    q, k, v, ld, beta, _ = inputs("gated-delta")
    with pytest.raises(ValueError, match="log_decay"):
        linear_attention(q, k, v, log_decay=-ld, beta=beta, normalize=False)  # a growth
    with pytest.raises(ShapeError, match="log_decay"):
        linear_attention(q, k, v, log_decay=ld[..., :5])
    with pytest.raises(ShapeError, match="log_decay"):
        linear_attention(q, k, v, log_decay=ld[0])
    with pytest.raises(ValueError, match="log_decay"):
        linear_attention(q, k, v, log_decay=ld.masked_fill(ld < -0.5, float("nan")))
    with pytest.raises(ValueError, match="normalize"):
        linear_attention(q, k, v, beta=beta, normalize=True)
    with pytest.raises(ValueError, match="log_decay"):
        linear_attention(q, k, v, beta=beta, log_decay=-torch.rand(2, 2, 12, 3, dtype=F64), normalize=False)
    with pytest.raises(ShapeError, match="k"):
        linear_attention(q, k[:, :, :7], v[:, :, :7], causal=True)
    with pytest.raises(ShapeError, match="k"):
        linear_attention(q, k[:, :, :7], v[:, :, :7], log_decay=ld[:, :, :7])
    with pytest.raises(ParameterError, match="chunk_size"):
        linear_attention(q, k, v, causal=True, chunk_size=0)
    with pytest.raises(TypeError, match="beta"):
        linear_attention(q, k, v, beta=(beta > 0.5), normalize=False)


def test_flops_formula():
    assert linear_flops(1000, 2, 8, False) == 4 * 2 * 1000 * 64
    assert linear_flops(1000, 2, 8, True, chunk_size=50) == 2 * (4 * 1000 * 50 * 8 + 4 * 1000 * 64)
    assert linear_flops(1000, 2, 8, False, chunk_size=50, two_scans=True) == 2 * linear_flops(1000, 2, 8, True, chunk_size=50)
