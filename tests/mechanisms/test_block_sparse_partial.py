"""The block-sparse kernel when N is not a multiple of the block size and nothing else masks: no mask_mod, no key
padding (the one case no registered mechanism reaches — each passes a mask_mod or pads itself). The partial last
block's missing keys must stay out of every softmax. Oracle: a float64 softmax over the layout's elements, written
here from the definition (exp and sum), sharing nothing with the kernel."""
from __future__ import annotations

import math

import pytest
import torch

from attnlab.kernels.block_sparse import BlockLayout, block_sparse_attention, block_sparse_attention_reference


def _oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor, b: int) -> torch.Tensor:
    """softmax over the keys j < n_k whose block is chosen for query i's block, by loops over rows."""
    rows = []
    for h in range(q.shape[1]):
        hb = blocks[h if blocks.shape[0] > 1 else 0]
        for i in range(q.shape[2]):
            keys = [j for j in range(k.shape[2]) if hb[i // b, j // b]]
            s = torch.stack([(q[:, h, i].double() * k[:, h, j].double()).sum(-1) for j in keys], -1) / math.sqrt(q.shape[-1])
            w = (s - s.amax(-1, keepdim=True)).exp()
            w = w / w.sum(-1, keepdim=True)
            rows.append(sum(w[:, t, None] * v[:, h, j].double() for t, j in enumerate(keys)))
    return torch.stack(rows, 1).view(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])


def _inputs(n: int, heads: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, heads, n, 4, generator=gen, dtype=torch.float64) for _ in range(3))  # type: ignore[return-value]


@pytest.mark.parametrize(("n", "b", "heads"), [(9, 4, 3), (10, 3, 1), (7, 2, 6)])
def test_partial_last_block_without_any_mask_matches_the_oracle(n: int, b: int, heads: int) -> None:
    nb = -(-n // b)
    gen = torch.Generator().manual_seed(n)
    blocks = torch.rand(heads, nb, nb, generator=gen) > 0.4
    blocks[:, :, -1] = True  # every row reads the partial last block
    layout = BlockLayout.from_mask(blocks, b)
    q, k, v = _inputs(n, heads)
    want = _oracle(q, k, v, blocks, b)
    torch.testing.assert_close(block_sparse_attention(q, k, v, layout), want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(block_sparse_attention_reference(q, k, v, layout)[0], want, atol=1e-10, rtol=1e-10)


def test_partial_last_block_gradients_match_the_oracle() -> None:
    n, b, heads = 9, 4, 3
    blocks = torch.ones(heads, 3, 3, dtype=torch.bool).tril()
    blocks[:, :, -1] = True
    layout = BlockLayout.from_mask(blocks, b)
    q, k, v = (t.requires_grad_(True) for t in _inputs(n, heads, seed=1))
    w = torch.randn(2, heads, n, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = torch.autograd.grad((block_sparse_attention(q, k, v, layout) * w).sum(), (q, k, v))
    want = torch.autograd.grad((_oracle(q, k, v, blocks, b) * w).sum(), (q, k, v))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10)


def test_a_row_reading_only_the_partial_block_normalises_over_its_real_keys() -> None:
    """n = 5, B = 4: the last block holds one real key; a row that reads only that block gives exactly its value."""
    q, k, v = _inputs(5, 1, seed=3)
    blocks = torch.tensor([[[True, False], [False, True]]])
    out = block_sparse_attention(q, k, v, BlockLayout.from_mask(blocks, 4))
    torch.testing.assert_close(out[:, :, 4], v[:, :, 4], atol=1e-12, rtol=0)
