"""Initialisations and training recipes (family D), registered as kind "init" or "recipe".

* `mimetic`: P001 mimetic initialisation (`mimetic_init_`, init "mimetic-init") and `mimeticity`;
* `apla`: P021 APLA, train only W_o or r random columns of it (`apla`, recipe "apla"), `training_cost`;
* `attention_to_identity`: P018 entropy-guided choice of attention layers to turn into identity
  (`select_identity_layers`, recipe "attention-to-identity"), `convert_to_identity`, `dilute`;
* `attention_map_distillation`: P146 MAE-Lite attention-map distillation with the head-count adapter
  (`AttentionMapDistillation`, recipe "attention-map-distillation");
* `relation_distillation`: P040 MiniLMv2 Q-Q, K-K, V-V relation distillation over A_r relation heads
  (`relation_distillation_loss`, recipe "minilmv2-relations"), `projections_of` to record q, k, v;
* `illama`: P214 iLLaMA soft causal mask on softmax layers (`soft_causal`, recipe "illama-soft-causal"),
  `soft_mask_rate` (its schedule), `PostSequenceClassToken`;
* `subsampled_attention`: P074 SSA, locally biased key subsampling in training, dense at eval
  (`subsample_attention`, recipe "subsampled-attention"), `dense_finetune`, `expected_keep_fraction`;
* `lora_ensemble`: P121 LoRA-Ensemble, M rank-r adapter sets on the attention projections over one frozen
  backbone (`LoRAEnsemble`, recipe "lora-ensemble"), `evaluate` (accuracy, NLL, ECE);
* `nmi_hybrid_distillation`: P137 NMI-HAD, attention-map distillation from the teacher layer whose mean query-key
  NMI is closest to the hybrid target (`nmi_hybrid_distillation`, recipe "nmi-hybrid-distillation").

`projections.attention_layers` finds the q, k, v, o projections of attnlab and transformers models.
"""
from .apla import APLA, TrainingCost, apla, training_cost
from .attention_map_distillation import AttentionMapDistillation, attention_kl
from .attention_to_identity import (
    DilutedAttention,
    IdentityAttention,
    attention_entropies,
    convert_to_identity,
    dilute,
    dilution_lambda,
    gaussian_entropy,
    select_identity_layers,
)
from .illama import (
    PostSequenceClassToken,
    SoftCausalAttention,
    set_soft_mask_rate,
    soft_causal,
    soft_causal_mask,
    soft_mask_rate,
)
from .lora_ensemble import (
    Calibration,
    EnsembleLoRALinear,
    LoRAEnsemble,
    MemberLinear,
    ensemble_probabilities,
    evaluate,
    expected_calibration_error,
)
from .mimetic import Mimeticity, MimeticTargets, mimetic_init_, mimeticity
from .nmi_hybrid_distillation import HybridTarget, nmi_hybrid_distillation
from .projections import AttentionLayer, attention_layers
from .relation_distillation import projections_of, relation_distillation_loss, relation_logits
from .subsampled_attention import (
    SubsampledAttention,
    dense_finetune,
    expected_keep_fraction,
    keep_probability,
    subsample_attention,
    subsample_mask,
)

__all__ = [
    "APLA",
    "apla",
    "attention_entropies",
    "attention_kl",
    "attention_layers",
    "AttentionLayer",
    "AttentionMapDistillation",
    "Calibration",
    "convert_to_identity",
    "dense_finetune",
    "dilute",
    "DilutedAttention",
    "dilution_lambda",
    "ensemble_probabilities",
    "EnsembleLoRALinear",
    "evaluate",
    "expected_calibration_error",
    "expected_keep_fraction",
    "gaussian_entropy",
    "HybridTarget",
    "IdentityAttention",
    "keep_probability",
    "LoRAEnsemble",
    "MemberLinear",
    "mimetic_init_",
    "mimeticity",
    "Mimeticity",
    "MimeticTargets",
    "nmi_hybrid_distillation",
    "PostSequenceClassToken",
    "projections_of",
    "relation_distillation_loss",
    "relation_logits",
    "select_identity_layers",
    "set_soft_mask_rate",
    "soft_causal",
    "soft_causal_mask",
    "soft_mask_rate",
    "SoftCausalAttention",
    "subsample_attention",
    "subsample_mask",
    "SubsampledAttention",
    "training_cost",
    "TrainingCost",
]
