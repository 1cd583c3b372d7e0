"""Explain what MiniLM's attention does on two sentences, from Python, and write the same page as
`attnlab explain "..." "..." --out DIR` (index.html, explain.json, png/).

    .venv/bin/python examples/explain_minilm.py [OUT_DIR]      # default: explain-minilm/
"""
from __future__ import annotations

import sys
from pathlib import Path

from attnlab.analysis.explain import explain
from attnlab.analysis.export import figures, write_json, write_pngs
from attnlab.analysis.page import write_page

TEXTS = ["The cat sat on the mat because it was tired.", "The animal didn't cross the street because it was too wide."]


def main(out: Path) -> None:
    methods = ("rollout", "attention-flow", "relevance-generic", "head-statistics", "sink-scores", "qk-embedding")
    ex = explain(TEXTS, "minilm", methods=methods, quiet=False)
    for t, text in enumerate(ex.texts):
        real = [i for i, m in enumerate(ex.mask[t]) if m]
        target = ex.targets[t]
        print(f"\n{text}\n  share of each token in {ex.tokens[t][target]} (rollout / attention-flow / relevance-generic):")
        for i in real:
            scores = [ex.methods[m]["token_scores"][t][i] for m in methods[:3]]
            print(f"  {ex.tokens[t][i]:>10}  " + "  ".join(f"{s:7.4f}" for s in scores))
    stats = ex.methods["head-statistics"]["stats"]
    previous = stats["previous-token-score"]  # (layers, texts, heads)
    prev = max(((l_, h) for l_ in range(ex.layers) for h in range(ex.heads)), key=lambda lh: previous[lh[0]][0][lh[1]])
    print(f"\nmost previous-token head on text 1: layer {prev[0]}, head {prev[1]} "
          f"({previous[prev[0]][0][prev[1]]:.2f} of its attention)")
    sinks = [row for row in ex.methods["sink-scores"]["table"] if row["text"] == 0][:3]
    print("top sinks on text 1: " + ", ".join(f"{ex.tokens[0][r['token']]} ({r['heads']} heads)" for r in sinks))
    out.mkdir(parents=True, exist_ok=True)
    figs = figures(ex)
    write_json(ex, out / "explain.json")
    write_pngs(figs, out / "png")
    print(f"\n{write_page(ex, out / 'index.html', figs)}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "explain-minilm"))
