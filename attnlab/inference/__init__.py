"""Inference-time methods (catalogue kind "inference", family F): KV-cache compression and token exit.

- `matryoshka_kv` (P004 MatryoshkaKV): per layer/head orthogonal projections of keys and values, PCA-initialised,
  Cayley-trained by distillation, truncated to nested ranks, ranks allocated greedily under a budget.
- `loki` (P027 Loki): per layer/head PCA of the keys; each query attends exactly to its top-k keys ranked by
  scores in the first r principal dimensions (prefill `loki_attention`, decode `loki_decode`, wrapper `LokiAttention`).
- `dyvte` (P231 DyVTE): after each layer a router reads [mean, last] of the text states; visual tokens (and their KV)
  exit after the first layer whose router fires (`VisualTokenExit`, `ExitRouter`, `exit_labels`, `compute_saved`).
"""
