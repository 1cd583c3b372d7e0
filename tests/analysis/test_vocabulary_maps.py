"""P173 MAPS: vocabulary maps of heads, relation scores, and their agreement with ablations and with transformer-lens."""
import re

import pytest
import torch

from attnlab.analysis.toy_lm import ToyLM, ToyLMSettings
from attnlab.analysis.vocabulary_maps import (
    SuccessorRecipe,
    SuccessorTask,
    fold_final_norm,
    head_ablation_effects,
    model_weights,
    pearson,
    relation_scores,
    salient_mappings,
    topk_membership,
    train_successor_lm,
    vocabulary_maps,
)
from attnlab.core.errors import ParameterError
from attnlab.core.registry import get

TASK = SuccessorTask(content=12, fillers=8, length=6)
RECIPE = SuccessorRecipe(dim=32, heads=4, layers=2, planted=(1, 2), steps=100, batch=64, lr=1e-2, seed=0)


@pytest.fixture(scope="module")
def successor():
    """A seconds-size successor model: only head (1, 2) sees other positions (the full recipe: `successor_lm`)."""
    return train_successor_lm(TASK, RECIPE)


def test_topk_membership_by_hand():
    rows = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.2, 0.6], [0.1, 0.3, 0.4]])
    targets = torch.tensor([1, 2, 0])
    assert float(topk_membership(rows, targets, 1)) == pytest.approx(1 / 3)  # only row 0's target is its argmax
    assert float(topk_membership(rows, targets, 2)) == pytest.approx(2 / 3)  # row 1's target is its second, row 2's its third
    assert float(topk_membership(-rows, targets, 1)) == pytest.approx(1 / 3)  # suppression: row 2's target is its least


def test_folded_unembedding_reads_the_final_layernorm():
    """LN(x) U = (1/σ) x U_folded + β U: the fold keeps every row's ranking and its differences up to 1/σ > 0."""
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.normal_()
    u = torch.randn(8, 5, dtype=torch.float64)
    x = torch.randn(3, 8, dtype=torch.float64)
    sigma = (x.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
    with torch.no_grad():
        through_norm = norm.double()(x) @ u - norm.bias.double() @ u
    torch.testing.assert_close(through_norm * sigma, x @ fold_final_norm(u, norm))


def test_successor_head_scores_highest_and_follows_ablation(successor):
    """The head that carries the successor scores highest, and over all heads the static scores follow the drop of
    the answer's logit when each head is ablated (measured: planted score 0.83-1.0 vs <= 0.33, r 0.93-0.97)."""
    ids, targets = TASK.sample(torch.Generator().manual_seed(7), 256)
    effects = head_ablation_effects(successor, ids, targets[:, -1], forward=RECIPE.forward)
    assert float(effects["accuracy"]) > 0.9
    scores = relation_scores(successor, TASK.pairs, k=1)
    planted = RECIPE.planted
    others = scores.clone()
    others[planted] = -1
    assert scores[planted] > others.max() + 0.3, scores
    drops = effects["logit_drop"]
    assert int(drops.argmax()) == planted[0] * RECIPE.heads + planted[1], drops
    assert pearson(scores, drops) > 0.7
    assert effects["accuracy_drop"][planted] > 0.5
    unfolded = relation_scores(successor, TASK.pairs, k=1, fold_norms=False)  # the official, raw E and U
    assert int(unfolded.argmax()) == int(scores.argmax())
    suppression = relation_scores(successor, TASK.pairs, k=1, suppression=True)
    assert suppression[planted] < 0.2  # it promotes the successor, it does not suppress it


def test_salient_mappings_of_the_successor_head(successor):
    layer, head = RECIPE.planted
    salient = salient_mappings(successor, layer, head, tokens=TASK.content, mappings=1)
    gains = [gain for _, gain, _ in salient]
    assert gains == sorted(gains, reverse=True)
    content = [(source, targets[0]) for source, _, targets in salient if source < TASK.content]
    right = sum(target == (source + 1) % TASK.content for source, target in content)
    assert len(content) >= TASK.content // 2 and right >= 0.75 * len(content), salient


def _bridge_of(toy: ToyLM):
    """A transformer-lens TL-native bridge with the ToyLM's weights (attention-only, pre-LN, learned positions)."""
    pytest.importorskip("transformer_lens.model_bridge", reason="transformer-lens 4.x (and its accelerate) not installed")
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.model_bridge.sources import native  # noqa: F401  (attaches TransformerBridge.boot_native)

    s = toy.settings
    cfg = TransformerBridgeConfig(d_model=s.dim, d_head=s.dim // s.heads, n_heads=s.heads, n_layers=s.layers,
                                  n_ctx=s.context, d_vocab=s.vocab, attn_only=True, normalization_type="LN", seed=0)
    bridge = TransformerBridge.boot_native(cfg)
    target = {n.replace("._original_component", ""): p for n, p in bridge.original_model.named_parameters()}
    renames = [(r"^embed\.", "tok_embed."), (r"^position\.", "pos."), (r"^blocks\.(\d+)\.norm1\.", r"layers.\1.ln1."),
               (r"^blocks\.(\d+)\.attn\.(q|k|v)_proj\.", r"layers.\1.attn.\2."),
               (r"^blocks\.(\d+)\.attn\.out_proj\.", r"layers.\1.attn.o."), (r"^norm\.", "ln_out."),
               (r"^unembed\.weight$", "head.weight")]
    copied = set()
    with torch.no_grad():
        for name, p in toy.named_parameters():
            rule = next(((pat, rep) for pat, rep in renames if re.search(pat, name)), None)
            if rule is None:
                assert name == "unembed.bias"  # TL-native's head has no bias: compared without it
                continue
            key = re.sub(rule[0], rule[1], name)
            target[key].copy_(p)
            copied.add(key)
    assert copied == set(target)
    return bridge


def test_maps_agree_with_transformer_lens_matrices(successor):
    bridge = _bridge_of(successor)
    ids, _ = TASK.sample(torch.Generator().manual_seed(3), 8)
    with torch.no_grad():  # the mapped weights compute the same model (without the per-head masks of the recipe)
        torch.testing.assert_close(bridge(ids) + successor.unembed.bias, successor(ids), atol=1e-5, rtol=1e-5)
    ours = vocabulary_maps(successor, fold_norms=False)
    e, u = bridge.W_E.detach(), bridge.W_U.detach()
    for layer in range(RECIPE.layers):
        for head in range(RECIPE.heads):
            ov = (e @ bridge.OV[layer, head] @ u).AB  # TL's FactoredMatrix of W_V W_O
            qk = (e @ bridge.QK[layer, head] @ e.T).AB  # and of W_Q W_Kᵀ
            torch.testing.assert_close(ours["ov"][layer, head], ov.double(), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(ours["qk"][layer, head], qk.double(), atol=1e-4, rtol=1e-4)
    # the relation score from TL's W_E, W_V, W_O, W_U (float64), top-1 membership written out here
    src, dst = TASK.pairs.T
    w_v, w_o = bridge.W_V.detach().double(), bridge.W_O.detach().double()
    rows = e.double()[src] @ w_v @ w_o @ u.double()  # (layers, heads, R, V)
    theirs = (rows.argmax(-1) == dst).double().mean(-1)
    assert torch.equal(relation_scores(successor, TASK.pairs, k=1, fold_norms=False), theirs)


def test_bad_inputs(successor):
    with pytest.raises(ValueError, match=r"pairs: expected \(source, target\) token id pairs, shape \(R, 2\)"):
        relation_scores(successor, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"pairs: expected token ids in \[0, 21\)"):
        relation_scores(successor, [[0, 30]])
    with pytest.raises(ParameterError, match=r"k: expected an int in \[1, 21\]"):
        relation_scores(successor, TASK.pairs, k=0)
    with pytest.raises(ValueError, match=r"layer, head: expected a head in \[0, 2\) × \[0, 4\)"):
        salient_mappings(successor, 2, 0)
    with pytest.raises(TypeError, match="holds no attnlab attention module"):
        model_weights(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="embedding: expected a .* matrix, and the model has no model.embed"):
        model_weights(torch.nn.Sequential(successor.blocks[0].attn), fold_norms=False)
    with pytest.raises(ValueError, match=r"targets: expected one target id per prompt, shape \(4,\)"):
        head_ablation_effects(successor, torch.zeros(4, 6, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ParameterError, match=r"planted: expected a \(layer, head\) of the model"):
        SuccessorRecipe(planted=(2, 0))
    with pytest.raises(ParameterError, match="content: expected an int >= 2"):
        SuccessorTask(content=1)
    assert {get(n, "analysis").paper.id for n in ("maps-relation-scores", "vocabulary-maps", "maps-salient-mappings")} == {"P173"}


def test_works_on_another_mechanism():
    """The maps read any attnlab Attention's projections: a linear-attention ToyLM gives maps of the right meaning —
    M_h with W_V zeroed for head 1 is zero for that head only."""
    torch.manual_seed(0)
    model = ToyLM(ToyLMSettings(vocab=9, dim=8, heads=2, layers=1, mlp_ratio=0.0, mechanism="retention"))
    with torch.no_grad():
        model.blocks[0].attn.v_proj.weight[4:] = 0  # head 1's value rows (head_dim 4)
    maps = vocabulary_maps(model)["ov"]
    assert maps.shape == (1, 2, 9, 9)
    assert torch.equal(maps[0, 1], torch.zeros(9, 9, dtype=torch.float64)) and maps[0, 0].abs().max() > 0
