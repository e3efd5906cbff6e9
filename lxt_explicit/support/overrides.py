"""The tiny-configuration tables: sizes tried on every config class, and per-family values.

:data:`GENERIC_SIZES` is passed to every config class that has the field (see
:func:`~lxt_explicit.support.configs.config_kwargs`); :data:`OVERRIDES` holds what a family needs
beyond it, each entry with the reason where it is not obvious.  Both are read-only.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

__all__ = ["GENERIC_SIZES", "OVERRIDES"]


def _frozen(**values) -> Mapping[str, Any]:
    return MappingProxyType(values)


#: Size arguments tried on every config class (only those it has are passed).
GENERIC_SIZES: Mapping[str, Any] = _frozen(
    # decoder and encoder stacks
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=64, use_cache=False, tie_word_embeddings=False,
    # encoder-decoder names (T5, BART, ...)
    d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4, encoder_layers=2,
    decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
    # special tokens inside the tiny vocabulary
    pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, sep_token_id=3, cls_token_id=1,
    mask_token_id=4,
    # mixture of experts: four experts, two per token, the second layer sparse
    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2, moe_topk=2,
    moe_k=2, top_k_experts=2, moe_intermediate_size=32, shared_expert_intermediate_size=32, n_shared_experts=1,
    n_group=1, topk_group=1, first_k_dense_replace=1, decoder_sparse_step=1,
    # multi-head latent attention
    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
    # state-space mixers
    state_size=8, mamba_d_state=8, ssm_state_size=8, time_step_rank=4,
    # vision
    image_size=32, patch_size=4, num_channels=3,
)

#: Per-family values for configs that validate shapes or need a size the generic table lacks.
#: A mapping as a value holds extra values for a sub-config (``{"text_config": {...}}``); its
#: ``model_type`` entry chooses the sub-config's class.
OVERRIDES: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    # hybrids: one layer of each kind in the two layers; state-space heads that divide the mixer's width
    "bamba": _frozen(mamba_n_heads=4, attn_layer_indices=(1,)),
    "falcon_h1": _frozen(mamba_n_heads=4, mamba_d_ssm=64),
    "granitemoehybrid": _frozen(mamba_n_heads=4, layer_types=("mamba", "attention")),
    "jamba": _frozen(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    "kimi_linear": _frozen(linear_num_heads=4, linear_head_dim=8),
    "lfm2_moe": _frozen(layer_types=("conv", "full_attention"), num_dense_layers=1),
    "lfm3": _frozen(layer_types=("conv", "full_attention")),
    "mamba2": _frozen(head_dim=16, n_groups=1),  # heads x head_dim == expand x hidden_size
    "qwen3_next": _frozen(layer_types=("linear_attention", "full_attention")),
    "qwen3_5_text": _frozen(layer_types=("linear_attention", "full_attention")),
    "qwen3_5_moe_text": _frozen(layer_types=("linear_attention", "full_attention")),
    "qwen4_exp_text": _frozen(layer_types=("linear_attention", "indexed_attention"), indexer_n_heads=2,
                              indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=4, indexer_compress_ratio=2),
    "recurrent_gemma": _frozen(block_types=("recurrent", "attention")),
    "zamba": _frozen(layers_block_type=("mamba", "hybrid"), head_dim=16, n_mamba_heads=2),
    "zamba2": _frozen(layers_block_type=("mamba", "hybrid"), head_dim=16, n_mamba_heads=4, adapter_rank=8),
    # mixture of experts: validated routing sizes, and MoE layers within the two layers
    "dbrx": _frozen(attn_config=_frozen(rope_theta=1e4, clip_qkv=8.0),  # its attention reads both
                    ffn_config=_frozen(ffn_hidden_size=64, moe_top_k=2)),
    "longcat_flash": _frozen(num_key_value_heads=4, zero_expert_num=2, head_dim=4),  # head_dim: the rope part
    "switch_transformers": _frozen(num_sparse_encoder_layers=2, num_sparse_decoder_layers=2),
    "zaya": _frozen(num_experts_per_tok=1),  # "supports num_experts_per_tok=1 only"
    # attention that validates its shapes: rotary dimensions, indexers, heads
    "axk2": _frozen(num_key_value_heads=4, index_head_dim=8, index_n_heads=4, index_topk=4),
    "codegen": _frozen(rotary_dim=4),
    "cohere_compass_text": _frozen(  # the default configuration has no rope parameters for its layer type
        rope_parameters=_frozen(full_attention=_frozen(rope_type="default", rope_theta=1e4))
    ),
    "deepseek_v32": _frozen(num_key_value_heads=4, index_head_dim=8, index_n_heads=4, index_topk=4),
    "dots3_note": _frozen(text_config=_frozen(num_key_value_heads=4)),
    "dots3_note_text": _frozen(num_key_value_heads=4),
    "esmc": _frozen(num_key_value_heads=4),
    "glm4_moe_lite": _frozen(num_key_value_heads=4),
    "glm_moe_dsa": _frozen(num_key_value_heads=4, index_head_dim=8, index_n_heads=4, index_topk=4),
    "gpt_neo": _frozen(attention_types=((("global", "local"), 1),), window_size=4),
    "gptj": _frozen(rotary_dim=4),
    "neomme": _frozen(head_dim=16),  # its partial rotary factor needs 4 rotated dimensions
    "reformer": _frozen(attn_layers=("local", "lsh"), axial_pos_shape=(2, 4), axial_pos_embds_dim=(16, 16),
                        local_attn_chunk_length=4, lsh_attn_chunk_length=4, num_buckets=2, feed_forward_size=64,
                        attention_head_size=8, is_decoder=False, hash_seed=0),  # hash_seed: deterministic LSH
    # small extra vocabularies and widths (the defaults build models of 100M+ parameters)
    "blt": _frozen(encoder_hash_byte_group_vocab=64, encoder_config=_frozen(hidden_size_global=32),
                   decoder_config=_frozen(hidden_size_global=32)),
    "gemma3n_text": _frozen(num_kv_shared_layers=0, vocab_size_per_layer_input=128, hidden_size_per_layer_input=8,
                            laurel_rank=8, altup_num_inputs=2, activation_sparsity_pattern=(0.0, 0.0)),
    "gemma4_text": _frozen(vocab_size_per_layer_input=128, hidden_size_per_layer_input=8),
    "gemma4_assistant": _frozen(backbone_hidden_size=32, num_centroids=8, centroid_intermediate_top_k=2,
                                text_config=_frozen(model_type="gemma4_text", hidden_size_per_layer_input=0,
                                                    vocab_size_per_layer_input=0)),
    "luke": _frozen(entity_vocab_size=16, entity_emb_size=16),
    "mobilebert": _frozen(embedding_size=32, intra_bottleneck_size=16, num_feedforward_networks=2),
    "musicgen_decoder": _frozen(num_codebooks=1),  # one codebook: input_ids of shape (batch, length)
    "musicgen_melody_decoder": _frozen(num_codebooks=1),
    "perceiver": _frozen(num_latents=8, d_latents=32, num_self_attends_per_block=2, num_self_attention_heads=4,
                         num_cross_attention_heads=4),
    "roc_bert": _frozen(pronunciation_embed_dim=16, pronunciation_vocab_size=16, shape_embed_dim=16,
                        shape_vocab_size=16),
    "squeezebert": _frozen(embedding_size=32),
    "vibevoice_acoustic_tokenizer_encoder": _frozen(num_filters=4, depths=(1, 1, 1, 1, 1, 1, 1)),
    # vision: few, narrow stages that fit a 32x32 (64x64) image
    "bit": _frozen(hidden_sizes=(16, 32, 64, 128), depths=(1, 1, 1, 1), embedding_size=16, num_groups=8),
    "convnext": _frozen(hidden_sizes=(16, 32), depths=(1, 1)),  # num_hidden_layers is its number of stages
    "convnextv2": _frozen(hidden_sizes=(16, 32), depths=(1, 1)),
    "donut-swin": _frozen(embed_dim=16, depths=(1, 1), num_heads=(2, 4), window_size=4),
    "efficientnet": _frozen(width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320),
    "hiera": _frozen(image_size=(32, 32), embed_dim=16, depths=(1, 1, 1, 1)),
    "levit": _frozen(image_size=64, patch_size=16, hidden_sizes=(16, 32, 48), num_attention_heads=(2, 4, 6),
                     depths=(1, 1, 1), key_dim=(8, 8, 8)),
    "mobilevitv2": _frozen(image_size=64, patch_size=2, width_multiplier=0.25, n_attn_blocks=(1, 1, 1)),
    "regnet": _frozen(hidden_sizes=(16, 32, 64, 128), depths=(1, 1, 1, 1), embedding_size=16, groups_width=8),
    "resnet": _frozen(hidden_sizes=(16, 32, 64, 128), depths=(1, 1, 1, 1), embedding_size=16),
    "swin": _frozen(embed_dim=16, depths=(1, 1), num_heads=(2, 4), window_size=4),  # 8x8, then 4x4 patches
    "textnet": _frozen(image_size=(32, 32)),
    "swinv2": _frozen(embed_dim=16, depths=(1, 1), num_heads=(2, 4), window_size=4),
})
