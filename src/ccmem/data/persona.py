"""Persona-fact dialogs, generated offline: facts stated in early turns, asked about at the end.

The task that exercises chat memory and runs here without any download. Seeded and versioned
(``GENERATOR_VERSION``): the same seed gives the same file. Train, validation and test dialogs use
disjoint values (and draw their answer options from their own split), so a model that answers a test
question read the value from memory: it cannot have memorised it, and the pools (30-90 values per kind)
are too large to guess from. Small-talk turns (no fact) can be mixed in, so that memory has to keep the
facts among chatter.

Record format (one JSON object per line)::

    {"id": "train-0", "split": "train", "version": "persona-v3",
     "turns": [["I have a dog called Biscuit.", "What a lovely name!"], ...],
     "question": "What is my dog called?", "answer": "Biscuit", "options": ["Biscuit", "Max", ...]}
"""

from __future__ import annotations

import json
import logging
import os
import random
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ccmem.fileio import (  # DatasetFormatError: also imported from here
    DatasetFormatError,
    atomic_path,
    jsonl_records,
    say_ignored_fields,
)

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "persona-v3"
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
        (
            "Biscuit",
            "Max",
            "Luna",
            "Rocky",
            "Pepper",
            "Mochi",
            "Ziggy",
            "Bruno",
            "Nala",
            "Toby",
            "Coco",
            "Daisy",
            "Milo",
            "Rosie",
            "Buster",
            "Hazel",
            "Oscar",
            "Ruby",
            "Teddy",
            "Willow",
            "Ginger",
            "Murphy",
            "Olive",
            "Duke",
            "Penny",
            "Scout",
            "Maple",
            "Otis",
            "Pickles",
            "Waffles",
            "Bandit",
            "Juniper",
            "Chester",
            "Poppy",
            "Rusty",
            "Sadie",
            "Winston",
            "Clover",
            "Dexter",
            "Pumpkin",
            "Bear",
            "Honey",
            "Tucker",
            "Marble",
            "Noodle",
            "Archie",
            "Bella",
            "Kiwi",
            "Sprout",
            "Fudge",
        ),
    ),
    "city": FactKind(
        "I live in {value}.",
        "In which city do I live?",
        (
            "Lisbon",
            "Oslo",
            "Nairobi",
            "Lima",
            "Osaka",
            "Denver",
            "Krakow",
            "Hanoi",
            "Dublin",
            "Cairo",
            "Porto",
            "Bergen",
            "Accra",
            "Quito",
            "Kyoto",
            "Austin",
            "Gdansk",
            "Manila",
            "Galway",
            "Tunis",
            "Seville",
            "Tampere",
            "Dakar",
            "Bogota",
            "Sapporo",
            "Boston",
            "Poznan",
            "Jakarta",
            "Cork",
            "Rabat",
            "Valencia",
            "Uppsala",
            "Lagos",
            "Medellin",
            "Nagoya",
            "Seattle",
            "Riga",
            "Hobart",
            "Zurich",
            "Tbilisi",
            "Geneva",
            "Vilnius",
            "Perth",
            "Montreal",
            "Bilbao",
            "Malmo",
            "Durban",
            "Santiago",
            "Busan",
            "Glasgow",
        ),
    ),
    "job": FactKind(
        "I work as a {value}.",
        "What is my job?",
        (
            "nurse",
            "pilot",
            "baker",
            "lawyer",
            "plumber",
            "teacher",
            "chemist",
            "farmer",
            "dentist",
            "architect",
            "carpenter",
            "librarian",
            "journalist",
            "pharmacist",
            "firefighter",
            "electrician",
            "photographer",
            "veterinarian",
            "translator",
            "accountant",
            "mechanic",
            "florist",
            "surgeon",
            "geologist",
            "butcher",
            "tailor",
            "barber",
            "cartographer",
            "astronomer",
            "locksmith",
            "beekeeper",
            "sculptor",
            "paramedic",
            "economist",
            "jeweller",
            "glassblower",
            "welder",
            "zoologist",
            "shepherd",
            "potter",
        ),
    ),
    "food": FactKind(
        "My favourite food is {value}.",
        "What is my favourite food?",
        (
            "sushi",
            "lasagna",
            "tacos",
            "curry",
            "paella",
            "falafel",
            "ramen",
            "pierogi",
            "goulash",
            "risotto",
            "dumplings",
            "burritos",
            "moussaka",
            "pho",
            "kimchi",
            "gnocchi",
            "couscous",
            "biryani",
            "ceviche",
            "empanadas",
            "hummus",
            "fondue",
            "tiramisu",
            "pancakes",
            "shakshuka",
            "bibimbap",
            "pad thai",
            "churros",
            "baklava",
            "gazpacho",
            "tempura",
            "poutine",
            "pretzels",
            "samosas",
            "waffles",
            "crepes",
            "nachos",
            "lentil soup",
            "meatballs",
            "polenta",
        ),
    ),
    "color": FactKind(
        "My favourite colour is {value}.",
        "What is my favourite colour?",
        (
            "blue",
            "green",
            "purple",
            "orange",
            "yellow",
            "red",
            "teal",
            "pink",
            "grey",
            "brown",
            "maroon",
            "navy",
            "turquoise",
            "lavender",
            "crimson",
            "beige",
            "olive",
            "coral",
            "amber",
            "indigo",
            "magenta",
            "cyan",
            "ivory",
            "silver",
            "gold",
            "violet",
            "scarlet",
            "mint",
            "peach",
            "charcoal",
        ),
    ),
    "sister": FactKind(
        "My sister's name is {value}.",
        "What is my sister's name?",
        (
            "Anna",
            "Clara",
            "Sofia",
            "Maya",
            "Elena",
            "Ingrid",
            "Priya",
            "Chloe",
            "Hannah",
            "Leila",
            "Nora",
            "Greta",
            "Amira",
            "Yuki",
            "Fatima",
            "Lucia",
            "Zara",
            "Ines",
            "Marta",
            "Keiko",
            "Olga",
            "Tessa",
            "Freya",
            "Imani",
            "Rosa",
            "Vera",
            "Lena",
            "Aisha",
            "Mila",
            "Jade",
            "Dora",
            "Paula",
            "Sonia",
            "Edith",
            "Wanda",
            "Hilda",
            "Nadia",
            "Irene",
            "Petra",
            "Alma",
        ),
    ),
    "number": FactKind(
        "My favourite number is {value}.",
        "What is my favourite number?",
        tuple(str(n) for n in range(10, 100)),
    ),
}
HELD_OUT_EVERY = 5  # value i of a kind: i % 5 == 0 only in test dialogs, i % 5 == 1 only in validation ones


@dataclass
class PersonaDialog:
    id: str
    split: str
    version: str
    turns: list[tuple[str, str]]
    question: str
    answer: str
    options: list[str]
    groups: dict[str, str] = field(default_factory=dict)  # what evaluation breaks accuracy down by


RECORD_FIELDS = frozenset(f.name for f in fields(PersonaDialog))  # what a persona JSON line may hold


def split_values(kind: FactKind, split: str) -> list[str]:
    """The values a split may use: disjoint for train, validation and test (every ``HELD_OUT_EVERY``-th)."""
    return values_of_split(kind.values, split)


def values_of_split(values: tuple[str, ...] | list[str], split: str) -> list[str]:
    """Value i goes to test when ``i % HELD_OUT_EVERY == 0``, to validation when it is 1, else to train
    (the rule every fact generator shares, so no value is ever in two splits)."""
    bucket = {"test": 0, "validation": 1}.get(split)
    if bucket is None:
        return [v for i, v in enumerate(values) if i % HELD_OUT_EVERY > 1]
    return [v for i, v in enumerate(values) if i % HELD_OUT_EVERY == bucket]


def bounds(name: str, value: Range, low: int, high: int) -> tuple[int, int]:
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
    facts = bounds("facts_per_dialog", facts_per_dialog, 1, len(FACTS))
    chatter = bounds("small_talk", small_talk, 0, len(SMALL_TALK))
    rng = random.Random(f"{GENERATOR_VERSION}-{split}-{seed}")
    for i in range(n):
        kinds = rng.sample(sorted(FACTS), rng.randint(*facts))
        values = {k: rng.choice(split_values(FACTS[k], split)) for k in kinds}
        turns = [(FACTS[k].statement.format(value=values[k]), rng.choice(ACKS)) for k in kinds]
        for turn in rng.sample(SMALL_TALK, rng.randint(*chatter)):
            turns.insert(rng.randint(0, len(turns)), turn)
        asked = rng.choice(kinds)
        answer = values[asked]
        # Distractors come from the same split, so a test question's options are all values never trained on.
        distractors = rng.sample([v for v in split_values(FACTS[asked], split) if v != answer], n_options - 1)
        options = [answer, *distractors]
        rng.shuffle(options)
        yield PersonaDialog(f"{split}-{i}", split, GENERATOR_VERSION, turns, FACTS[asked].question, answer, options)


def write_jsonl(path: str | os.PathLike[str], dialogs: Iterator[PersonaDialog] | list[PersonaDialog]) -> Path:
    """Write dialogs as JSON lines, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for dialog in dialogs:
            record = asdict(dialog)
            if not record["groups"]:
                del record["groups"]  # persona records stay as they were
            f.write(json.dumps(record) + "\n")
    return path


def _message_pairs(turns: list[Any], where: str) -> list[Any]:
    """``turns`` as ``[user, assistant]`` pairs: given so, or as chat messages (``{"role", "content"}``, OpenAI's
    shape) that alternate user and assistant."""
    if not turns or not all(isinstance(t, dict) for t in turns):
        return turns
    roles = [t["role"].lower() if isinstance(t.get("role"), str) else t.get("role") for t in turns]  # "User" too
    if not all(isinstance(t.get("content"), str) for t in turns) or roles != ["user", "assistant"] * (len(turns) // 2):
        hint = (
            "; a system message is not part of a memory dialog (ccmem's own system prompt is set with --system): "
            "remove it"
            if "system" in roles
            else ""
        )
        raise DatasetFormatError(
            f"{where}: field 'turns' given as messages must alternate user and assistant messages with string "
            f"content, starting with user and ending with assistant (roles here: {roles}){hint}"
        )
    return [[turns[i]["content"], turns[i + 1]["content"]] for i in range(0, len(turns), 2)]


def _record_name(where: str) -> str:
    """The id of a record that has none: ``line-7`` (``file:7``) or ``item-7`` (``file: item 7``, a JSON list)."""
    place = where.rpartition(":")[2].strip()
    return place.replace("item ", "item-") if place.startswith("item ") else f"line-{place}"


def read_jsonl(path: str | os.PathLike[str]) -> list[PersonaDialog]:
    """Read persona dialogs; a malformed record is reported with its file, line and field, and fields this format
    does not have (a per-record ``system`` prompt, say) are named once, as ignored."""
    dialogs = []
    found: set[str] = set()
    for where, record in jsonl_records(path):
        found |= set(record)
        for key, kind in (("turns", list), ("question", str), ("answer", str), ("options", list)):
            if key not in record:
                raise DatasetFormatError(
                    f"{where}: field {key!r} is missing; every record needs turns, question, answer and options"
                )
            if not isinstance(record[key], kind):
                got = json.dumps(record[key], ensure_ascii=False)[:60]
                raise DatasetFormatError(
                    f"{where}: field {key!r} must be a {kind.__name__}, got {got}"
                    + (
                        f' (write it as "{record[key]}")'
                        if kind is str and isinstance(record[key], int | float)
                        else ""
                    )
                )
        for key in ("question", "answer"):
            if not record[key].strip():
                raise DatasetFormatError(
                    f"{where}: field {key!r} is empty; every dialog needs a question and its answer"
                )
        options = record["options"]
        if not options or not all(isinstance(o, str) and o.strip() for o in options):
            raise DatasetFormatError(f"{where}: field 'options' must be a list of non-empty strings, got {options!r}")
        if len(options) < 2 or len(set(options)) < len(options):
            raise DatasetFormatError(
                f"{where}: field 'options' must hold at least two different options (one option, or the same "
                f"twice, is always chosen right or ties), got {options!r}"
            )
        if record["answer"] not in options:
            nfc = unicodedata.normalize("NFC", record["answer"])
            twin = next((o for o in options if unicodedata.normalize("NFC", o) == nfc), None)
            raise DatasetFormatError(
                f"{where}: field 'answer' ({record['answer']!r}) is not one of 'options' ({options!r}); it must be one "
                "of them exactly (spaces and case count)"
                + (
                    f"; it looks like option {twin!r}, but its accented letters are other code points "
                    f"({record['answer']!a} against {twin!a}: one NFC, the other NFD Unicode): save both the same way"
                    if twin is not None
                    else ""
                )
            )
        turns = _message_pairs(record["turns"], where)
        bad = next(
            (
                i
                for i, t in enumerate(turns)
                if not (isinstance(t, list) and len(t) == 2 and all(isinstance(s, str) for s in t))
            ),
            None,
        )
        if bad is not None:
            got = json.dumps(turns[bad], ensure_ascii=False)[:60]
            raise DatasetFormatError(
                f"{where}: field 'turns' must hold [user, assistant] string pairs (turn {bad + 1} is "
                f'{got}; an unanswered last user turn needs a reply, "" will do), e.g. '
                '[["I moved to Porto.", "Nice!"], ...], or chat messages [{"role": "user", "content": ...}, '
                '{"role": "assistant", "content": ...}, ...]'
            )
        groups = record.get("groups") or {}  # null: none, as an absent field (what pandas writes for a gap)
        if not isinstance(groups, dict):
            raise DatasetFormatError(
                f'{where}: field \'groups\' must map names to strings, e.g. {{"distance": "2-4"}}; got '
                f"{type(groups).__name__} {groups!r:.60}"
            )
        for name, value in groups.items():
            if not isinstance(value, str):  # a number too: "3" and 3 would make two groups of one value
                raise DatasetFormatError(
                    f"{where}: field 'groups' must map names to strings; {name!r} is {type(value).__name__} "
                    f"{value!r:.60} (write it as a string: {json.dumps(str(value))})"
                )
        dialogs.append(
            PersonaDialog(
                id=str(record["id"]) if record.get("id") is not None else _record_name(where),
                split=str(record.get("split", "")),
                version=str(record.get("version", "")),
                turns=[(u, a) for u, a in turns],
                question=record["question"],
                answer=record["answer"],
                options=list(record["options"]),
                groups=dict(groups),
            )
        )
    ids = Counter(d.id for d in dialogs)
    repeated = [i for i, count in ids.items() if count > 1]
    if repeated:
        logger.warning(
            "%s: %d ids occur more than once (e.g. %r); rows and reports count each record, but they cannot be told "
            "apart by id", path, len(repeated), repeated[0],
        )  # fmt: skip
    say_ignored_fields(path, found, sorted(RECORD_FIELDS), "persona")
    return dialogs
