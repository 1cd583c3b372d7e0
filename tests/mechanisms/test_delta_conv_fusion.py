"""ΔConvFusion (P012): the pyramid block's matrices by hand, materialize explains the output, and MSE
distillation from an attention layer lowers the error on held-out inputs."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import attnlab
from attnlab.mechanisms.mixers.delta_conv_fusion import DeltaConvBlock, delta_conv_fusion_mix, distill


def test_a_pooled_stage_and_the_pooling_branch_by_hand() -> None:
    """One channel, 3×3 grid, scale 2, 1×1 kernel of 1, γ = 0.5: M[n, m] = 1/|block| when n and m share a 2×2
    block (blocks clipped at the border: sizes 4, 2, 2, 1), plus 0.5/9 everywhere."""
    m = DeltaConvBlock(1, kernel_size=1, scales=(2,)).double()
    with torch.no_grad():
        m.kernels[0].fill_(1.0)
        m.pool_scale.fill_(0.5)
    block = [[0, 0, 1], [0, 0, 1], [2, 2, 3]]
    size = {0: 4, 1: 2, 2: 2, 3: 1}
    cells = [block[y][x] for y in range(3) for x in range(3)]
    want = torch.tensor([[(1 / size[a] if a == b else 0.0) + 0.5 / 9 for b in cells] for a in cells], dtype=torch.float64)
    got = m.materialize(torch.randn(2, 3, 3, 1, dtype=torch.float64))
    torch.testing.assert_close(got, want.expand(2, 1, 9, 9))
    h = torch.randn(1, 3, 3, 1, dtype=torch.float64)
    fast = delta_conv_fusion_mix(h, list(m.kernels), (2,), m.pool_scale)
    torch.testing.assert_close(fast.reshape(9), want @ h.reshape(9))


def test_unpooled_stage_is_a_depthwise_convolution_of_an_impulse() -> None:
    """Scale 1: an impulse at the centre of a 5×5 grid comes out as the kernel flipped (cross-correlation) around it."""
    gen = torch.Generator().manual_seed(0)
    kernel = torch.randn(2, 3, 3, generator=gen, dtype=torch.float64)
    h = torch.zeros(1, 5, 5, 2, dtype=torch.float64)
    h[0, 2, 2] = 1.0
    out = delta_conv_fusion_mix(h, [kernel], (1,), torch.zeros(2, dtype=torch.float64))
    want = torch.zeros(5, 5, 2, dtype=torch.float64)
    want[1:4, 1:4] = kernel.flip(1, 2).permute(1, 2, 0)
    torch.testing.assert_close(out[0], want)


def test_materialize_explains_the_output() -> None:
    torch.manual_seed(0)
    m = DeltaConvBlock(6, kernel_size=3, scales=(1, 2, 4)).double()
    with torch.no_grad():
        m.pool_scale.normal_()
    x = torch.randn(2, 5, 7, 6, dtype=torch.float64)
    a = m.materialize(x)
    assert a.shape == (2, 6, 35, 35)
    torch.testing.assert_close(m.attention_path(x, a) + m.proj_out.bias, m(x))
    torch.testing.assert_close(m(x, impl="reference"), m(x))


def test_distillation_reduces_the_held_out_error_to_the_teacher() -> None:
    torch.manual_seed(0)
    teacher = attnlab.build("neighborhood", dim=8, heads=2, kernel_size=3).double().eval()
    student = DeltaConvBlock(8, kernel_size=3, scales=(1, 2)).double()
    gen = torch.Generator().manual_seed(1)
    train = torch.randn(16, 6, 6, 8, generator=gen, dtype=torch.float64)
    held_out = torch.randn(16, 6, 6, 8, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        target = teacher(held_out)
        before = F.mse_loss(student(held_out), target).item()
    history = distill(student, teacher, train, steps=150, lr=1e-2)
    with torch.no_grad():
        after = F.mse_loss(student(held_out), target).item()
    assert len(history) == 151 and history[-1] < 0.5 * history[0]
    assert after < 0.5 * before, (before, after)
    assert all(not p.requires_grad or p.grad is None for p in teacher.parameters())  # the teacher is not trained
