"""Latent bottlenecks: a small array of latents reads the tokens by cross-attention (Perceiver, slot attention, RIN)."""
