"""Benchmark: Loki (P027) — are keys low-rank, and does ranking in few PCA dimensions find the right keys?

    .venv/bin/python benchmarks/loki.py [--out attnlab-results/loki] [--steps 300] [--threads 1]
        [--db attnlab-results/results.sqlite]

Writes DIR/loki.json and DIR/loki.png (the trained LM is cached in DIR/cache/, keyed by its settings) and records
the rows in the results store (--db, suite "kv-selection", `attnlab.bench.kv_cache`), where `attnlab report` shows
the tables and the figure:

1. Rank for 90% of the key variance per layer and head (PCA of the keys, `fit_key_basis`) against the head
   dimension d, on MiniLM (all-MiniLM-L6-v2, 6 × 12 heads, d = 32, keys taken with `attnlab.analysis.capture(qk=True)`
   over stdlib docstrings, padding left out) and on a small causal char-level LM trained here (2 layers of
   attnlab "softmax" attention, 4 heads, d = 32, learned positions; trained on the docstrings of ~100 stdlib modules,
   seeded).
2. Top-k recall (|S ∩ true top-k| / k), attention mass kept (Σ_{j∈S} softmax(q kᵀ/√d)_j) and the relative output
   error ‖o_S − o‖/‖o‖ of Loki at r ∈ {d/8, d/4, d/2, d} and k ∈ {N/16, N/8, N/4} on held-out text (N = 256, the
   basis fitted on the training text), against k random visible keys and the k most recent keys; queries that see
   no more than k keys are left out (every method is exact there). MiniLM: recall and mass (no values captured).
3. Decode time of one query against a cache of N = 32,768 keys (8 heads, d = 64): dense softmax (matmul and SDPA)
   vs `loki_decode` at r = d/4 with k = N/64, N/16, N/8, N/4; interleaved, median of 7, one thread.

Measured (2026-12-07, defaults, one thread on the shared 2-core machine, load ~10):
  rank for 90% key variance (d = 32): MiniLM per layer mean 21.2, 19.1, 18.5, 20.0, 20.5, 19.8 (heads 10–25);
  char LM (300 steps, held-out 2.59 nats/char) layer 0: 16–18, layer 1: 9–12.
  char LM, N = 256, k = N/8 = 32: recall of the exact top-k at r = 4, 8, 16, 32: 0.83, 0.90, 0.95, 1.00 (random 0.30,
  recent 0.32); output error 0.37, 0.33, 0.32, 0.31 (random 0.80, recent 0.74). MiniLM (bidirectional, k ≈ N/8 = 7):
  recall 0.79, 0.86, 0.91, 1.00 (random 0.22).
  decode N = 32,768, 8 heads, d = 64, r = 16: dense matmul 21.3 ms, SDPA 20.7 ms; Loki k = N/64 8.6 ms, N/16 14.5 ms,
  N/8 17.2 ms, N/4 29.9 ms (the top-k over N and the row gathers, not the rank-r pass, dominate on this CPU).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import math
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor, nn

import attnlab
from attnlab.analysis import capture, load_minilm
from attnlab.bench import kv_cache
from attnlab.bench.env import run_environment
from attnlab.bench.store import DEFAULT_DB, ResultStore
from attnlab.inference.loki import fit_key_basis, loki_decode, loki_select, split_rotated_keys, visible_keys

STDLIB = (
    "argparse collections json textwrap pathlib logging subprocess typing functools itertools unittest email.message "
    "http.client string re os shutil tarfile zipfile csv datetime decimal fractions statistics random heapq bisect "
    "contextlib dataclasses enum abc io socket threading queue asyncio ssl urllib.request xml.etree.ElementTree "
    "sqlite3 pickle copy pprint inspect ast dis tokenize difflib calendar locale gettext optparse configparser tempfile "
    "glob fnmatch hashlib hmac secrets uuid base64 binascii struct codecs unicodedata math cmath numbers operator "
    "weakref gc traceback warnings signal selectors mmap multiprocessing concurrent.futures sched timeit trace pdb "
    "doctest pydoc zipimport importlib runpy platform sysconfig site ftplib smtplib imaplib poplib mailbox mimetypes "
    "html.parser webbrowser wave colorsys cmd shlex"
).split()


def docstrings() -> list[str]:
    """The docstrings of the stdlib modules above and of their public members, each once, in a fixed order."""
    seen: set[str] = set()
    out: list[str] = []
    for name in STDLIB:
        mod = importlib.import_module(name)
        members = [getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]
        for obj in [mod, *(m for m in members if getattr(m, "__module__", None) == mod.__name__)]:
            doc = inspect.getdoc(obj)
            if doc and doc not in seen:
                seen.add(doc)
                out.append(doc)
    return out


class CharLM(nn.Module):
    """Pre-norm causal transformer over characters: attnlab softmax attention + GELU MLP, learned positions."""

    def __init__(self, vocab: int, dim: int, heads: int, layers: int, n_max: int) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, dim), nn.Embedding(n_max, dim)
        self.attn = nn.ModuleList(attnlab.build("softmax", dim=dim, heads=heads, causal=True) for _ in range(layers))
        self.norm1 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.norm2 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
                                 for _ in range(layers))
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, vocab))

    def forward(self, ids: Tensor, qkv: list[tuple[Tensor, Tensor, Tensor]] | None = None) -> Tensor:
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for attn, n1, n2, mlp in zip(self.attn, self.norm1, self.norm2, self.mlp, strict=True):
            h = n1(x)
            if qkv is not None:
                qkv.append(tuple(t.detach() for t in attn.project(h)))  # type: ignore[arg-type]
            x = x + attn(h)
            x = x + mlp(n2(x))
        return self.head(x)


def train_lm(text: str, out: Path, *, steps: int, n: int, seed: int) -> tuple[CharLM, list[str], dict[str, float]]:
    chars = sorted(set(text))
    config = {"vocab": len(chars), "dim": 128, "heads": 4, "layers": 2, "n_max": n}
    key = hashlib.sha256(json.dumps([config, steps, seed, len(text), text[:1000]]).encode()).hexdigest()[:12]
    cache = out / "cache" / f"charlm-{key}.pt"
    torch.manual_seed(seed)
    model = CharLM(**config)
    ids = torch.tensor([chars.index(c) for c in text])
    split = int(0.9 * len(ids))
    if cache.is_file():
        saved = torch.load(cache)
        model.load_state_dict(saved["state"])
        return model.eval(), chars, saved["stats"]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    start, losses = time.perf_counter(), []
    for _ in range(steps):
        at = torch.randint(0, split - n - 1, (16,), generator=gen)
        batch = torch.stack([ids[a : a + n + 1] for a in at.tolist()])
        loss = nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        held = torch.stack([ids[a : a + n + 1] for a in range(split, len(ids) - n - 1, n)][:32])
        test = nn.functional.cross_entropy(model(held[:, :-1]).flatten(0, 1), held[:, 1:].flatten()).item()
    stats = {"train_loss_last50": statistics.fmean(losses[-50:]), "heldout_loss_nats_per_char": test,
             "train_seconds": time.perf_counter() - start, "steps": steps}
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "stats": stats}, cache)
    return model, chars, stats


def recent_indices(n_q: int, n_k: int, top_k: int) -> Tensor:
    """The k most recent visible keys of each causal query (clamped at 0 for the first queries)."""
    pos = torch.arange(n_k - n_q, n_k)[:, None]
    return (pos - torch.arange(top_k)[None]).clamp_min(0)


def random_indices(n_q: int, n_k: int, top_k: int, causal: bool, gen: torch.Generator, shape: tuple[int, ...]) -> Tensor:
    """k distinct random visible keys per query (rows with fewer visible keys are left out by the caller)."""
    noise = torch.rand(*shape, n_q, n_k, generator=gen)
    noise = noise.masked_fill(~visible_keys(n_q, n_k, causal=causal, keep=None, device=noise.device), -1.0)
    return noise.topk(top_k, dim=-1).indices


def quality(q: Tensor, k: Tensor, v: Tensor | None, sel: Tensor, causal: bool, keep: Tensor | None,
            rows: Tensor) -> dict[str, float]:
    """Recall of the exact top-k, attention mass on the selection and relative output error, over `rows`
    (batch, heads, n_q) bool, for a selection `sel` (batch, heads, n_q, k) of visible keys."""
    d, n_q, n_k = q.shape[-1], q.shape[2], k.shape[2]
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(d)
    visible = visible_keys(n_q, n_k, causal=causal, keep=keep, device=q.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, -1)
    true = scores.topk(sel.shape[-1], dim=-1).indices
    hit = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, sel, True)
    in_true = torch.zeros_like(hit).scatter(-1, true, True)
    recall = (hit & in_true).sum(-1).double() / sel.shape[-1]
    mass = (probs * hit).sum(-1)
    result = {"recall": recall[rows].mean().item(), "mass": mass[rows].mean().item()}
    if v is not None:
        dense = probs @ v.double()
        sparse_logits = scores.masked_fill(~hit, float("-inf"))
        sparse = torch.softmax(sparse_logits, -1) @ v.double()
        err = (sparse - dense).norm(dim=-1) / dense.norm(dim=-1).clamp_min(1e-30)
        result["output_error"] = err[rows].mean().item()
    return result


def compare(layers: list[tuple[Tensor, Tensor, Tensor | None]], bases: list, ranks: list[int], ks: list[int],
            causal: bool, keep: Tensor | None, seed: int) -> list[dict[str, object]]:
    """Every method at every (r, k), averaged over the layers (each layer's heads and eligible queries)."""
    rows_out: list[dict[str, object]] = []
    gen = torch.Generator().manual_seed(seed)
    for top_k in ks:
        per: dict[str, list[dict[str, float]]] = {}
        for (q, k, v), basis in zip(layers, bases, strict=True):
            n_q, n_k = q.shape[2], k.shape[2]
            seen = visible_keys(n_q, n_k, causal=causal, keep=keep, device=q.device).sum(-1)
            rows = (seen > top_k).expand(q.shape[0], q.shape[1], n_q)
            for r in ranks:
                sel, _ = loki_select(q, k, basis.components, r, top_k, causal=causal, keep=keep)
                per.setdefault(f"loki r={r}", []).append(quality(q, k, v, sel, causal, keep, rows))
            rand = random_indices(n_q, n_k, top_k, causal, gen, tuple(q.shape[:2]))
            if keep is not None:  # draw among real keys only
                noise = torch.rand(*q.shape[:3], n_k, generator=gen).masked_fill(~keep[:, None, None, :], -1.0)
                rand = noise.topk(top_k, dim=-1).indices
            per.setdefault("random", []).append(quality(q, k, v, rand, causal, keep, rows))
            if causal:
                recent = recent_indices(n_q, n_k, top_k).expand(*q.shape[:2], n_q, top_k)
                per.setdefault("recent", []).append(quality(q, k, v, recent, causal, keep, rows))
        for method, values in per.items():
            rows_out.append({"k": top_k, "method": method,
                             **{m: statistics.fmean(x[m] for x in values) for m in values[0]}})
    return rows_out


def minilm_part(texts: list[str]) -> dict[str, object]:
    model, tok = load_minilm()
    calib, held = texts[0::2][:64], texts[1::2][:64]

    def keys_of(batch: list[str]) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
        enc = tok(batch, padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad(), capture(model, qk=True) as att:
            model(**enc)
        return [(q, k) for q, k in zip(att.queries, att.keys, strict=True)], enc["attention_mask"].bool()

    calib_qk, calib_keep = keys_of(calib)
    bases = [fit_key_basis(k, calib_keep) for _, k in calib_qk]
    held_qk, held_keep = keys_of(held)
    d = bases[0].head_dim
    ranks = [r for r in (d // 8, d // 4, d // 2, d) if r >= 1]
    n = int(held_keep.sum(1).float().mean())
    ks = sorted({max(1, n // 8), max(1, n // 4)})
    layers = [(q, k, None) for q, k in held_qk]
    return {
        "head_dim": d, "texts_calibration": len(calib), "texts_heldout": len(held), "mean_tokens": n,
        "rank90": [b.rank_for(0.9).tolist() for b in bases],
        "quality": compare(layers, bases, ranks, ks, causal=False, keep=held_keep, seed=0),
    }


def lm_part(text: str, out: Path, steps: int, seed: int) -> dict[str, object]:
    n = 256
    model, chars, stats = train_lm(text, out, steps=steps, n=n, seed=seed)
    ids = torch.tensor([chars.index(c) for c in text])
    split = int(0.9 * len(ids))
    gen = torch.Generator().manual_seed(seed + 1)
    calib = torch.stack([ids[a : a + n] for a in torch.randint(0, split - n, (32,), generator=gen).tolist()])
    held = torch.stack([ids[a : a + n] for a in range(split, len(ids) - n, n)][:16])
    calib_qkv: list[tuple[Tensor, Tensor, Tensor]] = []
    held_qkv: list[tuple[Tensor, Tensor, Tensor]] = []
    with torch.no_grad():
        model(calib, calib_qkv)
        model(held, held_qkv)
    bases = [fit_key_basis(k) for _, k, _ in calib_qkv]
    d = bases[0].head_dim
    return {
        "model": stats, "head_dim": d, "n": n, "sequences_calibration": len(calib), "sequences_heldout": len(held),
        "rank90": [b.rank_for(0.9).tolist() for b in bases],
        "quality": compare(list(held_qkv), bases, [d // 8, d // 4, d // 2, d], [n // 16, n // 8, n // 4],
                           causal=True, keep=None, seed=seed),
    }


def decode_timing(n: int, heads: int, d: int, repeats: int) -> dict[str, object]:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, 1, d, generator=gen)
    k, v = torch.randn(1, heads, n, d, generator=gen), torch.randn(1, heads, n, d, generator=gen)
    P = torch.linalg.qr(torch.randn(heads, d, d, generator=gen))[0]
    scale = 1.0 / math.sqrt(d)

    def dense_matmul() -> Tensor:
        return torch.softmax((q @ k.transpose(-1, -2)) * scale, -1) @ v

    def dense_sdpa() -> Tensor:
        return nn.functional.scaled_dot_product_attention(q, k, v)

    r = d // 4
    cache = split_rotated_keys(k, P, r)
    runs = {"dense matmul": dense_matmul, "dense sdpa": dense_sdpa}
    for top_k in (n // 64, n // 16, n // 8, n // 4):
        runs[f"loki r={r} k={top_k}"] = lambda top_k=top_k: loki_decode(q, *cache, v, P, top_k)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    exact = loki_decode(q, *split_rotated_keys(k, P, d), v, P, n)
    return {"n": n, "heads": heads, "head_dim": d, "repeats": repeats, "threads": torch.get_num_threads(),
            "median_ms": {name: 1e3 * statistics.median(t) for name, t in times.items()},
            "loki_r=d_k=N_max_abs_diff_vs_dense": (exact - dense_matmul()).abs().max().item()}


def plot(result: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(20, 4.2))
    for name, part in (("MiniLM", result["minilm"]), ("char LM (trained here)", result["lm"])):
        r90 = part["rank90"]  # type: ignore[index]
        ax[0].plot(range(len(r90)), [statistics.fmean(layer) for layer in r90], "o-", label=f"{name}, mean")
        for i, layer in enumerate(r90):
            ax[0].scatter([i] * len(layer), layer, s=8, alpha=0.5)
    ax[0].axhline(result["lm"]["head_dim"], color="k", ls="--", label="head dim d")  # type: ignore[index]
    ax[0].set(xlabel="layer", ylabel="rank for 90% key variance", title="key rank (per head: dots)", ylim=(0, None))
    ax[0].legend(fontsize=8)
    lm = result["lm"]
    d = lm["head_dim"]  # type: ignore[index]
    for col, metric in ((1, "recall"), (2, "output_error")):
        for top_k in sorted({row["k"] for row in lm["quality"]}):  # type: ignore[index]
            rows = [row for row in lm["quality"] if row["k"] == top_k]  # type: ignore[index]
            loki = [(int(str(row["method"]).split("=")[1]), row[metric]) for row in rows if str(row["method"]).startswith("loki")]
            line = ax[col].plot([x for x, _ in loki], [y for _, y in loki], "o-", label=f"Loki, k={top_k}")[0]
            for row in rows:
                if row["method"] in ("random", "recent"):
                    ax[col].axhline(row[metric], color=line.get_color(), ls=":" if row["method"] == "random" else "--",
                                    lw=1, label=f"{row['method']}, k={top_k}")
        ax[col].set(xlabel=f"rank r (d = {d})", ylabel=metric, title=f"char LM, N = {lm['n']}: {metric} vs r")  # type: ignore[index]
        ax[col].legend(fontsize=6, ncol=2)
    ax[2].set_yscale("log")
    timing = result["decode"]
    names = list(timing["median_ms"])  # type: ignore[index]
    ax[3].bar(range(len(names)), [timing["median_ms"][n] for n in names])  # type: ignore[index]
    ax[3].set_xticks(range(len(names)), names, rotation=20, fontsize=7)
    ax[3].set(ylabel="ms (median)", title=f"decode, one query, N = {timing['n']}, {timing['heads']} heads, d = {timing['head_dim']}")  # type: ignore[index]
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_DB.parent / "loki",
                        help="JSON, PNG and the trained LM go here (default %(default)s)")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the char LM (batch 16, N 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--decode-n", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--db", type=Path, default=DEFAULT_DB, metavar="PATH",
                        help=f"the results database, suite {kv_cache.SELECTION_SUITE!r} (default {DEFAULT_DB})")
    args = parser.parse_args()
    store = ResultStore(args.db)  # checked writable before the run
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    texts = docstrings()
    env = run_environment(matmul=False)
    result: dict[str, object] = {"args": {k: str(v) for k, v in vars(args).items()}, "corpus_chars": sum(map(len, texts))}
    result["minilm"] = minilm_part(texts)
    print("minilm rank90 per layer:", result["minilm"]["rank90"], flush=True)  # type: ignore[index]
    result["lm"] = lm_part("\n\n".join(texts), args.out, args.steps, args.seed)
    print("lm:", result["lm"]["model"], "rank90:", result["lm"]["rank90"], flush=True)  # type: ignore[index]
    result["decode"] = decode_timing(args.decode_n, 8, 64, args.repeats)
    print("decode:", result["decode"], flush=True)
    (args.out / "loki.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / "loki.png")
    for part in ("minilm", "lm"):
        for row in result[part]["quality"]:  # type: ignore[index]
            print(part, row)
    written = kv_cache.record_selection(store, result, env)
    print(f"recorded {written} rows of suite {kv_cache.SELECTION_SUITE!r} in {args.db}")


if __name__ == "__main__":
    main()
