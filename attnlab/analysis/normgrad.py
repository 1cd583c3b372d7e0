"""NormGrad saliency (P250, Rebuffi et al. 2020): the norm of each spatial location's share of a convolution's
weight gradient, per layer and combined over layers, with Grad-CAM as the baseline and the pointing game.

For a convolution y = W ⋆ x with weight W ∈ R^{C_out × C_in·k·k}, its weight gradient is a sum over the output
locations u of outer products, ∂L/∂W = Σ_u g_u x_uᵀ, with x_u the input patch that location reads (the im2col
column, C_in·k·k values) and g_u = ∂L/∂y_u (C_out values). NormGrad keeps each location's share apart:

    S_u = ‖g_u x_uᵀ‖_F = ‖g_u‖₂ · ‖x_u‖₂                                              (one map per layer)

computed as ‖g_u‖ times sqrt(Σ_window Σ_channels x²) — a convolution of x² with a ones kernel of the layer's
size, stride, padding and dilation — without forming the outer products (`normgrad_layer_reference` forms them,
in float64). L = the target class's logit (default: the predicted class). Multi-layer: each map is upsampled
(bilinear) to the input size, min-max normalised per image to [0, 1], and the maps multiplied (the official
code's combination). Grad-CAM at a layer (the baseline the paper explains): ReLU(Σ_c mean_u(g_c) · y_c).

    from attnlab.analysis.digits import digit_cnn, canvas_test_set
    from attnlab.analysis.normgrad import normgrad, pointing_game
    cnn = digit_cnn()
    test = canvas_test_set(cnn.settings, 100)
    sal = normgrad(cnn.model, test.images, layers=list(cnn.model.convs))   # maps per layer, upsampled, combined
    hits = pointing_game(sal.combined, test.boxes)                          # (100,) bool: max inside the digit

Class sensitivity (`class_sensitivity`): the Pearson correlation, over locations, of the maps for the most and the
least likely class, averaged over images (from paper knowledge: the paper's metric compares the maps of the top
and bottom classes; 1 = the map ignores the class). Pointing game (`pointing_game`): a hit when the map's maximum
(first one in raster order) lies in the object's box grown by `tolerance` pixels; a constant map is a miss. On the
digit canvases of `attnlab.analysis.digits` the box is the pasted digit's 8×8 square (chance: its area share).

Deviations: the official code inserts a virtual identity (1×1 or 3×3) layer after chosen layers; here the maps are
those of the network's own convolutions (the paper's NormGrad of a convolutional layer), and the multi-layer
product and Grad-CAM are computed at the same layers. Grouped convolutions are refused (their weight gradient is a
sum per group, not one outer product).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.errors import ParameterError, ShapeError
from ..core.registry import Paper, Param, Spec, add
from ..core.validate import check_finite, check_floating, check_tensor, is_int
from .digits import CNNSettings, canvas_test_set, digit_cnn

P250 = Paper("P250", "There and Back Again: Revisiting Backpropagation Saliency Methods", 2020, "2004.02866")
Method = Literal["normgrad", "gradcam"]


@dataclass
class Saliency:
    """maps: one (batch, h_l, w_l) map per layer at the layer's output resolution; upsampled (layers, batch, H, W)
    to the input size; combined (batch, H, W): product of the min-max normalised upsampled maps; target (batch,)."""

    maps: list[Tensor]
    upsampled: Tensor
    combined: Tensor
    target: Tensor


def _check_layers(model: nn.Module, layers: Sequence[nn.Module] | None) -> list[nn.Conv2d]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    found = [m for m in model.modules() if isinstance(m, nn.Conv2d)] if layers is None else list(layers)
    if not found:
        raise ValueError(f"layers: expected at least one nn.Conv2d of the model, got none in {type(model).__name__}")
    owned = {id(m) for m in model.modules()}
    for i, layer in enumerate(found):
        if not isinstance(layer, nn.Conv2d) or id(layer) not in owned:
            raise TypeError(f"layers: expected nn.Conv2d modules of the model, got {type(layer).__name__} at {i}")
        if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError(f"layers: expected convolutions with groups=1, zero padding given as ints, got "
                             f"groups={layer.groups}, padding={layer.padding!r}, padding_mode={layer.padding_mode!r} "
                             f"at {i}")
    return found


def _input_norms(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """‖x_u‖₂ for every output location u of conv: (batch, h_out, w_out)."""
    ones = torch.ones(1, x.shape[1], *conv.kernel_size, dtype=x.dtype, device=x.device)
    energy = F.conv2d(x * x, ones, stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
    return energy[:, 0].clamp_min(0).sqrt()


def _record(model: nn.Module, images: Tensor, target: Tensor | None,
            layers: list[nn.Conv2d]) -> tuple[list[Tensor], list[Tensor], list[Tensor], Tensor, Tensor]:
    """Run the model, backpropagate the target logits; (inputs, outputs, output grads) per layer, logits, target."""
    inputs: list[Tensor] = [torch.empty(0)] * len(layers)
    outputs: list[Tensor] = [torch.empty(0)] * len(layers)

    def hook_for(i: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            inputs[i], outputs[i] = args[0].detach(), output
        return hook

    handles = [layer.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        with torch.enable_grad():
            logits = model(images)
            if logits.dim() != 2 or logits.shape[0] != images.shape[0]:
                raise ShapeError(f"model: expected logits (batch, classes), got shape {tuple(logits.shape)}")
            chosen = logits.argmax(-1) if target is None else _check_target(target, logits)
            grads = torch.autograd.grad(logits.gather(1, chosen[:, None]).sum(), outputs)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, [o.detach() for o in outputs], list(grads), logits.detach(), chosen


def _check_target(target: Tensor, logits: Tensor) -> Tensor:
    check_tensor("target", target)
    if target.dtype != torch.int64 or tuple(target.shape) != (logits.shape[0],):
        raise ShapeError(f"target: expected class indices int64 (batch,) = ({logits.shape[0]},), got "
                         f"{target.dtype} {tuple(target.shape)}")
    if bool(((target < 0) | (target >= logits.shape[1])).any()):
        raise ValueError(f"target: expected classes in [0, {logits.shape[1]}), got {target.tolist()}")
    return target.to(logits.device)


def _normalise(maps: Tensor) -> Tensor:
    """Min-max to [0, 1] per image over (H, W); a constant map becomes 0."""
    low = maps.amin((-2, -1), keepdim=True)
    span = maps.amax((-2, -1), keepdim=True) - low
    return torch.where(span > 0, (maps - low) / torch.where(span > 0, span, 1), 0)


def saliency(model: nn.Module, images: Tensor, target: Tensor | None = None, *,
             layers: Sequence[nn.Module] | None = None, method: Method = "normgrad") -> Saliency:
    """NormGrad (or Grad-CAM) maps of `model` on images (batch, C, H, W) for the target classes (default: the
    predicted ones) at `layers` (nn.Conv2d modules of the model; default: all of them, in module order)."""
    check_tensor("images", images)
    if images.dim() != 4 or 0 in images.shape:
        raise ShapeError(f"images: expected a tensor (batch, channels, H, W), got shape {tuple(images.shape)}")
    check_floating("images", images)
    check_finite("images", images)
    if method not in ("normgrad", "gradcam"):
        raise ParameterError(f"method: expected 'normgrad' or 'gradcam', got {method!r}")
    convs = _check_layers(model, layers)
    inputs, outputs, grads, _, chosen = _record(model, images, target, convs)
    maps = []
    for conv, x, y, g in zip(convs, inputs, outputs, grads):
        if method == "normgrad":
            maps.append(g.norm(dim=1) * _input_norms(x, conv))
        else:
            weights = g.mean(dim=(2, 3), keepdim=True)
            maps.append(torch.relu((weights * y).sum(1)))
    size = images.shape[-2:]
    upsampled = torch.stack([F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
                             for m in maps])
    return Saliency(maps, upsampled, _normalise(upsampled).prod(0), chosen)


def normgrad(model: nn.Module, images: Tensor, target: Tensor | None = None, *,
             layers: Sequence[nn.Module] | None = None) -> Saliency:
    """NormGrad: S_u = ‖g_u‖·‖x_u‖ per output location of each layer, combined over the layers (see `saliency`)."""
    return saliency(model, images, target, layers=layers, method="normgrad")


def grad_cam(model: nn.Module, images: Tensor, target: Tensor | None = None, *,
             layers: Sequence[nn.Module] | None = None) -> Saliency:
    """Grad-CAM at each layer: ReLU(Σ_c mean_u(∂L/∂y_c) · y_c), combined as NormGrad's (see `saliency`)."""
    return saliency(model, images, target, layers=layers, method="gradcam")


def normgrad_layer_reference(x: Tensor, grad: Tensor, conv: nn.Conv2d) -> Tensor:
    """S_u = ‖g_u x_uᵀ‖_F from the explicit outer products, float64: x the layer's input (batch, C_in, H, W), grad
    the gradient at its output (batch, C_out, h, w) -> (batch, h, w)."""
    columns = F.unfold(x.double(), conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                       stride=conv.stride)  # (batch, C_in·k·k, h·w)
    g = grad.double().flatten(2)  # (batch, C_out, h·w)
    if columns.shape[2] != g.shape[2]:
        raise ShapeError(f"grad: expected {columns.shape[2]} output locations for conv, got {g.shape[2]}")
    outer = torch.einsum("bou,biu->buoi", g, columns)
    return outer.flatten(2).norm(dim=2).reshape(grad.shape[0], *grad.shape[2:])


def pointing_game(maps: Tensor, boxes: Tensor, tolerance: int = 0) -> Tensor:
    """(batch,) bool: the maximum of each map (batch, H, W) (first in raster order) lies in its box (top, left,
    bottom, right; bottom/right exclusive) grown by `tolerance` pixels; a constant map is a miss."""
    check_tensor("maps", maps)
    check_tensor("boxes", boxes)
    if maps.dim() != 3 or 0 in maps.shape:
        raise ShapeError(f"maps: expected a tensor (batch, H, W), got shape {tuple(maps.shape)}")
    if boxes.dtype != torch.int64 or tuple(boxes.shape) != (maps.shape[0], 4):
        raise ShapeError(f"boxes: expected int64 (batch, 4) = ({maps.shape[0]}, 4) as (top, left, bottom, right), "
                         f"got {boxes.dtype} {tuple(boxes.shape)}")
    if not is_int(tolerance) or tolerance < 0:
        raise ParameterError(f"tolerance: expected an int >= 0, got {tolerance!r}")
    flat = maps.flatten(1)
    where = flat.argmax(1)
    row, col = where // maps.shape[2], where % maps.shape[2]
    b = boxes.to(maps.device)
    inside = ((row >= b[:, 0] - tolerance) & (row < b[:, 2] + tolerance)
              & (col >= b[:, 1] - tolerance) & (col < b[:, 3] + tolerance))
    return inside & (flat.amax(1) > flat.amin(1))


def class_sensitivity(model: nn.Module, images: Tensor, *, layers: Sequence[nn.Module] | None = None,
                      method: Method = "normgrad") -> Tensor:
    """Per layer (layers + 1,) float64, the last entry for the combined map: the Pearson correlation over
    locations between the maps for the most and the least likely class, averaged over images (lower = more
    class-sensitive; a constant map counts as correlation 1)."""
    with torch.no_grad():
        logits = model(images)
    top = saliency(model, images, logits.argmax(-1), layers=layers, method=method)
    bottom = saliency(model, images, logits.argmin(-1), layers=layers, method=method)
    a = torch.cat([top.upsampled, top.combined[None]]).flatten(2).double()
    b = torch.cat([bottom.upsampled, bottom.combined[None]]).flatten(2).double()
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    denominator = a.norm(dim=-1) * b.norm(dim=-1)
    correlation = torch.where(denominator > 0, (a * b).sum(-1) / torch.where(denominator > 0, denominator, 1), 1.0)
    return correlation.mean(1)


def pointing_by_layer(settings: str | CNNSettings = "default", *, count: int | None = None, cache_dir: Any = None,
                      progress: bool = True) -> dict[str, Any]:
    """The demo: the digit CNN of `settings` (trained and cached on a miss) on its test canvases: test accuracy,
    the pointing accuracy of NormGrad and Grad-CAM at each conv layer and combined, their class sensitivity per
    layer and combined, and the chance level of the pointing game (the box's share of the canvas)."""
    trained = digit_cnn(settings, cache_dir=cache_dir, progress=progress)
    model = trained.model
    test = canvas_test_set(trained.settings, count)
    layers = list(model.convs)  # type: ignore[arg-type]
    out: dict[str, Any] = {"settings": trained.settings, "test_accuracy": trained.test_accuracy,
                           "chance": (8 / trained.settings.canvas) ** 2}
    for method in ("normgrad", "gradcam"):
        result = saliency(model, test.images, test.labels, layers=layers, method=method)  # type: ignore[arg-type]
        per_layer = [float(pointing_game(m, test.boxes).double().mean()) for m in result.upsampled]
        out[f"{method}_pointing"] = per_layer + [float(pointing_game(result.combined, test.boxes).double().mean())]
        out[f"{method}_class_sensitivity"] = class_sensitivity(model, test.images, layers=layers,
                                                               method=method).tolist()  # type: ignore[arg-type]
    return out


_MODEL = Param("model", nn.Module, doc="a CNN classifier: images (batch, C, H, W) -> logits (batch, classes)")
_IMAGES = Param("images", Tensor, doc="(batch, C, H, W)")
_TARGET = Param("target", Tensor, None, "class per image (batch,) int64; default: the predicted class", optional=True)
_LAYERS = Param("layers", (list, tuple), None, "nn.Conv2d modules of the model; default: all", optional=True)
add(Spec(name="normgrad", kind="analysis", paper=P250, factory=normgrad, family="E",
         summary="NormGrad: ‖g_u‖·‖x_u‖ per location of each conv layer (the norm of its share of the weight "
                 "gradient), and the product over layers", params=(_MODEL, _IMAGES, _TARGET, _LAYERS)))
add(Spec(name="grad-cam", kind="analysis", paper=P250, factory=grad_cam, family="E",
         summary="Grad-CAM at each conv layer (NormGrad's baseline): ReLU(Σ_c mean(∂L/∂y_c)·y_c)",
         params=(_MODEL, _IMAGES, _TARGET, _LAYERS)))
add(Spec(name="saliency-class-sensitivity", kind="analysis", paper=P250, factory=class_sensitivity, family="E",
         summary="Pearson correlation of the saliency maps for the most and least likely class (lower = more "
                 "class-sensitive), per layer and combined", params=(
             _MODEL, _IMAGES, _LAYERS,
             Param("method", str, "normgrad", "the saliency method", choices=("normgrad", "gradcam")))))
add(Spec(name="pointing-game", kind="analysis", paper=P250, factory=pointing_game, family="E",
         summary="share of maps whose maximum falls in the object's box", params=(
             Param("maps", Tensor, doc="(batch, H, W)"),
             Param("boxes", Tensor, doc="int64 (batch, 4): top, left, bottom, right (exclusive)"),
             Param("tolerance", int, 0, "pixels the box is grown by", low=0))))
