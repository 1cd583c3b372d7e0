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

Padded tokens carry no mass in any result. Methods are listed in the catalogue as kind
"analysis" (`attnlab papers`). `transformers` is imported only when a transformers model is used.
"""
from .capture import Attentions, Record, capture
from .char_lm import CharLM, CharLMSettings, char_lm
from .explain import Explanation, explain
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
from .locality import attention_mass_by_distance
from .lookback import LookbackDetector, lookback_features, lookback_ratio
from .models import load_minilm, minilm_path, tiny_llama
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
from .sinks import calibrate, calibration, sink_scores, sink_tokens

__all__ = [
    "attention_entropy",
    "attention_flow",
    "attention_mass_by_distance",
    "Attentions",
    "calibrate",
    "calibration",
    "capture",
    "char_lm",
    "CharLM",
    "CharLMSettings",
    "duplicate_token_score",
    "explain",
    "Explanation",
    "fuse_heads",
    "generic_relevance",
    "generic_relevance_from",
    "induction_score",
    "load_minilm",
    "lookback_features",
    "lookback_ratio",
    "LookbackDetector",
    "lrp_relevance",
    "max_flow_layered",
    "mean_attention_distance",
    "minilm_path",
    "normalize_qk",
    "offset_attention",
    "previous_token_score",
    "propagate_relevance",
    "qk_embedding",
    "qk_vectors",
    "QKEmbedding",
    "query_key_nmi",
    "rank_collapse_experiment",
    "Record",
    "relative_residual",
    "Relevance",
    "residual",
    "residual_attention",
    "residual_norm",
    "rollout",
    "sink_scores",
    "sink_tokens",
    "tiny_llama",
    "unified_implicit_attention",
    "weighted_attention",
]
