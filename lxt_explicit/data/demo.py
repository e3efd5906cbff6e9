"""A short invented document and question for the command-line demo.

The document is original (the expedition, its people and places are made
up), so SmolLM2-135M-Instruct can only answer from it.  With
:func:`demo_prompt` (the chat template with the reading-comprehension system
message, no pre-fill) and greedy decoding, SmolLM2-135M-Instruct (float32,
CPU, ``sdpa`` and ``eager`` attention) answered :data:`~lxt_explicit.data.demo.DEMO_QUESTION` with::

    Halvorsen named the lake Lake Solveig, after her mother.

(16 new tokens including the end-of-turn token; also in bfloat16): correct,
and it uses two facts of the document, the name and its reason.  Other
questions checked on the same document and prompt (float32, sdpa):

- "Who led the Aurora Deep expedition?" -> "The Aurora Deep expedition was
  led by Ingrid Halvorsen and her guide, Tomas Brekke."
- "What were Halvorsen's famous words?" -> "Ingrid Halvorsen's famous words
  were: "The mountain keeps its light inside.""
- "Where did the expedition return to?" -> "The expedition returned to
  Hammerfest in October 2019." (the year is made up by the model)

With the template's default system message the model drifted on the demo
question ("The expedition's name was Lake Solveig. Halvorsen chose the name
because of her mother's legacy, ..."), so use :func:`demo_prompt`.
"""

from __future__ import annotations

from .reading_comprehension import format_prompt

__all__ = ["DEMO_CONTEXT", "DEMO_QUESTION", "demo_prompt"]

DEMO_CONTEXT = (
    "The Aurora Deep expedition of 1931 explored the ice caves of Mount Velka in northern Greenland. "
    "It was led by the geologist Ingrid Halvorsen and her guide, a sailor named Tomas Brekke. "
    "After eleven days underground, the team found a frozen lake that glowed blue in the lamplight. "
    "Halvorsen named it Lake Solveig, after her mother. "
    'Her famous words, written in the camp diary, were: "The mountain keeps its light inside." '
    "The expedition returned to the port of Hammerfest in October with samples of ancient ice."
)

DEMO_QUESTION = "What did Halvorsen name the lake, and why?"


def demo_prompt(tokenizer, context: str = DEMO_CONTEXT, question: str = DEMO_QUESTION) -> str:
    """Return the chat prompt for the demo (the model answers in a sentence).

    Parameters
    ----------
    tokenizer : transformers.PreTrainedTokenizerBase
        A tokenizer with a chat template (SmolLM2's).
    context : str, default DEMO_CONTEXT
        The document.
    question : str, default DEMO_QUESTION
        The question.

    Returns
    -------
    str
        The prompt text; tokenize it with ``add_special_tokens=False``.
    """
    return format_prompt(tokenizer, context, question, prefill="")
