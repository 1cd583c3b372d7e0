"""P250 NormGrad: each layer's map equals the norm of the explicit outer product g_u x_uᵀ (im2col in float64, the
inputs and gradients computed here by hand), whose sum over u is the weight gradient; the pointing game and class
sensitivity on planted cases; on a small CNN trained here on digit canvases, pointing accuracy per layer."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnlab
from attnlab.analysis.digits import CNNSettings, DigitCNN, canvas_test_set, train_digit_cnn
from attnlab.analysis.normgrad import (
    class_sensitivity,
    grad_cam,
    normgrad,
    normgrad_layer_reference,
    pointing_game,
    saliency,
)


class Strided(nn.Module):
    """Two convolutions with stride, padding and dilation, for the layer-map check."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(2, 5, 3, stride=2, padding=1)
        self.b = nn.Conv2d(5, 4, (3, 2), padding=(2, 1), dilation=2)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))).mean((2, 3)))


def test_each_map_is_the_norm_of_the_explicit_outer_products():
    model = Strided().double()
    images = torch.randn(3, 2, 9, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 2, 1])
    result = normgrad(model, images, target, layers=[model.a, model.b])
    # by hand: the layers' inputs, outputs and d(target logits)/d(outputs)
    ya = model.a(images)
    xb = torch.tanh(ya)
    yb = model.b(xb)
    logits = model.head(torch.tanh(yb).mean((2, 3)))
    ga, gb = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), [ya, yb])
    for conv, x, g, got in ((model.a, images, ga, result.maps[0]), (model.b, xb.detach(), gb, result.maps[1])):
        expected = normgrad_layer_reference(x, g, conv)
        assert got.shape == expected.shape == g.shape[:1] + g.shape[2:]
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        # the reference's outer products sum over the locations to the weight gradient: its im2col is aligned
        columns = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
        summed = torch.einsum("bou,biu->oi", g.flatten(2), columns)
        (weight_grad,) = torch.autograd.grad(
            model.head(torch.tanh(model.b(torch.tanh(model.a(images)))).mean((2, 3))).gather(1, target[:, None]).sum(),
            [conv.weight])
        torch.testing.assert_close(summed, weight_grad.flatten(1), rtol=1e-10, atol=1e-12)
    assert result.upsampled.shape == (2, 3, 9, 7) and result.combined.shape == (3, 9, 7)
    assert float(result.combined.min()) >= 0 and float(result.combined.max()) <= 1


def test_the_pointing_game_on_planted_maps():
    maps = torch.zeros(4, 10, 10)
    maps[0, 3, 4] = 1.0   # inside (2, 3)-(6, 8)
    maps[1, 6, 4] = 1.0   # the row just below the box: a miss, a hit with tolerance 1
    maps[2, 4, 9] = 1.0   # right of the box
    boxes = torch.tensor([[2, 3, 6, 8]] * 4)
    assert pointing_game(maps, boxes).tolist() == [True, False, False, False]  # a constant map (3) is a miss
    assert pointing_game(maps, boxes, tolerance=1).tolist() == [True, True, False, False]
    transposed = torch.zeros(1, 10, 10)
    transposed[0, 4, 3] = 1.0  # (row 4, column 3) is inside; (row 3, column 4) would be too — use an asymmetric box
    assert pointing_game(transposed, torch.tensor([[4, 0, 5, 10]])).tolist() == [True]
    assert pointing_game(transposed, torch.tensor([[0, 4, 10, 5]])).tolist() == [False]


class Halves(nn.Module):
    """Class 0 (always the largest logit) reads channel 0 on the left half; class 1 (always the smallest) reads
    channel 1 on the right half (`same=False`) or channel 0 on the left half again (`same=True`)."""

    def __init__(self, same: bool) -> None:
        super().__init__()
        self.same = same
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        left, right = y[:, 0, :, :4].sum((1, 2)), y[:, 1, :, 4:].sum((1, 2))
        return torch.stack([left + 100, (left if self.same else right) - 100], dim=1)


def test_class_sensitivity_on_planted_classes():
    images = torch.rand(5, 1, 6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.1
    apart, same = Halves(same=False).double(), Halves(same=True).double()
    top, bottom = normgrad(apart, images, torch.zeros(5, dtype=torch.int64)), normgrad(apart, images,
                                                                                        torch.ones(5, dtype=torch.int64))
    torch.testing.assert_close(top.maps[0][:, :, :4], images[:, 0, :, :4])  # ‖g_u‖ = 1, ‖x_u‖ = the pixel
    assert bool((top.maps[0][:, :, 4:] == 0).all()) and bool((bottom.maps[0][:, :, :4] == 0).all())
    insensitive = class_sensitivity(same, images)  # per layer and combined
    sensitive = class_sensitivity(apart, images)
    torch.testing.assert_close(insensitive, torch.ones(2, dtype=torch.float64))
    assert bool((sensitive < 0).all()), sensitive  # maps on disjoint halves


def test_pointing_accuracy_per_layer_on_a_trained_cnn():
    settings = CNNSettings(channels=(8, 16, 16), steps=400, batch=32, lr=5e-3, seed=0)
    trained = train_digit_cnn(settings)
    test = canvas_test_set(settings, 120)
    model: DigitCNN = trained.model  # type: ignore[assignment]
    layers = list(model.convs)
    chance = (8 / settings.canvas) ** 2
    result = normgrad(model, test.images, test.labels, layers=layers)
    per_layer = [float(pointing_game(m, test.boxes).double().mean()) for m in result.upsampled]
    combined = float(pointing_game(result.combined, test.boxes).double().mean())
    assert trained.test_accuracy > 0.25  # 46 % for this seed after 400 steps (chance 10 %)
    assert all(p > 3 * chance for p in per_layer), per_layer
    assert combined > 5 * chance, combined
    # the boxes are where the digits are: pointing at the digit's mirror position fails
    mirrored = torch.stack([settings.canvas - test.boxes[:, 2], settings.canvas - test.boxes[:, 3],
                            settings.canvas - test.boxes[:, 0], settings.canvas - test.boxes[:, 1]], dim=1)
    assert float(pointing_game(result.combined, mirrored).double().mean()) < combined / 2
    cam = grad_cam(model, test.images, test.labels, layers=layers)
    assert cam.upsampled.shape == result.upsampled.shape and bool((cam.upsampled >= 0).all())


def test_bad_inputs_name_the_argument():
    model = Strided()
    images = torch.randn(2, 2, 9, 7)
    with pytest.raises(ValueError, match="images: expected a tensor \\(batch, channels, H, W\\)"):
        normgrad(model, images[0])
    with pytest.raises(TypeError, match="layers: expected nn.Conv2d modules of the model"):
        normgrad(model, images, layers=[model.head])
    with pytest.raises(TypeError, match="layers: expected nn.Conv2d modules of the model"):
        normgrad(model, images, layers=[nn.Conv2d(2, 5, 3)])
    with pytest.raises(ValueError, match="target: expected class indices int64"):
        normgrad(model, images, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="target: expected classes in"):
        normgrad(model, images, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="method: expected 'normgrad' or 'gradcam'"):
        saliency(model, images, method="cam")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="boxes: expected int64"):
        pointing_game(torch.zeros(2, 4, 4), torch.zeros(2, 4))
    grouped = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(ValueError, match="layers: expected convolutions with groups=1"):
        normgrad(grouped, images)


def test_registered_with_the_paper():
    for name in ("normgrad", "grad-cam", "saliency-class-sensitivity", "pointing-game"):
        spec = attnlab.get(name, kind="analysis")
        assert spec.paper.id == "P250" and spec.paper.arxiv == "2004.02866" and spec.family == "E"
