"""Synthetic tasks (registered in the catalogue as kind "task")."""
from .mqar import MQARData, mqar

__all__ = ["MQARData", "mqar"]
