"""The toy token LM: its trace adds up, knockouts and prefixes do what they say, it learns, its cache keys."""
import pytest
import torch

from attnlab.analysis import capture
from attnlab.analysis.toy_lm import ToyLM, ToyLMSettings, cache_file, cached, settings_key, train_toy_lm
from attnlab.core.errors import ParameterError


def _model(**kw) -> ToyLM:
    torch.manual_seed(0)
    return ToyLM(ToyLMSettings(**{"vocab": 11, "dim": 16, "heads": 2, "layers": 2, "context": 12, **kw})).double()


def _ids(batch: int = 2, n: int = 7, vocab: int = 11) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("mlp_ratio", [4.0, 0.0])
def test_trace_adds_up_to_the_logits(mlp_ratio):
    model, ids = _model(mlp_ratio=mlp_ratio), _ids()
    t = model.trace(ids)
    for layer in range(2):
        torch.testing.assert_close(t.residual[layer + 1], t.residual[layer] + t.attention[layer] + t.mlp[layer])
    torch.testing.assert_close(t.logits, model.unembed(model.norm(t.residual[-1])))
    torch.testing.assert_close(model(ids), t.logits)
    if mlp_ratio == 0:
        assert all(bool((m == 0).all()) for m in t.mlp) and model.blocks[0].mlp is None


def test_self_only_knockout_gives_the_value_of_the_token_itself():
    model, ids = _model(), _ids()
    eye = torch.eye(ids.shape[1], dtype=torch.bool)
    t = model.trace(ids, attn_masks={0: eye})
    attn = model.blocks[0].attn
    h = model.blocks[0].norm1(t.residual[0])
    torch.testing.assert_close(t.attention[0], attn.out_proj(attn.v_proj(h)))  # softmax over one key: weight 1
    free = model.trace(ids)
    torch.testing.assert_close(free.attention[0][:, 0], t.attention[0][:, 0])  # causal: token 0 sees only itself anyway
    assert not torch.allclose(free.attention[0][:, 1:], t.attention[0][:, 1:])


def test_a_prefix_of_token_embeddings_is_those_tokens():
    model, ids = _model(), _ids()
    head, tail = ids[:, :3], ids[:, 3:]
    torch.testing.assert_close(model(tail, prefix=model.embed(head)), model(ids))


def test_capture_records_every_layer_with_causal_rows():
    model, ids = _model(mechanism="softmax"), _ids()
    with torch.no_grad(), capture(model) as att:
        model(ids)
    assert len(att.layers) == 2
    maps = att.layers[1]
    torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:-1], dtype=maps.dtype))
    assert float(maps.triu(1).abs().max()) == 0.0


def test_it_learns_a_successor_rule():
    settings = ToyLMSettings(vocab=8, dim=16, heads=2, layers=1, context=8, mlp_ratio=2.0)
    torch.manual_seed(0)
    model = ToyLM(settings)

    def sample(g: torch.Generator):
        ids = torch.randint(0, 8, (32, 8), generator=g)
        return ids, (ids + 1) % 8

    losses = train_toy_lm(model, sample, steps=150, lr=1e-2, seed=0)
    ids, targets = sample(torch.Generator().manual_seed(99))
    with torch.no_grad():
        accuracy = float((model(ids).argmax(-1) == targets).float().mean())
    assert losses[0] > 1.5 and losses[-1] < 0.2 and accuracy == 1.0


def test_cache_hits_with_the_same_key_and_misses_with_another(tmp_path):
    settings = ToyLMSettings(vocab=5, dim=8, heads=2, layers=1, context=4)
    calls = []

    def fit(model):
        calls.append(1)
        with torch.no_grad():
            model.unembed.bias.fill_(len(calls))
        return {"note": "fitted"}

    first = cached("toy", settings_key(settings), lambda: ToyLM(settings), fit, cache_dir=tmp_path)
    again = cached("toy", settings_key(settings), lambda: ToyLM(settings), fit, cache_dir=tmp_path)
    assert (first.hit, again.hit, len(calls)) == (False, True, 1)
    torch.testing.assert_close(again.model.unembed.bias, torch.ones(5))
    assert again.record["note"] == "fitted" and first.path == again.path == cache_file("toy", settings_key(settings), tmp_path)
    other = cached("toy", {**settings_key(settings), "steps": 2}, lambda: ToyLM(settings), fit, cache_dir=tmp_path)
    assert not other.hit and len(calls) == 2 and other.path != first.path
    assert first.path.with_suffix(".json").is_file()


def test_bad_input_is_refused_by_name():
    model = _model()
    with pytest.raises(ValueError, match="ids: expected an int64"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"ids: expected token ids in \[0, 11\)"):
        model(torch.tensor([[3, 11]]))
    with pytest.raises(ValueError, match="at most context=12"):
        model(_ids(n=13))
    with pytest.raises(ValueError, match="attn_masks: expected layer indices"):
        model(_ids(), attn_masks={2: torch.eye(7, dtype=torch.bool)})
    with pytest.raises(ValueError, match="prefix: expected a tensor"):
        model(_ids(), prefix=torch.zeros(2, 3, 5))
    with pytest.raises(ParameterError, match="heads: expected a divisor"):
        ToyLMSettings(vocab=4, dim=10, heads=3)
    with pytest.raises(ParameterError, match="mlp_ratio"):
        ToyLMSettings(vocab=4, mlp_ratio=-1.0)
    with pytest.raises(ParameterError, match="folder: expected a plain folder name"):
        cached("../x", {}, lambda: model, lambda m: {})
