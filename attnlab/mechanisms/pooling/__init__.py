"""Attention pooling: m queries attend over the tokens, (batch, n, dim) -> (batch, m, dim)."""
