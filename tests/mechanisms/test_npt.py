"""NPT (P030): ABD mixes rows over their flattened embeddings, ABA stays within a row (by gradients); both
layers' weights and outputs by hand from the paper's equations; masked cells hide their value."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import attnlab
from attnlab.mechanisms.tables.npt import AttributeAttention, DatapointAttention, NonParametricTransformer, NPTModel

ROWS, F_, E = 6, 3, 8


def _npt(**over: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return attnlab.build("npt", **{"dim": E, "heads": 2, "attributes": F_, "depth": 1, **over}).double()


def _table(batch: int = 2, seed: int = 1) -> Tensor:
    return torch.randn(batch, ROWS, F_, E, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _row_jacobian_norms(layer: torch.nn.Module, x: Tensor, keep: Tensor | None, impl: str) -> Tensor:
    """|∂ out[0, r] / ∂ x[0, s]| summed over cells and channels: (rows r, rows s)."""

    def run(t: Tensor) -> Tensor:
        if impl == "fast":
            return layer(t, keep)
        return layer.reference(t, keep)[0]

    jac = torch.autograd.functional.jacobian(run, x[:1])  # (1, R, F, E, 1, R, F, E)
    return jac[0].abs().sum(dim=(1, 2, 5, 6))[:, 0]  # (R, R)


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_abd_mixes_rows_and_aba_stays_within_a_row(impl: str) -> None:
    m = _npt()
    abd, aba = m.layers
    assert isinstance(abd, DatapointAttention) and isinstance(aba, AttributeAttention)
    x = _table()
    off = ~torch.eye(ROWS, dtype=torch.bool)
    through_abd = _row_jacobian_norms(abd, x, None, impl)
    assert through_abd[off].min() > 1e-6, "ABD: a row's output does not depend on some other row"
    through_aba = _row_jacobian_norms(aba, x, None, impl)
    assert through_aba[off].max() == 0.0, "ABA: a row's output depends on another row"
    assert through_aba.diagonal().min() > 1e-6
    # padded rows reach no real row through ABD
    keep = torch.tensor([[True, True, False, True, False, True]])
    padded = _row_jacobian_norms(abd, x, keep, impl)
    assert padded[keep[0]][:, ~keep[0]].max() == 0.0 and padded[keep[0]][:, keep[0]][off[keep[0]][:, keep[0]]].min() > 1e-6


def test_aba_mixes_the_cells_of_a_row() -> None:
    aba = _npt().layers[1]
    x = _table()[:1]
    jac = torch.autograd.functional.jacobian(lambda t: aba(t, None), x)[0, 0, :, :, 0, 0]  # (F, E, F, E) of row 0
    cells = jac.abs().sum(dim=(1, 3))
    assert cells.min() > 1e-6, "ABA: a cell does not read every cell of its row"


def _ln(z: Tensor, norm: torch.nn.LayerNorm) -> Tensor:
    return F.layer_norm(z, z.shape[-1:], norm.weight, norm.bias, norm.eps)


def _block_by_hand(block: torch.nn.Module, tokens: Tensor, keep: Tensor | None, form: str) -> tuple[Tensor, Tensor]:
    """One pre-LN block on tokens (..., n, w), heads split by hand: (out, weights (..., heads, n, n)). form
    "standard": q, k, v of LN(tokens), logits / √(w / heads), identity residual; "official" (the official code's
    MAB): q of LN(tokens), k and v of the tokens, logits / √w, residual tokens W^res + b^res."""
    heads, w = block.heads, tokens.shape[-1]
    z = _ln(tokens, block.norm1)
    source = tokens if form == "official" else z
    scale = math.sqrt(w if form == "official" else w // heads)
    outs, weights = [], []
    for h in range(heads):
        cols = slice(h * w // heads, (h + 1) * w // heads)
        q = z @ block.query.weight[cols].T + block.query.bias[cols]
        k = source @ block.key.weight[cols].T + block.key.bias[cols]
        v = source @ block.value.weight[cols].T + block.value.bias[cols]
        logits = q @ k.transpose(-1, -2) / scale
        if keep is not None:
            logits = logits.masked_fill(~keep[..., None, :], float("-inf"))
        a = torch.softmax(logits, -1)
        outs.append(a @ v)
        weights.append(a)
    skip = tokens @ block.residual.weight.T + block.residual.bias if form == "official" else tokens
    mid = skip + torch.cat(outs, -1) @ block.out.weight.T + block.out.bias
    hidden = F.gelu(_ln(mid, block.norm2) @ block.hidden.weight.T + block.hidden.bias)
    return mid + hidden @ block.back.weight.T + block.back.bias, torch.stack(weights, -3)


@pytest.mark.parametrize("form", ["standard", "official"])
def test_abd_by_hand_over_the_flattened_rows(form: str) -> None:
    m = _npt(form=form)
    x, keep = _table(), torch.tensor([[True] * ROWS, [True, False, True, True, True, False]])
    rows = x.reshape(2, ROWS, F_ * E)  # row i = concat of its f cells: width f·e
    want, a = _block_by_hand(m.layers[0], rows, keep, form)
    a = a * keep[:, None, :, None]
    torch.testing.assert_close(m.materialize(x, row_mask=keep), a)
    for impl in ("fast", "reference"):
        got = m.layers[0](x, keep) if impl == "fast" else m.layers[0].reference(x, keep)[0]
        torch.testing.assert_close(got[keep], want.reshape(2, ROWS, F_, E)[keep])


@pytest.mark.parametrize("form", ["standard", "official"])
def test_aba_by_hand_within_each_row_and_the_stack_order(form: str) -> None:
    m = _npt(form=form)
    x = _table()
    abd_out, _ = _block_by_hand(m.layers[0], x.reshape(2, ROWS, F_ * E), None, form)
    h = abd_out.reshape(2, ROWS, F_, E)
    want, b = _block_by_hand(m.layers[1], h, None, form)  # the cells of a row are the tokens
    torch.testing.assert_close(m.materialize_attributes(x), b)
    torch.testing.assert_close(m(x), want)  # ABD then ABA
    torch.testing.assert_close(m(x, impl="reference"), want)


def test_official_form_fast_matches_reference_with_gradients() -> None:
    m = _npt(form="official", depth=2)
    x, keep = _table(), torch.tensor([[True] * ROWS, [False, True, True, False, True, True]])
    params = [x.clone().requires_grad_(True)] + list(m.parameters())
    fast = torch.autograd.grad((m(params[0], row_mask=keep) ** 2).sum(), params)
    ref = torch.autograd.grad((m(params[0], row_mask=keep, impl="reference") ** 2).sum(), params)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="parameter 'form' expected one of"):
        attnlab.build("npt", dim=8, heads=2, form="offical")
    with pytest.raises(ValueError, match="^form: expected one of"):
        NonParametricTransformer(8, 2, form="offical")


def test_depth_stacks_abd_aba_pairs() -> None:
    m = _npt(depth=3)
    assert [type(layer).__name__ for layer in m.layers] == ["DatapointAttention", "AttributeAttention"] * 3
    x = _table()
    h = x
    for layer in m.layers:
        h = layer(h, None)
    torch.testing.assert_close(m(x), h)
    assert m.materialize(x, layer=-1).shape == (2, 2, ROWS, ROWS)


def test_masked_cells_hide_their_value_and_the_loss_scores_only_them() -> None:
    torch.manual_seed(0)
    model = NPTModel((3, 5, 4), dim=8, heads=2).double()
    gen = torch.Generator().manual_seed(2)
    values = torch.stack([torch.randint(0, c, (2, 5), generator=gen) for c in (3, 5, 4)], -1)
    masked = torch.rand(2, 5, 3, generator=gen) < 0.4
    masked[0, 0, 1] = True
    other = values.clone()
    other[masked] = 0  # a masked cell's value is not seen
    for a, b in zip(model(values, masked), model(other, masked)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    unmasked = masked.clone()
    unmasked[0, 0, 1] = False  # the mask bit itself is an input: revealing a cell changes the output
    assert not torch.allclose(model(values, masked)[1], model(values, unmasked)[1])
    logits = model(values, masked)
    terms = [-torch.log_softmax(logits[j][b, r], -1)[values[b, r, j]] for b, r, j in masked.nonzero().tolist()]
    torch.testing.assert_close(model.masked_loss(values, masked), torch.stack(terms).mean())
    with pytest.raises(ValueError, match=r"^values: expected classes in \[0, categories\)"):
        model(values + 5, masked)
    with pytest.raises(ValueError, match=r"^masked: expected a bool tensor"):
        model(values, masked.long())
