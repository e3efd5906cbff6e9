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
