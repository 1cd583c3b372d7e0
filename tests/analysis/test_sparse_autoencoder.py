"""P103: the SAE recovers a planted dictionary (reconstruction and sparsity bounded), the separation score and the
steering hook are what they say, and on a tiny LM trained here on planted known/unknown names a separating latent
is found whose direction makes the model say "don't know"; an SAE on MiniLM's hidden states reconstructs them."""
import pytest
import torch

from attnlab.analysis.entity_lm import IDK, NAME_POSITION, EntityRecipe, EntityTask, entity_recognition, train_entity_lm
from attnlab.analysis.sparse_autoencoder import (
    SparseAutoencoder,
    reconstruction_metrics,
    residual_activations,
    separation_scores,
    steer_residual,
    train_sae,
)
from attnlab.analysis.toy_lm import ToyLM, ToyLMSettings
from attnlab.core.errors import ParameterError, ShapeError
from attnlab.core.registry import get


def _planted(seed: int = 0, n: int = 2048, dim: int = 32, atoms: int = 24, active: int = 3):
    """x = Σ_{j∈S} c_j D_j + 0.5 with |S| = 3 random atoms of a random unit dictionary D, c ~ U(1, 2)."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(atoms, dim, generator=g)
    dictionary = dictionary / dictionary.norm(dim=1, keepdim=True)
    chosen = torch.rand(n, atoms, generator=g).argsort(1)[:, :active]
    codes = torch.zeros(n, atoms).scatter(1, chosen, 1 + torch.rand(n, active, generator=g))
    return codes @ dictionary + 0.5, dictionary


@pytest.mark.parametrize(("kw", "l0_bound"), [({"activation": "relu", "l1": 0.1}, 4.0), ({"activation": "topk", "k": 3}, 3.0)])
def test_sae_recovers_a_planted_sparse_dictionary(kw, l0_bound):
    x, dictionary = _planted()
    sae = train_sae(x, 32, steps=500, seed=0, **kw)
    metrics = reconstruction_metrics(sae, x)
    assert metrics["fve"] > 0.95  # 3 atoms of 24 per vector: almost all the variance
    assert metrics["l0"] <= l0_bound
    assert sae.decoder.shape == (32, 32)
    torch.testing.assert_close(sae.decoder.detach().norm(dim=1), torch.ones(32))
    best_cosine = (dictionary @ sae.decoder.detach().T).max(1).values
    assert float(best_cosine.min()) > 0.9  # every planted atom is a decoder row


def test_codes_and_metrics_are_the_formulas():
    sae = SparseAutoencoder(3, 4, activation="topk", k=2).double()
    with torch.no_grad():
        sae.encoder.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]]))
        sae.encoder_bias.copy_(torch.tensor([0.0, 0.0, 0.0, -2.5]))
        sae.decoder.copy_(torch.eye(4, 3))
        sae.decoder_bias.zero_()
    x = torch.tensor([[3.0, 2.0, 1.0], [1.0, -1.0, 0.5], [0.0, 0.0, 0.0]], dtype=torch.float64)
    codes = sae.encode(x)
    # pre-activations: [3, 2, 1, 3.5], [1, -1, .5, -2], [0, 0, 0, -2.5]; TopK 2 then ReLU
    expected = torch.tensor([[3.0, 0, 0, 3.5], [1, 0, 0.5, 0], [0, 0, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(codes, expected)
    recon = torch.tensor([[3.0, 0, 0], [1, 0, 0.5], [0, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(sae(x), recon)
    m = reconstruction_metrics(sae, x)
    fve = 1 - (x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert m["fve"] == pytest.approx(float(fve)) and m["l0"] == pytest.approx(4 / 3)
    assert m["dead"] == pytest.approx(0.25)  # latent 1 never fires
    relu = SparseAutoencoder(3, 4, activation="relu").double()
    relu.load_state_dict(sae.state_dict())
    torch.testing.assert_close(relu.encode(x), torch.relu(relu.pre_activations(x)))


def test_separation_score_is_the_frequency_difference():
    known = torch.tensor([[1.0, 0.0, 0.2], [0.5, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.1, 0.0]])
    unknown = torch.tensor([[0.0, 1.0, 0.3], [0.0, 0.4, 0.0]])
    s = separation_scores(known, unknown)
    torch.testing.assert_close(s.freq_known, torch.tensor([0.75, 0.25, 0.25], dtype=torch.float64))
    torch.testing.assert_close(s.freq_unknown, torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(s.known, torch.tensor([0.75, -0.75, -0.25], dtype=torch.float64))
    torch.testing.assert_close(s.unknown, -s.known)
    torch.testing.assert_close(separation_scores(known, unknown, threshold=0.35).freq_unknown,
                               torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_steering_adds_the_vector_to_the_residual_entering_the_layer(layer):
    torch.manual_seed(0)
    model = ToyLM(ToyLMSettings(vocab=9, dim=8, heads=2, layers=2, context=6)).double()
    ids = torch.randint(0, 9, (2, 5), generator=torch.Generator().manual_seed(1))
    direction = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        x = model.trace(ids).residual[layer].clone()
        x[:, [1, 3]] += 1.5 * direction
        for block in model.blocks[layer:]:  # run the rest of the model by hand from the steered residual
            attention, mlp = block(x)
            x = x + attention + mlp
        expected = model.unembed(model.norm(x))
        with steer_residual(model, layer, direction, 1.5, positions=[1, 3]):
            steered = model(ids)
            trace = model.trace(ids)
        torch.testing.assert_close(steered, expected)
        torch.testing.assert_close(trace.residual[-1], x)
        assert not torch.allclose(model(ids), steered)  # the hook is gone


@pytest.fixture(scope="module")
def entity_study():
    task = EntityTask(names=64, known=32, relations=2, attributes=3, seed=0)
    model = train_entity_lm(task, EntityRecipe(steps=300, batch=128, lr=5e-3, seed=0))
    return model, task, entity_recognition(model, task, layer=1, latents=64, l1=0.2, sae_steps=600, seed=0)


def test_the_tiny_lm_knows_the_known_names_only(entity_study):
    _, _, study = entity_study
    accuracy = study.record["accuracy"]
    assert accuracy["known"] > 0.9 and accuracy["unknown"] > 0.9
    assert study.record["p_idk_known"] < 0.05 and study.record["p_idk_unknown"] > 0.95


def test_a_latent_separates_unknown_from_known_names(entity_study):
    model, task, study = entity_study
    r = study.record
    assert r["sae"]["fve"] > 0.9 and r["sae"]["l0"] < 12  # of 64 latents
    assert r["separation_unknown"] > 0.5
    assert r["separation_unknown"] > r["separation_null"] + 0.3  # far above the best score with shuffled labels
    # recomputed from the SAE: the latent fires on most unknown names' last token and few known ones
    j = r["unknown_latent"]
    with torch.no_grad():
        fires_unknown = study.sae.encode(residual_activations(model, task.prompts(task.unknown_names, 1), 1, [NAME_POSITION]))[:, j] > 0
        fires_known = study.sae.encode(residual_activations(model, task.prompts(task.known_names, 1), 1, [NAME_POSITION]))[:, j] > 0
    assert float(fires_unknown.double().mean() - fires_known.double().mean()) > 0.5  # relation 1: same name position


def test_steering_with_the_unknown_latent_makes_the_model_say_it_does_not_know(entity_study):
    model, task, study = entity_study
    r = study.record
    assert r["p_idk_known_steered_unknown_latent"] > r["p_idk_known"] + 0.25
    assert r["p_idk_known_steered_unknown_latent"] > r["p_idk_known_steered_random"] + 0.2
    with torch.no_grad(), steer_residual(model, 1, study.sae.decoder[r["unknown_latent"]], r["alpha"], [NAME_POSITION]):
        answers = model(task.prompts(task.known_names, 1))[:, -1].argmax(-1)
    assert float((answers == IDK).double().mean()) > 0.25  # under the other relation too, answers turn into IDK


def test_sae_on_minilm_hidden_states(minilm):
    model, tokenizer, _ = minilm
    texts = ["The cat sat on the mat.", "Because it was tired, the small cat slept all afternoon.",
             "Paris is the capital of France.", "She plays the violin every evening.",
             "Rivers carry water from the mountains to the sea.", "He bought three apples and a loaf of bread."]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[3]  # after layer 3 of 6
    vectors = hidden[batch["attention_mask"].bool()]  # real tokens only
    sae = train_sae(vectors, 64, activation="topk", k=8, steps=400, seed=0)
    metrics = reconstruction_metrics(sae, vectors)
    assert vectors.shape[1] == 384 and sae.decoder.shape == (64, 384)
    assert metrics["l0"] <= 8
    assert metrics["fve"] > 0.8
    untrained = SparseAutoencoder(384, 64, activation="topk", k=8)
    with torch.no_grad():
        untrained.decoder_bias.copy_(vectors.mean(0))
    assert reconstruction_metrics(untrained, vectors)["fve"] < metrics["fve"] - 0.3


def test_bad_inputs_are_named():
    with pytest.raises(ParameterError, match="k: expected an int in"):
        SparseAutoencoder(4, 3, activation="topk", k=5)
    with pytest.raises(ParameterError, match="k: expected None with activation 'relu'"):
        SparseAutoencoder(4, 3, k=2)
    with pytest.raises(ParameterError, match="activation: expected one of"):
        SparseAutoencoder(4, 3, activation="jumprelu")
    with pytest.raises(ShapeError, match="activations: expected a 2-D tensor"):
        train_sae(torch.zeros(3, 4, 5), 8)
    with pytest.raises(ShapeError, match="unknown_codes: expected last dimension dim=3"):
        separation_scores(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ShapeError, match=r"x: expected a floating tensor \(\.\.\., dim=4\)"):
        SparseAutoencoder(4, 3).encode(torch.zeros(2, 5))
    model = ToyLM(ToyLMSettings(vocab=5, dim=8, heads=2, layers=2, context=4))
    with pytest.raises(ParameterError, match="layer: expected an int in \\[0, 2\\]"):
        with steer_residual(model, 3, torch.zeros(8), 1.0):
            pass
    with pytest.raises(ShapeError, match="direction: expected a floating tensor \\(dim=8,\\)"):
        with steer_residual(model, 1, torch.zeros(7), 1.0):
            pass
    with pytest.raises(ParameterError, match="positions: expected indices in"):
        with steer_residual(model, 1, torch.zeros(8), 1.0, positions=[9]):
            pass
    with pytest.raises(ParameterError, match="known: expected an int in \\[1, 9\\]"):
        EntityTask(names=10, known=10)
    assert {get(n, "analysis").paper.id for n in ("sparse-autoencoder", "sae-separation-score", "residual-steering")} == {"P103"}
