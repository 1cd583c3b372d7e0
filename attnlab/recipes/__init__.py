"""Initialisations and training recipes (family D), registered as kind "init" or "recipe".

* `mimetic`: P001 mimetic initialisation (`mimetic_init_`, init "mimetic-init") and `mimeticity`;
* `apla`: P021 APLA, train only W_o or r random columns of it (`apla`, recipe "apla"), `training_cost`.

`projections.attention_layers` finds the q, k, v, o projections of attnlab and transformers models.
"""
from .apla import APLA, TrainingCost, apla, training_cost
from .mimetic import Mimeticity, MimeticTargets, mimetic_init_, mimeticity
from .projections import AttentionLayer, attention_layers

__all__ = [
    "APLA",
    "AttentionLayer",
    "MimeticTargets",
    "Mimeticity",
    "TrainingCost",
    "apla",
    "attention_layers",
    "mimetic_init_",
    "mimeticity",
    "training_cost",
]
