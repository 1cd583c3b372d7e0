"""P064 class lens: the last layer's [CLS] projection is the model's output (softmax and non-softmax mixers), the
trace decomposes the stream into the blocks' updates, identifiability's definition on planted logits, a planted
silent MLP, and on a tiny ViT trained here identifiability rises with depth."""
from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.analysis.class_lens import (
    class_identifiability,
    class_lens,
    identifiability_profile,
    sublayer_attribution,
    token_importance,
)
from attnlab.analysis.digits import DigitViT, ViTSettings, load_digits_split, train_digit_vit

MIXERS = [("softmax", ()), ("linear", ()), ("neighborhood", (("kernel_size", 5),))]


def _model(mixer: str = "softmax", params: tuple = (), seed: int = 0) -> DigitViT:
    torch.manual_seed(seed)
    return DigitViT(ViTSettings(dim=16, heads=2, layers=2, mixer=mixer, mixer_params=params)).eval()


@pytest.mark.parametrize(("mixer", "params"), MIXERS)
def test_the_last_layer_projection_is_the_models_logits(mixer, params):
    model = _model(mixer, params)
    images = load_digits_split().test_images[:12]
    lens = class_lens(model, images)
    with torch.no_grad():
        logits = model(images)
    assert lens.logits.shape == (3, 12, 17, 10) and lens.attention_logits.shape == (2, 12, 17, 10)
    assert torch.equal(lens.logits[-1, :, 0], logits)  # exact: the same LayerNorm and head on the same stream
    assert torch.equal(lens.model_logits, logits)
    labels = load_digits_split().test_labels[:12]
    assert torch.equal(class_identifiability(lens.logits[-1, :, 0], labels), class_identifiability(logits, labels))


@pytest.mark.parametrize(("mixer", "params"), MIXERS[:2])
def test_the_trace_is_the_stream_and_its_updates(mixer, params):
    model = _model(mixer, params).double()
    images = load_digits_split().test_images[:5].double()
    trace = model.trace(images)
    with torch.no_grad():
        x = model.tokens(images)
        assert torch.equal(trace.residuals[0], x)
        for layer, block in enumerate(model.blocks):
            x = block(x)  # each block run on its own
            assert torch.equal(trace.residuals[layer + 1], x)
            torch.testing.assert_close(trace.residuals[layer] + trace.attention[layer] + trace.mlp[layer], x,
                                       rtol=0, atol=1e-12)


def test_identifiability_is_one_minus_the_rank_over_the_classes():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0],    # true class 0 first -> 1
                           [3.0, 1.0, 2.0, 0.0],    # true class 3 last -> 1/4
                           [1.0, 1.0, 1.0, 1.0],    # all tied: rank 1.5 -> 1 − 1.5/4
                           [0.0, 2.0, 2.0, 5.0]])   # class 1 tied with 2, below 3: rank 1 + ½ -> 1 − 1.5/4
    labels = torch.tensor([0, 3, 2, 1])
    assert class_identifiability(logits, labels).tolist() == [1.0, 0.25, 0.625, 0.625]
    constant = torch.zeros(10, 10)  # a constant projection scores chance on average over the classes
    assert float(class_identifiability(constant, torch.arange(10)).mean()) == pytest.approx(0.55, abs=0)


def test_a_silent_mlp_carries_no_class():
    model = _model()
    with torch.no_grad():
        for block in model.blocks:  # the MLP's output layer zeroed: its update is 0, LN(0) = 0, logits = head bias
            block.mlp[-1].weight.zero_()
            block.mlp[-1].bias.zero_()
        model.head.bias.zero_()
    data = load_digits_split()
    lens = class_lens(model, data.test_images[:20])
    parts = sublayer_attribution(lens, data.test_labels[:20])
    assert torch.equal(lens.mlp_logits, torch.zeros_like(lens.mlp_logits))
    for key in ("cls", "image"):  # every class tied: (C + 1) / (2C) for every token
        assert parts.mlp_identifiability[key].tolist() == [0.55, 0.55]
        assert not torch.equal(parts.attention_identifiability[key], parts.mlp_identifiability[key])


def test_identifiability_rises_with_depth_on_a_trained_vit():
    trained = train_digit_vit(ViTSettings(dim=32, heads=2, layers=3, steps=200, batch=64, lr=5e-3, seed=0))
    data = load_digits_split()
    lens = class_lens(trained.model, data.test_images)
    cls = identifiability_profile(lens, data.test_labels)["cls"]
    assert trained.test_accuracy > 0.6
    assert float(cls[0]) < 0.6  # the [CLS] embedding is the same for every image: about chance, 0.55
    assert float(cls[-1]) > 0.85
    assert bool((cls[1:] >= cls[:-1] - 0.01).all()), cls  # never falls by more than 0.01 from block to block
    importance = token_importance(lens, data.test_labels, layer=-1)
    assert importance.shape == (len(data.test_labels), 4, 4)
    patch = 6  # raster order: row 1, column 2 of the 4×4 grid
    assert torch.equal(importance[:, 1, 2], lens.logits[-1, torch.arange(len(data.test_labels)), 1 + patch,
                                                         data.test_labels])


def test_bad_inputs_name_the_argument():
    model = _model()
    images = load_digits_split().test_images[:3]
    lens = class_lens(model, images)
    with pytest.raises(TypeError, match="model: expected a ViT with trace"):
        class_lens(torch.nn.Linear(2, 2), images)
    with pytest.raises(ValueError, match="images: expected a tensor"):
        class_lens(model, images[:, :4])
    with pytest.raises(TypeError, match="labels: expected an int64"):
        class_identifiability(lens.logits, torch.zeros(3))
    with pytest.raises(ValueError, match="labels: expected shape"):
        identifiability_profile(lens, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels: expected class indices"):
        class_identifiability(lens.model_logits, torch.tensor([0, 1, 10]))
    with pytest.raises(ValueError, match="layer: expected an int"):
        token_importance(lens, torch.zeros(3, dtype=torch.int64), layer=3)
    with pytest.raises(TypeError, match="patch_mask: expected dtype torch.bool"):
        class_lens(model, images, patch_mask=torch.ones(3, 16))


def test_registered_with_the_paper():
    for name in ("class-lens", "class-identifiability", "class-lens-attribution"):
        spec = attnlab.get(name, kind="analysis")
        assert spec.paper.id == "P064" and spec.paper.arxiv == "2310.18969" and spec.family == "E"
