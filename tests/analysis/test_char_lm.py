"""The small real causal LM (attnlab.analysis.char_lm): corpus, vocabulary, recipe, cache and capture."""
import dataclasses
import hashlib
import inspect
import json
import math
import string
import textwrap

import pytest
import torch

from attnlab.analysis import capture
from attnlab.analysis.char_lm import (
    DEFAULT_CACHE,
    UNKNOWN,
    VOCAB,
    VOCAB_SIZE,
    CharLM,
    CharLMSettings,
    cache_path,
    char_lm,
    corpus,
    corpus_sha256,
    decode,
    encode,
    lm_loss,
    lr_factor,
    split,
    train_char_lm,
)
from attnlab.core.errors import ParameterError

MODULES = ("textwrap", "string")
TINY = CharLMSettings(dim=32, heads=2, layers=2, context=32, steps=60, batch=8, lr=1e-2, modules=MODULES)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """(first call: trained and saved, second call: loaded) of the tiny LM in a fresh cache folder."""
    folder = tmp_path_factory.mktemp("char_lm")
    first = char_lm(TINY, cache_dir=folder, progress=False)
    second = char_lm(TINY, cache_dir=folder, progress=False)
    return folder, first, second


def test_corpus_is_the_docstrings_in_order_and_its_hash_is_sha256():
    text = corpus(MODULES)
    assert corpus(MODULES) == text
    assert text.startswith(inspect.getdoc(textwrap) + "\n\n")  # the first module's own docstring comes first
    assert inspect.getdoc(string.Template) in text and inspect.getdoc(textwrap.dedent) in text
    assert text.index(inspect.getdoc(textwrap.dedent)) < text.index(inspect.getdoc(string.capwords))
    assert corpus(MODULES[::-1]) != text  # the order is part of the corpus
    assert corpus_sha256(text) == hashlib.sha256(text.encode()).hexdigest()
    assert corpus_sha256("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert text.count(inspect.getdoc(textwrap.TextWrapper)) == 1


def test_vocabulary_maps_ascii_and_newline_and_one_unknown_id():
    assert VOCAB_SIZE == 97 and VOCAB[0] == "\n" and VOCAB[1] == " " and VOCAB[-1] == "~"
    ids = encode("a\n\té")
    assert ids.tolist() == [VOCAB.index("a"), 0, UNKNOWN, UNKNOWN] and ids.dtype == torch.int64
    assert decode(encode("def f(x):\n    return x ~ 1")) == "def f(x):\n    return x ~ 1"
    with pytest.raises(TypeError, match="text"):
        encode(b"bytes")


def test_lr_schedule_warms_up_then_falls_as_a_cosine():
    assert lr_factor(0, 100) == pytest.approx(1 / 5 * 1.0)
    assert lr_factor(4, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 100)))
    assert lr_factor(50, 100) == pytest.approx(0.5)
    assert lr_factor(99, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.99)))
    assert lr_factor(0, 3) == pytest.approx(1.0)  # warm-up of one step when 5% is less than one


def test_settings_are_checked():
    with pytest.raises(ParameterError, match="positional"):
        CharLMSettings(positional="alibi")
    with pytest.raises(ParameterError, match="mechanism: positional 'rope'"):
        CharLMSettings(positional="rope", mechanism="linear")
    with pytest.raises(ParameterError, match="heads"):
        CharLMSettings(dim=30, heads=4)
    with pytest.raises(ParameterError, match="steps"):
        CharLMSettings(steps=0)
    with pytest.raises(ParameterError, match="heldout"):
        CharLMSettings(heldout=1.0)
    with pytest.raises(ValueError, match="name"):
        char_lm("no-such-preset")
    with pytest.raises(ValueError, match="ids: expected at most context=32"):
        CharLM(TINY)(torch.zeros(1, 33, dtype=torch.int64))
    with pytest.raises(ValueError, match="text: expected at least 33"):
        split("x" * 100, 0.1, 32)


def test_training_lowers_the_heldout_loss(cached):
    _, lm, _ = cached
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY.seed)
        initial = CharLM(TINY).eval()
    _, held = split(corpus(MODULES), TINY.heldout, TINY.context)
    batch = torch.stack([held[s : s + TINY.context + 1] for s in range(0, len(held) - TINY.context - 1, TINY.context)])
    with torch.no_grad():
        before = float(lm_loss(initial, batch))
        after = float(lm_loss(lm.model, batch))
    assert before > math.log(VOCAB_SIZE) - 0.3  # near uniform at initialisation
    assert after < before - 1.0 and lm.heldout_loss < before - 1.0
    assert len(lm.train_losses) == TINY.steps
    assert sum(lm.train_losses[-10:]) / 10 < lm.train_losses[0] - 1.0


def test_cache_round_trip_gives_identical_logits_and_states_the_corpus_hash(cached):
    folder, first, second = cached
    assert not first.cached and second.cached and first.path == second.path
    assert first.path == cache_path("custom", TINY, corpus_sha256(corpus(MODULES)), folder)
    ids = encode("Return a copy of the string with its first character capitalized.")[None, :32]
    with torch.no_grad():
        assert torch.equal(first.model(ids), second.model(ids))
    assert second.heldout_loss == first.heldout_loss and second.train_losses == first.train_losses
    record = json.loads(first.path.with_suffix(".json").read_text())
    assert record["corpus_sha256"] == corpus_sha256(corpus(MODULES))
    assert record["settings"]["modules"] == list(MODULES) and record["settings"]["steps"] == TINY.steps


def test_a_changed_setting_or_text_misses_the_cache(cached, tmp_path):
    folder, first, _ = cached
    digest = corpus_sha256(corpus(MODULES))
    other = dataclasses.replace(TINY, seed=1, steps=2)
    assert cache_path("custom", other, digest, folder) != first.path
    assert cache_path("custom", TINY, corpus_sha256("other text"), folder) != first.path
    again = char_lm(other, cache_dir=folder, progress=False)
    assert not again.cached and again.path != first.path
    # a file at the right name but trained with other settings is not taken for this one
    moved = cache_path("custom", TINY, digest, tmp_path)
    moved.parent.mkdir(parents=True, exist_ok=True)
    moved.write_bytes(again.path.read_bytes())
    assert not char_lm(TINY, cache_dir=tmp_path, progress=False).cached  # retrained (and overwritten)
    assert char_lm(TINY, cache_dir=tmp_path, progress=False).cached


def test_retrain_trains_again_with_the_same_result(cached):
    folder, first, _ = cached
    redone = char_lm(TINY, cache_dir=folder, retrain=True, progress=False)
    assert not redone.cached
    for name, value in first.model.state_dict().items():  # seeded: the same weights
        torch.testing.assert_close(redone.model.state_dict()[name], value, rtol=1e-4, atol=1e-5)


def test_default_cache_is_in_the_results_folder():
    from attnlab.bench.store import DEFAULT_DB

    assert DEFAULT_CACHE == DEFAULT_DB.parent / "char_lm"


@pytest.mark.parametrize("positional", ["learned", "rope", "none"])
def test_capture_returns_causal_maps_of_every_layer(cached, positional):
    _, lm, _ = cached
    model = lm.model if positional == "learned" else CharLM(dataclasses.replace(TINY, positional=positional)).eval()
    ids = encode("Hello world, this is a test of it.")[None, :24]
    with torch.no_grad(), capture(model) as att:
        model(ids)
    assert len(att.layers) == TINY.layers and att.names == [f"blocks.{i}.mixer" for i in range(TINY.layers)]
    for a in att.layers:
        assert a.shape == (1, TINY.heads, 24, 24)
        torch.testing.assert_close(a.sum(-1), torch.ones(1, TINY.heads, 24))
        assert torch.all(a.triu(1) == 0)
        assert a[..., 1:, 0].min() > 0  # and not all mass on the diagonal
    if positional == "learned":
        assert not torch.allclose(att.layers[0][0, 0], att.layers[0][0, 1])  # trained heads differ


def test_on_step_sees_every_step_and_the_thread_count_comes_back():
    seen = []
    before = torch.get_num_threads()
    settings = dataclasses.replace(TINY, steps=3)
    lm = train_char_lm(corpus(MODULES), settings, on_step=lambda step, model: seen.append(step), threads=1)
    assert seen == [0, 1, 2, 3] and len(lm.train_losses) == 3 and not lm.cached
    assert torch.get_num_threads() == before
    with pytest.raises(ParameterError, match="threads"):
        train_char_lm(corpus(MODULES), settings, threads=0)
