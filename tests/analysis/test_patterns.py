"""P156: token patterns, how much each head follows them, and injecting them into chosen heads."""
import pytest
import torch

from attnlab.analysis import capture
from attnlab.analysis.patterns import (
    first_token_pattern,
    inject_patterns,
    matching_token_pattern,
    neighbour_pattern,
    normalise_pattern,
    pattern_match,
    pattern_scores,
    same_sentence_pattern,
    sentence_end_ids,
    token_patterns,
)
from attnlab.analysis.toy_lm import ToyLM, ToyLMSettings
from attnlab.core.errors import ParameterError
from attnlab.core.registry import get

END = 9
TOKENS = torch.tensor([5, 7, 5, END, 5, 7])  # two sentences: [5 7 5 9] [5 7]


def _matrix(rows):
    return torch.tensor(rows, dtype=torch.bool)


def _rows(pattern, dtype):
    """Each row of a 0/1 pattern divided by its number of ones (empty rows 0), written out here."""
    p = pattern.to(dtype)
    return p / p.sum(-1, keepdim=True).clamp(min=1)


def test_patterns_from_tokens_by_hand():
    assert torch.equal(matching_token_pattern(TOKENS), _matrix([
        [0, 0, 1, 0, 1, 0], [0, 0, 0, 0, 0, 1], [1, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0]]))
    same = _matrix([[1, 1, 1, 1, 0, 0]] * 4 + [[0, 0, 0, 0, 1, 1]] * 2)
    assert torch.equal(same_sentence_pattern(TOKENS, {END}), same)
    assert torch.equal(neighbour_pattern(TOKENS, window=2, direction="previous"), torch.ones(6, 6, dtype=torch.bool).tril(-1).triu(-2))
    assert torch.equal(neighbour_pattern(TOKENS, direction="next"), torch.eye(6, dtype=torch.bool).roll(1, 1).triu())
    assert torch.equal(neighbour_pattern(TOKENS), torch.eye(6, dtype=torch.bool).roll(1, 1).triu() | torch.eye(6, dtype=torch.bool).roll(-1, 1).tril())
    # padding (left-padded second sequence) and causality
    ids = torch.stack([TOKENS, torch.tensor([0, 0, 7, 5, 7, 7])])
    real = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
    first = first_token_pattern(ids, attention_mask=real, causal=True)
    assert torch.equal(first[0], _matrix([[1, 0, 0, 0, 0, 0]] * 6))
    assert torch.equal(first[1], _matrix([[0] * 6] * 2 + [[0, 0, 1, 0, 0, 0]] * 4))
    match = matching_token_pattern(ids, attention_mask=real, causal=True)[1]
    assert match.nonzero().tolist() == [[4, 2], [5, 2], [5, 4]]  # 7 at 2, 4, 5: earlier copies only, padded 0s match nothing
    names = ("matching-token", "same-sentence", "neighbours", "previous", "next", "first-token")
    assert tuple(token_patterns(TOKENS, sentence_ends={END})) == names


def test_normalise_pattern_rows_and_empty_rows():
    p = normalise_pattern(matching_token_pattern(TOKENS), torch.float64)
    assert torch.equal(p[0], torch.tensor([0, 0, 0.5, 0, 0.5, 0], dtype=torch.float64))
    assert torch.equal(p[3], torch.zeros(6, dtype=torch.float64))  # no other 9: the row stays 0, no NaN
    assert torch.equal(p.sum(-1), torch.tensor([1, 1, 1, 0, 1, 1], dtype=torch.float64))


def test_pattern_match_known_values():
    n = 6
    prev = neighbour_pattern(TOKENS, direction="previous")
    follows = normalise_pattern(prev, torch.float64)
    follows[0, 0] = 1.0  # query 0 has no previous token: it attends to itself
    uniform = torch.full((n, n), 1 / n, dtype=torch.float64)
    maps = torch.stack([follows, uniform])[None]  # (batch 1, heads 2, n, n)
    got = pattern_match(maps, prev)
    assert torch.equal(got["rows"], torch.tensor([[5, 5]]))  # query 0 has no pattern row
    torch.testing.assert_close(got["match"], torch.tensor([[1.0, 1 / n]], dtype=torch.float64))
    torch.testing.assert_close(got["similarity"], torch.tensor([[1.0, 1 / n]], dtype=torch.float64))
    first = first_token_pattern(TOKENS)
    # queries 0 and 1 of the previous-token head attend to token 0 only, the four others never
    torch.testing.assert_close(pattern_match(maps, first)["similarity"], torch.tensor([[2 / 6, 1 / n]], dtype=torch.float64))


def _toy(mechanism: str = "softmax", seed: int = 0) -> ToyLM:
    torch.manual_seed(seed)
    return ToyLM(ToyLMSettings(vocab=8, dim=16, heads=2, layers=2, mlp_ratio=0.0, mechanism=mechanism)).eval()


@pytest.mark.parametrize("mechanism", ["softmax", "gated-linear"])
def test_injected_heads_read_back_as_the_normalised_pattern(mechanism):
    model = _toy(mechanism)
    ids = torch.randint(0, 6, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), capture(model) as plain:
        before = model(ids)
    match = token_patterns(ids, names=("matching-token",), causal=True)["matching-token"]
    prev = neighbour_pattern(ids, direction="previous")
    with torch.no_grad(), inject_patterns(model, {(1, 1): match, (0, 0): prev[0]}) as names, capture(model) as att:
        after = model(ids)
    assert names == ["blocks.0.attn", "blocks.1.attn"]
    assert torch.equal(att.layers[1][:, 1], _rows(match, att.layers[1].dtype))
    assert torch.equal(att.layers[0][:, 0], _rows(prev, att.layers[0].dtype))
    torch.testing.assert_close(att.layers[0][:, 1], plain.layers[0][:, 1])  # the other head of layer 0 is untouched
    assert not torch.allclose(after, before, atol=1e-3)
    # the output is the pattern times v: layer 0 with both heads injected is out_proj(merge_heads(P̂ v)) by hand
    attn = model.blocks[0].attn
    with torch.no_grad(), inject_patterns(model, {(0, 0): prev, (0, 1): match}):
        update = model.trace(ids).attention[0]
    with torch.no_grad():
        v = attn.project(model.blocks[0].norm1(model.trace(ids).residual[0]))[2]
        heads = torch.stack([_rows(prev, v.dtype), _rows(match, v.dtype)], 1) @ v
        torch.testing.assert_close(update, attn.out_proj(attn.merge_heads(heads)))
    if mechanism == "softmax":  # rows of A sum to 1: injecting each head's own attention gives the model's output back
        own = {(layer, head): plain.layers[layer][:, head] for layer in range(2) for head in range(2)}
        with torch.no_grad(), inject_patterns(model, own):
            torch.testing.assert_close(model(ids), before, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), capture(model) as again:  # everything came back on exit
        torch.testing.assert_close(model(ids), before)
    torch.testing.assert_close(again.layers[1], plain.layers[1])


def test_bias_mode_is_the_pattern_added_to_the_scores():
    model = _toy("softmax", seed=2)
    ids = torch.randint(0, 6, (1, 6), generator=torch.Generator().manual_seed(3))
    match = token_patterns(ids, names=("matching-token",), causal=True)["matching-token"]
    with torch.no_grad(), inject_patterns(model, {(1, 0): match}, mode="bias", strength=2.5), capture(model) as att:
        model(ids)
    block = model.blocks[1]
    with torch.no_grad():
        x = block.norm1(model.trace(ids).residual[1])
        bias = torch.zeros(1, 2, 6, 6)
        bias[:, 0] = 2.5 * match.float()
        by_hand = block.attn.materialize(x, attn_mask=bias)  # softmax(s + λP) through the mechanism's own mask path
    torch.testing.assert_close(att.layers[1], by_hand.to(att.layers[1].dtype))
    with torch.no_grad(), inject_patterns(model, {(1, 0): match}, mode="bias", strength=0.0):
        torch.testing.assert_close(model(ids), model(ids))


def test_minilm_previous_and_next_token_heads(minilm):
    """Measured on the two fixture sentences: MiniLM's layer 0 head 2 attends to the previous token (similarity 1.00;
    the next best head 0.36); head (1, 8) to the next token (0.59; next best 0.27)."""
    model, tokenizer, batch = minilm
    with torch.no_grad(), capture(model) as att:
        model(**batch)
    scores = pattern_scores(att, batch["input_ids"], sentence_ends=sentence_end_ids(tokenizer))
    for name, head, margin in (("previous", (0, 2), 0.4), ("next", (1, 8), 0.2)):
        sim = scores["similarity"][name].mean(1)  # (layers, heads), over the two texts
        best = float(sim[head])
        sim[head] = -1
        assert best > sim.max() + margin, (name, float(best), float(sim.max()))
    assert scores["best"][0][2] == "previous" and scores["best"][1][8] == "next"
    assert scores["best_similarity"][0][2] > 0.9
    assert scores["rows"]["matching-token"][:, 1].eq(0).all()  # the second text repeats no token


def test_minilm_injection_reads_back_through_capture(minilm):
    model, tokenizer, batch = minilm
    with torch.no_grad(), capture(model) as plain:
        out = model(**batch).last_hidden_state
    same = same_sentence_pattern(batch["input_ids"], sentence_end_ids(tokenizer), attention_mask=batch["attention_mask"])
    with torch.no_grad(), inject_patterns(model, {(3, 4): same}) as names, capture(model) as att:
        changed = model(**batch).last_hidden_state
    assert names == ["encoder.layer.3.attention.self"]
    torch.testing.assert_close(att.layers[3][:, 4], _rows(same, torch.float32), atol=0, rtol=0)
    torch.testing.assert_close(att.layers[3][:, 5:], plain.layers[3][:, 5:])
    torch.testing.assert_close(att.layers[2], plain.layers[2])
    assert (changed - out).abs().max() > 1e-2
    with torch.no_grad(), inject_patterns(model, {(3, 4): same}, mode="bias", strength=0.0):
        torch.testing.assert_close(model(**batch).last_hidden_state, out, atol=1e-5, rtol=1e-5)


def test_bad_inputs():
    model = _toy()
    ids = torch.randint(0, 6, (1, 5))
    good = torch.ones(5, 5, dtype=torch.bool).tril()
    with pytest.raises(ParameterError, match="mode: expected one of"):
        with inject_patterns(model, {(0, 0): good}, mode="add"):
            pass
    with pytest.raises(ValueError, match=r"patterns: expected layers in \[0, 2\).*got layer 2"):
        with inject_patterns(model, {(2, 0): good}):
            pass
    with pytest.raises(ValueError, match=r"patterns: expected heads in \[0, 2\) for layer 0, got head 3"):
        with inject_patterns(model, {(0, 3): good}):
            pass
    with pytest.raises(ValueError, match=r"patterns\[\(0, 0\)\]: expected \(5, 5\) or \(1, 5, 5\) for this call"):
        with inject_patterns(model, {(0, 0): torch.ones(4, 4)}):
            model(ids)
    with pytest.raises(ValueError, match="non-negative"):
        with inject_patterns(model, {(0, 0): -good.float()}):
            pass
    with pytest.raises(TypeError, match="'bias' adds the pattern to softmax scores"):
        with inject_patterns(_toy("gated-linear"), {(0, 0): good}, mode="bias"):
            pass
    with pytest.raises(TypeError, match=r"module 'blocks.0.attn' \(mamba\) has no attention core"):
        with inject_patterns(_toy("mamba"), {(0, 0): good}):
            pass
    with pytest.raises(ValueError, match="tokens: expected integer token ids"):
        matching_token_pattern(torch.rand(5))
    with pytest.raises(ParameterError, match="window: expected an int >= 1"):
        neighbour_pattern(TOKENS, window=0)
    with pytest.raises(ParameterError, match="sentence_ends: expected a collection of token ids"):
        same_sentence_pattern(TOKENS, "9")
    with pytest.raises(ValueError, match=r"pattern: expected a bool pattern \(1, 5, 5\) or \(5, 5\)"):
        pattern_match(torch.rand(1, 2, 5, 5), torch.ones(4, 4, dtype=torch.bool))
    assert get("attention-patterns", "analysis").paper.id == get("pattern-injection", "analysis").paper.id == "P156"
