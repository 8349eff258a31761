"""Varied fact dialogs, generated offline: the data that teaches a memory to keep facts however they are said.

Where ``persona`` has one wording per fact kind, ``dialogs`` draws from a template file
(:mod:`ccmem.data.templates`, ``templates/facts.txt``): many wordings per kind (plain, indirect, embedded in a
longer turn), corrections ("actually, I moved to Porto") whose answer is the *new* value, two dozen fact
kinds (names, places, dates, numbers, preferences, relations, plans), 1-6 facts among small talk in dialogs of
up to 20 turns, and answers either bare or as a sentence ("You live in Porto.").

Generalisation is built into the splits: train, validation and test use disjoint wordings (``@validation`` /
``@test`` templates), disjoint values (every fifth value of a kind is test-only, the next validation-only), and
the test split also asks about kinds that never appear in training (``kind: ... @test``). Small talk comes from
a built-in list and, when installed, the English conversations of ``chatterbot-corpus`` (real dialog lines,
BSD-3; ``pip install --no-deps chatterbot-corpus==1.3.3``).

``templates="wide"`` (``templates/facts-wide.txt``) adds to those kinds values that must come back exactly
(e-mail addresses, booking codes, plates, postcodes), facts about other people by role (a colleague's city, a
neighbour's job) whose kinds share a value list, so the options name values the dialog gave someone else, and
more kinds of correction.

Records are persona records (``ccmem.data.persona``) plus ``groups``, which evaluation breaks accuracy down
by: ``distance`` (turns between the asked fact's last mention and the question), ``kind`` (``seen`` or
``held-out``) and ``corrected`` (``yes``/``no``).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from ccmem.data.persona import SMALL_TALK, PersonaDialog, Range, bounds, values_of_split
from ccmem.data.templates import DEFAULT_FILE, SPLITS, FactKind, Template, TemplateBank, parse_templates
from ccmem.fileio import package_dir

GENERATOR_VERSION = "dialogs-v1"
CHATTERBOT_HINT = "pip install --no-deps chatterbot-corpus==1.3.3"
#: chatterbot's English files that hold chat between people (the others are trivia or about the bot itself)
CHATTY_FILES = (
    "conversations", "emotion", "food", "gossip", "greetings", "health", "humor", "literature", "money", "movies",
    "psychology", "sports",
)  # fmt: skip
DISTANCE_BUCKETS = ((0, 1, "0-1"), (2, 4, "2-4"), (5, 9, "5-9"), (10, 10**6, "10+"))


def split_values(kind: FactKind, split: str) -> list[str]:
    """Values a split may use: disjoint across splits; a held-out kind's values are all test values."""
    if kind.held_out:
        return list(kind.values) if split == "test" else []
    return values_of_split(kind.values, split)


def distance_bucket(turns_back: int) -> str:
    return next(label for lo, hi, label in DISTANCE_BUCKETS if lo <= turns_back <= hi)


@lru_cache(maxsize=1)
def small_talk() -> tuple[tuple[str, str], ...]:
    """(user, assistant) turns without facts: the built-in ones, plus chatterbot's English conversations."""
    root = package_dir("chatterbot_corpus")
    if root is None:
        raise ModuleNotFoundError(f"the dialogs generator draws small talk from chatterbot-corpus: {CHATTERBOT_HINT}")
    import yaml

    pairs = list(SMALL_TALK)
    folder = root / "data" / "english"
    for file in sorted(folder.glob("*.yml")):
        if file.stem not in CHATTY_FILES:
            continue
        try:
            convs = yaml.safe_load(file.read_text(encoding="utf-8-sig")).get("conversations", [])
        except (yaml.YAMLError, AttributeError, UnicodeDecodeError):
            continue
        for conv in convs:
            lines = [str(x).strip() for x in conv if isinstance(x, (str, int, float))]
            for user, reply in zip(lines[::2], lines[1::2], strict=False):
                if len(user.split()) >= 3 and not user.isupper() and 2 <= len(reply) <= 300 and len(user) <= 200:
                    pairs.append((user, reply))
    return tuple(dict.fromkeys(pairs))


#: Most turns of a generated dialog when nothing sets them (``data.turns=0``).
DEFAULT_TURNS = 20


def split_shape(split: str, k: int, turns: int, min_turns: int = 0) -> tuple[Range, Range]:
    """(facts, turns) for a split: training and validation draw 1..k facts in ``min_turns``..turns turns (from 1
    when ``min_turns`` is 0); the test split has exactly ``turns`` turns and 3..k facts, so a benchmark controls
    the dialog length and asks among several facts."""
    if min_turns > turns:
        raise ValueError(f"the fewest turns ({min_turns}) must not exceed the most turns ({turns})")
    k = max(1, min(k, turns))
    if split == "test":
        return (min(3, k), k), turns
    return (1, k), (max(1, min_turns), turns)


def _state(rng: random.Random, bank: TemplateBank, template: Template, value: str, embed: float) -> str:
    text = template.render(value=value)
    if rng.random() < embed and (bank.leads or bank.tails):
        lead = rng.choice(bank.leads) + " " if bank.leads and rng.random() < 0.6 else ""
        tail = " " + rng.choice(bank.tails) if bank.tails and (not lead or rng.random() < 0.5) else ""
        text = f"{lead}{text}{tail}"
    return text


def generate(
    n: int,
    split: str,
    *,
    seed: int = 0,
    facts: Range = (1, 6),
    turns: Range = (1, DEFAULT_TURNS),
    n_options: int = 5,
    corrections: float = 0.25,
    embed: float = 0.5,
    sentence_answers: float = 0.5,
    templates: str | Path | TemplateBank | None = None,
) -> Iterator[PersonaDialog]:
    """``n`` dialogs of ``split``: ``facts`` facts (and maybe a correction) among small talk, ``turns`` turns in
    all, then a question about one fact with ``n_options`` answer options. Counts may be ``(min, max)`` ranges.

    ``corrections``: chance that a dialog corrects one of its facts later; ``embed``: chance that a statement
    is wrapped in a longer turn; ``sentence_answers``: chance that the answer is a sentence, not the bare value.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    bank = templates if isinstance(templates, TemplateBank) else load_bank(templates)
    kinds = [k for k in bank.kinds_for(split) if len(split_values(k, split)) >= 2]
    if not kinds:
        raise ValueError(f"the template file {bank.path} has no fact kind for the {split} split")
    lo, hi = bounds("facts", facts, 1, 200)
    n_facts = (min(lo, len(kinds)), min(hi, len(kinds)))  # a small template file has fewer kinds than asked for
    n_turns = bounds("turns", turns, 1, 200)
    if n_options < 2:
        raise ValueError(f"n_options must be at least 2, got {n_options}")
    chatter = small_talk()
    version = bank_version(bank)
    rng = random.Random(f"{GENERATOR_VERSION}-{split}-{seed}")
    for i in range(n):
        total = rng.randint(*n_turns)
        chosen = rng.sample(kinds, min(rng.randint(*n_facts), total))
        values = {k.name: rng.choice(split_values(k, split)) for k in chosen}
        sequence: list[tuple[str | None, str, str]] = [  # (kind, or None for small talk; user; assistant)
            (k.name, _state(rng, bank, rng.choice(k.for_split("say", split)), values[k.name], embed), "")
            for k in chosen
        ]
        old: dict[str, str] = {}  # the corrected kind -> its earlier value
        fixable = [k for k in chosen if k.for_split("fix", split) and len(split_values(k, split)) >= 3]
        if fixable and len(sequence) < total and rng.random() < corrections:
            k = rng.choice(fixable)
            old[k.name] = values[k.name]
            values[k.name] = rng.choice([v for v in split_values(k, split) if v != old[k.name]])
            fix = rng.choice(k.for_split("fix", split)).render(value=values[k.name], old=old[k.name])
            after = next(j for j, (name, _, _) in enumerate(sequence) if name == k.name)
            sequence.insert(rng.randint(after + 1, len(sequence)), (k.name, fix, ""))
        for user, reply in rng.sample(chatter, min(total - len(sequence), len(chatter))):
            sequence.insert(rng.randint(0, len(sequence)), (None, user, reply))
        mention: dict[str, int] = {}  # kind -> index of its latest mention
        dialog: list[tuple[str, str]] = []
        for j, (name, user, reply) in enumerate(sequence):
            dialog.append((user, reply or rng.choice(bank.acks)))
            if name is not None:
                mention[name] = j
        asked = rng.choice(chosen)
        answer_value = values[asked.name]
        forms = asked.for_split("answer", split)
        form = rng.choice(forms) if forms and rng.random() < sentence_answers else None
        # Values the dialog stated for other facts that the asked kind could also take (a colleague's city when
        # asked about one's parents' city: kinds sharing a value list) are options too, so that a memory has to
        # keep which fact each value belongs to. The packaged facts.txt has no such kinds.
        fixed = [old[asked.name]] if asked.name in old else []
        asked_values = set(split_values(asked, split))
        for k in chosen:
            v = values[k.name]
            if k is not asked and v in asked_values and v != answer_value and v not in fixed:
                fixed.append(v)
        fixed = fixed[: n_options - 1]
        pool = [v for v in split_values(asked, split) if v != answer_value and v not in fixed]
        distractors = fixed + rng.sample(pool, min(n_options - 1 - len(fixed), len(pool)))
        option_values = [answer_value, *distractors]
        rng.shuffle(option_values)
        options = [form.render(value=v) if form else v for v in option_values]
        answer = form.render(value=answer_value) if form else answer_value
        question = rng.choice(asked.for_split("ask", split)).text
        groups = {
            "distance": distance_bucket(len(dialog) - 1 - mention[asked.name]),
            "kind": "held-out" if asked.held_out else "seen",
            "corrected": "yes" if asked.name in old else "no",
            "turns": str(len(dialog)),
        }
        yield PersonaDialog(f"{split}-{i}", split, version, dialog, question, answer, options, groups=groups)


#: Packaged template banks by name (``data.templates=wide``, ``ccmem data dialogs --templates wide``).
PACKAGED_BANKS = {"default": DEFAULT_FILE, "wide": DEFAULT_FILE.parent / "facts-wide.txt"}


def bank_file(templates: str | Path | None = None) -> Path:
    """The template file ``templates`` names: a packaged bank's name (:data:`PACKAGED_BANKS`) or a path."""
    if templates is None or str(templates) in PACKAGED_BANKS:
        return PACKAGED_BANKS[str(templates or "default")]
    path = Path(templates)
    if not path.is_file():
        names = ", ".join(PACKAGED_BANKS)
        raise FileNotFoundError(f"no template file {templates}: give a file's path or a packaged bank ({names})")
    return path


def bank_version(bank: TemplateBank) -> str:
    """The version records made from ``bank`` carry: ``dialogs-v1``, ``dialogs-v1:wide`` for the packaged banks,
    ``dialogs-v1:mine.txt@1a2b3c4d`` for the user's own file: its name and a digest of what it says (included
    files too), so two files of one name, or one file edited between two runs, are told apart."""
    path = bank.path.resolve()
    name = next((name for name, file in PACKAGED_BANKS.items() if file.resolve() == path), None)
    if name is None:
        return f"{GENERATOR_VERSION}:{path.name}@{bank_digest(bank)}"
    return GENERATOR_VERSION if name == "default" else f"{GENERATOR_VERSION}:{name}"


def bank_digest(bank: TemplateBank) -> str:
    """8 hex digits of what a bank generates from: its replies, leads, tails, kinds, values and wordings (not where
    they were written: the same text in another folder has the same digest)."""
    content = {
        "acks": bank.acks,
        "leads": bank.leads,
        "tails": bank.tails,
        "kinds": [
            [k.name, k.held_out, k.values, {slot: [[t.text, t.split] for t in ts] for slot, ts in k.templates.items()}]
            for k in bank.kinds.values()
        ],
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:8]


def load_bank(templates: str | Path | None = None) -> TemplateBank:
    """The template bank of ``templates`` (a packaged bank's name or a file), or the packaged default."""
    return _cached_bank(str(bank_file(templates).resolve()))


@lru_cache(maxsize=4)
def _cached_bank(path: str) -> TemplateBank:
    return parse_templates(path)
