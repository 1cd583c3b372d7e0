"""P033 attention knockout: exact equality with masking by hand (attnlab mechanisms, MiniLM), refusal of mechanisms
without attn_mask, and the per-window drop localising to the planted layer of a trained image-QA ToyLM."""
import pytest
import torch

from attnlab.analysis import capture
from attnlab.analysis.knockout import (
    ImageQASettings,
    attention_layers,
    group_keep,
    knockout,
    train_image_qa,
    window_knockout,
)
from attnlab.analysis.toy_lm import ToyLM, ToyLMSettings


def toy(mechanism: str = "softmax", layers: int = 3, causal: bool = True) -> ToyLM:
    torch.manual_seed(0)
    return ToyLM(ToyLMSettings(vocab=11, dim=16, heads=2, layers=layers, context=8, mlp_ratio=2.0,
                               mechanism=mechanism, causal=causal)).eval()


def random_keep(n: int, seed: int) -> torch.Tensor:
    keep = torch.rand(n, n, generator=torch.Generator().manual_seed(seed)) > 0.4
    return keep | torch.eye(n, dtype=torch.bool)


def test_group_keep_blocks_exactly_the_edges_from_sources_to_targets():
    keep = group_keep(5, sources=[0, 1], targets=range(3, 5))
    blocked = {(i, j) for i in range(5) for j in range(5) if not keep[i, j]}
    assert blocked == {(3, 0), (3, 1), (4, 0), (4, 1)}
    per_sequence = group_keep(3, sources=torch.tensor([[True, False, False], [False, True, False]]), targets=[2])
    assert per_sequence.shape == (2, 1, 3, 3)
    assert not per_sequence[0, 0, 2, 0] and per_sequence[0, 0, 2, 1] and not per_sequence[1, 0, 2, 1]
    assert int((~per_sequence).sum()) == 2


@pytest.mark.parametrize("mechanism", ["softmax", "alibi", "rope"])
def test_knockout_equals_masking_by_hand_on_attnlab_mechanisms(mechanism):
    model, n = toy(mechanism), 7
    ids = torch.randint(0, 11, (2, n), generator=torch.Generator().manual_seed(1))
    keep = {0: random_keep(n, 2), 2: random_keep(n, 3)}
    own = {1: random_keep(n, 4), 2: random_keep(n, 5)}  # the model's own masks, narrowed by the knockout
    with torch.no_grad():
        with knockout(model, keep) as names:
            knocked = model(ids, attn_masks=own)
        by_hand = model(ids, attn_masks={0: keep[0], 1: own[1], 2: own[2] & keep[2]})
        plain = model(ids, attn_masks=own)
    assert names == ["blocks.0.attn", "blocks.2.attn"]
    assert torch.equal(knocked, by_hand)
    assert not torch.allclose(knocked, plain)  # the knockout did something
    with torch.no_grad():
        assert torch.equal(model(ids, attn_masks=own), plain)  # and is gone after the context


def test_knockout_maps_read_back_through_capture_and_empty_rows_are_zero():
    model, n = toy(), 6
    ids = torch.randint(0, 11, (1, n), generator=torch.Generator().manual_seed(2))
    keep = group_keep(n, sources=[0, 1, 2, 3], targets=[3])  # query 3 keeps no key at all (causal)
    with torch.no_grad(), knockout(model, {1: keep}), capture(model) as att:
        out = model(ids)
    assert torch.isfinite(out).all()
    a = att.layers[1][0]
    assert torch.equal(a[:, 3], torch.zeros_like(a[:, 3]))  # fully knocked-out row: zeros, not NaN
    assert (a[:, 4:, :4].sum(-1) > 0).all()  # other queries still see those keys
    assert torch.allclose(a[:, [0, 1, 2, 4, 5]].sum(-1), torch.ones(2, 5))


def test_knockout_refuses_a_mechanism_without_attn_mask_by_name():
    model = toy("linear")
    with pytest.raises(ValueError, match=r"layer 1 \(blocks.1.attn, linear\) takes no arbitrary attention mask"):
        with knockout(model, {1: torch.ones(4, 4, dtype=torch.bool)}):
            pass


def test_knockout_bad_input():
    model = toy()
    with pytest.raises(ValueError, match=r"keep: expected layer indices in \[0, 3\), got 3"):
        with knockout(model, {3: torch.ones(4, 4, dtype=torch.bool)}):
            pass
    with pytest.raises(ValueError, match=r"keep\[0\]: expected a bool tensor"):
        with knockout(model, {0: torch.ones(4, 4)}):
            pass
    with pytest.raises(TypeError, match="keep: expected a mapping"):
        with knockout(model, [torch.ones(4, 4, dtype=torch.bool)]):  # type: ignore[arg-type]
            pass
    with pytest.raises(ValueError, match=r"keep\[0\]: expected \(n_q, n_k\) = \(5, 5\)"):
        with knockout(model, {0: torch.ones(4, 4, dtype=torch.bool)}):
            model(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        attention_layers("model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"targets: expected positions in \[-4, 4\), got \[7\]"):
        group_keep(4, [0], [7])
    with pytest.raises(ValueError, match=r"window: expected an int in \[1, layers=3\], got 4"):
        window_knockout(model, lambda: torch.ones(2), torch.ones(4, 4, dtype=torch.bool), window=4)
    with pytest.raises(ValueError, match="answer_probability: expected a float tensor"):
        window_knockout(model, lambda: torch.ones(2, 3), torch.ones(4, 4, dtype=torch.bool))


@pytest.fixture(scope="module")
def image_qa():
    settings = ImageQASettings(layers=3, via=1, dim=32, heads=2, classes=4, image=2, question=2, noise=0.3,
                               steps=200, batch=32, mlp_ratio=0.0, seed=0)
    qa = train_image_qa(settings, use_cache=False)
    ids, prefix, labels = qa.sample(torch.Generator().manual_seed(7), 256)
    return qa, (ids, prefix, labels)


def test_window_drop_localises_to_the_planted_layer(image_qa):
    qa, (ids, prefix, labels) = image_qa
    groups, n = qa.groups(), qa.settings.length

    def p():
        return qa.answer_probability(ids, prefix, labels)

    to_question = window_knockout(qa.model, p, group_keep(n, groups["image"], groups["question"]))
    assert to_question.starts == [0, 1, 2]
    assert to_question.base.mean() > 0.6  # the model answers
    # layers 0 and 2 never carry image -> question: knocking them out changes nothing, bit for bit
    assert torch.equal(to_question.knocked[0], to_question.base) and torch.equal(to_question.knocked[2], to_question.base)
    assert to_question.knocked[1].mean() < 0.35  # layer 1 does: the answer falls to chance (1/4)
    assert to_question.drop[1] > 0.3 and to_question.relative[1] < -0.4
    to_last = window_knockout(qa.model, p, group_keep(n, groups["image"], groups["last"]), window=2)
    assert to_last.starts == [0, 1] and torch.equal(to_last.drop, torch.zeros(2))  # the last token never reads the image
    pairs = window_knockout(qa.model, p, group_keep(n, groups["image"], groups["question"]), window=2)
    assert (pairs.knocked.mean(-1) < 0.35).all()  # both windows of two hold layer 1


def test_knockout_on_minilm_equals_masking_the_keys_by_hand(minilm):
    model, _, batch = minilm
    n = batch["input_ids"].shape[1]
    group = [2, 3]
    layers = len(attention_layers(model))
    keep = group_keep(n, sources=group, targets=range(n))  # every query loses the keys of the group
    masked = batch["attention_mask"].clone()
    masked[:, group] = 0
    with torch.no_grad():
        with knockout(model, dict.fromkeys(range(layers), keep)):
            knocked = model(**batch).last_hidden_state
            with capture(model) as att:
                model(**batch)
        by_hand = model(**{**batch, "attention_mask": masked}).last_hidden_state
        with knockout(model, {3: keep}):
            one_layer = model(**batch, output_hidden_states=True).hidden_states
        plain = model(**batch, output_hidden_states=True).hidden_states
        with knockout(model, {0: group_keep(n, sources=range(n), targets=[1])}), capture(model) as blind:
            finite = model(**batch).last_hidden_state
    assert layers == 6
    assert torch.equal(knocked, by_hand)
    assert all(torch.equal(a[:, :, :, group], torch.zeros_like(a[:, :, :, group])) for a in att.layers)
    assert [torch.equal(a, b) for a, b in zip(one_layer, plain)] == [True] * 4 + [False] * 3  # from layer 3 on
    assert torch.equal(blind.layers[0][:, :, 1], torch.zeros_like(blind.layers[0][:, :, 1]))  # no key left: zeros
    assert torch.isfinite(finite).all() and (blind.layers[1][:, :, 1].sum(-1) > 0.99).all()
