"""capture on tiny random models of every attention family transformers ships (built from configs, nothing
downloaded): the recorded maps equal transformers' eager `output_attentions=True` maps (1e-5), the model's
outputs inside `capture` equal those outside it, masks follow the padding, and rollout and relevance run.
LongT5's local encoder attention returns blocked maps (batch, blocks, heads, ℓ, 3ℓ): capture records the (n, n)
token map they stand for, checked entry by entry against the blocks, against the dense banded softmax written
from the layer's weights, and against the layer's output (W_o·A·v); transient-global attention is refused."""
import warnings

import pytest
import torch

from attnlab.analysis import capture, generic_relevance, rollout

pytest.importorskip("transformers")

D = 32  # width of every model
TEXT = dict(vocab_size=64, hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * D,
            max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
T5 = dict(vocab_size=64, d_model=D, d_kv=8, d_ff=2 * D, num_layers=2, num_decoder_layers=2, num_heads=4,
          relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0, pad_token_id=0)
BART = dict(vocab_size=64, d_model=D, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=2 * D, decoder_ffn_dim=2 * D, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)
VISION = dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * D, image_size=16,
              patch_size=4, num_channels=3)
SEAMLESS = dict(vocab_size=64, hidden_size=D, max_position_embeddings=64, encoder_layers=2, decoder_layers=2,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=2 * D, decoder_ffn_dim=2 * D,
                speech_encoder_layers=2, speech_encoder_attention_heads=4, speech_encoder_intermediate_size=2 * D,
                feature_projection_input_dim=16, num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4,
                adaptor_kernel_size=2, adaptor_stride=2, conv_depthwise_kernel_size=3, max_source_positions=64,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)
AUDIO = dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * D,
             conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8,
             num_conv_pos_embedding_groups=4, feat_extract_norm="layer", do_stable_layer_norm=True, vocab_size=32)

# model_type[:variant] -> (config overrides, inputs kind); kinds: text, causal, seq2seq, vision, audio, clip, ...
ARCHS = {
    # encoders
    "bert": (TEXT, "text"),
    "roberta": (dict(TEXT, pad_token_id=1), "text"),
    "electra": (dict(TEXT, embedding_size=D), "text"),
    "albert": (dict(TEXT, embedding_size=16), "text"),
    "distilbert": (dict(vocab_size=64, dim=D, n_layers=2, n_heads=4, hidden_dim=2 * D, max_position_embeddings=64,
                        pad_token_id=0), "text"),
    "deberta-v2": (dict(TEXT, relative_attention=True, position_buckets=8, max_relative_positions=16,
                        pos_att_type=["p2c", "c2p"]), "text"),
    "mpnet": (TEXT, "text"),
    # decoders: GQA, sliding windows, soft-capping, sinks, ALiBi, local attention
    "llama": (dict(TEXT, num_key_value_heads=2), "causal"),
    "mistral": (dict(TEXT, num_key_value_heads=2, sliding_window=4), "causal"),
    "qwen2": (dict(TEXT, num_key_value_heads=1), "causal"),
    "gemma2": (dict(TEXT, num_key_value_heads=2, head_dim=8, sliding_window=4, attn_logit_softcapping=5.0,
                    final_logit_softcapping=None), "causal"),
    "gpt_oss": (dict(TEXT, num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1,
                     sliding_window=4, layer_types=["sliding_attention", "full_attention"]), "causal"),
    "gpt2": (dict(vocab_size=64, n_embd=D, n_layer=2, n_head=4, n_positions=64), "causal"),
    "opt": (dict(TEXT, ffn_dim=2 * D, word_embed_proj_dim=D), "causal"),
    "phi": (dict(TEXT, num_key_value_heads=4), "causal"),
    "gemma3_text": (dict(TEXT, num_key_value_heads=2, head_dim=8, sliding_window=4,
                         layer_types=["sliding_attention", "full_attention"]), "causal"),
    "gpt_bigcode": (dict(vocab_size=64, n_embd=D, n_layer=2, n_head=4, n_positions=64, multi_query=True), "causal"),
    "gptj": (dict(vocab_size=64, n_embd=D, n_layer=2, n_head=4, n_positions=64, rotary_dim=4), "causal"),
    "gpt_neox": (dict(TEXT, rotary_pct=0.5), "causal"),
    "falcon": (dict(vocab_size=64, hidden_size=D, num_hidden_layers=2, num_attention_heads=4, alibi=True,
                    new_decoder_architecture=False, multi_query=True), "causal"),
    "bloom": (dict(vocab_size=64, hidden_size=D, n_layer=2, n_head=4), "causal"),
    "gpt_neo": (dict(vocab_size=64, hidden_size=D, num_layers=2, num_heads=4, window_size=4, max_position_embeddings=64,
                     attention_types=[[["global", "local"], 1]], bos_token_id=1, eos_token_id=2), "causal"),
    "mpt": (dict(vocab_size=64, d_model=D, n_layers=2, n_heads=4, max_seq_len=64), "causal"),
    "xglm": (dict(vocab_size=64, d_model=D, num_layers=2, attention_heads=4, ffn_dim=2 * D, max_position_embeddings=64,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2), "causal"),
    # encoder-decoders: learned and relative positions
    "bart": (BART, "seq2seq"),
    "marian": (BART, "seq2seq"),
    "mbart": (BART, "seq2seq"),
    "pegasus": (BART, "seq2seq"),
    "t5": (T5, "seq2seq"),
    "mt5": (T5, "seq2seq"),
    "umt5": (T5, "seq2seq"),
    "longt5": (dict(T5, encoder_attention_type="local", local_radius=2), "seq2seq"),
    "pix2struct": (dict(text_config=dict(T5, hidden_size=D, d_ff=2 * D), vision_config=dict(
        hidden_size=D, patch_embed_hidden_size=48, d_ff=2 * D, d_kv=8, num_hidden_layers=2, num_attention_heads=4,
        patch_size=4, relative_attention_num_buckets=8, relative_attention_max_distance=16)), "patches"),
    "udop": (dict(T5, image_size=16, patch_size=4, num_channels=3,
                  relative_bias_args=[{"type": "1d"}, {"type": "horizontal"}, {"type": "vertical"}]), "layout"),
    "switch_transformers": (dict(T5, num_experts=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
                                 expert_capacity=8), "seq2seq"),
    # SeamlessM4T: the speech-to-text model (conformer encoder with relative positions, its adapter's attention
    # over the downsampled frames, the text decoder) and the text-to-text model; the full model adds the
    # text-to-unit model and the vocoder, whose attention is that of the text stacks
    "seamless_m4t": (SEAMLESS, "speech2text"),
    "seamless_m4t:text": (SEAMLESS, "seq2seq"),
    # vision towers
    "vit": (VISION, "vision"),
    "deit": (VISION, "vision"),
    "dinov2": (VISION, "vision"),
    "beit": (dict(VISION, use_relative_position_bias=True), "vision"),
    "swin": (dict(embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=2, image_size=16, patch_size=2), "vision"),
    "clip": (dict(text_config=dict(TEXT, max_position_embeddings=16), vision_config=VISION, projection_dim=D), "clip"),
    "siglip": (dict(text_config=dict(TEXT, max_position_embeddings=16), vision_config=VISION), "clip"),
    # audio: per-sample masks, per-frame attention; relative positions in the conformer
    "wav2vec2": (AUDIO, "audio"),
    "hubert": (AUDIO, "audio"),
    "wav2vec2-conformer": (dict(AUDIO, position_embeddings_type="relative", conv_depthwise_kernel_size=3), "audio"),
    "whisper": (dict(vocab_size=64, d_model=D, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=2 * D, decoder_ffn_dim=2 * D, num_mel_bins=8,
                     max_source_positions=8, max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                     decoder_start_token_id=1, begin_suppress_tokens=None, suppress_tokens=None), "whisper"),
}


# models without an AutoModel class for the part tested
CLASSES = {"pix2struct": "Pix2StructForConditionalGeneration", "seamless_m4t": "SeamlessM4TForSpeechToText",
           "seamless_m4t:text": "SeamlessM4TForTextToText"}
# modules whose maps the model computes but does not return with output_attentions=True: eager maps read from
# the module's own (output, weights) return value
UNRETURNED = {"seamless_m4t": r"adapter\.layers\.\d+\.self_attn$"}


def _model(model_type):
    import transformers
    from transformers import AutoConfig, AutoModel

    overrides, kind = ARCHS[model_type]
    config = AutoConfig.for_model(model_type.partition(":")[0], **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if model_type in CLASSES:
            model = getattr(transformers, CLASSES[model_type])(config)
            model.set_attn_implementation("eager")
        else:
            model = AutoModel.from_config(config, attn_implementation="eager")
    return model.eval(), kind


def _inputs(kind):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # the second text is padded
    if kind in ("text", "causal"):
        return {"input_ids": ids, "attention_mask": mask}
    if kind == "seq2seq":
        dec = torch.randint(3, 64, (2, 5), generator=g)
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}
    if kind == "patches":  # Pix2Struct: (row, column, 4 x 4 x 3 pixels) per patch, the second image padded
        patches = torch.randn(2, 6, 2 + 48, generator=g)
        patches[..., 0], patches[..., 1] = torch.arange(6) // 3 + 1, torch.arange(6) % 3 + 1
        patch_mask = torch.ones(2, 6, dtype=torch.long)
        patch_mask[1, 4:] = 0
        return {"flattened_patches": patches, "attention_mask": patch_mask,
                "decoder_input_ids": torch.randint(3, 64, (2, 5), generator=g)}
    if kind == "layout":  # UDOP: text with boxes, and the page image (its 16 patches join the encoder's tokens)
        return {"input_ids": ids, "attention_mask": mask, "bbox": torch.rand(2, 7, 4, generator=g).sort(-1).values,
                "pixel_values": torch.randn(2, 3, 16, 16, generator=g),
                "decoder_input_ids": torch.randint(3, 64, (2, 5), generator=g)}
    if kind == "vision":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    if kind == "clip":
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    if kind == "audio":
        values = torch.randn(2, 400, generator=g)
        sample_mask = torch.ones(2, 400, dtype=torch.long)
        sample_mask[1, 250:] = 0
        return {"input_values": values * sample_mask, "attention_mask": sample_mask}
    if kind == "speech2text":  # SeamlessM4T: 16 features per frame, the second utterance padded
        frames = torch.ones(2, 12, dtype=torch.long)
        frames[1, 8:] = 0
        return {"input_features": torch.randn(2, 12, 16, generator=g), "attention_mask": frames,
                "decoder_input_ids": torch.randint(3, 64, (2, 5), generator=g)}
    if kind == "whisper":
        return {"input_features": torch.randn(2, 8, 16, generator=g),
                "decoder_input_ids": torch.randint(3, 64, (2, 5), generator=g)}
    raise AssertionError(kind)


def _maps(output):
    """Every attention map of a transformers output, nested outputs included."""
    found = []
    for key, value in output.items():
        if key.endswith("attentions") and isinstance(value, tuple):
            found += list(value)
        elif hasattr(value, "items"):
            found += _maps(value)
    return found


def _eager_maps(model, model_type, inputs):
    """The eager maps of one call: those returned with output_attentions=True, then those of `UNRETURNED`."""
    import re

    pattern = UNRETURNED.get(model_type)
    extra, handles = [], []
    for name, module in model.named_modules():
        if pattern and re.search(pattern, name):
            handles.append(module.register_forward_hook(lambda mod, args, out: extra.append(out[1])))
    try:
        returned = _maps(model(**inputs, output_attentions=True))
    finally:
        for h in handles:
            h.remove()
    assert not pattern or extra, f"{model_type}: no module matches {pattern}"
    return returned + extra


def _unblock(dense, blocked):
    """The entries of the (n, n) map `dense` at the places of the blocked local map (batch, blocks, heads, ℓ, 3ℓ),
    written out: query r of block j is token j·ℓ + r, key column c is token (j − 1)·ℓ + c; None outside [0, n)."""
    n = dense.shape[-1]
    _, blocks, _, ell, width = blocked.shape
    pairs = {}
    for j in range(blocks):
        for r in range(ell):
            for c in range(width):
                i, t = j * ell + r, (j - 1) * ell + c
                pairs[j, r, c] = dense[:, :, i, t] if i < n and 0 <= t < n else None
    return pairs


def _tensors(output):
    return {k: v for k, v in output.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_capture_equals_eager_and_leaves_the_output_unchanged(model_type):
    model, kind = _model(model_type)
    inputs = _inputs(kind)
    with torch.no_grad():
        plain = model(**inputs)
        eager = _eager_maps(model, model_type, inputs)
        with warnings.catch_warnings(record=True) as caught, capture(model) as att:
            warnings.simplefilter("always")
            inside = model(**inputs)
    assert eager and len(att.records) == len(eager) and not att.skipped, (len(att.records), len(eager), att.skipped)
    blocked = [t for t in eager if t.dim() != 4]  # LongT5's local attention: blocks, recorded as (n, n) maps
    eager = [t for t in eager if t.dim() == 4]
    assert bool(blocked) == (model_type == "longt5")
    local = [r for r in att.records if r.name.endswith("LocalSelfAttention")]
    assert len(local) == len(blocked)
    for rec, blocks in zip(local, blocked):  # every entry of the blocks is in the (n, n) map, nothing else is
        pairs = _unblock(rec.weights, blocks)
        for (j, r, c), value in pairs.items():
            real = j * blocks.shape[3] + r < rec.weights.shape[-1]
            if value is not None:
                torch.testing.assert_close(value, blocks[:, j, :, r, c], rtol=0, atol=1e-6)
            elif real:  # a key outside the sequence gets no weight from a real query
                assert blocks[:, j, :, r, c][rec.query_mask[:, j * blocks.shape[3] + r]].abs().max() == 0
        assert int((rec.weights != 0).sum()) == sum(int((v != 0).sum()) for v in pairs.values() if v is not None)
    records = [r for r in att.records if all(r is not x for x in local)]
    # capture never changes what the model computes, nor what it returns
    assert set(_tensors(inside)) == set(_tensors(plain))
    for key, value in _tensors(plain).items():
        torch.testing.assert_close(_tensors(inside)[key], value, rtol=0, atol=1e-6, msg=f"{model_type}: output {key}")
    # every eager map is recorded once (call order differs from the outputs' order for encoder-decoders)
    left = list(range(len(eager)))
    for rec in records:
        match = [i for i in left if eager[i].shape == rec.weights.shape
                 and torch.allclose(eager[i], rec.weights, rtol=0, atol=1e-5)]
        assert match, f"{model_type}: {rec.name} matches no eager map"
        left.remove(match[0])
    assert (att.fallback is not None) == any("output_attentions=True" in str(w.message) for w in caught)


def _rollout_checks(att):
    r = rollout(att)
    keep = att.attention_mask
    rows = r.sum(-1)
    torch.testing.assert_close(rows[keep], torch.ones(int(keep.sum()), dtype=torch.float64))
    assert rows[~keep].abs().sum() == 0
    return r


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_masks_rollout_and_relevance_run(model_type):
    model, kind = _model(model_type)
    inputs = _inputs(kind)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with capture(model) as att:
            model(**inputs)
    streams = target = None
    if model_type == "swin":  # maps per window (batch · windows, heads, w², w²): no token x token chain
        assert {r.weights.shape[0] for r in att.records} == {2 * 16, 2 * 4}  # 8 x 8 patches in 2 x 2 windows, then 4 x 4
        with pytest.raises(ValueError, match="do not chain from layer to layer|need self-attention maps of one shape"):
            rollout(att)
        with pytest.raises(ValueError, match="maps per window"):
            generic_relevance(model, inputs)
        return
    if kind == "clip":
        vision = att.select("vision")
        assert vision.attention_mask.shape == (2, vision.records[0].weights.shape[-1]) and bool(vision.attention_mask.all())
        _rollout_checks(vision)
        text = att.select("text")
        assert torch.equal(text.attention_mask, inputs["attention_mask"].bool())
        streams = lambda name, cross: ("vision", "vision") if "vision" in name else ("text", "text")  # noqa: E731
        target = lambda out: out.logits_per_image.diagonal()  # noqa: E731
    elif kind in ("seq2seq", "whisper", "patches", "layout"):
        enc = att.select(r"^encoder|^text_encoder\.")
        assert enc.records
        _rollout_checks(enc)
    elif kind == "speech2text":  # the conformer's frames (the adapter then halves them): a per-frame mask
        enc = att.select(r"^speech_encoder\.encoder\.")
        assert torch.equal(enc.attention_mask, inputs["attention_mask"].bool())
        _rollout_checks(enc)
        adapter = att.select(r"^speech_encoder\.adapter\.")  # ⌊(8 + 2 − 2) / 2⌋ + 1 = 5 of 7 frames are real
        assert adapter.attention_mask.sum(-1).tolist() == [7, 5]
        _rollout_checks(adapter)
    else:
        _rollout_checks(att)
    if model_type.startswith("seamless_m4t"):  # streams by name: "text_decoder" is no "decoder" part
        streams = lambda name, cross: (  # noqa: E731
            ("decoder", "encoder") if cross else ("decoder", "decoder") if name.startswith("text_decoder")
            else ("speech", "speech") if name.startswith("speech_encoder.encoder.") else ("encoder", "encoder"))
    if kind == "audio":  # attention runs over frames; the call's mask is per sample
        frames = att.records[0].weights.shape[-1]
        assert att.attention_mask.shape == (2, frames)
        assert bool(att.attention_mask[0].all()) and 0 < int(att.attention_mask[1].sum()) < frames
    if kind in ("text", "causal"):
        assert torch.equal(att.attention_mask, inputs["attention_mask"].bool())
    if kind == "layout":  # the text's mask, then the 16 image patches (those merged into a text box are masked)
        seen = att.select("^encoder").attention_mask
        assert seen.shape == (2, 7 + 16) and torch.equal(seen[:, :7], inputs["attention_mask"].bool())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rel = generic_relevance(model, inputs, streams=streams, target=target)
    scores = rel.scores
    keep = rel.masks[rel.input]
    assert torch.isfinite(scores).all() and scores[~keep].abs().sum() == 0
    assert scores[keep].abs().sum() > 0  # some relevance reaches the real tokens


@pytest.mark.parametrize("model_type", ["bloom", "t5"])
def test_tuple_outputs_come_back_as_tuples_without_maps(model_type):
    """return_dict=False: capture reads the maps by name inside, the caller gets the same tuple as without it."""
    model, kind = _model(model_type)
    inputs = _inputs(kind)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = model(**inputs, return_dict=False)
        with capture(model) as att:
            inside = model(**inputs, return_dict=False)
    assert type(inside) is tuple and len(inside) == len(plain) and len(att.records) == {"bloom": 2, "t5": 6}[model_type]
    for a, b in zip(plain, inside):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)


def test_generic_eager_attention_equals_the_files_eager_functions():
    """The fallback formula for a module whose file has no eager function: GQA, additive mask, soft-capping."""
    from torch import nn
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
    from transformers.models.llama.modeling_llama import eager_attention_forward as llama_eager

    from attnlab.analysis.capture import generic_eager_attention

    module = nn.Module().eval()
    module.num_key_value_groups = 2
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    mask = torch.zeros(2, 1, 5, 5)
    mask[1, ..., 3:] = torch.finfo(torch.float32).min
    for theirs, extra in ((llama_eager, {}), (gemma2_eager, {"softcap": 0.5})):
        want_out, want_probs = theirs(module, q, k, v, mask, scaling=0.3, **extra)
        out, probs = generic_eager_attention(module, q, k, v, mask, scaling=0.3, **extra)
        torch.testing.assert_close(probs, want_probs, rtol=0, atol=1e-6)
        torch.testing.assert_close(out, want_out, rtol=0, atol=1e-6)


def _longt5_local_calls(model, inputs):
    """(input, output) of every LongT5 local attention call of an eager run without capture."""
    calls, handles = [], []
    for name, module in model.named_modules():
        if name.endswith("LocalSelfAttention"):
            handles.append(module.register_forward_hook(lambda mod, args, kwargs, out: calls.append((mod, args[0], out[0])),
                                                        with_kwargs=True))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return calls


def test_longt5_local_maps_are_the_dense_banded_softmax_and_carry_the_layer_output():
    """Each recorded (n, n) map equals softmax(q kᵀ + bias(t − i)) over the keys |t − i| ≤ local_radius that are
    real tokens, written from the layer's weights, and W_o·merge_heads(A·v) with it is the layer's output."""
    model, kind = _model("longt5")
    inputs = _inputs(kind)
    calls = _longt5_local_calls(model, inputs)
    with torch.no_grad(), capture(model, qk=True) as att:
        returned = model(**inputs, output_attentions=True)
    assert [t.dim() for t in returned.encoder_attentions] == [5, 5]  # asked for: transformers' blocked layout
    local = [i for i, name in enumerate(att.names) if name.endswith("LocalSelfAttention")]
    assert len(local) == len(calls) == 2
    real = inputs["attention_mask"].bool()
    radius = model.config.local_radius
    biased = model.encoder.block[0].layer[0].LocalSelfAttention  # layer 0's bias is shared with the others
    n = real.shape[1]
    offsets = torch.arange(n)[None, :] - torch.arange(n)[:, None]  # t − i
    buckets = biased._relative_position_bucket(offsets, bidirectional=True, num_buckets=8, max_distance=16)
    bias = biased.relative_attention_bias(buckets).permute(2, 0, 1)  # (heads, n, n)
    for index, (module, hidden, output) in zip(local, calls):
        b = hidden.shape[0]
        q, k, v = (linear(hidden).view(b, n, 4, 8).transpose(1, 2) for linear in (module.q, module.k, module.v))
        allowed = (offsets.abs() <= radius)[None, None] & real[:, None, None, :]
        scores = (q @ k.transpose(-1, -2) + bias).masked_fill(~allowed, float("-inf"))
        want = torch.softmax(scores, dim=-1) * real[:, None, :, None]
        torch.testing.assert_close(att.layers[index], want, rtol=0, atol=1e-5)
        raw = att.records[index].weights  # padded queries too: their blocks' out-of-sequence keys hold value 0
        torch.testing.assert_close(module.o((raw @ v).transpose(1, 2).reshape(b, n, -1)), output, rtol=0, atol=1e-5)
        torch.testing.assert_close(att.queries[index], q * real[:, None, :, None], rtol=0, atol=0)
        torch.testing.assert_close(att.keys[index], k * real[:, None, :, None], rtol=0, atol=0)
        assert att.records[index].scale == 1.0


def test_longt5_local_gradients_equal_those_of_the_blocked_maps():
    """capture(grads=True): d loss / dA of the (n, n) map equals the gradient transformers' blocked map gets, entry
    by entry (real queries and keys), and the loss is unchanged inside the capture."""
    model, kind = _model("longt5")
    inputs = _inputs(kind)
    weight = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(3))
    eager = model(**inputs, output_attentions=True)
    blocked = eager.encoder_attentions
    for t in blocked:
        t.retain_grad()
    loss = (eager.last_hidden_state * weight).sum()
    loss.backward()
    with capture(model, grads=True) as att:
        inside = (model(**inputs).last_hidden_state * weight).sum()
        inside.backward()
    assert inside.item() == loss.item()
    local = [i for i, name in enumerate(att.names) if name.endswith("LocalSelfAttention")]
    grads = att.grads
    checked = 0
    for index, blocks in zip(local, blocked):
        rec = att.records[index]
        for (j, r, c), value in _unblock(grads[index], blocks).items():
            i, t = j * blocks.shape[3] + r, (j - 1) * blocks.shape[3] + c
            if value is None or abs(t - i) > model.config.local_radius:
                continue
            keep = rec.query_mask[:, i] & rec.key_mask[:, t]
            torch.testing.assert_close(value[keep], blocks.grad[:, j, :, r, c][keep], rtol=1e-5, atol=1e-6)
            checked += int(keep.sum())
    assert checked > 0 and all(g.abs().sum() > 0 for g in grads)


def test_longt5_transient_global_is_refused_and_its_decoder_can_be_captured():
    """Transient-global keys include per-block summaries (layer-normed sums of the tokens): no (n, n) map carries
    the output, so capture refuses with BlockedAttentionError and leaves no hook; the decoder alone is captured."""
    from transformers import AutoConfig, AutoModel

    from attnlab.analysis.capture import BlockedAttentionError

    config = AutoConfig.for_model("longt5", **T5, encoder_attention_type="transient-global", local_radius=2,
                                  global_block_size=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModel.from_config(config, attn_implementation="eager").eval()
    inputs = _inputs("seq2seq")
    with pytest.raises(BlockedAttentionError, match="transient-global attention at 'encoder.block.0"):
        with capture(model):
            pass
    assert model.config._attn_implementation == "eager"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        eager = model(**inputs, output_attentions=True)
        with capture(model.decoder) as att:
            model(**inputs)
    want = [eager.decoder_attentions[0], eager.cross_attentions[0], eager.decoder_attentions[1], eager.cross_attentions[1]]
    assert len(att.records) == 4 and att.fallback is None
    for rec, map_ in zip(att.records, want):
        torch.testing.assert_close(rec.weights, map_, rtol=0, atol=1e-6)


def test_scatter_local_blocks_rejects_other_layouts():
    from attnlab.analysis.capture import scatter_local_blocks

    with pytest.raises(ValueError, match=r"blocked: expected \(batch, blocks, heads, block, 3·block\), got shape \(1, 2, 4, 3, 6\)"):
        scatter_local_blocks(torch.zeros(1, 2, 4, 3, 6), 5)
    with pytest.raises(ValueError, match=r"n: expected a length in \[1, 6\]"):
        scatter_local_blocks(torch.zeros(1, 2, 4, 3, 9), 7)
