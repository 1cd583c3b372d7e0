"""Residual blocks whose token mixer is any registered mechanism."""
