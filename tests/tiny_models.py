"""Tiny models of every supported architecture, built from transformers config classes with a fixed seed."""

from __future__ import annotations

import torch
import transformers as tf

CAUSAL = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "gpt2")
ENCODERS = ("bert", "roberta")
VISION = ("vit",)
ARCHITECTURES = CAUSAL + ENCODERS + VISION

VOCAB = 96
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def config(arch: str):
    if arch == "llama":
        return tf.LlamaConfig(**_COMMON)
    if arch == "mistral":
        return tf.MistralConfig(**_COMMON, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**_COMMON)  # biases in q, k, v
    if arch == "qwen3":
        return tf.Qwen3Config(**_COMMON, head_dim=8)  # q/k RMS norms
    if arch == "gemma3":
        # sliding and full attention layers, scaled embeddings, (1 + w) RMS norms, tanh-GELU, logit soft-capping
        return tf.Gemma3TextConfig(
            **_COMMON, head_dim=8, sliding_window=4, final_logit_softcapping=30.0, query_pre_attn_scalar=8
        )
    if arch == "gpt2":
        return tf.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )
    if arch == "bert":
        return tf.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
    if arch == "roberta":
        return tf.RobertaConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=130, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=1,
        )
    if arch == "vit":
        return tf.ViTConfig(
            image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
    raise ValueError(arch)


def build(arch: str, *, attn: str = "eager", dtype=torch.float64, seed: int = 0, bias_free: bool = False):
    """A tiny model in eval mode; ``bias_free`` zeroes every bias and ViT's additive position embeddings."""
    cfg = config(arch)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    if arch in CAUSAL:
        cls = {"gpt2": tf.GPT2LMHeadModel, "gemma3": tf.Gemma3ForCausalLM}.get(arch, tf.AutoModelForCausalLM)
        model = cls(cfg) if cls is not tf.AutoModelForCausalLM else cls.from_config(cfg)
    elif arch == "bert":
        model = tf.BertForMaskedLM(cfg)
    elif arch == "roberta":
        model = tf.RobertaForMaskedLM(cfg)
    else:
        model = tf.ViTForImageClassification(cfg)
    model = model.to(dtype).eval()
    if bias_free:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith("bias"):
                    parameter.zero_()
    return model


def inputs(arch: str, *, batch: int = 1, length: int = 7, seed: int = 1, dtype=torch.float64) -> dict:
    generator = torch.Generator().manual_seed(seed)
    if arch in VISION:
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=generator, dtype=dtype)}
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    if arch in CAUSAL:
        return {"input_ids": ids, "use_cache": False}
    return {"input_ids": ids}


def target(arch: str, output) -> torch.Tensor:
    """The explained scalar: the largest logit at the last position (or of the image)."""
    logits = output.logits
    if arch in VISION:
        return logits[0].max()
    position = -1 if arch in CAUSAL else 2
    return logits[0, position].max()


# --------------------------------------------------------------------------- mixture of experts

#: Tiny mixture-of-experts configurations: 4 experts, top-2, sizes that the fused kernels accept.
MOE_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "phimoe", "granitemoe", "gpt_oss", "deepseek_v3",
                "llama4_text")
_MOE_COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, num_experts=4, num_local_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=16,
)
_MOE_EXTRA = {
    "deepseek_v3": dict(num_key_value_heads=4, n_routed_experts=4, n_group=1, topk_group=1, first_k_dense_replace=1,
                        q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
    "llama4_text": dict(interleave_moe_layer_step=1, head_dim=8, intermediate_size_mlp=32),
    "gpt_oss": dict(head_dim=8),
    "qwen2_moe": dict(shared_expert_intermediate_size=16),
}


def moe_config(family: str):
    kwargs = {**_MOE_COMMON, **_MOE_EXTRA.get(family, {})}
    return tf.AutoConfig.for_model(family, **kwargs)


def build_moe(family: str, *, dtype=torch.float64, experts: str = "eager", attn: str = "eager", bias_free=False):
    """A tiny mixture-of-experts causal LM in eval mode with the given experts implementation."""
    cfg = moe_config(family)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    with torch.no_grad():  # routers start at zero in some families: give them weights so routing is not a tie
        for name, parameter in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")) and parameter.abs().sum() == 0:
                parameter.normal_(0, 0.5)
            if bias_free and name.endswith("bias"):
                parameter.zero_()
    if hasattr(model, "set_experts_implementation") and model._can_set_experts_implementation():
        model.set_experts_implementation(experts)
    elif experts != "eager":
        raise ValueError(f"{family} has one experts implementation")
    return model


# --------------------------------------------------------------------------- state-space and linear attention

#: Tiny state-space / linear-attention families (2 layers, small state): pure Mamba, Mamba2 and their
#: hybrids with attention (and experts), and the gated delta nets of Qwen3-Next, Qwen3.5 and others.
SSM_FAMILIES = ("mamba", "falcon_mamba", "mamba2", "jamba", "bamba", "falcon_h1", "nemotron_h", "granitemoehybrid",
                "zamba", "zamba2", "qwen3_next", "qwen3_5", "olmo_hybrid", "kimi_linear")
#: Families without softmax attention: MambaLRP alone, conservative on bias-free models.
PURE_SSM_FAMILIES = ("mamba", "falcon_mamba", "mamba2")

_SSM = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2)
_HYBRID = dict(_SSM, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
_MAMBA2_HEADS = dict(mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
                     mamba_chunk_size=4)
_DELTA = dict(layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=4, linear_key_head_dim=8,
              linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4)
_MAMBA1 = dict(state_size=8, expand=2, conv_kernel=4, time_step_rank=4)
_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_SSM_CONFIGS = {
    "mamba": lambda: tf.MambaConfig(**_SSM, **_MAMBA1),
    "falcon_mamba": lambda: tf.FalconMambaConfig(**_SSM, **_MAMBA1),
    # chunk_size 4 < sequence length: the chunked scan with padding and inter-chunk states
    "mamba2": lambda: tf.Mamba2Config(**_SSM, num_heads=8, head_dim=8, state_size=8, expand=2, n_groups=2,
                                      conv_kernel=4, chunk_size=4),
    "jamba": lambda: tf.JambaConfig(**_HYBRID, num_experts=4, num_experts_per_tok=2, expert_layer_period=2,
                                    expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8,
                                    mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4),
    "bamba": lambda: tf.BambaConfig(**_HYBRID, **_MAMBA2_HEADS, attn_layer_indices=[1]),
    "falcon_h1": lambda: tf.FalconH1Config(**_HYBRID, **_MAMBA2_HEADS, mamba_d_ssm=64, head_dim=8),
    "nemotron_h": lambda: tf.NemotronHConfig(
        vocab_size=VOCAB, hidden_size=32, layers_block_type=["mamba", "attention", "mlp"], num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=48, ssm_state_size=8, mamba_num_heads=8,
        mamba_head_dim=8, n_groups=2, conv_kernel=4, expand=2, chunk_size=4,
    ),
    "granitemoehybrid": lambda: tf.GraniteMoeHybridConfig(
        **_HYBRID, **_MAMBA2_HEADS, num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=16,
        layer_types=["mamba", "attention"],
    ),
    "zamba": lambda: tf.ZambaConfig(**_HYBRID, attention_hidden_size=64, attention_head_dim=16, n_mamba_heads=2,
                                    mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4,
                                    layers_block_type=["hybrid", "hybrid"]),
    "zamba2": lambda: tf.Zamba2Config(
        **_SSM, layers_block_type=["mamba", "hybrid"], mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
        mamba_ngroups=2, n_mamba_heads=8, intermediate_size=48, num_attention_heads=4, num_key_value_heads=4,
        chunk_size=4, max_position_embeddings=128,
    ),
    "qwen3_next": lambda: tf.Qwen3NextConfig(**_HYBRID, **_DELTA, head_dim=8, moe_intermediate_size=16,
                                             shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2),
    "qwen3_5": lambda: tf.Qwen3_5TextConfig(**_HYBRID, **_DELTA, head_dim=8),
    "olmo_hybrid": lambda: tf.OlmoHybridConfig(**_HYBRID, **_DELTA, **_TOKENS),
    "kimi_linear": lambda: tf.KimiLinearConfig(
        **dict(_HYBRID, num_key_value_heads=4), **_TOKENS, layer_types=["linear_attention", "full_attention"],
        linear_head_dim=8, linear_num_heads=4, linear_conv_kernel_dim=4, num_local_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=8,
    ),
}


def build_ssm(family: str, *, dtype=torch.float64, bias_free: bool = False):
    """A tiny state-space / linear-attention causal LM in eval mode (eager attention and experts)."""
    cfg = _SSM_CONFIGS[family]()
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    if hasattr(model, "set_experts_implementation") and model._can_set_experts_implementation():
        model.set_experts_implementation("eager")  # the fused experts kernels have no float64
    if bias_free:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith("bias"):
                    parameter.zero_()
    return model
