"""PKCAM (P184): ECA's adaptive kernel size, the global branch reads only earlier layers, the scales by hand, and the
generic suite on the full module (previous descriptors held fixed)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import attnlab
from attnlab.core.registry import Paper, Supports, register, remove
from attnlab.mechanisms.mixers.pkcam import (
    PKCAM,
    adaptive_kernel_size,
    channel_descriptor,
    pkcam_attention_reference,
    pkcam_scales,
)
from attnlab.testing import run_all


@pytest.mark.parametrize(("channels", "k"), [(1, 1), (4, 1), (8, 3), (16, 3), (32, 3), (64, 3), (128, 5), (256, 5),
                                             (512, 5), (1024, 5), (2048, 7), (100, 3), (3000, 7)])
def test_adaptive_kernel_size(channels: int, k: int) -> None:
    """k = odd(|log2 C + 1| / 2): the value truncated to an int, plus one when even (values written by hand)."""
    t = int(abs(math.log2(channels) + 1) / 2)
    assert k == (t if t % 2 else t + 1)
    assert adaptive_kernel_size(channels) == k
    module = attnlab.build("pkcam", dim=channels, previous_layers=1)
    assert module.kernel_size == k and module.local_kernel.shape == (k,) and module.global_kernel.shape == (k,)


def _module(channels: int = 6, layers: int = 2, **kw: object) -> PKCAM:
    torch.manual_seed(0)
    return attnlab.build("pkcam", dim=channels, previous_layers=layers, **kw).double()


def test_global_branch_reads_only_earlier_layers() -> None:
    """With the local branch switched off (a = 0), s depends on the previous descriptors and not on the current map:
    zero gradient of s with respect to x, a non-zero one for every previous layer; the code's include_current variant
    does read x (the test can tell)."""
    m = _module()
    with torch.no_grad():
        m.fusion[0] = 0.0
        m.fusion[1] = 2.0
        m.layer_weights.copy_(torch.tensor([0.7, 1.3]))  # g > 0: the ReLU passes every layer
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    previous = torch.randn(2, 2, 6, generator=gen, dtype=torch.float64).abs().requires_grad_(True)
    for scales in (m.scales(x, previous), pkcam_scales(x, previous, **m._options())):  # reference, fast path
        gx, gp = torch.autograd.grad(scales.sum(), (x, previous))
        assert gx.abs().max() == 0
        assert all(gp[:, j].abs().max() > 0 for j in range(2))
    shifted = x.detach() + 3 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(m.scales(shifted, previous), m.scales(x, previous))
    with_current = _module(include_current=True)
    with torch.no_grad():
        with_current.fusion[0] = 0.0
        with_current.layer_weights.copy_(torch.tensor([0.7, 1.3, 0.9]))
    (gx,) = torch.autograd.grad(with_current.scales(x, previous.detach()).sum(), x)
    assert gx.abs().max() > 0


def test_scales_by_hand() -> None:
    """C = 3, k = 3, L = 2: z the channel means; s_loc = σ(conv(z)) with zero padding; g = ReLU(w_1 z_1 + w_2 z_2);
    s_glob = σ(conv'(g)); s = σ(a s_loc + b s_glob); Y = X (1 + s)."""
    m = attnlab.build("pkcam", dim=3, previous_layers=2, kernel_size=3).double()
    with torch.no_grad():
        m.local_kernel.copy_(torch.tensor([0.5, -1.0, 0.25]))
        m.global_kernel.copy_(torch.tensor([1.0, 0.0, -0.5]))
        m.layer_weights.copy_(torch.tensor([1.0, -2.0]))
        m.fusion.copy_(torch.tensor([0.75, 1.5]))
    x = torch.tensor([[[[1.0, 2.0, 0.0], [3.0, 0.0, -2.0]]]], dtype=torch.float64)  # (1, 1, 2, 3)
    z = [2.0, 1.0, -1.0]
    z1, z2 = [1.0, 1.0, 4.0], [0.0, 1.0, 1.0]
    loc = [0.5 * 0 - 1.0 * z[0] + 0.25 * z[1], 0.5 * z[0] - 1.0 * z[1] + 0.25 * z[2], 0.5 * z[1] - 1.0 * z[2] + 0]
    g = [max(0.0, a - 2 * b) for a, b in zip(z1, z2)]  # [1, 0, 2]
    glo = [1.0 * 0 - 0.5 * g[1], 1.0 * g[0] - 0.5 * g[2], 1.0 * g[1] - 0.5 * 0]
    sig = lambda t: 1 / (1 + math.exp(-t))  # noqa: E731
    s = torch.tensor([sig(0.75 * sig(a) + 1.5 * sig(b)) for a, b in zip(loc, glo)], dtype=torch.float64)
    previous = torch.tensor([[z1, z2]], dtype=torch.float64)
    want = x * (1 + s)
    torch.testing.assert_close(m(x, previous), want)
    torch.testing.assert_close(m(x, previous, impl="reference"), want)
    torch.testing.assert_close(m.scales(x, previous)[0], s)
    a = m.materialize(x, previous)
    torch.testing.assert_close(torch.einsum("bcnm,bmc->bnc", a, x.reshape(1, 2, 3)), (want - x).reshape(1, 2, 3))


def test_narrower_layers_are_tiled() -> None:
    """A previous layer of C/2 channels counts as its descriptor repeated twice (the code's `repeat`)."""
    m = _module(channels=6, layers=2)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 2, 2, 6, generator=gen, dtype=torch.float64)
    early = channel_descriptor(torch.randn(2, 4, 4, 3, generator=gen, dtype=torch.float64))
    late = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    want = m(x, torch.stack([early.repeat(1, 2), late], 1))
    for impl in ("fast", "reference"):
        torch.testing.assert_close(m(x, [early, late], impl=impl), want)
    with pytest.raises(ValueError, match=r"previous\[0\]: expected \(batch, C_j\)"):
        m(x, [torch.randn(2, 4, dtype=torch.float64), late])
    with pytest.raises(ValueError, match="previous: expected the descriptors of 2 previous layers"):
        m(x)
    with pytest.raises(ValueError, match="previous: this module reads no previous layer"):
        _module(layers=0)(x, late[:, None])


def test_no_previous_layer_is_eca() -> None:
    """previous_layers = 0: s = σ(Conv1D_k(GAP x)), ECA."""
    m = _module(channels=16, layers=0)  # k = 3
    x = torch.randn(2, 3, 3, 16, dtype=torch.float64)
    z = x.mean((1, 2))
    s = torch.sigmoid(torch.nn.functional.conv1d(z[:, None], m.local_kernel[None, None], padding=m.kernel_size // 2)[:, 0])
    torch.testing.assert_close(pkcam_attention_reference(x, None, **m._options())[0], x * (1 + s[:, None, None]))
    torch.testing.assert_close(m(x), x * (1 + s[:, None, None]))


class _FixedPrevious(PKCAM):
    """PKCAM whose previous descriptors are a fixed buffer (one per layer, shared by the batch): the full module
    under the generic suite's one-input contract."""

    fixed: Tensor

    def __init__(self, dim: int, heads: int = 8, **kw: object) -> None:
        super().__init__(dim, heads, **kw)  # type: ignore[arg-type]
        self.register_buffer("fixed", torch.randn(1, self.previous_layers, dim).abs())

    def forward(self, x: Tensor, previous: object = None, **kw: object) -> Tensor:  # type: ignore[override]
        return super().forward(x, self.fixed.expand(x.shape[0], -1, -1), **kw)  # type: ignore[arg-type]

    def materialize(self, x: Tensor, previous: object = None, **kw: object) -> Tensor:  # type: ignore[override]
        return super().materialize(x, self.fixed.expand(x.shape[0], -1, -1), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("include_current", [False, True])
def test_generic_suite_with_the_global_branch(include_current: bool) -> None:
    name = f"test-pkcam-fixed-{include_current}"
    register(name=name, paper=Paper(None, "test", 2026), family="B", cost="O(N·C)", exponent=1.0,
             supports=Supports(grids=(2,)), normalized=False,
             test_params={"previous_layers": 3, "include_current": include_current},
             params=PKCAM.spec.params[4:])(type("Fixed", (_FixedPrevious,), {}))
    try:
        run_all(attnlab.get(name))
    finally:
        remove(name)
