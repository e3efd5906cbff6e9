"""A tiny causal language model with tokenizers built in code (no downloads, fixed seed).

``tokenizer()`` is word-level; ``byte_level_tokenizer()`` is a byte-level BPE tokenizer (the scheme of
GPT-2, Llama 3, SmolLM2) trained on a few sentences, so characters it has not seen are split into
pieces of one byte each.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
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


BYTE_LEVEL_CORPUS = (
    "the capital of france is paris",
    "a small café in paris sells bread",
    "the café is closed on monday",
    "ingrid named the lake after her mother",
)


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<pad>", "<eos>"],
        show_progress=False,
    )
    backend.train_from_iterator(BYTE_LEVEL_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def model(*, dtype=torch.float64, attn: str = "sdpa", seed: int = 0, bias_free_check: bool = False, vocab_size=None):
    config = LlamaConfig(
        vocab_size=vocab_size or len(WORDS), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, eos_token_id=1, pad_token_id=0,
        bos_token_id=None,
    )
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()
