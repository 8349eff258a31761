"""Persona-fact dialogs, generated offline: facts stated in early turns, asked about at the end.

The task that exercises chat memory and runs here without any download. Seeded and versioned
(``GENERATOR_VERSION``): the same seed gives the same file. Test dialogs ask only about values that no
training dialog contains, so a model that answers them read the value from memory, not from its weights.

Small-talk turns (no fact) can be mixed in, so that memory has to keep the facts among chatter; the
``validation`` split uses training values with its own random stream (for early stopping).

Record format (one JSON object per line)::

    {"id": "train-0", "split": "train", "version": "persona-v2",
     "turns": [["I have a dog called Biscuit.", "What a lovely name!"], ...],
     "question": "What is my dog called?", "answer": "Biscuit", "options": ["Biscuit", "Max", ...]}
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from ccmem.fileio import atomic_path

GENERATOR_VERSION = "persona-v2"
ACKS = ("Got it!", "Thanks for telling me.", "Nice, I'll remember that.", "Good to know.", "Noted!")
SMALL_TALK = (
    ("It has been raining all day here.", "Rainy days are perfect for a good book and a warm drink."),
    ("I finally finished that long report at work.", "Well done! That must feel like a weight off your shoulders."),
    ("My neighbour is playing loud music again.", "That sounds annoying. Maybe a friendly word would help."),
    ("I think I will go for a walk later.", "A walk is a great way to clear your head."),
    ("I watched a documentary about whales last night.", "Whales are fascinating animals. Did you enjoy it?"),
    ("The coffee machine at the office broke today.", "Oh no, that can make a morning much harder."),
    ("I am trying to read more books this year.", "That is a great goal. Short daily sessions add up quickly."),
    ("We had a big family dinner on Sunday.", "That sounds lovely. Family dinners are special."),
)
SPLITS = ("train", "validation", "test")
Range = int | tuple[int, int]


@dataclass(frozen=True)
class FactKind:
    statement: str  # "{value}" is replaced
    question: str
    values: tuple[str, ...]


FACTS: dict[str, FactKind] = {
    "dog": FactKind(
        "I have a dog called {value}.",
        "What is my dog called?",
        ("Biscuit", "Max", "Luna", "Rocky", "Pepper", "Mochi", "Ziggy", "Bruno", "Nala", "Toby"),
    ),
    "city": FactKind(
        "I live in {value}.",
        "In which city do I live?",
        ("Lisbon", "Oslo", "Nairobi", "Lima", "Osaka", "Denver", "Krakow", "Hanoi", "Dublin", "Cairo"),
    ),
    "job": FactKind(
        "I work as a {value}.",
        "What is my job?",
        ("nurse", "pilot", "baker", "lawyer", "plumber", "teacher", "chemist", "farmer", "dentist", "architect"),
    ),
    "food": FactKind(
        "My favourite food is {value}.",
        "What is my favourite food?",
        ("sushi", "lasagna", "tacos", "curry", "paella", "falafel", "ramen", "pierogi", "goulash", "risotto"),
    ),
    "color": FactKind(
        "My favourite colour is {value}.",
        "What is my favourite colour?",
        ("blue", "green", "purple", "orange", "yellow", "red", "teal", "pink", "grey", "brown"),
    ),
}
HELD_OUT_EVERY = 5  # every 5th value of each kind appears only in test dialogs


@dataclass
class PersonaDialog:
    id: str
    split: str
    version: str
    turns: list[tuple[str, str]]
    question: str
    answer: str
    options: list[str]


def split_values(kind: FactKind, split: str) -> list[str]:
    """The values a split may use: test gets every ``HELD_OUT_EVERY``-th, train the rest."""
    test = [v for i, v in enumerate(kind.values) if i % HELD_OUT_EVERY == 0]
    return test if split == "test" else [v for v in kind.values if v not in test]


def _bounds(name: str, value: Range, low: int, high: int) -> tuple[int, int]:
    lo, hi = (value, value) if isinstance(value, int) else value
    if not low <= lo <= hi <= high:
        raise ValueError(f"{name} must be a number or a (min, max) range within {low}..{high}, got {value!r}")
    return lo, hi


def generate(
    n: int,
    split: str,
    *,
    seed: int = 0,
    facts_per_dialog: Range = 3,
    small_talk: Range = 0,
    n_options: int = 4,
) -> Iterator[PersonaDialog]:
    """``n`` dialogs that state ``facts_per_dialog`` facts among ``small_talk`` fact-free turns and end with a
    question about one fact. Both counts may be ``(min, max)`` ranges, drawn per dialog."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    facts = _bounds("facts_per_dialog", facts_per_dialog, 1, len(FACTS))
    chatter = _bounds("small_talk", small_talk, 0, len(SMALL_TALK))
    rng = random.Random(f"{GENERATOR_VERSION}-{split}-{seed}")
    for i in range(n):
        kinds = rng.sample(sorted(FACTS), rng.randint(*facts))
        values = {k: rng.choice(split_values(FACTS[k], split)) for k in kinds}
        turns = [(FACTS[k].statement.format(value=values[k]), rng.choice(ACKS)) for k in kinds]
        for turn in rng.sample(SMALL_TALK, rng.randint(*chatter)):
            turns.insert(rng.randint(0, len(turns)), turn)
        asked = rng.choice(kinds)
        answer = values[asked]
        distractors = rng.sample([v for v in FACTS[asked].values if v != answer], n_options - 1)
        options = [answer, *distractors]
        rng.shuffle(options)
        yield PersonaDialog(f"{split}-{i}", split, GENERATOR_VERSION, turns, FACTS[asked].question, answer, options)


def write_jsonl(path: str | os.PathLike[str], dialogs: Iterator[PersonaDialog] | list[PersonaDialog]) -> Path:
    """Write dialogs as JSON lines, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for dialog in dialogs:
            f.write(json.dumps(asdict(dialog)) + "\n")
    return path


class DatasetFormatError(ValueError):
    """A data file that does not have the expected format; the message names file, line and field."""


def read_jsonl(path: str | os.PathLike[str]) -> list[PersonaDialog]:
    """Read persona dialogs; a malformed record is reported with its file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no dataset file at {path}")
    dialogs = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetFormatError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
            for key, kind in (("turns", list), ("question", str), ("answer", str), ("options", list)):
                if not isinstance(record.get(key), kind):
                    raise DatasetFormatError(f"{path}:{line_no}: field {key!r} must be a {kind.__name__}")
            if record["answer"] not in record["options"]:
                raise DatasetFormatError(f"{path}:{line_no}: field 'answer' is not one of 'options'")
            turns = record["turns"]
            if not all(isinstance(t, list) and len(t) == 2 and all(isinstance(s, str) for s in t) for t in turns):
                raise DatasetFormatError(f"{path}:{line_no}: field 'turns' must hold [user, assistant] string pairs")
            dialogs.append(
                PersonaDialog(
                    id=str(record.get("id", f"line-{line_no}")),
                    split=str(record.get("split", "")),
                    version=str(record.get("version", "")),
                    turns=[(u, a) for u, a in turns],
                    question=record["question"],
                    answer=record["answer"],
                    options=list(record["options"]),
                )
            )
    return dialogs
