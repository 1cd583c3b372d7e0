"""Synthetic tasks (registered in the catalogue as kind "task")."""
from .mqar import MQARData, mqar
from .table_lookup import TableLookupData, table_lookup

__all__ = ["MQARData", "TableLookupData", "mqar", "table_lookup"]
