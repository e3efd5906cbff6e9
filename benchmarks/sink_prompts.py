"""Prompt sets of the attention-sink benchmark (``sinks.py``), written for it (no dataset was copied).

Every item names the word the explanation should point at (``answer``), which occurs in the prompt
next to a distractor of the same kind:

* ``reading``: invented two-entity contexts, a question about one of them; two-shot for the base
  model (Gemma-3), chat template with the pre-fill ``The answer is "`` for SmolLM2 (instruct);
* ``entities``: the entity-tracking sentences of :mod:`lxt_explicit.data.entity_tracking` (all 60);
* ``induction``: a list of six words, then the list again up to a word: the next word is copied
  from the first list (every other word of the list is a distractor);
* ``lookup``: a storage list of three labelled containers (``red jar: buttons``), a question about
  one line answered, then the question about another; the other two contents are the distractors.  Written after the
  setting of ``attnlrp_sinks()`` was chosen on the other sets, as a held-out check;
* agreement items come from :func:`lxt_explicit.evaluate.agreement_items`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

#: (context, question, answer, distractor)
READING = (
    ("Mara flies a green kite and Tomas flies a yellow kite.", "What color is Tomas's kite?", "yellow", "green"),
    ("The bakery on Elm Street sells bread, and the shop on Oak Street sells cheese.",
     "What does the shop on Oak Street sell?", "cheese", "bread"),
    ("Lena plays the violin in the orchestra, while her cousin Jonas plays the trumpet.",
     "What instrument does Jonas play?", "trumpet", "violin"),
    ("The red train goes to Lisbon and the blue train goes to Madrid.", "Where does the blue train go?",
     "Madrid", "Lisbon"),
    ("Oskar owns a dog named Pepper and a cat named Biscuit.", "What is the name of Oskar's cat?", "Biscuit",
     "Pepper"),
    ("In the garden, the roses grow by the wall and the tulips grow by the pond.",
     "Where do the tulips grow?", "pond", "wall"),
    ("Nadia drinks tea every morning, but her brother Samir drinks coffee.", "What does Samir drink?",
     "coffee", "tea"),
    ("The museum opens on Monday and the library opens on Thursday.", "On which day does the library open?",
     "Thursday", "Monday"),
    ("Felix studied chemistry at the university, and his friend Ruth studied history.",
     "What did Ruth study?", "history", "chemistry"),
    ("The captain keeps the map in a drawer and the compass in a box.", "Where does the captain keep the compass?",
     "box", "drawer"),
    ("Greta painted the fence white and painted the door purple.", "What color did Greta paint the door?",
     "purple", "white"),
    ("At the market, Ivan bought apples and Clara bought onions.", "What did Clara buy?", "onions", "apples"),
    ("The first letter was sent to Vienna and the second letter was sent to Prague.",
     "Where was the second letter sent?", "Prague", "Vienna"),
    ("Hugo rides a bicycle to work, while his neighbour Elsa takes the bus.", "How does Elsa get to work?",
     "bus", "bicycle"),
    ("The farmer keeps goats on the hill and sheep in the valley.", "What does the farmer keep in the valley?",
     "sheep", "goats"),
    ("Petra's favourite fruit is the mango, and Karl's favourite fruit is the cherry.",
     "What is Karl's favourite fruit?", "cherry", "mango"),
    ("The older sister is called Irene and the younger sister is called Sofia.",
     "What is the younger sister called?", "Sofia", "Irene"),
    ("The morning class learns French and the evening class learns German.",
     "Which language does the evening class learn?", "German", "French"),
    ("Theo planted oaks along the road and birches near the house.", "What did Theo plant near the house?",
     "birches", "oaks"),
    ("The silver ring was found in the kitchen and the gold ring was found in the attic.",
     "Where was the gold ring found?", "attic", "kitchen"),
    # the question asks about the first of the two entities
    ("Anton wears a brown hat and Berta wears a grey hat.", "What color is Anton's hat?", "brown", "grey"),
    ("The tall tower is made of stone and the small hut is made of wood.", "What is the tall tower made of?",
     "stone", "wood"),
    ("Wilma keeps her keys in a basket and her gloves in a bag.", "Where does Wilma keep her keys?", "basket",
     "bag"),
    ("The first ship sailed to Oslo and the second ship sailed to Dublin.", "Where did the first ship sail?",
     "Oslo", "Dublin"),
    ("Jonah collects stamps, and his sister Mia collects shells.", "What does Jonah collect?", "stamps",
     "shells"),
    ("The soup was served in a bowl and the salad was served on a plate.", "What was the soup served in?",
     "bowl", "plate"),
    ("Carla's horse is called Storm and Dieter's horse is called Blaze.", "What is Carla's horse called?",
     "Storm", "Blaze"),
    ("The north gate is painted orange and the south gate is painted black.", "What color is the north gate?",
     "orange", "black"),
    ("Rosa works as a baker and her husband Emil works as a tailor.", "What does Rosa work as?", "baker",
     "tailor"),
    ("The concert was held in March and the festival was held in July.", "When was the concert held?", "March",
     "July"),
    ("Leon sleeps on a sofa and his dog sleeps on a rug.", "Where does Leon sleep?", "sofa", "rug"),
    ("The left drawer holds spoons and the right drawer holds forks.", "What does the left drawer hold?",
     "spoons", "forks"),
)

#: The examples before each reading item for the base model (one about each entity of a pair).
SHOTS = (("Ben has a red car and Ana has a blue car.", "What color is Ana's car?", "blue"),
         ("The cup is on the shelf and the plate is on the table.", "Where is the cup?", "shelf"))

#: Words of the induction lists (one token each with a leading space in both tokenizers, mostly).
WORDS = ("table", "river", "candle", "forest", "mirror", "garden", "window", "pencil", "bottle", "bridge", "castle",
         "doctor", "engine", "flower", "guitar", "hammer", "island", "jacket", "kitten", "ladder", "market", "needle",
         "orange", "pillow", "rabbit", "saddle", "ticket", "valley", "wallet", "yellow", "basket", "cotton")


#: Containers, labels and contents of the lookup set.
CONTAINERS = ("box", "jar", "bag", "crate", "basket", "drawer", "tin", "chest")
LABELS = ("red", "blue", "green", "black", "white", "brown", "silver", "wooden")
CONTENTS = ("apples", "pencils", "candles", "coins", "buttons", "letters", "stones", "shells", "spoons", "marbles",
            "ribbons", "seeds", "nails", "stamps", "beads", "towels")


@dataclass(frozen=True)
class SinkItem:
    """One prompt: text before the answer, the answer word, where the answer occurs (a substring to locate)."""

    kind: str
    text: str
    answer: str
    locate: str  # the answer occurs at the last occurrence of this substring in ``text``


def reading_items(model_kind: str, tokenizer=None) -> list[SinkItem]:
    """Reading items for a base model (one-shot, plain text) or an instruct model (chat template)."""
    items = []
    for context, question, answer, _ in READING:
        if model_kind == "base":
            shots = "".join(f"Context: {c}\nQuestion: {q}\nAnswer: {a}\n\n" for c, q, a in SHOTS)
            text = f"{shots}Context: {context}\nQuestion: {question}\nAnswer:"
        else:
            from lxt_explicit.data.reading_comprehension import format_prompt

            text = format_prompt(tokenizer, context, question)
        items.append(SinkItem("reading", text, answer, f"{context}"))
    return items


def entity_items() -> list[SinkItem]:
    from lxt_explicit.data.entity_tracking import ALL_ITEMS

    return [SinkItem("entities", item.prompt, item.answer, item.prompt[: item.prompt.index(". ") + 1])
            for item in ALL_ITEMS]


def induction_items(count: int = 20, seed: int = 0) -> list[SinkItem]:
    rng = random.Random(seed)
    items = []
    for _ in range(count):
        words = rng.sample(WORDS, 6)
        cut = rng.randint(2, 4)
        text = f"List: {' '.join(words)}.\nSame list: {' '.join(words[:cut])}"
        items.append(SinkItem("induction", text, words[cut], f"List: {' '.join(words)}."))
    return items


def lookup_items(count: int = 32, seed: int = 0) -> list[SinkItem]:
    """Three labelled containers and their contents, one question answered about another line, then the asked one."""
    rng = random.Random(seed)
    items = []
    for _ in range(count):
        container = rng.choice(CONTAINERS)
        labels, contents = rng.sample(LABELS, 3), rng.sample(CONTENTS, 3)
        asked, shown = rng.sample(range(3), 2)
        lines = "".join(f"{label} {container}: {content}\n" for label, content in zip(labels, contents))
        text = (f"Storage list:\n{lines}\nQ: What is in the {labels[shown]} {container}?\nA: {contents[shown]}\n"
                f"Q: What is in the {labels[asked]} {container}?\nA:")
        items.append(SinkItem("lookup", text, contents[asked], lines))
    return items
