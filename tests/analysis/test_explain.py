"""`attnlab explain` on MiniLM with a padded batch of two texts: every number against a slow computation
written here from the model's own eager attentions, zero scores on padding, the JSON and PNG exports,
CLI errors, and the page in headless Chromium (escaped token text, no script of the texts runs).
Then a model made of attnlab mechanisms with token strings (no tokenizer): maps, rollout,
attention-flow, relevance-generic and head-statistics against the model written out by hand;
methods that do not apply;
the CLI's --model MODULE:NAME; and a model directory whose own code must never run."""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import torch
from torch import nn

import attnlab
from attnlab.analysis.explain import METHODS, explain, load_model
from attnlab.analysis.export import figures, load_json, write_json, write_pngs
from attnlab.analysis.page import render, script_json, write_page
from attnlab.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analysis.conftest import SENTENCES  # noqa: E402
from browser import open_page  # noqa: E402  (tests/browser.py)

ALL = ("rollout", "attention-flow", "relevance-generic", "relevance-lrp", "head-statistics", "sink-scores",
       "qk-embedding", "layer-similarity", "head-classes", "attention-patterns",
       "qk-decomposition")
EVIL = ['<script>window.__pwned=1</script>', '"><img src=x onerror="window.__pwned=2">']
PROBE = """
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  const probe = document.createElement('div');
  probe.id = 'attnlab-probe';
  const text = document.body.innerText;
  probe.textContent = JSON.stringify({
    pwned: typeof window.__pwned, images: images.length,
    decoded: images.filter(i => i.complete && i.naturalWidth > 0).length,
    canvases: document.querySelectorAll('.grid[data-text] canvas').length,
    qk: document.querySelectorAll('.qk canvas').length,
    scripts: document.scripts.length, texts: TEXTS.map(t => text.includes(t)),
    tokens: Array.from(document.querySelectorAll('.strip .tok')).map(s => s.textContent),
  });
  document.body.appendChild(probe);
});
"""


@pytest.fixture(scope="module")
def explained(minilm):
    model, tokenizer, _ = minilm
    return explain(SENTENCES, model, tokenizer=tokenizer, methods=ALL)


@pytest.fixture(scope="module")
def eager(minilm_capture):
    """Per sequence: the model's own eager attentions cropped to the real tokens, (layers, heads, n, n) float64."""
    _, maps, mask = minilm_capture
    out = []
    for b in range(mask.shape[0]):
        real = mask[b].nonzero().flatten()
        out.append(np.stack([a[b][:, real][:, :, real].double().numpy() for a in maps]))
    return out, mask


def _mixed(a: np.ndarray) -> list[np.ndarray]:
    """Â per layer by hand: 0.5·mean over heads + 0.5·I, rows divided by their sum."""
    out = []
    for layer in a:
        m = 0.5 * layer.mean(0) + 0.5 * np.eye(layer.shape[-1])
        out.append(m / m.sum(1, keepdims=True))
    return out


def test_tokens_masks_targets(explained, minilm):
    _, tokenizer, batch = minilm
    assert explained.texts == SENTENCES
    assert explained.mask == batch["attention_mask"].bool().tolist()
    assert explained.tokens[1] == tokenizer.convert_ids_to_tokens(batch["input_ids"][1].tolist())
    assert explained.layers == 6 and explained.heads == 12 and not explained.causal
    assert explained.targets == [0, 0]  # [CLS] of an encoder
    assert explained.tokens[0][0] == "[CLS]"


def test_rollout_is_the_product_of_mixed_attention(explained, eager):
    maps, mask = eager
    for b, a in enumerate(maps):
        real = mask[b].nonzero().flatten().numpy()
        r = np.eye(a.shape[-1])
        for m in _mixed(a):
            r = m @ r
        got = np.array(explained.methods["rollout"]["matrix"][b])
        np.testing.assert_allclose(got[np.ix_(real, real)], r, atol=1e-6)
        np.testing.assert_allclose(np.array(explained.methods["rollout"]["token_scores"][b])[real], r[0], atol=1e-6)


def test_flow_equals_networkx_max_flow(explained, eager):
    maps, _ = eager
    a = maps[0]  # the padded sequence
    mixed = _mixed(a)
    n, layers = a.shape[-1], len(mixed)
    g = nx.DiGraph()
    for l_, m in enumerate(mixed, 1):
        for i in range(n):
            for j in range(n):
                g.add_edge((l_ - 1, j), (l_, i), capacity=float(m[i, j]))
    scores = explained.methods["attention-flow"]["token_scores"][0]
    for j in range(n):
        value = nx.maximum_flow_value(g, (0, j), (layers, 0))
        assert scores[j] == pytest.approx(value, abs=1e-6)


def test_head_statistics_by_loops(explained, eager):
    maps, _ = eager
    stats = explained.methods["head-statistics"]["stats"]
    for b, a in enumerate(maps):
        for l_ in range(a.shape[0]):
            for h in range(a.shape[1]):
                m = a[l_, h]
                n = m.shape[0]
                entropy = np.mean([-sum(p * math.log(p) for p in row if p > 0) for row in m])
                distance = np.mean([sum(m[i, j] * abs(i - j) for j in range(n)) for i in range(n)])
                previous = sum(m[i, i - 1] for i in range(1, n)) / m.sum()
                assert stats["attention-entropy"][l_][b][h] == pytest.approx(entropy, abs=1e-5)
                assert stats["mean-attention-distance"][l_][b][h] == pytest.approx(distance, abs=1e-5)
                assert stats["previous-token-score"][l_][b][h] == pytest.approx(previous, abs=1e-6)


def test_sinks_by_loops(explained, eager):
    maps, mask = eager
    sinks = explained.methods["sink-scores"]
    for b, a in enumerate(maps):
        real = mask[b].nonzero().flatten().tolist()
        n = len(real)
        received = a.mean(axis=2)  # (layers, heads, n): mean over the real queries
        got = np.array(sinks["scores"])[:, b][:, :, real]
        np.testing.assert_allclose(got, received, atol=1e-6)
        np.testing.assert_array_equal(np.array(sinks["is_sink"])[:, b][:, :, real], received > 5 / n)
        rows = [r for r in sinks["table"] if r["text"] == b]
        assert {r["token"] for r in rows} == {real[j] for j in range(n) if (received[:, :, j] > 5 / n).any()}
        for r in rows:
            j = real.index(r["token"])
            assert r["heads"] == int((received[:, :, j] > 5 / n).sum())


def test_padded_tokens_score_zero_in_json(explained, tmp_path):
    data = load_json(write_json(explained, tmp_path / "explain.json"))
    pad = [[not m for m in row] for row in data["mask"]]
    assert any(pad[0]) and not any(pad[1])
    checked = 0
    for name, result in data["methods"].items():
        for b, row in enumerate(pad):
            padded = [i for i, p in enumerate(row) if p]
            if "token_scores" in result:
                assert all(result["token_scores"][b][i] == 0 for i in padded), name
                checked += 1
            if "matrix" in result:
                m = np.array(result["matrix"][b])
                assert not m[padded].any() and not m[:, padded].any(), name
            if "input_relevance" in result:
                assert all(result["input_relevance"][b][i] == 0 for i in padded), name
                a = np.array(result["attention_relevance"])[:, b]
                assert not a[..., padded, :].any() and not a[..., padded].any(), name
            if "scores" in result:
                assert not np.array(result["scores"])[:, b][..., padded].any(), name
                assert not np.array(result["is_sink"])[:, b][..., padded].any(), name
    assert checked == 10  # rollout, attention-flow, relevance-generic, relevance-lrp, sink-scores × 2 texts
    for layer in data["methods"]["qk-embedding"]["heads"]:  # points for the real tokens only
        for e in layer:
            assert len(e["x"]) == 2 * sum(map(sum, data["mask"]))
    att = np.array(data["attention"])[:, 0]
    padded = [i for i, p in enumerate(pad[0]) if p]
    assert not att[..., padded, :].any() and not att[..., :, padded].any()


def test_pngs_decode(explained, tmp_path):
    from matplotlib.image import imread

    figs = figures(explained)
    assert sorted(figs) == sorted(["qk.png", *(f"{k}_t{t}.png" for k in ("tokens", "attention", "heads", "sinks") for t in (1, 2))])
    for path in write_pngs(figs, tmp_path / "png"):
        assert imread(path).shape[0] > 50


def test_script_json_cannot_close_its_element():
    text = script_json({"t": "</script><!-- & \u2028"})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"t": "</script><!-- & \u2028"}


def test_unknown_method_and_missing_model_exit_2(capsys, tmp_path):
    assert main(["explain", "a text", "--methods", "rollout,bogus", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'bogus'" in err and all(m in err for m in METHODS)
    missing = tmp_path / "no-such-model"
    assert main(["explain", "a text", "--model", str(missing), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(missing) in err and "minilm" in err
    assert not (tmp_path / "index.html").exists()


def test_relevance_by_hand(explained, minilm):
    """P035 with the model's eager attentions and torch.autograd.grad: Ā = mean_h (∇A ⊙ A)^+, R ← R + Ā R;
    P111 the same with A replaced by its LRP relevance R^(A) (taken from the JSON: its own tests check it)."""
    model, _, batch = minilm
    with torch.enable_grad():
        out = model(**batch, output_attentions=True)
        m = batch["attention_mask"][..., None].to(out.last_hidden_state.dtype)
        y = ((out.last_hidden_state * m).sum(1) / m.sum(1)).norm(dim=-1)  # MiniLM has no head: pooled norm
        grads = torch.autograd.grad(y.sum(), out.attentions)
    lrp_a = np.array(explained.methods["relevance-lrp"]["attention_relevance"])  # R^(A) of P111, (layers, batch, heads, n, n)
    for b in range(2):
        real = batch["attention_mask"][b].bool().nonzero().flatten()
        ix = np.ix_(real.numpy(), real.numpy())
        r, c = np.eye(len(real)), np.eye(len(real))
        for layer, (a, g) in enumerate(zip(out.attentions, grads)):
            a_b = a[b][:, real][:, :, real].detach().double().numpy()
            g_b = g[b][:, real][:, :, real].double().numpy()
            r = r + np.maximum(a_b * g_b, 0).mean(0) @ r  # P035, eq. 5-7
            c = c + np.maximum(lrp_a[layer, b][:, ix[0], ix[1]] * g_b, 0).mean(0) @ c  # P111: ∇A ⊙ R^(A)
        for name, want in (("relevance-generic", r), ("relevance-lrp", c)):
            scale = np.abs(want - np.eye(len(real))).max()
            got = np.array(explained.methods[name]["token_scores"][b])
            np.testing.assert_allclose(got[real.numpy()], want[0] - np.eye(len(real))[0], rtol=1e-4, atol=1e-4 * scale)
            matrix = np.array(explained.methods[name]["matrix"][b])[ix]
            np.testing.assert_allclose(matrix, want - np.eye(len(real)), rtol=1e-4, atol=1e-4 * scale)


def test_qk_embedding_by_hand(explained, minilm):
    """P093 from the query/key projections (hooks): c·q and (k − μ_k)/c + c·μ_q with equal mean norms, then PCA."""
    from scipy.optimize import brentq

    model, _, batch = minilm
    layer, head, d = 2, 5, 32
    seen = {}
    attn = model.encoder.layer[layer].attention.self
    hooks = [getattr(attn, n).register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o.detach())) for n in ("query", "key")]
    with torch.no_grad():
        model(**batch)
    for hk in hooks:
        hk.remove()
    mask = batch["attention_mask"].bool()
    q = np.concatenate([seen["query"][b, mask[b], head * d:(head + 1) * d].double().numpy() for b in range(2)])
    k = np.concatenate([seen["key"][b, mask[b], head * d:(head + 1) * d].double().numpy() for b in range(2)])
    mu_q, kc = q.mean(0), k - k.mean(0)
    gap = lambda c: np.linalg.norm(c * q, axis=1).mean() - np.linalg.norm(kc / c + c * mu_q, axis=1).mean()  # noqa: E731
    c = brentq(gap, 1e-3, 1e3, xtol=1e-14)
    joint = np.concatenate([c * q, kc / c + c * mu_q])
    joint -= joint.mean(0)
    _, _, vt = np.linalg.svd(joint, full_matrices=False)
    want = joint @ vt[:2].T
    e = explained.methods["qk-embedding"]["heads"][layer][head]
    got = np.array([e["x"], e["y"]]).T
    assert e["kind"] == ["q"] * len(q) + ["k"] * len(k)
    for axis in range(2):  # each axis up to its sign
        sign = np.sign(got[:, axis] @ want[:, axis])
        np.testing.assert_allclose(got[:, axis], sign * want[:, axis], atol=1e-6)


def test_cli_with_a_model_directory(tmp_path, capsys):
    from attnlab.analysis import minilm_path

    out = tmp_path / "out"
    assert main(["explain", "It was tired.", "--model", str(minilm_path()), "--methods", "rollout,sink-scores", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out / "index.html")
    assert "rollout" in captured.err and "sink-scores" in captured.err  # progress on stderr
    data = load_json(out / "explain.json")
    assert list(data["methods"]) == ["rollout", "sink-scores"]
    assert sorted(p.name for p in (out / "png").iterdir()) == ["attention_t1.png", "sinks_t1.png", "tokens_t1.png"]
    page = (out / "index.html").read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert page.count("<script") == 2 and "<link" not in page  # the data and the inline script, no stylesheet link


def test_page_escapes_texts_and_runs_offline(minilm, tmp_path):
    model, tokenizer, _ = minilm
    ex = explain(EVIL, model, tokenizer=tokenizer, methods=[m for m in ALL if m != "attention-flow"])
    page = write_page(ex, tmp_path / "index.html", figures(ex))
    text = page.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "<img src=x" not in text and "<script>window" not in text
    seen = open_page(page, probe=f"const TEXTS = {script_json(EVIL)};" + PROBE)
    assert seen.errors == []
    assert seen.remote_requests == []
    found = re.search(r'<div id="attnlab-probe">(.*?)</div>', seen.dom)
    assert found, "the probe did not run"
    import html

    result = json.loads(html.unescape(found.group(1)))
    assert result["pwned"] == "undefined"
    assert result["images"] == 9 and result["decoded"] == 9  # tokens, attention, heads, sinks per text; qk
    assert result["canvases"] == 2 * 6 * 12 and result["qk"] == 6 * 12
    assert result["scripts"] == 3  # the data, the page's script, the probe
    assert result["texts"] == [True, True]  # each text shown verbatim, as text
    real = [t for t, m in zip(ex.tokens[0], ex.mask[0]) if m]
    assert result["tokens"][: len(real)] == real and "<" in real


def test_render_needs_no_figures(explained):
    text = render(explained)
    assert "<img" not in text and text.count("class='strip'") == 10


@pytest.fixture(scope="module")
def causal_dir(minilm, tmp_path_factory):
    """A local Hugging Face directory: a tiny random Llama (causal, no LM head via AutoModel) + MiniLM's tokenizer."""
    from transformers import LlamaConfig, LlamaModel

    _, tokenizer, _ = minilm
    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    LlamaModel(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_causal_model_directory_explains_the_last_token(causal_dir):
    from transformers import AutoModel, AutoTokenizer

    ex = explain(SENTENCES, causal_dir, methods=("rollout", "relevance-generic", "sink-scores"))
    assert ex.causal and ex.layers == 2 and ex.heads == 4
    lengths = [sum(m) for m in ex.mask]
    assert ex.targets == [n - 1 for n in lengths]  # right padding: the last real token
    model = AutoModel.from_pretrained(causal_dir, local_files_only=True, attn_implementation="eager").eval()
    batch = AutoTokenizer.from_pretrained(causal_dir, local_files_only=True)(SENTENCES, return_tensors="pt", padding=True)
    with torch.no_grad():
        maps = model(**batch, output_attentions=True).attentions
    for b, n in enumerate(lengths):
        r = np.eye(n)
        for m in _mixed(np.stack([a[b, :, :n, :n].double().numpy() for a in maps])):
            r = m @ r
        scores = np.array(ex.methods["rollout"]["token_scores"][b])
        np.testing.assert_allclose(scores[:n], r[n - 1], atol=1e-6)
        for name in ("rollout", "relevance-generic", "sink-scores"):
            assert not np.array(ex.methods[name]["token_scores"][b])[n:].any(), name


# -- a model made of attnlab mechanisms, token strings, no tokenizer -------------------------------
TOKENS = [["the", "cat", "sat", "on", "the", "mat"], ["a", "cat"]]  # the second is padded


class Block(nn.Module):
    def __init__(self, name: str, dim: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = attnlab.build(name, dim=dim, heads=heads, **({"causal": True} if causal else {}))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return x + self.attn(self.norm(x), attention_mask=mask)  # True = real token


class TinyLM(nn.Module):
    """Token ids (batch, n) -> embeddings -> residual attnlab blocks -> hidden states (batch, n, dim)."""

    def __init__(self, vocab: int = 8, name: str = "softmax", causal: bool = False, *, dim: int = 16, heads: int = 2,
                 use_mask: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(name, dim, heads, causal) for _ in range(2))
        self.use_mask = use_mask

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, attention_mask if self.use_mask else None)
        return x


class NoMaskLM(TinyLM):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # no attention_mask: cannot take a padded batch
        return super().forward(ids)


def _by_hand(model: TinyLM, ids: list[int], causal: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One unpadded sequence through the model written out: softmax(q kᵀ/√d [+ causal mask]) per layer,
    and d y / dA with y = ‖mean of the last hidden states‖. Returns (maps (heads, n, n), grads)."""
    x = model.embed(torch.tensor([ids]))
    maps = []
    for block in model.blocks:
        a = block.attn
        h = block.norm(x)
        q, k, v = (proj(h).view(1, len(ids), a.heads, -1).transpose(1, 2) for proj in (a.q_proj, a.k_proj, a.v_proj))
        scores = q @ k.transpose(-1, -2) / math.sqrt(a.head_dim)
        if causal:
            scores = scores.masked_fill(torch.ones(len(ids), len(ids), dtype=torch.bool).triu(1), -math.inf)
        att = scores.softmax(-1)  # in the graph: d y / dA also flows through the later layers' scores
        maps.append(att)
        x = x + a.out_proj((att @ v).transpose(1, 2).reshape(1, len(ids), -1))
    y = x[0].mean(0).norm()
    grads = torch.autograd.grad(y, maps)
    return [m[0].detach() for m in maps], [g[0] for g in grads]


def test_tokens_through_a_model_of_attnlab_mechanisms_by_hand():
    model = TinyLM().double().eval()
    ex = explain(model=model, tokens=TOKENS,
                 methods=("rollout", "attention-flow", "relevance-generic", "head-statistics", "sink-scores"))
    assert ex.vocabulary == ["<pad>", "the", "cat", "sat", "on", "mat", "a"]
    assert ex.tokens == [TOKENS[0], ["a", "cat", "", "", "", ""]] and ex.texts == ["the cat sat on the mat", "a cat"]
    assert ex.mask == [[True] * 6, [True, True] + [False] * 4]
    assert ex.layer_names == ["blocks.0.attn", "blocks.1.attn"] and ex.heads == 2
    assert not ex.causal and ex.targets == [0, 0] and ex.skipped == {}
    index = {t: i for i, t in enumerate(ex.vocabulary)}
    for b, seq in enumerate(TOKENS):
        n = len(seq)
        maps, grads = _by_hand(model, [index[t] for t in seq])
        np.testing.assert_allclose(np.array(ex.attention)[:, b, :, :n, :n], torch.stack(maps).numpy(), atol=1e-10)
        r = np.eye(n)
        for m in _mixed(torch.stack(maps).numpy()):
            r = m @ r
        np.testing.assert_allclose(np.array(ex.methods["rollout"]["matrix"][b])[:n, :n], r, atol=1e-10)
        np.testing.assert_allclose(ex.methods["attention-flow"]["token_scores"][b][:n],
                                   _flow_by_networkx(torch.stack(maps).numpy(), 0), atol=1e-6)
        rel = np.eye(n)
        for a, g in zip(maps, grads):
            rel = rel + np.maximum((a * g).numpy(), 0).mean(0) @ rel  # P035, eq. 5-7
        np.testing.assert_allclose(np.array(ex.methods["relevance-generic"]["matrix"][b])[:n, :n], rel - np.eye(n),
                                   atol=1e-10)
        for layer, a in enumerate(maps):  # duplicate-token share from the strings: earlier copies of the same token
            for h in range(2):
                dup = sum(a[h, i, j].item() for i in range(n) for j in range(i) if seq[i] == seq[j]) / a[h].sum().item()
                got = ex.methods["head-statistics"]["stats"]["duplicate-token-score"][layer][b][h]
                assert got == pytest.approx(dup, abs=1e-10)
        for name in ("rollout", "attention-flow", "relevance-generic", "sink-scores"):
            assert not any(ex.methods[name]["token_scores"][b][n:]), name
    duplicate = ex.methods["head-statistics"]["stats"]["duplicate-token-score"]
    assert any(duplicate[layer][0][h] > 0 for layer in range(2) for h in range(2))


def _flow_by_networkx(maps: np.ndarray, target: int) -> list[float]:
    mixed = _mixed(maps)
    n, layers = maps.shape[-1], len(mixed)
    g = nx.DiGraph()
    for l_, m in enumerate(mixed, 1):
        for i in range(n):
            for j in range(n):
                g.add_edge((l_ - 1, j), (l_, i), capacity=float(m[i, j]))
    return [nx.maximum_flow_value(g, (0, j), (layers, target)) for j in range(n)]


def test_causal_model_of_attnlab_mechanisms_explains_the_last_token():
    model = TinyLM(causal=True).double().eval()
    ex = explain(model=model, tokens=TOKENS, methods=("rollout",))
    assert ex.causal and ex.targets == [5, 1]
    index = {t: i for i, t in enumerate(ex.vocabulary)}
    for b, seq in enumerate(TOKENS):
        n = len(seq)
        maps, _ = _by_hand(model, [index[t] for t in seq], causal=True)
        r = np.eye(n)
        for m in _mixed(torch.stack(maps).numpy()):
            r = m @ r
        np.testing.assert_allclose(ex.methods["rollout"]["token_scores"][b][:n], r[n - 1], atol=1e-10)


def test_embeddings_given_as_inputs():
    model = TinyLM().double().eval()
    blocks = model.blocks

    class OnEmbeddings(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = blocks

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x, None)
            return x

    ids = [1, 2, 3, 2]
    x = model.embed(torch.tensor([ids])).detach()
    ex = explain(model=OnEmbeddings(), tokens=["w", "x", "y", "x"], inputs=x,
                 methods=("rollout", "relevance-lrp", "head-statistics"))
    maps, _ = _by_hand(model, ids)
    np.testing.assert_allclose(np.array(ex.attention)[:, 0], torch.stack(maps).numpy(), atol=1e-10)
    assert ex.vocabulary == [] and ex.tokens == [["w", "x", "y", "x"]] and ex.layer_names == ["blocks.0.attn", "blocks.1.attn"]
    relevance = ex.methods["relevance-lrp"]["input_relevance"][0]  # reaches the embeddings given as inputs
    assert sum(relevance) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"tokens: expected .* \[4\] real tokens .* got lists of \[3\]"):
        explain(model=OnEmbeddings(), tokens=["w", "x", "y"], inputs=x)


def test_methods_that_do_not_apply_are_left_out_with_the_reason(tmp_path):
    model = TinyLM(name="linear").double().eval()
    ex = explain(model=model, tokens=TOKENS)
    assert list(ex.skipped) == ["relevance-lrp", "qk-decomposition"] and "softmax" in ex.skipped["relevance-lrp"]
    assert "TypeError" in ex.skipped["qk-decomposition"] and "linear" in ex.skipped["qk-decomposition"]
    assert list(ex.methods) == [m for m in ALL if m not in ex.skipped]
    assert list(ex.method_info) == list(ex.methods)
    page = write_page(ex, tmp_path / "index.html", figures(ex)).read_text(encoding="utf-8")
    assert "Left out" in page and "<b>relevance-lrp</b>" in page and "<b>qk-decomposition</b>" in page
    with pytest.raises(ValueError, match="softmax"):  # named explicitly: an error, not a skip
        explain(model=model, tokens=TOKENS, methods=("rollout", "relevance-lrp"))


@pytest.mark.parametrize("model, kwargs, error, needle", [
    (NoMaskLM(), {"tokens": TOKENS}, ValueError, "must take attention_mask"),
    (TinyLM(use_mask=False), {"tokens": TOKENS}, ValueError, "still sees the padded keys"),
    (TinyLM(), {"tokens": "the cat"}, TypeError, "tokens: expected a non-empty list"),
    (TinyLM(), {"tokens": [["a"], []]}, TypeError, "tokens: expected a non-empty list"),
    (TinyLM(), {"tokens": TOKENS, "texts": ["a text"]}, ValueError, "not both"),
    (TinyLM(), {"tokens": TOKENS, "tokenizer": object()}, ValueError, "pass no tokenizer"),
    ("minilm", {"tokens": TOKENS}, TypeError, "needs a torch.nn.Module"),
    (TinyLM(), {}, TypeError, "tokens=...")  # an nn.Module without tokenizer nor tokens
])
def test_token_model_errors(model, kwargs, error, needle):
    args = [kwargs.pop("texts")] if "texts" in kwargs else (["a text"] if not kwargs else [])
    with pytest.raises(error, match=re.escape(needle)):
        explain(*args, model=model, **kwargs)


MODEL_FILE = '''
import torch
from torch import nn

import attnlab


class Model(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 16)
        self.attn = nn.ModuleList(attnlab.build("softmax", dim=16, heads=2) for _ in range(2))

    def forward(self, ids, attention_mask=None):
        x = self.embed(ids)
        for a in self.attn:
            x = x + a(x, attention_mask=attention_mask)
        return x


def make_model(vocab_size):
    torch.manual_seed(0)
    return Model(vocab_size)


NOT_A_MODEL = 3
'''


def test_cli_explains_a_module_model_from_token_strings(tmp_path, capsys):
    path = tmp_path / "tinymodels.py"
    path.write_text(MODEL_FILE)
    out = tmp_path / "out"
    argv = ["explain", "--import", str(path), "--model", f"{path}:make_model", "--tokens", "the cat sat on the mat",
            "--tokens", "a cat", "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out / "index.html")
    assert "[1/11] rollout" in captured.err  # every method applies to softmax layers
    data = load_json(out / "explain.json")
    assert data["model"] == f"{path}:make_model" and data["tokens"] == [TOKENS[0], ["a", "cat", "", "", "", ""]]
    assert data["layer_names"] == ["attn.0", "attn.1"] and data["skipped"] == {}
    assert data["targets"] == [0, 0] and data["mask"][1] == [True, True, False, False, False, False]
    assert sorted(p.name for p in (out / "png").iterdir()) == sorted(
        ["qk.png", *(f"{k}_t{t}.png" for k in ("tokens", "attention", "heads", "sinks") for t in (1, 2))])
    seen = open_page(out / "index.html")
    assert seen.errors == [] and seen.remote_requests == []
    assert seen.dom.count("class=\"strip\"") == 2 * 5 and seen.dom.count("<canvas") >= 2 * 2 * 2


@pytest.mark.parametrize("argv, needle", [
    (["a text", "--model", "{path}:make_model"], "takes --tokens"),
    (["--tokens", "a b"], "--tokens: a tokenizer model (minilm) takes TEXTs"),
    (["--model", "{path}:make_model"], "expected TEXTs"),
    (["--model", "{path}:missing", "--tokens", "a b"], "to define 'missing'"),
    (["--model", "{path}:NOT_A_MODEL", "--tokens", "a b"], "got int"),
    (["--model", "no_such_module_xyz:make", "--tokens", "a b"], "no_such_module_xyz"),
    (["--model", "not-a-dir-nor-module", "--tokens", "a b"], "MODULE:NAME"),
    (["--model", "{path}:make_model", "--tokens", "a b", "--methods", "relevance-lrp,nope"], "'nope'"),
])
def test_cli_token_model_errors_exit_2(tmp_path, capsys, argv, needle):
    path = tmp_path / "tinymodels.py"
    path.write_text(MODEL_FILE)
    argv = [a.format(path=path) for a in argv]
    assert main(["explain", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_model_directory_code_never_runs(tmp_path, capsys, monkeypatch):
    """A directory whose config maps AutoModel to its own module: refused before transformers reads it;
    a plain directory is loaded with trust_remote_code=False."""
    marker = tmp_path / "ran"
    evil = tmp_path / "evil-model"
    evil.mkdir()
    (evil / "config.json").write_text(json.dumps({"model_type": "bert", "auto_map": {"AutoModel": "modeling_evil.Evil"}}))
    (evil / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass Evil: pass\n")
    assert main(["explain", "a text", "--model", str(evil), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "auto_map" in err and "trust_remote_code=False" in err and "\n" not in err
    with pytest.raises(ValueError, match="auto_map"):
        explain("a text", evil)
    assert not marker.exists() and not (tmp_path / "out").exists()
    (evil / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (evil / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["modeling_evil.Evil", None]}}))
    with pytest.raises(ValueError, match="tokenizer_config.json has an auto_map"):
        load_model(evil)
    (evil / "tokenizer_config.json").unlink()
    import transformers

    calls = []

    def spy(kind):
        return classmethod(lambda cls, path, **kw: calls.append((kind, kw)) or nn.Identity())

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", spy("model"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy("tokenizer"))
    load_model(evil)
    assert [(kind, kw["trust_remote_code"], kw["local_files_only"]) for kind, kw in calls] == [
        ("tokenizer", False, True), ("model", False, True)]
    assert not marker.exists()
