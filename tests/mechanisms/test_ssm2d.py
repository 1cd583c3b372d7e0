"""2-D SSM: the kernel is the recurrence's impulse response (by hand and step by step), the four directions
combine as flipped-input runs summed, materialize explains the output, the normalised transitions keep the
kernel decaying, masks and bad parameters refused by name."""
from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.core.errors import ShapeError
from attnlab.mechanisms.mixers.ssm2d import (
    DIRECTIONS,
    ssm2d_attention,
    ssm2d_attention_reference,
    ssm2d_kernel,
)

F64 = torch.float64


def parameters(channels: int, states: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random a (4, C, S, 4) with |A1| + |A2|, |A3| + |A4| < 1 (signs mixed), b, c (4, C, S, 2), float64."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.rand(4, channels, states, 4, generator=g, dtype=F64) - 0.5) * 0.9
    b = torch.randn(4, channels, states, 2, generator=g, dtype=F64)
    c = torch.randn(4, channels, states, 2, generator=g, dtype=F64)
    return a, b, c


def only(direction: int, c: torch.Tensor) -> torch.Tensor:
    """c with the output gains of every other direction zero: the layer is that direction's scan alone."""
    kept = torch.zeros_like(c)
    kept[direction] = c[direction]
    return kept


def test_kernel_by_hand_on_the_first_lattice_paths():
    # one state: K[0,0] = C1 B1 + C2 B2; K[0,1] = C1 (A1 B1 + A2 B2) (h^v of (0, 1) sees no row above);
    # K[1,0] = C2 (A3 B1 + A4 B2); K[1,1] = C1 A2 (A3 B1 + A4 B2) + C2 A3 (A1 B1 + A2 B2); K[0,2] = C1 A1 (A1 B1 + A2 B2)
    a1, a2, a3, a4, b1, b2, c1, c2 = 0.3, -0.2, 0.5, 0.4, 1.5, -0.7, 2.0, 0.9
    a = torch.tensor([a1, a2, a3, a4], dtype=F64).expand(4, 1, 1, 4)
    b = torch.tensor([b1, b2], dtype=F64).expand(4, 1, 1, 2)
    c = torch.tensor([c1, c2], dtype=F64).expand(4, 1, 1, 2)
    k = ssm2d_kernel(a, b, c, 2, 3)[0, 0]
    right, down = a1 * b1 + a2 * b2, a3 * b1 + a4 * b2
    want = torch.tensor(
        [[c1 * b1 + c2 * b2, c1 * right, c1 * a1 * right], [c2 * down, c1 * a2 * down + c2 * a3 * right, float("nan")]],
        dtype=F64,
    )
    torch.testing.assert_close(k[0], want[0])
    torch.testing.assert_close(k[1, :2], want[1, :2])


@pytest.mark.parametrize("shape", [(5, 7), (6, 3), (1, 5), (4, 1)])
def test_kernel_equals_the_recurrence_run_step_by_step_on_an_impulse(shape):
    # direction (flip rows, flip columns) starts at the corner it flips to (0, 0): an impulse there, run by the
    # reference's explicit loops with only that direction's output, is the kernel (flipped back)
    h, w = shape
    a, b, c = parameters(2, 3)
    kernels = ssm2d_kernel(a, b, c, h, w)
    for k, (flip_rows, flip_cols) in enumerate(DIRECTIONS):
        impulse = torch.zeros(1, h, w, 2, dtype=F64)
        impulse[0, h - 1 if flip_rows else 0, w - 1 if flip_cols else 0] = 1.0
        response, _ = ssm2d_attention_reference(impulse, a, b, only(k, c))
        dims = [d for d, flip in ((0, flip_rows), (1, flip_cols)) if flip]
        torch.testing.assert_close(response[0].flip(dims).permute(2, 0, 1), kernels[k])


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_directions_are_flipped_input_runs_summed(impl):
    # direction k's output = flip_k(scan with direction k's parameters, run as the unflipped scan, on flip_k(x));
    # the layer = the sum of the four
    a, b, c = parameters(3, 2, seed=1)
    x = torch.randn(2, 5, 6, 3, dtype=F64)

    def layer(x, a, b, c):
        return ssm2d_attention(x, a, b, c) if impl == "fast" else ssm2d_attention_reference(x, a, b, c)[0]

    total = torch.zeros_like(x)
    for k, (flip_rows, flip_cols) in enumerate(DIRECTIONS):
        dims = [d for d, flip in ((1, flip_rows), (2, flip_cols)) if flip]
        as_first = [t.clone() for t in (a, b, c)]
        for t, source in zip(as_first, (a, b, c)):
            t[0] = source[k]
        run = layer(x.flip(dims), *as_first[:2], only(0, as_first[2])).flip(dims)
        torch.testing.assert_close(layer(x, a, b, only(k, c)), run)
        total = total + run
    torch.testing.assert_close(layer(x, a, b, c), total)


def test_the_unflipped_scan_reads_only_the_quadrant_above_left():
    a, b, c = parameters(1, 2, seed=2)
    x = torch.randn(1, 6, 6, 1, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(ssm2d_attention(x, a, b, only(0, c))[0, 3, 2].sum(), x)
    reached = g[0, ..., 0].abs() > 1e-10 * g.abs().max()  # the FFT leaves round-off (~1e-16) outside
    quadrant = (torch.arange(6)[:, None] <= 3) & (torch.arange(6)[None, :] <= 2)
    assert torch.equal(reached, quadrant)


def test_materialize_explains_the_output_and_holds_the_kernels():
    torch.manual_seed(0)
    m = attnlab.build("ssm2d", dim=2, state_dim=3).double()
    x = torch.randn(2, 4, 5, 2, dtype=F64)
    weights = m.materialize(x)
    assert weights.shape == (2, 2, 20, 20)
    torch.testing.assert_close(torch.einsum("bcnm,bmc->bnc", weights, x.reshape(2, 20, 2)).reshape(x.shape), m(x))
    torch.testing.assert_close(m.attention_path(x, weights), m(x))
    # strictly above-left of n only the unflipped scan reaches: M[c, (i, j), (p, q)] = K_0[c, i − p, j − q]
    kernels = ssm2d_kernel(m.transitions(), m.input_gain, m.output_gain, 4, 5)[0].detach()
    for i, j, p, q in [(3, 4, 0, 0), (2, 3, 1, 1), (3, 1, 0, 0), (1, 4, 0, 2)]:
        torch.testing.assert_close(weights[0, :, i * 5 + j, p * 5 + q], kernels[:, i - p, j - q])


def test_normalised_transitions_bound_the_kernel_by_rho_to_the_path_length():
    # A1 + A2 = ρ_h, A3 + A4 = ρ_v, all ≥ 0: |h[p, q]| ≤ ρ^{p+q} max|B| per state, so
    # |K[p, q]| ≤ Σ_s (|C1| + |C2|) max(|B1|, |B2|) ρ_max^{p+q}
    torch.manual_seed(0)
    m = attnlab.build("ssm2d", dim=2, state_dim=4).double()
    a = m.transitions().detach()
    assert (a >= 0).all()
    rho_h, rho_v = a[..., :2].sum(-1), a[..., 2:].sum(-1)
    torch.testing.assert_close(rho_h, torch.sigmoid(m.decay[..., 0]).detach())
    torch.testing.assert_close(rho_v, torch.sigmoid(m.decay[..., 1]).detach())
    kernels = ssm2d_kernel(a, m.input_gain.detach(), m.output_gain.detach(), 40, 40)
    rho = torch.maximum(rho_h, rho_v).amax()
    scale = (m.output_gain.abs().sum(-1) * m.input_gain.abs().amax(-1)).sum(-1).detach()  # (4, C)
    steps = torch.arange(40, dtype=F64)
    bound = scale[..., None, None] * rho ** (steps[:, None] + steps[None, :])
    assert (kernels.abs() <= bound + 1e-12).all()


def test_float32_fast_path_matches_the_float64_reference():
    torch.manual_seed(0)
    m = attnlab.build("ssm2d", dim=4, state_dim=16)
    x = torch.randn(1, 8, 9, 4)
    torch.testing.assert_close(m(x), m(x, impl="reference"), rtol=1e-4, atol=1e-4)


def test_masks_and_bad_parameters_refused_by_name():
    m = attnlab.build("ssm2d", dim=2, state_dim=2)
    x = torch.randn(1, 3, 3, 2)
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(x, key_padding_mask=torch.ones(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention_mask"):
        m(x, attention_mask=torch.ones(1, 9, dtype=torch.bool))
    a, b, c = parameters(2, 3)
    with pytest.raises(ShapeError, match="^a: expected shape"):
        ssm2d_attention(x.double(), a[:2], b, c)
    with pytest.raises(ShapeError, match="^b: expected 3 channels"):
        ssm2d_attention(torch.randn(1, 3, 3, 3, dtype=F64), parameters(3, 3)[0], b, c)
    with pytest.raises(TypeError, match="^a: expected dtype"):
        ssm2d_attention(x, a, b, c)
    with pytest.raises(ValueError, match="state_dim"):
        attnlab.build("ssm2d", dim=2, state_dim=0)
