"""Sparse attention: softmax attention over chosen key blocks (engine in `block_sparse.py`) and its patterns."""
