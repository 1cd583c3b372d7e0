"""P042: ABP restricts attention exactly as specified (read back through capture, ToyLM and MiniLM), CAMA replaces
the residual stream by context-aware means, and the three-stage test on a planted arithmetic ToyLM."""
import pytest
import torch

from attnlab.analysis import capture
from attnlab.analysis.knockout import knockout
from attnlab.analysis.last_token_circuit import (
    ArithmeticSettings,
    all_for_one,
    all_for_one_grid,
    arithmetic_prompts,
    cama,
    context_aware_means,
    peeking_masks,
    train_arithmetic,
)
from attnlab.analysis.toy_lm import ToyLM, ToyLMSettings


def toy(layers: int = 3) -> ToyLM:
    torch.manual_seed(0)
    return ToyLM(ToyLMSettings(vocab=9, dim=16, heads=2, layers=layers, context=8, mlp_ratio=2.0)).eval()


def test_peeking_masks_are_the_three_stages():
    masks = peeking_masks(4, layers=5, wait=1, transfer=2)
    assert sorted(masks) == [1, 2, 3, 4]  # nothing before wait
    abp = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(masks[1], abp) and torch.equal(masks[2], abp)
    assert torch.equal(masks[3], torch.eye(4, dtype=torch.bool)) and torch.equal(masks[4], torch.eye(4, dtype=torch.bool))
    padded = peeking_masks(4, layers=2, wait=0, transfer=1, attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    assert padded[0].shape == (2, 1, 4, 4)
    assert padded[0][1, 0, 1].all() and not padded[0][1, 0, 3, :3].any()  # sequence 1 ends at position 1


def test_abp_read_back_through_capture_on_a_toylm():
    model, n = toy(), 6
    ids = torch.randint(0, 9, (2, n), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with capture(model) as free:
            model(ids)
        with knockout(model, peeking_masks(n, layers=3, wait=1, transfer=1)), capture(model) as att:
            model(ids)
    assert torch.equal(att.layers[0], free.layers[0])  # before wait: untouched
    eye = torch.eye(n).expand(2, 2, n, n)
    peek = att.layers[1]
    assert torch.equal(peek[:, :, :-1], eye[:, :, :-1])  # every token but the last attends to itself alone
    assert (peek[:, :, -1] > 0).all() and torch.allclose(peek[:, :, -1].sum(-1), torch.ones(2, 2))  # the last reads all
    assert torch.equal(att.layers[2], eye)  # after: self only, the last token too


def test_abp_read_back_through_capture_on_minilm(minilm):
    model, _, batch = minilm
    real = batch["attention_mask"].bool()
    n, lengths = real.shape[1], real.sum(-1)
    with torch.no_grad(), knockout(model, peeking_masks(n, layers=6, wait=2, transfer=2, attention_mask=real)), \
            capture(model) as att:
        model(**batch)
    for layer, a in enumerate(att.layers):
        for b in range(2):
            m = int(lengths[b])
            seq = a[b, :, :m, :m]
            if layer < 2:
                assert (seq > 0).all()  # bidirectional BERT attention, untouched
                continue
            eye = torch.eye(m).expand_as(seq)
            if layer < 4:
                assert torch.equal(seq[:, :-1], eye[:, :-1]) and (seq[:, -1] > 0).all()
            else:
                assert torch.equal(seq, eye)


def test_context_aware_means_by_hand():
    reference = torch.tensor([[1, 5, 2], [1, 5, 3], [4, 5, 2]])
    states = torch.arange(27, dtype=torch.float64).reshape(3, 3, 3)
    means = context_aware_means(torch.tensor([[1, 5, 2], [4, 5, 3]]), reference, states)
    assert torch.equal(means[0, 0], (states[0, 0] + states[1, 0]) / 2)  # token 1 at position 0: prompts 0, 1
    assert torch.equal(means[1, 0], states[2, 0])
    assert torch.equal(means[0, 1], states[:, 1].mean(0)) and torch.equal(means[1, 1], states[:, 1].mean(0))
    assert torch.equal(means[0, 2], (states[0, 2] + states[2, 2]) / 2) and torch.equal(means[1, 2], states[1, 2])
    with pytest.raises(ValueError, match="reference: token 7 at position 0 .* never occurs there"):
        context_aware_means(torch.tensor([[7, 5, 2]]), reference, states)


def test_cama_replaces_the_residual_stream_entering_the_layer():
    model = toy()
    reference = torch.randint(0, 9, (12, 5), generator=torch.Generator().manual_seed(4))
    ids = reference[:3]
    with torch.no_grad():
        states = model.trace(reference).residual[2]
        means = context_aware_means(ids, reference, states)
        with cama(model, ids, reference=reference, layer=2):
            logits = model(ids)
        a, m = model.blocks[2](means)  # layer 2 run by hand on the means, then the read-out
        by_hand = model.unembed(model.norm(means + a + m))
    assert torch.allclose(logits, by_hand, atol=1e-6)
    with torch.no_grad(), cama(model, ids, reference=reference, layer=0):
        assert torch.equal(model(ids), model.trace(ids).logits)  # nothing precedes layer 0


@pytest.fixture(scope="module")
def planted():
    settings = ArithmeticSettings(operands=5, layers=3, dim=32, heads=2, mlp_ratio=2.0, steps=200, lr=5e-3,
                                  planted=(1, 1), seed=0)
    return train_arithmetic(settings, use_cache=False)


def test_three_stage_test_on_a_planted_arithmetic_model(planted):
    ids, answers = arithmetic_prompts(planted.settings)
    assert planted.record["accuracy"] >= 0.9
    at_plant = all_for_one(planted.model, ids, answers, reference=ids, wait=1, transfer=1, run=planted.run)
    assert at_plant.full_accuracy == planted.record["accuracy"]
    # layer 0 is self-only in the planted model: CAMA at layer 1 changes nothing, ABP is its own structure
    assert at_plant.accuracy == at_plant.full_accuracy
    with torch.no_grad():
        assert torch.allclose(at_plant.logits, planted.run(ids)[:, -1], atol=1e-4)
    for wait in (1, 2):  # no transfer: the last token never reads another token -> one answer for all prompts
        blind = all_for_one(planted.model, ids, answers, reference=ids, wait=wait, transfer=0, run=planted.run)
        assert blind.predictions.unique().numel() == 1
        assert blind.accuracy <= 5 / 25  # at most the most frequent sum (4: five prompts)
    grid = all_for_one_grid(planted.model, ids, answers, reference=ids, run=planted.run)
    assert [(r["wait"], r["transfer"]) for r in grid] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2),
                                                          (2, 0), (2, 1)]
    assert next(r for r in grid if (r["wait"], r["transfer"]) == (1, 1))["accuracy"] == at_plant.accuracy


def test_last_token_circuit_bad_input():
    model = toy()
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"transfer: expected wait \+ transfer <= layers = 3"):
        peeking_masks(4, layers=3, wait=2, transfer=2)
    with pytest.raises(ValueError, match="wait: expected an int >= 0, got -1"):
        peeking_masks(4, layers=3, wait=-1, transfer=1)
    with pytest.raises(ValueError, match=r"answers: expected answer ids \(batch=2,\)"):
        all_for_one(model, ids, torch.zeros(3, dtype=torch.long), reference=ids, wait=1, transfer=1)
    with pytest.raises(ValueError, match=r"layer: expected an int in \[0, 3\), got 3"):
        with cama(model, ids, reference=ids, layer=3):
            pass
    with pytest.raises(TypeError, match="blocks: expected the model's layers"):
        all_for_one(torch.nn.Linear(2, 2), ids, ids[:, 0], reference=ids, wait=0, transfer=1)
    with pytest.raises(ValueError, match="planted: expected None or"):
        ArithmeticSettings(layers=3, planted=(2, 2))
