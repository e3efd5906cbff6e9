"""Entity-tracking sentences: the next token is determined by an entity named earlier.

Each item introduces two entities with one attribute each ("Julia's brother is a pilot and her
sister is a nurse.") and ends where the next token is the attribute of one of them ("Her sister
works as a" -> " nurse").  The sentences were written for this library (no dataset was copied).
They are a second text set for the perturbation benchmark next to the reading-comprehension
prompts: plain text without a chat template, 13-31 tokens, every token of the prompt ranked.

``entity_tracking.json`` holds all 60 sentences written, each with whether SmolLM2-135M-Instruct
(float32, greedy, ``sdpa`` attention) predicts a next token that starts the answer; 20 do.
:data:`ITEMS` holds those 20 (explanations of a wrong prediction say little about the entity).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

__all__ = ["ALL_ITEMS", "ITEMS", "EntityItem"]


@dataclass(frozen=True)
class EntityItem:
    """One sentence.

    Attributes
    ----------
    prompt : str
        The text up to the answer (the model's prompt).
    answer : str
        The word that should come next.
    smollm2_correct : bool
        Whether SmolLM2-135M-Instruct's most likely next token starts the answer.
    """

    prompt: str
    answer: str
    smollm2_correct: bool


_DATA = json.loads(resources.files(__package__).joinpath("entity_tracking.json").read_text(encoding="utf-8"))

#: Every sentence written (60).
ALL_ITEMS: tuple[EntityItem, ...] = tuple(EntityItem(**item) for item in _DATA["items"])
#: The sentences SmolLM2-135M-Instruct completes correctly (20).
ITEMS: tuple[EntityItem, ...] = tuple(item for item in ALL_ITEMS if item.smollm2_correct)
del _DATA
