"""ContMix (P240): kernels sum to 1 per token, region tokens are the keys' r×r adaptive average pool, and
materialize explains the output."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from attnlab.mechanisms.mixers.contmix import ContMix, contmix_attention, contmix_kernels


def _qkv(seed: int = 0, shape: tuple[int, ...] = (2, 5, 6, 8)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(3))  # type: ignore[return-value]


def test_each_tokens_kernel_sums_to_one_and_is_not_uniform() -> None:
    q, k, _ = _qkv()
    gen = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(9, 9, generator=gen, dtype=torch.float64), torch.randn(9, generator=gen, dtype=torch.float64)
    w = contmix_kernels(q, k, weight, bias, heads=2, kernel_size=3, region_size=3)
    assert w.shape == (2, 2, 5, 6, 3, 3)
    torch.testing.assert_close(w.sum((-2, -1)), torch.ones(2, 2, 5, 6, dtype=torch.float64))
    assert (w > 0).all() and w.std() > 0.01  # a softmax, not a constant kernel


def test_region_tokens_are_the_keys_adaptive_average_pool_by_hand() -> None:
    """With q one-hot on channel c of group 0 (width d = 4) and W = I (r² = k² = 9), the kernel logits are
    R[:, c] / √d: softmax of the 3×3 region means of k's channel c, bins written out by hand for H = 5, W = 6."""
    q, k, _ = _qkv(shape=(1, 5, 6, 8))
    c = 1
    q = torch.zeros_like(q)
    q[..., c] = 1.0
    w = contmix_kernels(q, k, torch.eye(9, dtype=torch.float64), torch.zeros(9, dtype=torch.float64),
                        heads=2, kernel_size=3, region_size=3)
    rows, cols = [(0, 2), (1, 4), (3, 5)], [(0, 2), (2, 4), (4, 6)]  # ⌊i·L/3⌋ … ⌈(i+1)·L/3⌉ − 1
    means = torch.tensor([[k[0, r0:r1, c0:c1, c].mean() for c0, c1 in cols] for r0, r1 in rows], dtype=torch.float64)
    expected = torch.softmax(means.flatten() / 2.0, dim=0).reshape(3, 3)
    torch.testing.assert_close(w[0, 0, 2, 3], expected)
    torch.testing.assert_close(w[0, 0, 0, 0], expected)  # the same at every token: q is constant


def test_region_size_as_configured() -> None:
    """r = 5 (k = 5, W = I): the logits of a one-hot q are the 5×5 pooled means of k's channel; the 3×3 pool differs."""
    q, k, _ = _qkv(shape=(1, 5, 6, 8))
    q = torch.zeros_like(q)
    q[..., 6] = 1.0  # channel 6: group 1 (channels 4…7)
    w = contmix_kernels(q, k, torch.eye(25, dtype=torch.float64), torch.zeros(25, dtype=torch.float64),
                        heads=2, kernel_size=5, region_size=5)
    pooled = F.adaptive_avg_pool2d(k[..., 6][:, None], 5)[0, 0]  # (5, 5)
    torch.testing.assert_close(w[0, 1, 1, 1], torch.softmax(pooled.flatten() / 2.0, dim=0).reshape(5, 5))
    torch.testing.assert_close(w[0, 0, 1, 1], torch.full((5, 5), 1 / 25, dtype=torch.float64))  # group 0: q = 0


def test_output_is_each_tokens_kernel_applied_to_its_neighbours() -> None:
    """o at an interior token = Σ_t w_t v_{i+δ_t} written out; at the corner (0, 0) the off-grid taps read zero."""
    q, k, v = _qkv()
    gen = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(4, 9, generator=gen, dtype=torch.float64), torch.randn(9, generator=gen, dtype=torch.float64)
    kw = {"heads": 2, "kernel_size": 3, "region_size": 2}
    w = contmix_kernels(q, k, weight, bias, **kw)
    out = contmix_attention(q, k, v, weight, bias, **kw)
    for (y, x) in ((2, 3), (0, 0)):
        want = torch.zeros(8, dtype=torch.float64)
        for i in range(3):
            for j in range(3):
                if 0 <= y + i - 1 < 5 and 0 <= x + j - 1 < 6:
                    tap = torch.cat((w[0, 0, y, x, i, j].expand(4), w[0, 1, y, x, i, j].expand(4)))
                    want += tap * v[0, y + i - 1, x + j - 1]
        torch.testing.assert_close(out[0, y, x], want)


def test_materialize_explains_the_output() -> None:
    torch.manual_seed(0)
    m = ContMix(12, heads=3, kernel_size=3, region_size=2).double()
    x = torch.randn(2, 4, 5, 12, dtype=torch.float64)
    a = m.materialize(x)
    assert a.shape == (2, 3, 20, 20)
    torch.testing.assert_close(m.attention_path(x, a) + m.proj.bias, m(x))
    interior = 1 * 5 + 1  # token (1, 1): all 9 taps on the grid
    torch.testing.assert_close(a[:, :, interior].sum(-1), torch.ones(2, 3, dtype=torch.float64))
    assert (a[:, :, interior] != 0).sum(-1).eq(9).all()
    torch.testing.assert_close(m.kernels(x).sum((-2, -1)), torch.ones(2, 3, 4, 5, dtype=torch.float64))
