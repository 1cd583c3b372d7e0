"""Attention over graphs: node features (nodes, dim) and edges (2, edges) -> (nodes, dim), messages along edges."""
