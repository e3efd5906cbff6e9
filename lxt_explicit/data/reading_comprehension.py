"""Short reading-comprehension prompts that SmolLM2-135M-Instruct answers correctly.

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

import re
import string
from dataclasses import dataclass
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

#: System message that replaces the chat template's default one.
SYSTEM_PROMPT = "You are a helpful assistant. Answer questions about the context briefly."
#: Text the assistant turn starts with, so that the next token is the answer.
ANSWER_PREFILL = 'The answer is "'

_STRIP = string.punctuation + "“”‘’"


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
ITEMS: tuple[QAItem, ...] = (
    QAItem(
        'Mira Tollan grew up in a fishing village. At the age of twenty she moved to Lisbon, where she opened a small bakery.',
        'Which city did Mira move to?',
        'Lisbon',
    ),
    QAItem(
        'The lighthouse on Karrow Island was painted green in 1921. Its keeper, Osric Vane, lived there for thirty years.',
        'What color was the lighthouse painted?',
        'green',
    ),
    QAItem(
        'Professor Delia Hume studied desert insects for a decade. Her favorite animal, however, was the otter, which she kept as a mascot for her lab.',
        "What was Delia Hume's favorite animal?",
        'otter',
    ),
    QAItem(
        'The village of Brennick holds a festival every spring. The festival was founded by a baker named Tobias.',
        'Who founded the festival?',
        'Tobias',
    ),
    QAItem(
        'The research ship Calder left port with seven scientists on board. They spent four months mapping the seafloor.',
        'How many scientists were on board?',
        'seven',
    ),
    QAItem(
        'Anna keeps three pets: a parrot, a rabbit and a tortoise. The tortoise is the oldest, at forty years.',
        'Which pet is the oldest?',
        'tortoise',
    ),
    QAItem(
        'In the story, the young knight Elric carried a silver sword. His horse was called Thunder, and it was faster than any other horse in the kingdom.',
        'What was the horse called?',
        'Thunder',
    ),
    QAItem(
        'The Orvala company builds electric bicycles. Its headquarters are in Oslo, and it has about two hundred employees.',
        'Where are the headquarters of Orvala?',
        'Oslo',
    ),
    QAItem(
        'Jonas painted his kitchen door yellow last summer. His sister thought the color was too bright.',
        'What color is the kitchen door?',
        'yellow',
    ),
    QAItem(
        'The inventor Petra Liss built a clock that runs on rainwater. She first showed it in Vienna in 1899.',
        'In which city did Petra Liss first show her clock?',
        'Vienna',
    ),
    QAItem(
        "A small museum in the town of Wendle displays old maps. The museum's founder was a sailor named Hollis.",
        "What was the name of the museum's founder?",
        'Hollis',
    ),
    QAItem(
        'The expedition to Mount Arvek was led by Sora Kim. The climbers reached the summit after nine days.',
        'Who led the expedition to Mount Arvek?',
        'Sora',
    ),
    QAItem(
        'Farmer Lund grows only one crop on his land. Every year he plants potatoes in April and harvests them in September.',
        'What crop does Farmer Lund grow?',
        'potatoes',
    ),
    QAItem(
        'The band Pale Harbor recorded its first album in a barn. The drummer, Ines, wrote most of the songs.',
        'Who wrote most of the songs?',
        'Ines',
    ),
    QAItem(
        'The planet Tessaron has two moons. Its surface is covered by a purple ocean that never freezes.',
        'What color is the ocean on Tessaron?',
        'purple',
    ),
    QAItem(
        'Captain Hale sailed from Dublin to Halifax in an old wooden schooner. The journey took five weeks.',
        'Where did Captain Hale sail to?',
        'Halifax',
    ),
    QAItem(
        'The zoo in Marrow Bay opened a new enclosure last year. It is home to a family of penguins that arrived from Chile.',
        'Which animals live in the new enclosure?',
        'penguins',
    ),
    QAItem(
        'The chess club meets every Thursday. This year the club champion is a quiet student named Arjun.',
        'Who is the club champion?',
        'Arjun',
    ),
    QAItem(
        'The bakery on Fen Street is famous for one cake. People travel from far away to buy its lemon cake.',
        'What kind of cake is the bakery famous for?',
        'lemon',
    ),
    QAItem(
        'A storm destroyed the harbor of Pellin in 1870. The town was rebuilt by its mayor, Gideon Marsh, within three years.',
        'Who rebuilt the town?',
        'Gideon',
    ),
    QAItem(
        'Greta bought a new car in March. It is a small car, and its color is orange.',
        "What color is Greta's car?",
        'orange',
    ),
    QAItem(
        'The ancient kingdom of Ulmar traded salt for silk. Its capital was the city of Drenna, built on a hill.',
        'What was the capital of Ulmar?',
        'Drenna',
    ),
    QAItem(
        'The hikers followed the trail for six hours. At the end, they found a hidden lake called Mirrow.',
        'What was the lake called?',
        'Mirrow',
    ),
    QAItem(
        'Theo has two older brothers. His favorite sport is tennis, which he plays every weekend.',
        "What is Theo's favorite sport?",
        'tennis',
    ),
    QAItem(
        'The library of Castor Hill owns a rare book about birds. The book was written by a monk named Aurelian.',
        'Who wrote the rare book?',
        'Aurelian',
    ),
    QAItem(
        'The Velmont train leaves the station at noon. It travels north to the city of Harrowgate.',
        'Where does the Velmont train travel to?',
        'Harrowgate',
    ),
    QAItem(
        'The tea house in Kesswick serves only one drink. Visitors come for its green tea, grown on nearby hills.',
        'What kind of tea does the tea house serve?',
        'green',
    ),
    QAItem(
        'The garden behind the castle has a famous fountain. In the middle of the fountain stands a statue of a lion.',
        'What animal does the statue show?',
        'lion',
    ),
    QAItem(
        'The mountain village of Ostra has very cold winters. Its people speak an old dialect and keep goats.',
        'What animals do the people of Ostra keep?',
        'goats',
    ),
    QAItem(
        'The pirate ship Black Gull had a crew of twelve men. Its captain was a woman called Marisol.',
        'Who was the captain of the Black Gull?',
        'Marisol',
    ),
    QAItem(
        'The summer market in Tilbury sells fruit and flowers. Its most popular fruit is the cherry.',
        'What is the most popular fruit at the market?',
        'cherry',
    ),
    QAItem(
        'Oskar learned to cook from his uncle in Naples. Today he runs a small restaurant in Hamburg.',
        'Where does Oskar run his restaurant?',
        'Hamburg',
    ),
    QAItem(
        'The children built a snowman in the park. They gave it a carrot nose and a red scarf.',
        'What color was the scarf?',
        'red',
    ),
    QAItem(
        'During the war, the spy used the code name Sparrow. Only her commander knew her real name.',
        "What was the spy's code name?",
        'Sparrow',
    ),
    QAItem(
        'The Quillon Prize is given each year to a young poet. This year it was won by Esme Corran.',
        'Who won the Quillon Prize this year?',
        'Esme',
    ),
    QAItem(
        'The clock tower in Ravensby has four faces. It was built by an engineer named Bertram.',
        'Who built the clock tower?',
        'Bertram',
    ),
    QAItem(
        'The spaceship Halcyon carried a crew of three. It landed on the moon Europa after a long voyage.',
        'Where did the spaceship Halcyon land?',
        'Europa',
    ),
    QAItem(
        'The fairy tale tells of a princess who lived in a glass tower. Her only friend was a white cat named Snow.',
        "What was the name of the princess's cat?",
        'Snow',
    ),
    QAItem(
        'The harvest festival in Dunmore lasts for eight days. On the last day, everyone eats pumpkin soup.',
        'How many days does the festival last?',
        'eight',
    ),
    QAItem(
        'Lina collects stamps from every country she visits. Her favorite stamp comes from Peru and shows a llama.',
        "Which country does Lina's favorite stamp come from?",
        'Peru',
    ),
    QAItem(
        'The first mayor of Kelby was a teacher. Her name was Rosalind, and she served for twelve years.',
        'What was the name of the first mayor of Kelby?',
        'Rosalind',
    ),
    QAItem(
        'The rowing team trained on the lake every morning. Their coach, a former champion named Viktor, was very strict.',
        'Who was the coach of the rowing team?',
        'Viktor',
    ),
    QAItem(
        'The new hospital in Brightwater has three floors. Its garden is full of blue flowers.',
        'What color are the flowers in the garden?',
        'blue',
    ),
    QAItem(
        'After years of travel, the painter Ilse settled in Marseille. There she painted the sea every day.',
        'Where did Ilse settle?',
        'Marseille',
    ),
    QAItem(
        'A family of foxes lives under the old barn. The farmer feeds them apples in winter.',
        'What does the farmer feed the foxes?',
        'apples',
    ),
    QAItem(
        'Henrik Solberg founded the Arctic Seed Library. The library stores seeds from hundreds of plants. It is kept cold by the natural ice of the mountain.',
        'Who founded the Arctic Seed Library?',
        'Henrik',
    ),
    QAItem(
        'The city of Valdora is known for its canals. Boats carry bread and milk through the streets every morning. Tourists love to ride them at sunset.',
        'Which city is known for its canals?',
        'Valdora',
    ),
    QAItem(
        'The horse that won the Lindon Cup was called Comet. It was trained by a woman from Kerry. The race was run in heavy rain.',
        'What was the name of the horse that won the Lindon Cup?',
        'Comet',
    ),
    QAItem(
        'Saffron is the main spice of the soup served in Qalat. The soup is cooked for six hours. Visitors usually eat it with flat bread and goat cheese.',
        'What is the main spice of the soup?',
        'Saffron',
    ),
    QAItem(
        'The old ferry Marigold crosses the bay twice a day. Its captain has worked on the ferry for twenty years. In winter the crossing is often cancelled because of ice.',
        'What is the name of the old ferry?',
        'Marigold',
    ),
    QAItem(
        'Berlin was where the engineer Karla Nott built her first glider. She later moved to the coast to test it in stronger winds. Her glider flew for twelve minutes.',
        'In which city did Karla Nott build her first glider?',
        'Berlin',
    ),
    QAItem(
        'The team from Eastfield won the quiz by answering a question about volcanoes. Their captain, Leon, knew the answer at once. The prize was a trip to Iceland.',
        'Who was the captain of the team?',
        'Leon',
    ),
    QAItem(
        'Every house on Juniper Lane has a white fence. The tallest house belongs to a retired pilot. He grows tomatoes in his front garden.',
        'What does the retired pilot grow in his garden?',
        'tomatoes',
    ),
    QAItem(
        'Nine lanterns hang above the gate of the temple. They are lit every evening by the youngest monk. The temple stands on a small island in the lake.',
        'How many lanterns hang above the gate?',
        'Nine',
    ),
    QAItem(
        "Rosa's cafe serves breakfast all day. Her most famous dish is a pancake with blackberries. She opened the cafe in Galway ten years ago.",
        'In which town did Rosa open her cafe?',
        'Galway',
    ),
)
