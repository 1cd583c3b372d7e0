"""Lookback Lens (P220): ratios against explicit loops on a padded tiny Llama, means not sums, the detector."""
import json

import pytest
import torch

from attnlab.analysis import capture, tiny_llama
from attnlab.analysis.lookback import LookbackDetector, lookback_features, lookback_ratio
from attnlab.core import registry


def _batch(side):
    """Two sequences of 10 slots: sequence 0 has 7 real tokens (padded on `side`), sequence 1 has 10."""
    torch.manual_seed(1)
    ids = torch.randint(3, 64, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    if side == "left":
        mask[0, :3] = 0
    else:
        mask[0, 7:] = 0
    ids[mask == 0] = 0
    return ids, mask


def _loop_ratios(eager, mask, context):
    """{(layer, b, head, real query index i): LR} by explicit loops over the real tokens only."""
    out = {}
    for layer, a in enumerate(eager):
        for b in range(mask.shape[0]):
            real = [p for p in range(mask.shape[1]) if mask[b, p]]
            n = context[b]
            for h in range(a.shape[1]):
                for t in range(n, len(real)):
                    row = a[b, h, real[t]].double()
                    ctx = sum(float(row[real[j]]) for j in range(n)) / n
                    new_keys = range(n, t + 1)
                    new = sum(float(row[real[j]]) for j in new_keys) / len(new_keys)
                    out[layer, b, h, real[t]] = ctx / (ctx + new)
    return out


@pytest.mark.parametrize("side", ["left", "right"])
def test_ratio_matches_explicit_loops_on_a_padded_tiny_llama(side):
    model = tiny_llama(5)
    ids, mask = _batch(side)
    context = [3, 6]  # different context lengths; contexts and generated parts of different lengths
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        with capture(model) as att:
            model(input_ids=ids, attention_mask=mask)
    lr = lookback_ratio(att, context)
    assert lr.shape == (2, 2, 4, 10) and lr.dtype == torch.float64
    expected = _loop_ratios(eager, mask.bool(), context)
    got = torch.zeros_like(lr)
    for (layer, b, h, i), v in expected.items():
        got[layer, b, h, i] = v
    torch.testing.assert_close(lr, got, rtol=0, atol=1e-6)
    # padded positions and context positions score 0, generated positions are proper ratios
    assert lr[:, 0, :, ~mask[0].bool()].abs().max() == 0
    assert len(expected) == 2 * 4 * ((7 - 3) + (10 - 6))
    assert bool(((lr > 0) == (got > 0)).all())

    # features: mean over a span of generated steps, layer-major
    feats = lookback_features(att, torch.tensor(context), span=(1, 3))
    assert feats.shape == (2, 2 * 4)
    for b in range(2):
        real = [p for p in range(10) if mask[b, p]]
        span_rows = [real[context[b] + s] for s in (1, 2)]
        for layer in range(2):
            for h in range(4):
                want = sum(expected[layer, b, h, i] for i in span_rows) / 2
                assert abs(float(feats[b, layer * 4 + h]) - want) < 1e-6
    full = lookback_features(att, context)
    for b in range(2):
        rows = [i for (layer, bb, h, i) in expected if bb == b and layer == 1 and h == 2]
        want = sum(expected[1, b, 2, i] for i in rows) / len(rows)
        assert abs(float(full[b, 4 + 2]) - want) < 1e-6


def test_means_not_sums_regression():
    """Uniform attention over 4 context and 2 generated keys: means give 1/2, sums would give 2/3."""
    a = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    a[0, 0, 5, :] = 1 / 6  # the last query (second generated token) looks everywhere alike
    for i in range(5):
        a[0, 0, i, : i + 1] = 1 / (i + 1)  # causal uniform rows
    lr = lookback_ratio(a, 4)
    assert lr.shape == (1, 1, 6)
    assert abs(float(lr[0, 0, 5]) - 0.5) < 1e-12  # sums: (4/6) / 1 = 0.667
    # first generated query (position 4): uniform over 5 keys, 4 context + itself -> means equal again
    assert abs(float(lr[0, 0, 4]) - 0.5) < 1e-12
    assert lr[0, 0, :4].abs().max() == 0
    # a query that puts 0.6 on 4 context keys and 0.4 on 2 generated ones: means 0.15 and 0.2
    a[0, 0, 5] = torch.tensor([0.15, 0.15, 0.15, 0.15, 0.2, 0.2], dtype=torch.float64)
    assert abs(float(lookback_ratio(a, 4)[0, 0, 5]) - 0.15 / 0.35) < 1e-12


def test_padded_keys_leave_both_means_and_counts():
    """The same rows with padding keys of zero weight inserted give the same ratios (mask given explicitly)."""
    torch.manual_seed(0)
    real = torch.rand(1, 2, 6, 6, dtype=torch.float64).tril()
    real = real / real.sum(-1, keepdim=True)
    padded = torch.zeros(1, 2, 9, 9, dtype=torch.float64)
    padded[:, :, 3:, 3:] = real  # left padding of 3
    padded[:, :, :3, :] = 0.5  # junk on padded rows/keys is ignored
    padded[:, :, 3:, :3] = 0.3
    mask = torch.tensor([[False] * 3 + [True] * 6])
    lr_padded = lookback_ratio(padded, [2], attention_mask=mask)
    torch.testing.assert_close(lr_padded[..., 3:], lookback_ratio(real, 2), rtol=0, atol=1e-12)
    assert lr_padded[..., :3].abs().max() == 0


def test_bad_context_lengths_and_spans_name_the_argument():
    a = torch.full((2, 1, 4, 4), 0.25, dtype=torch.float64)
    with pytest.raises(ValueError, match="context_length"):
        lookback_ratio(a, 4)  # no generated token left
    with pytest.raises(ValueError, match="context_length"):
        lookback_ratio(a, 0)
    with pytest.raises(ValueError, match="context_length"):
        lookback_ratio(a, [1, 2, 3])
    with pytest.raises(ValueError, match="span"):
        lookback_features(a, 2, span=(5, 7))


def _planted(n, seed):
    """Seeded features (n, 8) in [0, 1]: heads 2 and 5 look back more (+0.15) on factual spans (label 1)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = 0.5 + 0.1 * torch.randn(n, 8, generator=g, dtype=torch.float64)
    x[:, 2] += 0.15 * y
    x[:, 5] += 0.15 * y
    return x.clamp(0, 1), y


def test_detector_separates_a_planted_signal_and_matches_sklearn():
    x, y = _planted(400, 0)
    xt, yt = _planted(400, 1)
    det = LookbackDetector(C=10.0).fit(x, y)
    accuracy = float((det.predict(xt) == yt).double().mean())
    assert accuracy > 0.8  # chance is 0.5; the Bayes rate here is about 0.86
    assert det.coef.abs().argsort()[-2:].sort().values.tolist() == [2, 5]
    # the same objective solved by scikit-learn's LogisticRegression (independent solver)
    sk = pytest.importorskip("sklearn.linear_model")
    ref = sk.LogisticRegression(C=10.0, tol=1e-12, max_iter=10000).fit(x.numpy(), y.numpy())
    torch.testing.assert_close(det.coef, torch.from_numpy(ref.coef_[0]), rtol=1e-5, atol=1e-5)
    assert abs(float(det.intercept) - float(ref.intercept_[0])) < 1e-5
    p = det.predict_proba(xt)
    torch.testing.assert_close(p, torch.from_numpy(ref.predict_proba(xt.numpy())[:, 1]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("suffix", [".safetensors", ".json"])
def test_save_load_round_trip_gives_identical_predictions(tmp_path, suffix):
    x, y = _planted(200, 2)
    det = LookbackDetector(C=0.5).fit(x, y)
    path = det.save(tmp_path / f"det{suffix}")
    back = LookbackDetector.load(path)
    assert torch.equal(back.predict_proba(x), det.predict_proba(x))
    assert torch.equal(back.predict(x), det.predict(x))
    assert back.C == 0.5
    assert b"pickle" not in path.read_bytes() and path.read_bytes()[:2] != b"\x80\x04"


def test_loading_a_file_that_is_not_a_detector_is_a_clear_error(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04not a safetensors file at all")
    with pytest.raises(ValueError, match="not a LookbackDetector file"):
        LookbackDetector.load(junk)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(other))
    with pytest.raises(ValueError, match="not a LookbackDetector file.*format"):
        LookbackDetector.load(other)
    other_json = tmp_path / "other.json"
    other_json.write_text(json.dumps({"coef": [1.0]}))
    with pytest.raises(ValueError, match="not a LookbackDetector file"):
        LookbackDetector.load(other_json)
    with pytest.raises(ValueError, match="not fitted"):
        LookbackDetector().predict(torch.zeros(2, 3))


def test_detector_checks_its_inputs():
    x, y = _planted(50, 3)
    with pytest.raises(ValueError, match="labels"):
        LookbackDetector().fit(x, torch.zeros(50))  # one class only
    with pytest.raises(ValueError, match="labels"):
        LookbackDetector().fit(x, y[:10])
    det = LookbackDetector().fit(x, y)
    with pytest.raises(ValueError, match="features"):
        det.predict(torch.zeros(3, 5))


def test_end_to_end_features_of_a_tiny_llama_feed_the_detector():
    model = tiny_llama(7)
    ids, mask = _batch("left")
    with torch.no_grad(), capture(model) as att:
        model(input_ids=ids, attention_mask=mask)
    feats = lookback_features(att, [3, 6])
    labels = torch.tensor([0.0, 1.0], dtype=torch.float64)
    det = LookbackDetector().fit(feats, labels.long())
    p = det.predict_proba(feats)
    assert p.shape == (2,)
    x = feats.double()
    # the fitted model is the regularised logistic regression's optimum: p = σ(w·x + b), and the objective's
    # gradient vanishes there: Σ (p − y) = 0 (b unpenalised) and C·Σ (p − y) x + w = 0 (C = 1)
    torch.testing.assert_close(p, torch.sigmoid(x @ det.coef + det.intercept))
    assert abs(float((p - labels).sum())) < 1e-8
    torch.testing.assert_close(x.T @ (p - labels) + det.coef, torch.zeros_like(det.coef), atol=1e-8, rtol=0)
    assert p[1] > 0.5 > p[0]  # two separable examples: each on its side


def test_registered_as_analysis():
    spec = registry.get("lookback-ratio", kind="analysis")
    assert spec.paper.id == "P220" and spec.paper.arxiv == "2407.07071"
    assert spec.factory is lookback_ratio
