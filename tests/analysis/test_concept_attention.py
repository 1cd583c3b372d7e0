"""P109 ConceptAttention on a tiny MM-DiT (attnlab.analysis.toy_diffusion.MMDiT): concepts leave the image and prompt
streams exactly as they are, the saliency is the formula (float64, written from the paper and the official code),
and it localises concepts planted as image regions. MiniLM has no image stream: no MiniLM test."""
import math

import pytest
import torch
from torch.nn import functional as F

from attnlab.analysis.concept_attention import concept_attention, segmentation_iou
from attnlab.analysis.toy_diffusion import MMDiT, plant_similarity, quadrant_layouts, region_images
from attnlab.core.registry import get

DIM, VOCAB, GRID, HEADS = 16, 10, 4, 4


def _model(mechanism="softmax", seed=0, layers=2):
    torch.manual_seed(seed)
    return MMDiT(channels=3, vocab=VOCAB, tokens=GRID * GRID, dim=DIM, heads=HEADS, layers=layers,
                 mechanism=mechanism).double()


def _inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, GRID * GRID, 3, generator=g, dtype=torch.float64)
    prompt = torch.randint(VOCAB, (batch, 5), generator=g)
    return latents, prompt


@pytest.mark.parametrize("mechanism", ["softmax", "linear"])
def test_concepts_do_not_change_the_image_or_the_prompt(mechanism):
    model = _model(mechanism)
    latents, prompt = _inputs()
    with torch.no_grad():
        img, txt = model.streams(latents, prompt)
        one = concept_attention(model, latents, prompt, torch.tensor([1, 4, 7]))
        other = concept_attention(model, latents, prompt, torch.randn(2, 6, DIM, dtype=torch.float64))
    for sal in (one, other):
        assert torch.equal(sal.image, img) and torch.equal(sal.prompt, txt)  # bit-identical
    assert one.concepts.shape == (2, 3, DIM) and not torch.allclose(one.concepts[:, :1], other.concepts[:, :1])
    assert one.saliency.shape == (2, 3, GRID * GRID) and other.saliency.shape == (2, 6, GRID * GRID)


def _layer_norm(x):
    return F.layer_norm(x, x.shape[-1:])


def _heads(t):
    return t.view(t.shape[0], t.shape[1], HEADS, -1).transpose(1, 2)


def _attention(q, k, v):
    """softmax(q kᵀ/√d) v per head, heads concatenated."""
    a = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
    out = a @ v
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def _reference(model, latents, prompt, concept_ids, layers):
    """The formula from the module weights alone, float64."""
    img = latents @ model.img_in.weight.T + model.img_in.bias + model.position
    txt = model.txt_in.weight[prompt]
    con = model.txt_in.weight[concept_ids][None].expand(latents.shape[0], -1, -1)
    maps, cross = [], []
    for block in model.blocks:
        ia, ta = block.img_attn, block.txt_attn

        def qkv(x, attn):
            x = _layer_norm(x)
            return [_heads(x @ p.weight.T + p.bias) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]

        def update(x, out, attn, mlp):
            x = x + out @ attn.out_proj.weight.T + attn.out_proj.bias
            hidden = F.gelu(_layer_norm(x) @ mlp[0].weight.T + mlp[0].bias)
            return x + hidden @ mlp[2].weight.T + mlp[2].bias

        (qi, ki, vi), (qt, kt, vt), (qc, kc, vc) = qkv(img, ia), qkv(txt, ta), qkv(con, ta)
        joint = _attention(torch.cat([qt, qi], 2), torch.cat([kt, ki], 2), torch.cat([vt, vi], 2))
        o_txt, o_img = joint[:, : txt.shape[1]], joint[:, txt.shape[1]:]
        o_con = _attention(qc, torch.cat([ki, kc], 2), torch.cat([vi, vc], 2))  # image + concept keys, no prompt
        maps.append((o_img @ o_con.transpose(1, 2)).softmax(-1).transpose(1, 2))  # softmax over concepts
        q_img = qi.transpose(1, 2).reshape(qi.shape[0], qi.shape[2], -1)
        k_con = kc.transpose(1, 2).reshape(kc.shape[0], kc.shape[2], -1)
        cross.append((q_img @ k_con.transpose(1, 2)).softmax(-1).transpose(1, 2))
        img = update(img, o_img, ia, block.img_mlp)
        txt = update(txt, o_txt, ta, block.txt_mlp)
        con = update(con, o_con, ta, block.txt_mlp)  # the concepts' residual stream, with the prompt's parameters
    return torch.stack(maps), torch.stack(cross)[layers].mean(0), con


def test_saliency_is_the_formula_in_float64():
    model = _model(layers=3)
    latents, prompt = _inputs(seed=1)
    ids = torch.tensor([0, 3, 5, 9])
    with torch.no_grad():
        sal = concept_attention(model, latents, prompt, ids, layers=[1, 2])
        per_layer, cross, concepts = _reference(model, latents, prompt, ids, [1, 2])
    torch.testing.assert_close(sal.per_layer, per_layer, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sal.saliency, per_layer[1:].mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sal.cross_attention, cross, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sal.concepts, concepts, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sal.saliency.sum(1), torch.ones(2, GRID * GRID, dtype=torch.float64))
    assert not torch.allclose(per_layer[0], per_layer[1], atol=1e-3)  # layers differ: the average is not trivial


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_saliency_localises_concepts_planted_as_image_regions(seed):
    """Image quadrants are filled (plus noise) with the text embeddings of 4 of 5 concept words, on an MM-DiT whose two
    streams share similarity-based attention (plant_similarity); the absent concept gets no token."""
    dim, grid = 32, 6
    torch.manual_seed(seed)
    model = plant_similarity(MMDiT(channels=dim, vocab=8, tokens=grid * grid, dim=dim, heads=4, layers=2), seed=seed)
    g = torch.Generator().manual_seed(seed)
    assignments = [torch.randperm(5, generator=g)[:4].tolist() for _ in range(4)]
    layouts = quadrant_layouts(grid, assignments)
    latents = region_images(model.txt_in.weight.detach()[:5], layouts, noise=0.5, generator=g)
    prompt = torch.tensor(assignments)  # the prompt names the four concepts of the image
    with torch.no_grad():
        sal = concept_attention(model, latents, prompt, torch.arange(5))
    iou = segmentation_iou(sal.segmentation(), layouts, 5)
    present = ~torch.isnan(iou)
    assert present.sum() == 16 and iou[present].mean() > 0.9, iou
    best = sal.saliency.argmax(-1)  # pointing: each present concept's most salient token lies in its region
    for b in range(4):
        for c in assignments[b]:
            assert layouts[b, best[b, c]] == c
        absent = ({0, 1, 2, 3, 4} - set(assignments[b])).pop()
        assert not (sal.segmentation()[b] == absent).any()


def test_segmentation_iou_by_hand():
    seg = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 2]])
    truth = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 0]])
    iou = segmentation_iou(seg, truth, 3)
    torch.testing.assert_close(iou[0, :2], torch.tensor([0.5, 2 / 3], dtype=torch.float64))
    assert math.isnan(iou[0, 2]) and iou[1].tolist()[0] == 0.0 and math.isnan(iou[1, 1]) and iou[1, 2] == 0.5


def test_registered_with_the_paper():
    spec = get("concept-attention", "analysis")
    assert spec.paper.id == "P109" and spec.paper.arxiv == "2502.04320" and spec.family == "E"


def test_bad_inputs_name_the_argument():
    model = _model()
    latents, prompt = _inputs()
    with pytest.raises(TypeError, match="model: expected an MM-DiT"):
        concept_attention(torch.nn.Linear(2, 2), latents, prompt, torch.tensor([1]))
    with pytest.raises(ValueError, match="layers: expected block indices in \\[0, 2\\)"):
        concept_attention(model, latents, prompt, torch.tensor([1]), layers=[2])
    with pytest.raises(TypeError, match="concepts: expected word ids"):
        concept_attention(model, latents, prompt, [1, 2])
    with pytest.raises(ValueError, match="concepts: expected"):
        concept_attention(model, latents, prompt, torch.zeros(3, 2, 4, DIM, dtype=torch.float64))
    with pytest.raises(ValueError, match="prompt: expected batch 2"):
        concept_attention(model, latents, prompt[:1], torch.tensor([1]))
    with pytest.raises(ValueError, match="latents: expected \\(batch, 16, 3\\)"):
        concept_attention(model, latents[:, :3], prompt, torch.tensor([1]))
    with pytest.raises(TypeError, match="ids: expected a LongTensor"):
        concept_attention(model, latents, prompt.float(), torch.tensor([1]))
    with pytest.raises(ValueError, match="model: plant_similarity needs channels == dim"):
        plant_similarity(model)
