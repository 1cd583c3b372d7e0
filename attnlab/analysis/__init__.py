"""Analysis: see what attention does, on every attnlab mechanism and on Hugging Face models.

The foundation is `capture`: a context manager that records the attention probabilities of every
layer and head (and, on request, their gradients) from attnlab modules (through `materialize`) and
from transformers models (through a registered attention implementation), batched and padded.
Everything else reads its result, `Attentions`, or plain maps (batch, heads, n_q, n_k) per layer:

    from attnlab.analysis import capture, load_minilm, rollout, attention_flow, attention_entropy
    model, tok = load_minilm()          # or char_lm(): a small causal LM trained here, cached (P068, P248)
    batch = tok(["The cat sat on the mat.", "It was tired."], return_tensors="pt", padding=True)
    with capture(model) as att:
        model(**batch)
    r = rollout(att)                  # (batch, n, n): share of input j in output i   (P008)
    f = attention_flow(att)           # (batch, n, n): exact max-flow from j to i      (P008)
    h = attention_entropy(att)        # (layers, batch, heads)
    rel = generic_relevance(model, batch).scores   # (batch, n): P035 relevance for [CLS]

Beyond maps: layer and model similarity (P025 `similarity`), head classes by NMI (P137), token patterns and their
injection (P156), a head's weights read through the vocabulary (P173 `vocabulary_maps`) or as singular terms of
W_Q W_Kᵀ (P190 `qk_decomposition`), sparse dictionaries of attention (P187 `lorsa`) and of the residual stream
(P103 `sparse_autoencoder`, P179 `feature_geometry`), interventions (P033 `knockout`, P042 `last_token_circuit`,
P046 `deception`), neuron attribution (P119), cross- and joint-attention saliency (P077, P109) and vision (P064
`class_lens`, P047 `faithful_masks`, P055 `spatial_shuffle`, P250 `normgrad`), with the small models trained here
that they are shown on (`toy_lm`, `induction_model`, `digits`, `toy_diffusion`, `entity_lm`, `digit_captioner`).

Padded tokens carry no mass in any result. Methods are listed in the catalogue as kind
"analysis" (`attnlab papers`). `transformers` is imported only when a transformers model is used.
"""
from .capture import Attentions, Record, capture
from .char_lm import CharLM, CharLMSettings, char_lm
from .class_lens import (
    class_identifiability,
    class_lens,
    identifiability_profile,
    sublayer_attribution,
    token_importance,
)
from .concept_attention import ConceptSaliency, concept_attention
from .cross_attention_heads import (
    HeadRelevance,
    head_relevance_from_maps,
    head_relevance_vectors,
    ordered_weakening,
    weakened_heads,
)
from .deception import attention_in_graph, deception_penalty, impermissible_mass
from .digits import CNNSettings, DigitCNN, DigitViT, ViTSettings, digit_cnn, digit_vit, load_digits_split
from .explain import Explanation, explain
from .faithful_masks import FaithfulMaskViT, FaithfulSettings, faithful_masks, masked_patch_invariance
from .feature_geometry import (
    Modularity,
    PowerLaw,
    crystal_quality,
    eigenvalue_power_law,
    power_law_slopes,
    spatial_modularity,
)
from .head_classes import HeadClasses, classify_nmi, head_classes, hybrid_layer
from .heads import (
    attention_entropy,
    duplicate_token_score,
    induction_score,
    mean_attention_distance,
    offset_attention,
    previous_token_score,
    query_key_nmi,
)
from .implicit import unified_implicit_attention
from .induction_model import induction_model
from .knockout import WindowKnockout, group_keep, knockout, window_knockout
from .last_token_circuit import AllForOne, all_for_one, cama, context_aware_means, peeking_masks
from .locality import attention_mass_by_distance
from .lookback import LookbackDetector, lookback_features, lookback_ratio
from .lorsa import Lorsa, fit_lorsa, lorsa_head_scores
from .models import load_minilm, minilm_path, tiny_llama
from .multimodal_neurons import ablation_check, decode_neurons, neuron_attribution
from .normgrad import class_sensitivity, grad_cam, normgrad, pointing_game, saliency
from .patterns import inject_patterns, pattern_match, pattern_scores, sentence_end_ids, token_patterns
from .qk_decomposition import decompose, qk_form, score_decomposition_summary, terms_needed, trace_score
from .qk_embedding import QKEmbedding, normalize_qk, qk_embedding, qk_vectors
from .rank_collapse import rank_collapse_experiment, relative_residual, residual, residual_norm
from .relevance import (
    Relevance,
    generic_relevance,
    generic_relevance_from,
    lrp_relevance,
    propagate_relevance,
    weighted_attention,
)
from .rollout import attention_flow, fuse_heads, max_flow_layered, residual_attention, rollout
from .similarity import attncorr, attnsim, layer_similarity, linear_cka, mixedsim, neuronsim, pwcca, svcca
from .sinks import calibrate, calibration, sink_scores, sink_tokens
from .sparse_autoencoder import SparseAutoencoder, reconstruction_metrics, separation_scores, steer_residual, train_sae
from .spatial_shuffle import disrt_score, representation_shift, shuffle_patches
from .vocabulary_maps import relation_scores, salient_mappings, successor_lm, vocabulary_maps

__all__ = [
    "ablation_check",
    "all_for_one",
    "AllForOne",
    "attention_entropy",
    "attention_flow",
    "attention_in_graph",
    "attention_mass_by_distance",
    "Attentions",
    "attncorr",
    "attnsim",
    "calibrate",
    "calibration",
    "cama",
    "capture",
    "char_lm",
    "CharLM",
    "CharLMSettings",
    "class_identifiability",
    "class_lens",
    "class_sensitivity",
    "classify_nmi",
    "CNNSettings",
    "concept_attention",
    "ConceptSaliency",
    "context_aware_means",
    "crystal_quality",
    "deception_penalty",
    "decode_neurons",
    "decompose",
    "digit_cnn",
    "digit_vit",
    "DigitCNN",
    "DigitViT",
    "disrt_score",
    "duplicate_token_score",
    "eigenvalue_power_law",
    "explain",
    "Explanation",
    "faithful_masks",
    "FaithfulMaskViT",
    "FaithfulSettings",
    "fit_lorsa",
    "fuse_heads",
    "generic_relevance",
    "generic_relevance_from",
    "grad_cam",
    "group_keep",
    "head_classes",
    "head_relevance_from_maps",
    "head_relevance_vectors",
    "HeadClasses",
    "HeadRelevance",
    "hybrid_layer",
    "identifiability_profile",
    "impermissible_mass",
    "induction_model",
    "induction_score",
    "inject_patterns",
    "knockout",
    "layer_similarity",
    "linear_cka",
    "load_digits_split",
    "load_minilm",
    "lookback_features",
    "lookback_ratio",
    "LookbackDetector",
    "Lorsa",
    "lorsa_head_scores",
    "lrp_relevance",
    "masked_patch_invariance",
    "max_flow_layered",
    "mean_attention_distance",
    "minilm_path",
    "mixedsim",
    "Modularity",
    "neuron_attribution",
    "neuronsim",
    "normalize_qk",
    "normgrad",
    "offset_attention",
    "ordered_weakening",
    "pattern_match",
    "pattern_scores",
    "peeking_masks",
    "pointing_game",
    "power_law_slopes",
    "PowerLaw",
    "previous_token_score",
    "propagate_relevance",
    "pwcca",
    "qk_embedding",
    "qk_form",
    "qk_vectors",
    "QKEmbedding",
    "query_key_nmi",
    "rank_collapse_experiment",
    "reconstruction_metrics",
    "Record",
    "relation_scores",
    "relative_residual",
    "Relevance",
    "representation_shift",
    "residual",
    "residual_attention",
    "residual_norm",
    "rollout",
    "saliency",
    "salient_mappings",
    "score_decomposition_summary",
    "sentence_end_ids",
    "separation_scores",
    "shuffle_patches",
    "sink_scores",
    "sink_tokens",
    "SparseAutoencoder",
    "spatial_modularity",
    "steer_residual",
    "sublayer_attribution",
    "successor_lm",
    "svcca",
    "terms_needed",
    "tiny_llama",
    "token_importance",
    "token_patterns",
    "trace_score",
    "train_sae",
    "unified_implicit_attention",
    "ViTSettings",
    "vocabulary_maps",
    "weakened_heads",
    "weighted_attention",
    "window_knockout",
    "WindowKnockout",
]
