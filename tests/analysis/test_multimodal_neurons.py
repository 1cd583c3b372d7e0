"""P119 multimodal neurons: the attribution identities (float64, any mechanism), decoding on a planted neuron, and
the ablation check on a digit captioner trained here in seconds."""
import pytest
import torch

from attnlab.analysis.digit_captioner import (
    CAPTION,
    PATCHES,
    CaptionerSettings,
    PatchFeatures,
    train_captioner,
)
from attnlab.analysis.digits import load_digits_split
from attnlab.analysis.multimodal_neurons import ablate_neurons, ablation_check, decode_neurons, neuron_attribution
from attnlab.analysis.toy_lm import ToyLM, ToyLMSettings
from attnlab.core.errors import ParameterError, ShapeError
from attnlab.core.registry import get


def _lm(mechanism: str = "softmax", **kw) -> ToyLM:
    torch.manual_seed(0)
    settings = {"vocab": 13, "dim": 16, "heads": 2, "layers": 3, "context": 10, "mlp_ratio": 2.0, "mechanism": mechanism, **kw}
    return ToyLM(ToyLMSettings(**settings)).double()


def _inputs(batch: int = 3):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 13, (batch, 3), generator=g)
    prefix = torch.randn(batch, 4, 16, generator=g, dtype=torch.float64)
    target = torch.randint(0, 13, (batch,), generator=g)
    return ids, prefix, target


@pytest.mark.parametrize("mechanism", ["softmax", "linear"])
def test_scores_per_position_sum_to_the_mlp_update_times_its_gradient(mechanism):
    """Σ_u a_u ∂log p/∂a_u = ⟨m − b_out, ∂log p/∂m⟩ at each position: the gradient at the MLP's output, taken
    by an independent autograd call on a hooked tensor."""
    model, (ids, prefix, target) = _lm(mechanism), _inputs()
    att = neuron_attribution(model, ids, target, prefix=prefix)
    for layer, block in enumerate(model.blocks):
        kept: dict = {}
        handle = block.mlp.register_forward_hook(lambda _m, _a, out, kept=kept: kept.setdefault("m", out))
        try:
            logits = model(ids, prefix=prefix)
        finally:
            handle.remove()
        log_p = torch.log_softmax(logits[:, -1], -1).gather(-1, target[:, None]).sum()
        (grad_m,) = torch.autograd.grad(log_p, kept["m"])
        expected = ((kept["m"] - block.mlp[2].bias) * grad_m).sum(-1)  # (batch, n)
        torch.testing.assert_close(att.scores[layer].sum(-1), expected.detach(), rtol=1e-10, atol=1e-12)
        # and neuron by neuron: ∂log p/∂a_u = W_out[:, u] · ∂log p/∂m
        torch.testing.assert_close(att.gradients[layer], (grad_m @ block.mlp[2].weight).detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(att.log_prob, torch.log_softmax(model(ids, prefix=prefix)[:, -1], -1).gather(
        -1, target[:, None])[:, 0].detach())


def test_layer_total_equals_the_derivative_of_scaling_its_neurons():
    """Σ_{u,i} a_u,i g_u,i = d/dt log p(a → t·a) at t = 1, by central differences in float64."""
    model, (ids, prefix, target) = _lm(), _inputs(batch=1)
    att = neuron_attribution(model, ids, target, prefix=prefix)
    eps = 1e-5
    for layer in range(3):
        def log_p(t: float, layer: int = layer) -> float:
            handle = model.blocks[layer].mlp[1].register_forward_hook(lambda _m, _a, out: out * t)
            try:
                with torch.no_grad():
                    return float(torch.log_softmax(model(ids, prefix=prefix)[0, -1], -1)[target[0]])
            finally:
                handle.remove()
        slope = (log_p(1 + eps) - log_p(1 - eps)) / (2 * eps)
        assert float(att.scores[layer].sum()) == pytest.approx(slope, rel=1e-6, abs=1e-9)


def test_attribution_of_a_frozen_model_and_over_positions():
    model, (ids, prefix, target) = _lm(), _inputs()
    free = neuron_attribution(model, ids, target, prefix=prefix)
    model.requires_grad_(False)
    frozen = neuron_attribution(model, ids, target, prefix=prefix)
    torch.testing.assert_close(frozen.scores, free.scores)
    over = free.over([0, 1, 2, 3])
    torch.testing.assert_close(over, free.scores[:, :, :4].sum(2).transpose(0, 1))
    assert over.shape == (3, 3, 32)


def test_decoding_reads_a_planted_neuron_through_the_unembedding():
    model = _lm()
    with torch.no_grad():
        model.blocks[1].mlp[2].weight[:, 5] = 3.0 * model.unembed.weight[7]  # neuron 5 writes token 7's row
        model.blocks[1].mlp[2].weight[:, 6] = -model.unembed.weight[2]
    values, tokens = decode_neurons(model, 1, [5, 6], top=3)
    assert int(tokens[0, 0]) == 7
    logits = model.unembed.weight @ model.blocks[1].mlp[2].weight[:, 6]
    assert int(tokens[1, 0]) == int(logits.argmax()) and int(tokens[1, 0]) != 2
    torch.testing.assert_close(values[0], (model.unembed.weight @ model.blocks[1].mlp[2].weight[:, 5]).topk(3).values.detach())


def test_ablation_equals_removing_the_neurons_output_weights():
    model, (ids, prefix, _) = _lm(), _inputs()
    everywhere = torch.zeros(1, 1, 32, dtype=torch.bool)
    everywhere[..., [3, 9]] = True
    with torch.no_grad():
        plain = model(ids, prefix=prefix)
        with ablate_neurons(model, {1: everywhere}):
            ablated = model(ids, prefix=prefix)
        w = model.blocks[1].mlp[2].weight
        saved = w.clone()
        w[:, [3, 9]] = 0.0  # the same neurons silenced by weight surgery
        surgery = model(ids, prefix=prefix)
        w.copy_(saved)
        torch.testing.assert_close(ablated, surgery, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(ablated, plain)
        at_five = torch.zeros(1, 7, 32, dtype=torch.bool)
        at_five[0, 5, [3, 9]] = True
        with ablate_neurons(model, {1: at_five}):
            local = model(ids, prefix=prefix)
        torch.testing.assert_close(local[:, :5], plain[:, :5])  # causal: earlier positions untouched
        assert not torch.allclose(local[:, 5], plain[:, 5])
        torch.testing.assert_close(model(ids, prefix=prefix), plain)  # the hooks went on exit


@pytest.fixture(scope="module")
def captioner():
    model, record = train_captioner(CaptionerSettings(dim=32, layers=2, steps=200, seed=0))
    return model, record


def test_the_tiny_captioner_captions_digits(captioner):
    _, record = captioner
    assert record["test_accuracy"] > 0.7  # chance 0.1


def test_ablating_top_attributed_neurons_hurts_the_caption_more_than_random_ones(captioner):
    model, _ = captioner
    data = load_digits_split()
    with torch.no_grad():
        prefix = model.prefix(data.test_images[:64])
    check = ablation_check(model.lm, model.prompt(64), data.test_labels[:64], prefix=prefix, k=8, seed=0)
    assert check.top_drop > 0.05
    assert check.top_drop > check.random_drop + 0.05
    assert check.top_drop > 4 * abs(check.random_drop)


def test_bad_inputs_are_named():
    model, (ids, prefix, target) = _lm(), _inputs()
    with pytest.raises(ValueError, match="model: expected MLP blocks"):
        neuron_attribution(_lm(mlp_ratio=0.0), ids, target, prefix=prefix)
    with pytest.raises(TypeError, match="model: expected a ToyLM"):
        neuron_attribution(torch.nn.Linear(2, 2), ids, target)
    with pytest.raises(ShapeError, match="target: expected int64"):
        neuron_attribution(model, ids, target[:2], prefix=prefix)
    with pytest.raises(ValueError, match=r"target: expected ids in \[0, 13\)"):
        neuron_attribution(model, ids, target + 20, prefix=prefix)
    with pytest.raises(ParameterError, match="position: expected an index"):
        neuron_attribution(model, ids, target, prefix=prefix, position=7)
    with pytest.raises(ParameterError, match="neurons: expected indices"):
        decode_neurons(model, 0, [32])
    with pytest.raises(TypeError, match="masks: expected bool"):
        with ablate_neurons(model, {0: torch.zeros(3)}):
            pass
    with pytest.raises(ShapeError, match=r"images: expected a tensor \(batch, 8, 8\)"):
        PatchFeatures()(torch.zeros(2, 64))
    with pytest.raises(ParameterError, match="mlp_ratio"):
        CaptionerSettings(mlp_ratio=0.0)
    assert CAPTION == 10 and PATCHES == 4
    names = ("multimodal-neuron-attribution", "neuron-decoding", "neuron-ablation-check")
    assert {get(n, "analysis").paper.id for n in names} == {"P119"}
