"""Attention sinks (P068, P248): scores, sink tokens, ACT calibration on maps and at run time."""
import pytest
import torch

import attnlab
from attnlab.analysis.sinks import calibrate, calibration, sink_scores, sink_tokens


def _slow_scores(a, mask):
    b, h, n, _ = a.shape
    out = torch.zeros(b, h, n, dtype=torch.float64)
    for bi in range(b):
        real = [i for i in range(n) if mask[bi, i]]
        for hi in range(h):
            for j in real:
                out[bi, hi, j] = sum(float(a[bi, hi, i, j]) for i in real) / len(real)
    return out


def _slow_calibrate(a, beta, alpha, mask):
    a = a.clone().to(torch.float64)
    b, h, n, _ = a.shape
    for bi in range(b):
        real = [i for i in range(n) if mask[bi, i]]
        for hi in range(h):
            score = {j: sum(float(a[bi, hi, i, j]) for i in real) / len(real) for j in real}
            sinks = [j for j in real[1:] if score[j] > alpha / len(real)]
            for i in range(n):
                row = a[bi, hi, i].clone()
                removed = (1 - beta) * sum(float(row[j]) for j in sinks)
                rest = sum(float(row[j]) for j in range(n) if j not in sinks)
                if rest == 0:
                    continue
                for j in range(n):
                    a[bi, hi, i, j] = row[j] * beta if j in sinks else row[j] + removed * float(row[j]) / rest
    return a


def _maps(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    logits[:, :, :, 3] += 3.0  # a hidden (non-initial) sink at key 3
    logits[:, :, :, 0] += 2.0
    mask = torch.tensor([[True] * 6, [False, False, True, True, True, True]])  # sequence 1 left-padded
    logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    a = logits.softmax(-1) * mask[:, None, :, None]
    return a, mask


def test_sink_scores_match_a_loop_and_ignore_padding():
    a, mask = _maps()
    s = sink_scores(a, attention_mask=mask)
    torch.testing.assert_close(s, _slow_scores(a, mask))
    assert (s[1, :, :2] == 0).all()
    torch.testing.assert_close(s.sum(-1), torch.ones(2, 3, dtype=torch.float64))  # real rows sum to 1


def test_sink_tokens_threshold_and_alpha():
    a, mask = _maps()
    found = sink_tokens(a, alpha=1.5, attention_mask=mask)
    slow = _slow_scores(a, mask)
    n_real = mask.sum(-1).to(torch.float64)[:, None, None]
    assert torch.equal(found, (slow > 1.5 / n_real) & mask[:, None, :])
    assert found[:, :, 3].all()
    fixed = sink_tokens(a, threshold=0.3, attention_mask=mask)
    assert torch.equal(fixed, (slow > 0.3) & mask[:, None, :])


def test_calibrate_matches_a_loop():
    a, mask = _maps(1)
    out = calibrate(a, beta=0.4, alpha=1.5, key_mask=mask)
    expected = _slow_calibrate(a, 0.4, 1.5, mask)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.sum(-1), a.sum(-1))  # rows keep their mass
    assert not torch.allclose(out, a)
    # the first real token is never calibrated, even when it is a sink
    assert (out[0, :, :, 0] >= a[0, :, :, 0] - 1e-12).all()
    assert (out[1, :, :, :2] == 0).all()


def test_calibrate_only_chosen_heads_and_bad_inputs():
    a, mask = _maps(2)
    out = calibrate(a, beta=0.5, alpha=1.5, key_mask=mask, heads=[1])
    torch.testing.assert_close(out[:, [0, 2]], a[:, [0, 2]])
    assert not torch.allclose(out[:, 1], a[:, 1])
    with pytest.raises(ValueError, match="beta"):
        calibrate(a, beta=1.5)
    with pytest.raises(ValueError, match="weights"):
        calibrate(a[0])


def test_runtime_calibration_on_an_attnlab_model():
    torch.manual_seed(0)
    model = attnlab.build("softmax", dim=8, heads=2, causal=True).double()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    kpm = torch.tensor([[True] * 7, [False] + [True] * 6])
    before = model(x, key_padding_mask=kpm)
    with torch.no_grad():
        a = model.materialize(x, key_padding_mask=kpm)
    assert sink_tokens(a, alpha=1.2, attention_mask=kpm)[..., 2:].any()  # there is something to calibrate
    with calibration(model, beta=0.3, alpha=1.2) as names:
        fast = model(x, key_padding_mask=kpm)
        ref = model(x, key_padding_mask=kpm, impl="reference")
        inside = model.materialize(x, key_padding_mask=kpm)
    assert names == ["softmax"]
    expected_a = _slow_calibrate(a, 0.3, 1.2, kpm)
    torch.testing.assert_close(inside, expected_a)
    _, _, v = model.project(x)
    expected = model.out_proj(model.merge_heads(expected_a @ v))
    torch.testing.assert_close(fast, expected)
    torch.testing.assert_close(ref, expected)
    assert not torch.allclose(fast, before)
    torch.testing.assert_close(model(x, key_padding_mask=kpm), before)  # restored on exit


def test_registered():
    assert attnlab.get("sink-scores", kind="analysis").paper.id == "P068"
    assert attnlab.get("attention-calibration", kind="analysis").paper.id == "P248"
    with pytest.raises(TypeError, match="model"):
        with calibration(torch.nn.Linear(2, 2)):
            pass
