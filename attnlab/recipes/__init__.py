"""Initialisations and training recipes (family D), registered as kind "init" or "recipe".

* `mimetic`: P001 mimetic initialisation (`mimetic_init_`) and `mimeticity`.
"""
from .mimetic import Mimeticity, MimeticTargets, mimetic_init_, mimeticity
from .projections import AttentionLayer, attention_layers

__all__ = ["AttentionLayer", "MimeticTargets", "Mimeticity", "attention_layers", "mimetic_init_", "mimeticity"]
