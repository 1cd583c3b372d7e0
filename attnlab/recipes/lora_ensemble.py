"""LoRA-Ensemble (P121): an implicit ensemble of M members sharing one frozen backbone, each with its own
low-rank adapters on the attention projections and its own classifier head.

For member m and each adapted projection W (torch weight (out, in), y = x Wᵀ + b):

    y_m = x (W + B_m A_m)ᵀ + b,     A_m ∈ R^{r×in} ~ N(0, σ²) (σ = 0.02),  B_m ∈ R^{out×r} = 0 at the start

(the official `models/lora.py` init: normal A, zero B), so every member equals the backbone at the start;
the heads are copies of the model's head, trained per member. The prediction is the mean of the
members' probabilities, p(y | x) = (1/M) Σ_m softmax(f_m(x)). Adapted projections: q, k, v by default
(the official code's `lora_type="qkv"`); any subset of q, k, v, o. The backbone is frozen (requires_grad
False) and stored once; trainable: M·Σ r·(in + out) adapter entries plus M heads.

Evaluation (`evaluate`): accuracy, NLL = −(1/n) Σ log p(y_i | x_i), and the expected calibration error
with B equal-width confidence bins (k/B, (k+1)/B] (the first also takes 0), confidence = max_c p_c,

    ECE = Σ_b (n_b / n) · | acc_b − conf_b |.

Members run in one batched pass: the input batch is repeated M times, member-major, and each adapted
projection applies member m's adapters to the m-th slice. `explicit_member(m)` returns member m as a plain
model (B_m A_m merged into the weights, its own head), for checks against an explicit ensemble.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core.registry import Paper, Param, Spec, add
from .projections import attention_layers

LORA_ENSEMBLE = Paper("P121", "LoRA-Ensemble: Efficient Uncertainty Modelling for Self-attention Networks", 2024, "2405.14438")

PROJECTIONS = ("q", "k", "v", "o")


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    return value


def _member_slices(x: Tensor, members: int, name: str) -> Tensor:
    if x.shape[0] % members:
        raise ValueError(
            f"{name}: expected a batch of members × samples (a multiple of {members}, member-major), got {x.shape[0]}"
        )
    return x.reshape(members, -1, x.shape[-1])


class EnsembleLoRALinear(nn.Module):
    """A frozen nn.Linear plus M rank-r adapters, y_m = base(x_m) + x_m A_mᵀ B_mᵀ on a member-major batch."""

    def __init__(
        self, base: nn.Linear, members: int, rank: int, *, std: float = 0.02, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base: expected an nn.Linear, got {type(base).__name__}")
        self.members, self.rank = _positive_int("members", members), _positive_int("rank", rank)
        if rank > min(base.in_features, base.out_features):
            raise ValueError(f"rank: expected <= {min(base.in_features, base.out_features)} (the projection's width), got {rank}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.weight
        a = torch.randn(members, rank, base.in_features, generator=generator, dtype=w.dtype).to(w.device) * std
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(members, base.out_features, rank, dtype=w.dtype, device=w.device))

    def forward(self, x: Tensor) -> Tensor:
        xm = _member_slices(x, self.members, "x")
        delta = torch.einsum("mnr,mor->mno", torch.einsum("mni,mri->mnr", xm, self.lora_A), self.lora_B)
        return self.base(x) + delta.reshape(*x.shape[:-1], -1)

    def merged(self, m: int) -> nn.Linear:
        """Member m as a plain nn.Linear with weight W + B_m A_m."""
        out = copy.deepcopy(self.base)
        with torch.no_grad():
            out.weight.add_(self.lora_B[m] @ self.lora_A[m])
        return out


class MemberLinear(nn.Module):
    """M independent copies of a linear layer (the members' heads), applied on a member-major batch."""

    def __init__(self, base: nn.Linear, members: int) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"head: expected the name of an nn.Linear, got {type(base).__name__}")
        self.members = _positive_int("members", members)
        self.weight = nn.Parameter(base.weight.detach().clone().expand(members, -1, -1).clone())
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone().expand(members, -1).clone())

    def forward(self, x: Tensor) -> Tensor:
        y = torch.einsum("mni,moi->mno", _member_slices(x, self.members, "x"), self.weight)
        if self.bias is not None:
            y = y + self.bias[:, None]
        return y.reshape(*x.shape[:-1], -1)

    def merged(self, m: int) -> nn.Linear:
        """Member m's head as a plain nn.Linear."""
        out = nn.Linear(self.weight.shape[2], self.weight.shape[1], bias=self.bias is not None)
        out = out.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight[m])
            if self.bias is not None:
                out.bias.copy_(self.bias[m])
        return out


def _replace(root: nn.Module, target: nn.Module, new: nn.Module) -> None:
    for name, module in root.named_modules():
        if module is target:
            parent_name, _, child = name.rpartition(".")
            setattr(root.get_submodule(parent_name), child, new)
            return
    raise ValueError(f"model: expected {type(target).__name__} inside the model, got none")


class LoRAEnsemble(nn.Module):
    """`model` (frozen, in place) as an implicit ensemble of `members` LoRA members (module docstring).

    `forward(*inputs, **kw)` repeats every tensor input along dim 0 M times and returns the model's output
    (or its `.logits`, for a transformers model) with a leading member axis (M, batch, …); `predict` gives
    the mean of the members' probabilities."""

    def __init__(
        self,
        model: nn.Module,
        members: int,
        rank: int,
        *,
        projections: Sequence[str] = ("q", "k", "v"),
        head: str | None = None,
        std: float = 0.02,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.members, self.rank = _positive_int("members", members), _positive_int("rank", rank)
        if isinstance(projections, str) or not projections or any(p not in PROJECTIONS for p in projections) or len(
            set(projections)
        ) != len(projections):
            raise ValueError(f"projections: expected distinct names among {PROJECTIONS}, got {projections!r}")
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not 0 < std < math.inf:
            raise ValueError(f"std: expected a finite number > 0 (the std of A), got {std!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        layers = attention_layers(model)
        head_module = None
        if head is not None:
            head_module = dict(model.named_modules()).get(head)
            if not isinstance(head_module, nn.Linear):
                raise ValueError(f"head: expected the name of an nn.Linear of the model, got {head!r}")
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in layers:
            for name in projections:
                adapter = EnsembleLoRALinear(getattr(layer, name), members, rank, std=std, generator=generator)
                _replace(layer.module, getattr(layer, name), adapter)
        if head_module is not None:
            _replace(model, head_module, MemberLinear(head_module, members))
        self.model = model

    @property
    def adapters(self) -> list[EnsembleLoRALinear]:
        """The adapted projections, in module order."""
        return [m for m in self.model.modules() if isinstance(m, EnsembleLoRALinear)]

    @property
    def heads(self) -> MemberLinear | None:
        """The members' heads (None without `head`)."""
        return next((m for m in self.model.modules() if isinstance(m, MemberLinear)), None)

    @property
    def trainable_count(self) -> int:
        """M·Σ r·(in + out) over the adapted projections, plus the M heads."""
        count = sum(self.members * a.rank * (a.base.in_features + a.base.out_features) for a in self.adapters)
        if self.heads is not None:
            count += sum(p.numel() for p in self.heads.parameters())
        return count

    def forward(self, *inputs: Any, **kw: Any) -> Tensor:
        def repeat(t: Any) -> Any:
            return torch.cat([t] * self.members) if isinstance(t, Tensor) else t

        out = self.model(*(repeat(t) for t in inputs), **{k: repeat(v) for k, v in kw.items()})
        out = getattr(out, "logits", out)  # a transformers output
        if not isinstance(out, Tensor):
            raise TypeError(f"model: expected a tensor output (the logits), got {type(out).__name__}")
        return out.reshape(self.members, -1, *out.shape[1:])

    def predict(self, *inputs: Any, **kw: Any) -> Tensor:
        """The ensemble's probabilities (batch, …, classes): the mean over members of softmax(f_m(x))."""
        return ensemble_probabilities(self(*inputs, **kw))

    def explicit_member(self, m: int) -> nn.Module:
        """Member m as a plain model: a copy of the model with B_m A_m merged and member m's head."""
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m < self.members:
            raise ValueError(f"m: expected a member index in [0, {self.members}), got {m!r}")
        plain = copy.deepcopy(self.model)
        for name, module in list(plain.named_modules()):
            if isinstance(module, (EnsembleLoRALinear, MemberLinear)):
                parent_name, _, child = name.rpartition(".")
                setattr(plain.get_submodule(parent_name), child, module.merged(m))
        return plain


def ensemble_probabilities(member_logits: Tensor) -> Tensor:
    """(1/M) Σ_m softmax(logits_m) over the last axis: (M, …, classes) -> (…, classes)."""
    if not isinstance(member_logits, Tensor) or member_logits.dim() < 2:
        raise ValueError(f"member_logits: expected a tensor (members, ..., classes), got {member_logits!r:.60}")
    return member_logits.softmax(dim=-1).mean(dim=0)


@dataclass(frozen=True)
class Calibration:
    """Accuracy, negative log-likelihood (nats per sample) and ECE of probabilities against labels."""

    accuracy: float
    nll: float
    ece: float


def _check_probs(probs: Tensor, labels: Tensor) -> None:
    if not isinstance(probs, Tensor) or probs.dim() != 2 or not probs.is_floating_point():
        raise ValueError(f"probs: expected float probabilities (n, classes), got {probs!r:.60}")
    if not isinstance(labels, Tensor) or labels.shape != probs.shape[:1] or labels.dtype != torch.long:
        raise ValueError(f"labels: expected int64 class indices ({probs.shape[0]},), got {labels!r:.60}")
    if bool(((labels < 0) | (labels >= probs.shape[1])).any()):
        raise ValueError(f"labels: expected indices in [0, {probs.shape[1]}), got one outside")


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = 10) -> float:
    """Σ_b (n_b/n)|acc_b − conf_b| over `bins` equal-width confidence bins (k/B, (k+1)/B], 0 in the first."""
    _check_probs(probs, labels)
    bins = _positive_int("bins", bins)
    p = probs.detach().double()
    confidence, predicted = p.max(dim=-1)
    correct = (predicted == labels).double()
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    ece = 0.0
    for b in range(bins):
        inside = index == b
        if inside.any():
            ece += float(inside.double().mean()) * abs(float(correct[inside].mean() - confidence[inside].mean()))
    return ece


def evaluate(probs: Tensor, labels: Tensor, *, bins: int = 10) -> Calibration:
    """`Calibration` of predicted probabilities (n, classes) against labels (n,)."""
    _check_probs(probs, labels)
    p = probs.detach().double()
    accuracy = float((p.argmax(-1) == labels).double().mean())
    nll = float(-p.gather(1, labels[:, None]).clamp_min(torch.finfo(torch.float64).tiny).log().mean())
    return Calibration(accuracy, nll, expected_calibration_error(probs, labels, bins))


add(
    Spec(
        name="lora-ensemble",
        kind="recipe",
        paper=LORA_ENSEMBLE,
        factory=LoRAEnsemble,
        family="D",
        summary="LoRA-Ensemble: M members sharing a frozen backbone, each with rank-r adapters on the attention "
        "projections and its own head; mean of probabilities; evaluate() gives accuracy, NLL, ECE",
        params=(
            Param("members", int, doc="M, the ensemble size", low=1),
            Param("rank", int, doc="r, the adapters' rank", low=1),
            Param("projections", tuple, ("q", "k", "v"), "adapted projections among q, k, v, o"),
            Param("head", str, None, "name of the classifier nn.Linear to copy per member", optional=True),
        ),
    )
)
