"""Short reading-comprehension prompts that SmolLM2-135M-Instruct answers correctly.

The prompts live in the data file ``reading_comprehension.json`` next to this module (shipped as
package data); this module reads it once on import and gives the items, the system message and
the pre-fill as Python values, with the functions that format, answer and check them.

Every item is an invented two-to-four-sentence context, a question and a
one-word answer that appears verbatim in the context.  The facts are made up
for this library (no dataset was copied), so the model can only answer from
the context, which is what an explanation of its answer should show.

Prompt format (chosen by measuring, see :func:`format_prompt`)::

    <|im_start|>system
    You are a helpful assistant. Answer questions about the context briefly.<|im_end|>
    <|im_start|>user
    Context: {context}
    Question: {question}<|im_end|>
    <|im_start|>assistant
    The answer is "

so the model's next token is the first token of the answer.  Measured with
the strict check of :func:`verify` (float32, greedy) on the first 56 items
written: "Context/Question" plus "Answer with one word." and no pre-fill got
0 (the model restates the question: "The horse was called Thunder."); the
same with the pre-fill 36; the pre-fill alone 42; the pre-fill with a
task-specific system message 45 (on all 70 items: 55).  The template's
default system message ("... named SmolLM, trained by Hugging Face") even
leaked into one answer ("Hugging Face").  Failures left are mostly answers
with an article ("The violin"), digits for number words ("11") or a
different word of the same kind from the model's own knowledge.

:data:`ITEMS` holds only the items that passed :func:`verify` with both
``sdpa`` and ``eager`` attention (in bfloat16, 54 of the 55 pass).  Tokenize
a prompt with ``add_special_tokens=False``: the chat template already
contains them.  The generated answer follows a quote, so its first token has
no leading space and often differs from the answer's first token in the
context (``"L"`` vs ``" Lisbon"``); :func:`answer_token_positions` finds the
latter.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from importlib import resources
from typing import Iterable, Sequence

import torch

__all__ = [
    "QAItem",
    "ITEMS",
    "SYSTEM_PROMPT",
    "ANSWER_PREFILL",
    "format_prompt",
    "first_word",
    "generate_answer",
    "verify",
    "answer_token_positions",
]


_STRIP = string.punctuation + "“”‘’"
_DATA = json.loads(resources.files(__package__).joinpath("reading_comprehension.json").read_text(encoding="utf-8"))

#: System message that replaces the chat template's default one.
SYSTEM_PROMPT: str = _DATA["system_prompt"]
#: Text the assistant turn starts with, so that the next token is the answer.
ANSWER_PREFILL: str = _DATA["answer_prefill"]


@dataclass(frozen=True)
class QAItem:
    """One reading-comprehension item.

    Attributes
    ----------
    context : str
        Two to four sentences of invented facts.
    question : str
        A question about the context.
    answer : str
        The one-word answer; it occurs verbatim (as a whole word) in ``context``.
    """

    context: str
    question: str
    answer: str


def format_prompt(tokenizer, context: str, question: str, *, prefill: str = ANSWER_PREFILL) -> str:
    """Return the full prompt text whose continuation is the answer.

    Parameters
    ----------
    tokenizer : transformers.PreTrainedTokenizerBase
        A tokenizer with a chat template (SmolLM2's).
    context : str
        The document to answer from.
    question : str
        The question.
    prefill : str, default ANSWER_PREFILL
        Start of the assistant turn; ``""`` lets the model answer in a sentence.

    Returns
    -------
    str
        Chat template with :data:`SYSTEM_PROMPT`, the user turn
        ``"Context: ...\\nQuestion: ..."``, the generation prompt and
        ``prefill``.  Tokenize it with ``add_special_tokens=False``.
    """
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"Context: {context}\nQuestion: {question}"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + prefill


def first_word(text: str) -> str:
    """Return the first whitespace-separated word of ``text``, lower-cased, without surrounding punctuation."""
    words = text.split()
    return words[0].strip(_STRIP).lower() if words else ""


@torch.no_grad()
def generate_answer(model, tokenizer, item: QAItem, max_new_tokens: int = 8) -> str:
    """Return the model's greedy continuation of :func:`format_prompt` for ``item``.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal language model.
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer.
    item : QAItem
        The item to answer.
    max_new_tokens : int, default 8
        Number of tokens to generate.

    Returns
    -------
    str
        The generated text (special tokens removed).
    """
    prompt = format_prompt(tokenizer, item.context, item.question)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def verify(model, tokenizer, items: Iterable[QAItem]) -> list[bool]:
    """Check which items the model answers correctly.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal language model (greedy decoding is used).
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer.
    items : iterable of QAItem
        The items to check.

    Returns
    -------
    list of bool
        For each item, whether the first generated word (see :func:`first_word`)
        equals its answer, ignoring case.
    """
    return [first_word(generate_answer(model, tokenizer, item)) == item.answer.lower() for item in items]


def answer_token_positions(tokenizer, prompt_text: str, item: QAItem) -> list[int]:
    """Return where the answer occurs in the context part of a tokenized prompt.

    Parameters
    ----------
    tokenizer : transformers.PreTrainedTokenizerFast
        A fast tokenizer (it must return offset mappings).
    prompt_text : str
        A prompt that contains ``item.context`` verbatim, e.g. from :func:`format_prompt`.
    item : QAItem
        The item.

    Returns
    -------
    list of int
        For each whole-word occurrence of ``item.answer`` in the context, the
        index of its first token in
        ``tokenizer(prompt_text, add_special_tokens=False)["input_ids"]``,
        in increasing order.

    Raises
    ------
    ValueError
        If the context is not in the prompt or the answer is not in the context.
    """
    start = prompt_text.find(item.context)
    if start < 0:
        raise ValueError("the item's context does not occur in the prompt")
    pattern = rf"(?<!\w){re.escape(item.answer)}(?!\w)"
    chars = [start + m.start() for m in re.finditer(pattern, item.context)]
    if not chars:
        raise ValueError(f"answer {item.answer!r} does not occur in the context")
    offsets = tokenizer(prompt_text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [_token_at(offsets, char) for char in chars]


def _token_at(offsets: Sequence[tuple[int, int]], char: int) -> int:
    """Index of the token whose character span contains ``char``."""
    for index, (begin, end) in enumerate(offsets):
        if begin <= char < end:
            return index
    raise ValueError(f"no token covers character {char}")


#: Items that SmolLM2-135M-Instruct (float32, greedy, sdpa and eager attention)
#: answers correctly with :func:`format_prompt`: 55 of the 70 written.
ITEMS: tuple[QAItem, ...] = tuple(QAItem(**item) for item in _DATA["items"])
del _DATA
