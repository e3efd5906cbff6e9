"""A tiny causal language model with a word-level tokenizer built in code (no downloads, fixed seed)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = (
    "<pad> <eos> <unk> <system> <user> <assistant> the capital of france is paris london a city river "
    "lake named after her mother expedition led by ingrid and tomas found blue ice what did name why "
    "context question answer . , ?"
).split()

CHAT_TEMPLATE = (
    "{% for message in messages %}<{{ message['role'] }}> {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {word: index for index, word in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="removed")
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def model(*, dtype=torch.float64, attn: str = "sdpa", seed: int = 0, bias_free_check: bool = False):
    config = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=1, pad_token_id=0, bos_token_id=None,
    )
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()
