"""The real MiniLM encoder and a padded batch of two sentences, loaded once per test session (per worker)."""
import pytest
import torch

SENTENCES = ["The cat sat on the mat.", "Because it was tired, the small cat slept all afternoon."]


@pytest.fixture(scope="session")
def minilm():
    from attnlab.analysis import load_minilm

    model, tokenizer = load_minilm()
    batch = tokenizer(SENTENCES, return_tensors="pt", padding=True)
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()  # the first one is padded
    return model, tokenizer, batch


@pytest.fixture(scope="session")
def minilm_capture(minilm):
    """(capture of MiniLM on the padded batch, the model's own eager attentions, real-token mask)."""
    from attnlab.analysis import capture

    model, _, batch = minilm
    with torch.no_grad():
        eager = model(**batch, output_attentions=True).attentions
        with capture(model) as att:
            model(**batch)
    return att, eager, batch["attention_mask"].bool()
