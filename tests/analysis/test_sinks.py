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
    before = model(x, attention_mask=kpm)
    with torch.no_grad():
        a = model.materialize(x, attention_mask=kpm)
    assert sink_tokens(a, alpha=1.2, attention_mask=kpm)[..., 2:].any()  # there is something to calibrate
    with calibration(model, beta=0.3, alpha=1.2) as names:
        fast = model(x, attention_mask=kpm)
        ref = model(x, attention_mask=kpm, impl="reference")
        inside = model.materialize(x, attention_mask=kpm)
    assert names == ["softmax"]
    expected_a = _slow_calibrate(a, 0.3, 1.2, kpm)
    torch.testing.assert_close(inside, expected_a)
    _, _, v = model.project(x)
    expected = model.out_proj(model.merge_heads(expected_a @ v))
    torch.testing.assert_close(fast, expected)
    torch.testing.assert_close(ref, expected)
    assert not torch.allclose(fast, before)
    torch.testing.assert_close(model(x, attention_mask=kpm), before)  # restored on exit


def test_registered():
    assert attnlab.get("sink-scores", kind="analysis").paper.id == "P068"
    assert attnlab.get("attention-calibration", kind="analysis").paper.id == "P248"
    with pytest.raises(TypeError, match="model"):
        with calibration(torch.nn.Linear(2, 2)):
            pass


def test_runtime_calibration_on_a_transformers_model():
    """ACT on a tiny Llama: the chosen heads' probabilities are calibrated before A·v (checked against
    the loop above and against o_proj(Ã v) written out), other heads untouched, all restored on exit."""
    from attnlab.analysis import capture, tiny_llama

    model = tiny_llama(seed=1).double()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        with capture(model) as att:
            model(input_ids=ids, attention_mask=mask)
    a0 = att.layers[0].to(torch.float64)
    real = mask.bool()
    assert sink_tokens(a0, alpha=1.2, attention_mask=real)[:, :2, 1:].any()  # something to calibrate
    attn = model.model.layers[0].self_attn
    seen = {}
    hook = attn.register_forward_hook(lambda m, args, kwargs, out: seen.update(x=kwargs["hidden_states"], out=out[0]),
                                      with_kwargs=True)
    try:
        with torch.no_grad(), calibration(model, beta=0.3, alpha=1.2, heads={(0, 0), (0, 1)}) as names:
            with capture(model) as inside:
                during = model(input_ids=ids, attention_mask=mask).logits
    finally:
        hook.remove()
    assert names == ["model.layers.0.self_attn"]
    c0 = inside.layers[0].to(torch.float64)
    torch.testing.assert_close(c0[:, :2], _slow_calibrate(a0[:, :2], 0.3, 1.2, real))
    torch.testing.assert_close(c0[:, 2:], a0[:, 2:])
    b, n, _ = seen["x"].shape
    heads, kv, d = 4, 2, attn.head_dim
    v = attn.v_proj(seen["x"]).view(b, n, kv, d).transpose(1, 2).repeat_interleave(heads // kv, dim=1)
    expected = attn.o_proj((c0 @ v).transpose(1, 2).reshape(b, n, heads * d))
    torch.testing.assert_close(seen["out"][real], expected[real])
    assert not torch.allclose(during[real], before[real])
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before, equal_nan=True)
