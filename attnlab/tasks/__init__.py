"""Synthetic tasks (registered in the catalogue as kind "task")."""
from .hierarchical_filtering import TreeData, filtered_tree_data
from .icl_linear_regression import ICLRegressionData, icl_linear_regression
from .implicit_update import ImplicitUpdateProblem, implicit_update_problem
from .layernorm_expressivity import KeySets, MajorityData, majority_data, random_key_sets
from .mqar import MQARData, mqar
from .random_feature_attention import KeyQueryData, rf_attention_regression
from .rank_one_memorization import MemorizationData, memorization_data
from .table_lookup import TableLookupData, table_lookup

__all__ = [
    "TreeData", "filtered_tree_data", "ICLRegressionData", "icl_linear_regression",
    "ImplicitUpdateProblem", "implicit_update_problem",
    "MQARData", "TableLookupData", "mqar", "table_lookup",
    "MemorizationData", "memorization_data",
    "KeyQueryData", "rf_attention_regression",
    "KeySets", "MajorityData", "majority_data", "random_key_sets"]
