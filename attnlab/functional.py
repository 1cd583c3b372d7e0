"""Every functional op of attnlab at one stable path: `attnlab.functional.<name>(q, k, v, ...)`.

The mechanisms' fast paths and float64 references (each entry names its own in `Spec.functional`,
printed by `attnlab info NAME`) and the kernels they share. The modules these come from may move;
this namespace does not.
"""
from .kernels.block_sparse import BlockLayout, block_sparse_attention, block_sparse_attention_reference
from .kernels.linear_scan import (
    linear_attention,
    linear_attention_recurrent,
    linear_attention_reference,
    linear_attention_step,
)
from .kernels.neighborhood import tiled_attention
from .kernels.sdpa import sdpa
from .mechanisms.dense.alibi import alibi_attention, alibi_attention_reference, alibi_slopes
from .mechanisms.dense.coca import coca_attention, coca_attention_reference
from .mechanisms.dense.dependency_vit import reversed_attention, reversed_attention_reference
from .mechanisms.dense.gem import gem_attention, gem_attention_reference
from .mechanisms.dense.kerple import kerple_attention, kerple_attention_reference
from .mechanisms.dense.multiscale import multiscale_attention, multiscale_attention_reference
from .mechanisms.dense.neural import neural_attention, neural_attention_reference
from .mechanisms.dense.normalized_attention import normalized_attention, normalized_attention_reference
from .mechanisms.dense.primer import primer_attention, primer_attention_reference
from .mechanisms.dense.probabilistic_attention import probabilistic_attention, probabilistic_attention_reference
from .mechanisms.dense.prototype_memory import prototype_memory_attention, prototype_memory_attention_reference
from .mechanisms.dense.rope import rope_attention, rope_attention_reference
from .mechanisms.dense.selective import selective_attention, selective_attention_reference
from .mechanisms.dense.self_fixed_point import self_fixed_point_attention, self_fixed_point_attention_reference
from .mechanisms.dense.softmax import softmax_attention, softmax_attention_reference
from .mechanisms.graphs.supergat import supergat_attention, supergat_attention_reference
from .mechanisms.heads.dual_attention import relational_attention, relational_attention_reference
from .mechanisms.heads.mhe import mhe_attention, mhe_attention_reference
from .mechanisms.heads.moh import moh_attention, moh_attention_reference
from .mechanisms.heads.shvit import shvit_attention, shvit_attention_reference
from .mechanisms.latents.perceiver import perceiver_attention, perceiver_attention_reference
from .mechanisms.latents.rin import rin_attention, rin_attention_reference
from .mechanisms.latents.slot_attention import slot_attention, slot_attention_reference
from .mechanisms.linear.based import based_attention, based_attention_reference
from .mechanisms.linear.deep_memory import deep_memory_attention, deep_memory_attention_reference
from .mechanisms.linear.efficient import efficient_attention, efficient_attention_reference
from .mechanisms.linear.focused import focused_linear_attention, focused_linear_attention_reference
from .mechanisms.linear.galerkin import (
    fourier_attention,
    fourier_attention_reference,
    galerkin_attention,
    galerkin_attention_reference,
)
from .mechanisms.linear.local_linear import local_linear_attention, local_linear_attention_reference
from .mechanisms.linear.memora import memora_attention, memora_attention_reference
from .mechanisms.linear.miras import memory_attention, memory_attention_reference
from .mechanisms.linear.selective_ssm import hidden_attention, selective_scan, selective_scan_reference
from .mechanisms.local.aggregated import aggregated_attention, aggregated_attention_reference
from .mechanisms.local.axial import axial_attention, axial_attention_reference
from .mechanisms.local.circular_window import circular_window_attention, circular_window_attention_reference
from .mechanisms.local.halo import halo_attention, halo_attention_reference
from .mechanisms.local.multi_window import multi_window_attention, multi_window_attention_reference
from .mechanisms.local.neighborhood import neighborhood_attention, neighborhood_attention_reference
from .mechanisms.local.twins import gsa_attention, gsa_attention_reference, lsa_attention, lsa_attention_reference
from .mechanisms.mixers.channel_group import channel_group_attention, channel_group_attention_reference
from .mechanisms.mixers.context_broadcasting import (
    context_broadcasting_attention,
    context_broadcasting_attention_reference,
)
from .mechanisms.mixers.contmix import contmix_attention, contmix_attention_reference, contmix_kernels
from .mechanisms.mixers.deconstructed_attention import (
    altered_similarity_attention,
    altered_similarity_attention_reference,
    fixed_mixing_attention,
    fixed_mixing_attention_reference,
    no_mixing_attention,
    no_mixing_attention_reference,
)
from .mechanisms.mixers.delta_conv_fusion import (
    delta_conv_fusion_attention,
    delta_conv_fusion_attention_reference,
    delta_conv_fusion_mix,
)
from .mechanisms.mixers.han_channel_spatial import (
    han_channel_spatial_attention,
    han_channel_spatial_attention_reference,
)
from .mechanisms.mixers.han_layer_attention import han_layer_attention, han_layer_attention_reference
from .mechanisms.mixers.hyperzzw import hyperzzw_attention, hyperzzw_attention_reference
from .mechanisms.mixers.lambda_layer import lambda_attention, lambda_attention_reference
from .mechanisms.mixers.lightweight_conv import (
    dynamicconv_attention,
    dynamicconv_attention_reference,
    lightconv_attention,
    lightconv_attention_reference,
)
from .mechanisms.mixers.lka import lka_attention, lka_attention_reference
from .mechanisms.mixers.pkcam import pkcam_attention, pkcam_attention_reference
from .mechanisms.mixers.psa import psa_attention, psa_attention_reference, psa_channel_gate, psa_spatial_gate
from .mechanisms.mixers.ssm2d import ssm2d_attention, ssm2d_attention_reference, ssm2d_kernel
from .mechanisms.mixers.swiftformer import additive_attention, additive_attention_reference
from .mechanisms.mixers.ulsam import ulsam_attention, ulsam_attention_reference
from .mechanisms.mixers.xcit import xca_attention, xca_attention_reference
from .mechanisms.pooling.attention_bottleneck import bottleneck_attention, bottleneck_attention_reference
from .mechanisms.pooling.class_attention import class_attention, class_attention_reference
from .mechanisms.pooling.efficient_probing import efficient_probing_attention, efficient_probing_attention_reference
from .mechanisms.pooling.simpool import simpool_attention, simpool_attention_reference
from .mechanisms.positional.botnet import botnet_attention, botnet_attention_reference
from .mechanisms.positional.faceformer import (
    aligned_cross_attention,
    aligned_cross_attention_reference,
    faceformer_attention,
    faceformer_attention_reference,
)
from .mechanisms.positional.gpsa import gpsa_attention, gpsa_attention_reference, nonlocality
from .mechanisms.sets.point_transformer import point_transformer_attention, point_transformer_attention_reference
from .mechanisms.sparse.bilateral import bilateral_attention, bilateral_attention_reference
from .mechanisms.sparse.combiner import combiner_attention, combiner_attention_reference
from .mechanisms.sparse.dhsa import dhsa_attention, dhsa_attention_reference
from .mechanisms.sparse.fit import fit_attention, fit_attention_reference
from .mechanisms.sparse.hierarchical_selection import (
    hierarchical_selection_attention,
    hierarchical_selection_attention_reference,
)
from .mechanisms.sparse.mra import mra_attention, mra_attention_reference
from .mechanisms.sparse.power import power_attention, power_attention_reference
from .mechanisms.sparse.proxy import proxy_token_attention, proxy_token_attention_reference
from .mechanisms.sparse.routing import routing_attention, routing_attention_reference
from .mechanisms.sparse.select_and_pack import select_and_pack_attention, select_and_pack_attention_reference
from .mechanisms.sparse.sliding_window import sliding_window_attention, sliding_window_attention_reference
from .mechanisms.tables.npt import (
    npt_attribute_attention,
    npt_attribute_attention_reference,
    npt_datapoint_attention,
    npt_datapoint_attention_reference,
)

__all__ = [
    "additive_attention",
    "additive_attention_reference",
    "aggregated_attention",
    "aggregated_attention_reference",
    "alibi_attention",
    "alibi_attention_reference",
    "alibi_slopes",
    "aligned_cross_attention",
    "aligned_cross_attention_reference",
    "altered_similarity_attention",
    "altered_similarity_attention_reference",
    "axial_attention",
    "axial_attention_reference",
    "based_attention",
    "based_attention_reference",
    "bilateral_attention",
    "bilateral_attention_reference",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "BlockLayout",
    "botnet_attention",
    "botnet_attention_reference",
    "bottleneck_attention",
    "bottleneck_attention_reference",
    "channel_group_attention",
    "channel_group_attention_reference",
    "circular_window_attention",
    "circular_window_attention_reference",
    "class_attention",
    "class_attention_reference",
    "coca_attention",
    "coca_attention_reference",
    "combiner_attention",
    "combiner_attention_reference",
    "context_broadcasting_attention",
    "context_broadcasting_attention_reference",
    "contmix_attention",
    "contmix_attention_reference",
    "contmix_kernels",
    "deep_memory_attention",
    "deep_memory_attention_reference",
    "delta_conv_fusion_attention",
    "delta_conv_fusion_attention_reference",
    "delta_conv_fusion_mix",
    "dhsa_attention",
    "dhsa_attention_reference",
    "dynamicconv_attention",
    "dynamicconv_attention_reference",
    "efficient_attention",
    "efficient_attention_reference",
    "efficient_probing_attention",
    "efficient_probing_attention_reference",
    "faceformer_attention",
    "faceformer_attention_reference",
    "fit_attention",
    "fit_attention_reference",
    "fixed_mixing_attention",
    "fixed_mixing_attention_reference",
    "focused_linear_attention",
    "focused_linear_attention_reference",
    "fourier_attention",
    "fourier_attention_reference",
    "galerkin_attention",
    "galerkin_attention_reference",
    "gem_attention",
    "gem_attention_reference",
    "gpsa_attention",
    "gpsa_attention_reference",
    "gsa_attention",
    "gsa_attention_reference",
    "halo_attention",
    "halo_attention_reference",
    "han_channel_spatial_attention",
    "han_channel_spatial_attention_reference",
    "han_layer_attention",
    "han_layer_attention_reference",
    "hidden_attention",
    "hierarchical_selection_attention",
    "hierarchical_selection_attention_reference",
    "hyperzzw_attention",
    "hyperzzw_attention_reference",
    "kerple_attention",
    "kerple_attention_reference",
    "lambda_attention",
    "lambda_attention_reference",
    "lightconv_attention",
    "lightconv_attention_reference",
    "linear_attention",
    "linear_attention_recurrent",
    "linear_attention_reference",
    "linear_attention_step",
    "lka_attention",
    "lka_attention_reference",
    "local_linear_attention",
    "local_linear_attention_reference",
    "lsa_attention",
    "lsa_attention_reference",
    "memora_attention",
    "memora_attention_reference",
    "memory_attention",
    "memory_attention_reference",
    "mhe_attention",
    "mhe_attention_reference",
    "moh_attention",
    "moh_attention_reference",
    "mra_attention",
    "mra_attention_reference",
    "multi_window_attention",
    "multi_window_attention_reference",
    "multiscale_attention",
    "multiscale_attention_reference",
    "neighborhood_attention",
    "neighborhood_attention_reference",
    "neural_attention",
    "neural_attention_reference",
    "no_mixing_attention",
    "no_mixing_attention_reference",
    "nonlocality",
    "normalized_attention",
    "normalized_attention_reference",
    "npt_attribute_attention",
    "npt_attribute_attention_reference",
    "npt_datapoint_attention",
    "npt_datapoint_attention_reference",
    "perceiver_attention",
    "perceiver_attention_reference",
    "pkcam_attention",
    "pkcam_attention_reference",
    "point_transformer_attention",
    "point_transformer_attention_reference",
    "power_attention",
    "power_attention_reference",
    "primer_attention",
    "primer_attention_reference",
    "probabilistic_attention",
    "probabilistic_attention_reference",
    "prototype_memory_attention",
    "prototype_memory_attention_reference",
    "proxy_token_attention",
    "proxy_token_attention_reference",
    "psa_attention",
    "psa_attention_reference",
    "psa_channel_gate",
    "psa_spatial_gate",
    "relational_attention",
    "relational_attention_reference",
    "reversed_attention",
    "reversed_attention_reference",
    "rin_attention",
    "rin_attention_reference",
    "rope_attention",
    "rope_attention_reference",
    "routing_attention",
    "routing_attention_reference",
    "sdpa",
    "select_and_pack_attention",
    "select_and_pack_attention_reference",
    "selective_attention",
    "selective_attention_reference",
    "selective_scan",
    "selective_scan_reference",
    "self_fixed_point_attention",
    "self_fixed_point_attention_reference",
    "shvit_attention",
    "shvit_attention_reference",
    "simpool_attention",
    "simpool_attention_reference",
    "sliding_window_attention",
    "sliding_window_attention_reference",
    "slot_attention",
    "slot_attention_reference",
    "softmax_attention",
    "softmax_attention_reference",
    "ssm2d_attention",
    "ssm2d_attention_reference",
    "ssm2d_kernel",
    "supergat_attention",
    "supergat_attention_reference",
    "tiled_attention",
    "ulsam_attention",
    "ulsam_attention_reference",
    "xca_attention",
    "xca_attention_reference",
]
