"""Synthetic tasks (registered in the catalogue as kind "task")."""
from .hierarchical_filtering import TreeData, filtered_tree_data
from .icl_linear_regression import ICLRegressionData, icl_linear_regression
from .implicit_update import ImplicitUpdateProblem, implicit_update_problem
from .latent_hierarchy import HierarchyData, LatentHierarchy, latent_hierarchy_data
from .layernorm_expressivity import KeySets, MajorityData, majority_data, random_key_sets
from .lda_topics import LDAData, lda_documents
from .mqar import MQARData, mqar
from .random_feature_attention import KeyQueryData, rf_attention_regression
from .rank_one_memorization import MemorizationData, memorization_data
from .refex import RefExData, refex_split
from .scan_snap import ScanSnapData, scan_snap_data
from .table_lookup import TableLookupData, table_lookup

__all__ = [
    "TreeData", "filtered_tree_data", "ICLRegressionData", "icl_linear_regression",
    "ImplicitUpdateProblem", "implicit_update_problem",
    "MQARData", "TableLookupData", "mqar", "table_lookup",
    "MemorizationData", "memorization_data",
    "KeyQueryData", "rf_attention_regression",
    "KeySets", "MajorityData", "majority_data", "random_key_sets",
    "ScanSnapData", "scan_snap_data", "LDAData", "lda_documents", "RefExData", "refex_split",
    "HierarchyData", "LatentHierarchy", "latent_hierarchy_data"]
