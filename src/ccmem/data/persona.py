"""Persona-fact dialogs, generated offline: facts stated in early turns, asked about at the end.

The task that exercises chat memory and runs here without any download. Seeded and versioned
(``GENERATOR_VERSION``): the same seed gives the same file. Test dialogs ask only about values that no
training dialog contains, so a model that answers them read the value from memory, not from its weights.

Record format (one JSON object per line)::

    {"id": "train-0", "split": "train", "version": "persona-v1",
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

GENERATOR_VERSION = "persona-v1"
ACKS = ("Got it!", "Thanks for telling me.", "Nice, I'll remember that.", "Good to know.", "Noted!")


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


def generate(
    n: int, split: str, *, seed: int = 0, facts_per_dialog: int = 3, n_options: int = 4
) -> Iterator[PersonaDialog]:
    """``n`` dialogs of ``facts_per_dialog`` stated facts each, ending with a question about one of them."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 1 <= facts_per_dialog <= len(FACTS):
        raise ValueError(f"facts_per_dialog must be between 1 and {len(FACTS)}, got {facts_per_dialog}")
    rng = random.Random(f"{GENERATOR_VERSION}-{split}-{seed}")
    for i in range(n):
        kinds = rng.sample(sorted(FACTS), facts_per_dialog)
        values = {k: rng.choice(split_values(FACTS[k], split)) for k in kinds}
        turns = [(FACTS[k].statement.format(value=values[k]), rng.choice(ACKS)) for k in kinds]
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
