"""P046 attention-deception penalty: its value by hand, maps with their graph (ToyLM, MiniLM), and training on a
marked-token task: attention on the token -> ~0, accuracy stays, ablating the token still breaks predictions."""
import math

import pytest
import torch

from attnlab.analysis import capture
from attnlab.analysis.deception import (
    MarkedTokenSettings,
    attention_in_graph,
    deception_penalty,
    evaluate_deception,
    impermissible_mass,
    train_deceptive,
)
from attnlab.analysis.toy_lm import ToyLM, ToyLMSettings


def test_penalty_by_hand():
    a = torch.zeros(1, 2, 2, 3)
    a[0, 0, 0] = torch.tensor([0.5, 0.3, 0.2])  # head 0, query 0: mass 0.3 on key 1
    a[0, 1, 0] = torch.tensor([0.1, 0.6, 0.3])  # head 1: mass 0.6
    a[0, :, 1] = torch.tensor([0.0, 0.0, 1.0])  # query 1 (not the classifying one): all on key 2
    m = torch.tensor([False, True, False])
    assert torch.allclose(impermissible_mass(a, m, position=0), torch.tensor([[[0.3, 0.6]]]))
    mean = deception_penalty([a], m, position=0, strength=2.0)
    assert math.isclose(float(mean), -2.0 * (math.log(0.7) + math.log(0.4)) / 2, rel_tol=1e-6)
    assert math.isclose(float(deception_penalty([a, a], m, reduce="max")), -math.log(0.4), rel_tol=1e-6)
    assert float(deception_penalty(a, m, position=1)) == 0.0
    all_on_it = deception_penalty(a, torch.tensor([False, False, True]), position=1)
    assert torch.isfinite(all_on_it) and all_on_it > 80  # 1 − α·m = 0: floored, large, finite


def test_attention_in_graph_on_an_attnlab_model_keeps_the_graph():
    torch.manual_seed(0)
    model = ToyLM(ToyLMSettings(vocab=7, dim=16, heads=2, layers=2, context=6, causal=False))
    ids = torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(1))
    with attention_in_graph(model) as maps:
        model(ids)
    with torch.no_grad(), capture(model) as att:
        model(ids)
    assert len(maps.layers) == 2 and all(t.grad_fn is not None for t in maps.layers)
    assert all(torch.allclose(g, c, atol=1e-6) for g, c in zip(maps.layers, att.layers))
    deception_penalty(maps.layers, ids == 3).backward()
    assert model.blocks[1].attn.q_proj.weight.grad.abs().sum() > 0


def test_attention_in_graph_refuses_a_mechanism_without_materialize():
    model = ToyLM(ToyLMSettings(vocab=7, dim=16, heads=2, layers=1, context=6, mechanism="memora"))
    with pytest.raises(TypeError, match=r"blocks.0.attn \(memora\) has no materialize"):
        with attention_in_graph(model):
            pass


SMALL = dict(length=6, fillers=8, dim=32, heads=2, steps=150, batch=64, seed=0, strength=1.0)


def test_penalty_hides_the_marked_token_while_the_model_still_uses_it():
    run = train_deceptive(MarkedTokenSettings(layers=2, penalised=(0, 1), **SMALL))
    result = evaluate_deception(run)
    assert result["accuracy"] > 0.95  # the label is still read ...
    assert result["mass_layer_0"] < 0.02 and result["mass_layer_1"] < 0.02  # ... while [CLS] never attends to it
    assert result["ablated_accuracy"] < 0.65  # and without the token the model is at chance: it relies on it
    assert run.curve[0]["mass"] > 10 * run.curve[-1]["mass"]


def test_one_layer_cannot_route_around_the_penalised_attention(tmp_path):
    settings = MarkedTokenSettings(layers=1, penalised=(0,), **SMALL)
    run = train_deceptive(settings, use_cache=True, cache_dir=str(tmp_path))
    result = evaluate_deception(run)
    assert result["mass_layer_0"] < 0.02
    assert result["accuracy"] < 0.65  # no other token can carry the label to [CLS]
    again = train_deceptive(settings, use_cache=True, cache_dir=str(tmp_path))  # from the cache: same model, curve
    assert again.curve == run.curve and evaluate_deception(again) == result
    assert len(list((tmp_path / "deception-marked-token").glob("*.pt"))) == 1


def test_penalty_on_minilm_through_capture(minilm):
    model, tokenizer, batch = minilm
    impermissible = batch["input_ids"] == tokenizer.convert_tokens_to_ids("cat")
    with torch.no_grad():
        eager = model(**batch, output_attentions=True).attentions
    expected = -torch.log(1 - (eager[-1][:, :, 0] * impermissible[:, None]).sum(-1)).mean()
    query = model.encoder.layer[5].attention.self.query.weight
    saved = query.detach().clone()  # the model is shared by the session's tests: restored bit for bit below
    try:
        with attention_in_graph(model) as maps:
            model(**batch)
        penalty = deception_penalty(maps.layers[-1:], impermissible, position=0)
        assert torch.allclose(penalty, expected, atol=1e-6)
        penalty.backward()
        assert query.grad is not None and query.grad.abs().sum() > 0
        with torch.no_grad():
            query -= 0.05 * query.grad / query.grad.norm()  # one normalised step down the penalty
            after = -torch.log(1 - (model(**batch, output_attentions=True).attentions[-1][:, :, 0]
                                    * impermissible[:, None]).sum(-1)).mean()
        assert after < expected
    finally:
        with torch.no_grad():
            query.copy_(saved)
        model.zero_grad(set_to_none=True)


def test_deception_bad_input():
    a = torch.full((1, 1, 2, 2), 0.5)
    with pytest.raises(ValueError, match=r"impermissible: expected a bool mask \(n_k,\) or \(batch, n_k\) with n_k=2"):
        deception_penalty(a, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"position: expected a query index in \[-2, 2\), got 2"):
        deception_penalty(a, torch.tensor([True, False]), position=2)
    with pytest.raises(ValueError, match="reduce: expected one of"):
        deception_penalty(a, torch.tensor([True, False]), reduce="sum")
    with pytest.raises(ValueError, match="strength: expected a float"):
        deception_penalty(a, torch.tensor([True, False]), strength=-1.0)
    with pytest.raises(ValueError, match="penalised: expected a non-empty tuple"):
        MarkedTokenSettings(layers=2, penalised=(2,))
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        with attention_in_graph("model"):  # type: ignore[arg-type]
            pass
