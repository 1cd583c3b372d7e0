"""Attention over point sets with coordinates: (batch, n, dim) and positions (batch, n, d_pos) -> (batch, n, dim)."""
