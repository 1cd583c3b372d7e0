"""ConceptAttention (P109, Helbling et al. 2025): concept saliency maps from the attention outputs of an MM-DiT.

Concept tokens c (text-encoded concept words, e.g. "cat", "sky", "grass") run through every MM-attention layer beside
the image tokens x and the prompt tokens p, with the PROMPT stream's parameters (its LayerNorm, q/k/v and output
projections, MLP), and with one-way attention: concepts attend to the image and to themselves, image and prompt
tokens never attend to concepts, so the image and the prompt (and the generation) are exactly what they are without
concepts. Per layer, with o the attention outputs (heads concatenated, before the output projection):

    [o_p; o_x] = Attn(q_[p;x], k_[p;x], v_[p;x])                  the model's own joint attention, unchanged
    o_c        = Attn(q_c, [k_c; k_x], [v_c; v_x])                  concepts: concept and image keys (not the prompt's)
    c          ← c + W_o^p o_c,  c ← c + MLP^p(LN^p c)              the concept residual stream, updated as the prompt's
    S_l        = softmax over concepts of (o_x · o_cᵀ)              (image tokens × concepts), a saliency in OUTPUT space
    S          = mean over the chosen layers l of S_l               (the official code also averages over timesteps)

as the official code does it (helblazer811/ConceptAttention: concept_attention/flux/dit_block.py, the keys
[concepts; image] of the concept attention, the prompt stream's `txt_attn.qkv` / `txt_attn.proj` / `txt_mlp`, and
`compute_heatmaps_from_vectors`: einsum of output vectors, softmax over concepts, mean over time and layers). The
baseline the paper compares with, the cross-attention saliency softmax over concepts of (q_x · k_cᵀ) (heads
concatenated, no scale), is returned too. Attn is the model's attention core — any registered mechanism with
cross-attention (`MMDiTBlock.attend`), e.g. "linear" as well as "softmax".

The model: an MM-DiT with the protocol of `attnlab.analysis.toy_diffusion.MMDiT` — `embed_image(latents)`,
`embed_text(ids)` and `blocks`, each with `project_image`, `project_text`, `attend`, `image_update`, `text_update`.
The method reads attention outputs, not maps, so it goes through the blocks rather than `capture`; MiniLM has no
image stream (and no cross-attention), so there is no MiniLM version.

    from attnlab.analysis.concept_attention import concept_attention
    sal = concept_attention(mmdit, latents, prompt_ids, concept_ids)
    sal.saliency        # (batch, concepts, image tokens), sums to 1 over concepts
    sal.segmentation()  # (batch, image tokens): the concept of each token
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.errors import ShapeError
from ..core.registry import Paper, Param, Spec, add
from ..core.validate import is_int

P109 = Paper("P109", "ConceptAttention: Diffusion Transformers Learn Highly Interpretable Features", 2025, "2502.04320")


@dataclass
class ConceptSaliency:
    """What `concept_attention` returns; saliency maps are (batch, concepts, image tokens)."""

    saliency: Tensor  # mean over the chosen layers of per_layer
    per_layer: Tensor  # (layers, batch, concepts, image tokens): softmax over concepts of o_x · o_c per block
    cross_attention: Tensor  # the baseline: mean over the chosen layers of softmax over concepts of q_x · k_c
    image: Tensor  # (batch, image tokens, dim): the image stream after the last block (as without concepts)
    prompt: Tensor  # (batch, prompt tokens, dim): the prompt stream after the last block
    concepts: Tensor  # (batch, concepts, dim): the concept stream after the last block

    def segmentation(self) -> Tensor:
        """(batch, image tokens): the index of the most salient concept of each image token."""
        return self.saliency.argmax(1)


def _concepts(model: nn.Module, concepts: Tensor, batch: int) -> Tensor:
    if not isinstance(concepts, Tensor):
        raise TypeError(f"concepts: expected word ids (LongTensor) or text tokens (float), got {type(concepts).__name__}")
    if concepts.dtype == torch.long:
        ids = concepts[None] if concepts.dim() == 1 else concepts
        tokens = model.embed_text(ids)  # type: ignore[operator]
    else:
        tokens = concepts[None] if concepts.dim() == 2 else concepts
    if tokens.dim() != 3 or tokens.shape[0] not in (1, batch) or tokens.shape[1] < 1:
        raise ShapeError(f"concepts: expected (concepts,) or ({batch}, concepts) ids, or text tokens (batch or 1, "
                         f"concepts, dim), got {tuple(concepts.shape)}")
    return tokens.expand(batch, -1, -1)


def concept_attention(model: nn.Module, latents: Tensor, prompt: Tensor, concepts: Tensor, *,
                      layers: Sequence[int] | None = None) -> ConceptSaliency:
    """P109: saliency of each concept over the image tokens (module docstring), averaged over the blocks `layers`
    (indices; default all). concepts: word ids (concepts,) or (batch, concepts), or text tokens (batch, concepts, dim)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise TypeError(f"model: expected an MM-DiT with `blocks` (toy_diffusion.MMDiT protocol), got {type(model).__name__}")
    chosen = list(range(len(blocks))) if layers is None else list(layers)
    if not chosen or any(not is_int(i) or not 0 <= i < len(blocks) for i in chosen):
        raise ValueError(f"layers: expected block indices in [0, {len(blocks)}), got {layers!r}")
    img = model.embed_image(latents)  # type: ignore[operator]
    txt = model.embed_text(prompt)  # type: ignore[operator]
    if txt.shape[0] != img.shape[0]:
        raise ShapeError(f"prompt: expected batch {img.shape[0]} (as latents), got {txt.shape[0]}")
    con = _concepts(model, concepts, img.shape[0]).to(img.dtype)
    n_txt = txt.shape[1]
    output_maps, cross_maps = [], []
    for block in blocks:
        qi, ki, vi = block.project_image(img)
        qt, kt, vt = block.project_text(txt)
        qc, kc, vc = block.project_text(con)
        joint = block.attend(torch.cat([qt, qi], 2), torch.cat([kt, ki], 2), torch.cat([vt, vi], 2))
        o_txt, o_img = joint[:, :n_txt], joint[:, n_txt:]
        o_con = block.attend(qc, torch.cat([kc, ki], 2), torch.cat([vc, vi], 2))
        output_maps.append(torch.einsum("bid,bcd->bci", o_img, o_con).softmax(1))
        cross_maps.append(torch.einsum("bhid,bhcd->bci", qi, kc).softmax(1))
        img, txt, con = block.image_update(img, o_img), block.text_update(txt, o_txt), block.text_update(con, o_con)
    per_layer = torch.stack(output_maps)
    return ConceptSaliency(per_layer[chosen].mean(0), per_layer, torch.stack(cross_maps)[chosen].mean(0), img, txt, con)


def segmentation_iou(segmentation: Tensor, truth: Tensor, concepts: int) -> Tensor:
    """(batch, concepts) intersection over union of each concept's tokens in two label maps (batch, tokens); NaN
    where the concept is in neither."""
    if segmentation.shape != truth.shape or segmentation.dim() != 2:
        raise ShapeError(f"truth: expected the shape of segmentation {tuple(segmentation.shape)}, got {tuple(truth.shape)}")
    labels = torch.arange(concepts, device=truth.device)[None, :, None]
    a, b = segmentation[:, None] == labels, truth[:, None] == labels
    inter, union = (a & b).sum(-1).to(torch.float64), (a | b).sum(-1).to(torch.float64)
    return torch.where(union > 0, inter / union.clamp_min(1), torch.nan)


add(Spec(name="concept-attention", kind="analysis", paper=P109, factory=concept_attention, family="E",
         summary="concept saliency in an MM-DiT: concept tokens through each layer's prompt-stream projections with "
                 "one-way attention; softmax over concepts of attention-output dot products",
         params=(Param("model", nn.Module, doc="an MM-DiT (toy_diffusion.MMDiT protocol)"),
                 Param("latents", Tensor, doc="image latents (batch, tokens, channels)"),
                 Param("prompt", Tensor, doc="prompt word ids (batch, m)"),
                 Param("concepts", Tensor, doc="concept word ids (concepts,) / (batch, concepts), or text tokens"),
                 Param("layers", (list, tuple), None, "block indices to average; default all", optional=True))))
