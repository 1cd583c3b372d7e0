"""Head statistics against slow loops written here, on MiniLM (padded batch) and a tiny Llama."""
import math

import pytest
import torch

from attnlab.analysis import (
    attention_entropy,
    capture,
    duplicate_token_score,
    induction_score,
    mean_attention_distance,
    offset_attention,
    previous_token_score,
    query_key_nmi,
    tiny_llama,
)


def _per_head(eager, mask, fn):
    """fn(A (n, n) of real tokens) for every layer, sequence and head: (layers, batch, heads)."""
    out = torch.zeros(len(eager), eager[0].shape[0], eager[0].shape[1], dtype=torch.float64)
    for layer, e in enumerate(eager):
        for b in range(e.shape[0]):
            real = mask[b].nonzero().flatten().tolist()
            for h in range(e.shape[1]):
                a = e[b, h].double()[real][:, real]
                out[layer, b, h] = fn(a, real)
    return out


def _distance(a, real):
    return sum(a[i, j].item() * abs(real[i] - real[j]) for i in range(len(real)) for j in range(len(real))) / len(real)


def _entropy(a, real):
    total = 0.0
    for i in range(len(real)):
        total -= sum(p * math.log(p) for p in a[i].tolist() if p > 0)
    return total / len(real)


def _nmi(a, real):
    n = len(real)
    joint = a / n
    pk = joint.sum(0)
    mi = sum(
        joint[i, j].item() * math.log(joint[i, j].item() / (pk[j].item() / n))
        for i in range(n) for j in range(n) if joint[i, j] > 0
    )
    hk = -sum(p * math.log(p) for p in pk.tolist() if p > 0)
    return mi / math.sqrt(math.log(n) * hk)


def _offset(offset):
    def score(a, real):
        vals = [a[i, i + offset].item() for i in range(len(real)) if 0 <= i + offset < len(real)]
        return sum(vals) / len(vals)

    return score


@pytest.mark.parametrize(
    "stat, slow",
    [
        (mean_attention_distance, _distance),
        (attention_entropy, _entropy),
        (query_key_nmi, _nmi),
        (lambda att: offset_attention(att, -1), _offset(-1)),
        (lambda att: offset_attention(att, 2), _offset(2)),
    ],
)
def test_statistics_match_slow_loops_on_minilm(minilm_capture, stat, slow):
    att, eager, mask = minilm_capture  # right padding: real tokens are 0..n-1, so index gaps are positions
    got = stat(att)
    assert got.shape == (6, 2, 12)
    torch.testing.assert_close(got, _per_head(eager, mask, slow), rtol=1e-5, atol=1e-6)


def test_single_map_and_positions(minilm_capture):
    att, eager, mask = minilm_capture
    one = mean_attention_distance(att.layers[3], attention_mask=mask)
    assert one.shape == (2, 12)
    # with only 1-D coordinates equal to the token index, positions give the same distances
    n = mask.shape[1]
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    torch.testing.assert_close(mean_attention_distance(att.layers[3], positions=pos, attention_mask=mask), one)
    # a padded batch changes nothing for the unpadded sequence
    torch.testing.assert_close(one[1], mean_attention_distance(att.layers[3][1:2], attention_mask=mask[1:2])[0])


def _pattern_share(a, tokens, rule):
    n = a.shape[-1]
    hit = sum(a[i, j].item() for i in range(n) for j in range(n) if rule(tokens, i, j))
    return hit / a.sum().item()


def _prev(tok, i, j):
    return j == i - 1


def _dup(tok, i, j):
    return j < i and tok[j] == tok[i]


def _ind(tok, i, j):
    return 1 <= j <= i and tok[j - 1] == tok[i] and j - 1 < i


@pytest.mark.parametrize("stat, rule", [(previous_token_score, _prev), (duplicate_token_score, _dup), (induction_score, _ind)])
def test_pattern_scores_match_slow_loops_on_tiny_llama(stat, rule):
    model = tiny_llama(2)
    half = torch.randint(3, 20, (2, 6), generator=torch.Generator().manual_seed(4))
    ids = torch.cat([half, half], dim=1)  # repeated halves: duplicates and induction targets exist
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on the second sequence
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        with capture(model) as att:
            model(input_ids=ids, attention_mask=mask)
    got = stat(att)
    assert got.shape == (2, 2, 4)
    real = mask.bool()
    for layer, e in enumerate(eager):
        for b in range(2):
            idx = real[b].nonzero().flatten()
            tok = ids[b, idx].tolist()
            for h in range(4):
                a = e[b, h].double()[idx][:, idx]
                assert abs(got[layer, b, h].item() - _pattern_share(a, tok, rule)) < 1e-6


def test_pattern_scores_need_tokens(minilm_capture):
    att, _, _ = minilm_capture
    with pytest.raises(ValueError, match="tokens"):
        induction_score(att.layers)
