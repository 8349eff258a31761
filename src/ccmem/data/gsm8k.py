"""GSM8K grade-school maths: the real files, answer checking, step boundaries, and an offline generator.

The files users download (``grade_school_math/data/{train,test}.jsonl`` of openai/grade-school-math) hold
one JSON object per line with two fields::

    {"question": "Ada buys 3 pens at $2 each ...",
     "answer": "The pens cost 3*2 = $<<3*2=6>>6.\\nAda pays 6+4 = $<<6+4=10>>10.\\n#### 10"}

``answer`` is a worked solution whose lines may carry calculator annotations ``<<expr=result>>`` and whose
last line is ``#### N``. :func:`read_jsonl` splits it into the worked ``solution`` (annotations kept) and
the normalised final ``answer``. There is no official validation file: :func:`read_split` holds out the
*last* ``n_validation`` problems of ``train.jsonl`` as validation (deterministic, no shuffling) and its
``train`` split is the rest, so the two never overlap. Given a ``train_ratio`` instead (the fork's
``data.train_ratio``), it keeps that share of ``train.jsonl`` for training and holds out the rest
(:func:`hold_out`: a seeded draw of distinct questions, so a question repeated in the file stays on one side).

:func:`generate` makes arithmetic word problems offline in exactly that format (seeded, versioned by
``GENERATOR_VERSION``). Every annotation's arithmetic is exact and every answer is a whole number. A
generated question belongs to the split that a hash of its text picks (:func:`split_of`, 80/10/10 for
train/validation/test); the generator discards draws of other splits, so no question can be in two splits,
whatever the seeds. Problems of one template with other names and numbers do appear in every split, as
GSM8K's own problems share their patterns.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import operator
import os
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

from ccmem.fileio import DatasetFormatError, atomic_path, jsonl_records, say_ignored_fields

GENERATOR_VERSION = "arith-v1"
SPLITS = ("train", "validation", "test")
VALIDATION_SIZE = 500  # of GSM8K's 7,473 training problems, the last 500 make validation

# A number as written in text: optional minus and currency sign ($ € £ ¥), thousands commas, decimals; not in a word.
_SIGN = r"(?P<neg>[-−]?)"
_NUMBER_REST = r"[$€£¥]?[ \t]*(?P<neg2>-?)(?P<num>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
_NUMBER_BODY = _SIGN + _NUMBER_REST
_NUMBER = re.compile(r"(?<![\w.])" + _NUMBER_BODY)
# After '####' a minus may stand apart ('#### - 5' is -5; '#### + 5' is 5); in running text '10 - 5' is no
# negative number.
_FINAL = re.compile(r"####[ \t]*(?:\+[ \t]*)?" + _SIGN + r"[ \t]*" + _NUMBER_REST)
# A fraction as a final answer ('#### 3/4', '#### -1/3', '#### - 1/3'): read as its exact value.
_FRACTION_REST = r"(?P<fnum>\d+)[ \t]*/[ \t]*(?P<fden>\d+)(?![\d.,/]*\d)"
_FRACTION = re.compile(r"(?P<fneg>[-−]?)[ \t]*" + _FRACTION_REST)
_LAST_FRACTION = re.compile(r"(?<![\w.,/])(?P<fneg>[-−]?)" + _FRACTION_REST)  # in running text, not in a word or number
# A mixed number ('#### 1 1/2', 'it takes 2 3/4 hours'): the whole part and the fraction are one value.
_MIXED_REST = r"(?P<whole>\d+)[ \t]+" + _FRACTION_REST
_MIXED = re.compile(r"(?P<fneg>[-−]?)[ \t]*" + _MIXED_REST)
_LAST_MIXED = re.compile(r"(?<![\w.,/])(?P<fneg>[-−]?)" + _MIXED_REST)
_ANNOTATION = re.compile(r"<<[^<>\n]*>>")
_RESULT = re.compile(r"(?:=[ \t]*\$?[ \t]*(?:<<[^<>\n]*>>)?|<<[^<>\n]*>>)[ \t]*\$?-?\d+(?:,\d{3})*(?:\.\d+)?")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_CONCLUSION = re.compile(r"=|\b(?:so|therefore|thus|hence|total|altogether|overall|in all)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    solution: str  # the worked steps, calculator annotations kept, without the final '#### N' line
    answer: str  # the final number, normalised (normalise_number)
    split: str
    version: str  # GENERATOR_VERSION for generated problems, "" for downloaded ones

    @property
    def answer_text(self) -> str:
        """GSM8K's ``answer`` field: the worked solution, then the line ``#### N``."""
        return f"{self.solution}\n#### {self.answer}" if self.solution else f"#### {self.answer}"


# ---------------------------------------------------------------------------------------------- numbers


def _canonical(match: re.Match[str]) -> str:
    value = Decimal(match["num"].replace(",", ""))
    if match["neg"] or match["neg2"]:
        value = -value
    if value == value.to_integral_value():
        return str(int(value))  # "12.0" -> "12", "-0" -> "0"
    return format(value.normalize(), "f")  # "3.50" -> "3.5"


def _canonical_fraction(match: re.Match[str]) -> str | None:
    """A fraction's canonical form: its decimal where that ends (``3/4`` -> ``0.75``, ``8/2`` -> ``4``), else
    the reduced fraction (``2/6`` -> ``1/3``), a mixed number's whole part included (``1 1/2`` -> ``1.5``); None for
    a zero denominator."""
    if int(match["fden"]) == 0:
        return None
    whole = int(match.groupdict().get("whole") or 0)
    value = (whole + Fraction(int(match["fnum"]), int(match["fden"]))) * (-1 if match["fneg"] else 1)
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    if denominator != 1:
        return f"{value.numerator}/{value.denominator}"
    exact = Decimal(value.numerator) / Decimal(value.denominator)  # ends: only 2s and 5s divide it
    return str(int(exact)) if exact == exact.to_integral_value() else format(exact.normalize(), "f")


def normalise_number(text: str) -> str | None:
    """The canonical form of a number written alone (``"$1,250.00"`` -> ``"1250"``, ``"3/4"`` -> ``"0.75"``),
    or None if it is not one."""
    text = text.strip()
    text = text.removesuffix(".")
    if text.startswith("+"):  # '#### +5', as extract_answer reads it
        text = text[1:].lstrip()
    match = re.fullmatch(_NUMBER_BODY, text)
    if match:
        return _canonical(match)
    fraction = _MIXED.fullmatch(text) or _FRACTION.fullmatch(text)
    return _canonical_fraction(fraction) if fraction else None


def extract_answer(text: str) -> str | None:
    """The final answer of a solution, normalised: the number after the first ``####`` that has one (so a model
    that goes on to invent another problem is judged by its first answer), else the last number in the text (a
    fraction read whole, as after ``####``)."""
    final = _FINAL.search(text)
    if final:
        return _final_value(text, final)[0]
    numbers = list(_NUMBER.finditer(text))
    if not numbers:
        return None
    # 'each gets 3/4.' ends in three quarters, not in its denominator 4 ('takes 2 3/4 hours': two and three quarters)
    ending = (f for pattern in (_LAST_MIXED, _LAST_FRACTION) for f in pattern.finditer(text))
    fraction = next((f for f in ending if f.end() == numbers[-1].end()), None)
    value = _canonical_fraction(fraction) if fraction else None
    return value if value is not None else _canonical(numbers[-1])


def _final_value(text: str, final: re.Match[str]) -> tuple[str, int]:
    """The value of the final answer that ``final`` (a match of ``_FINAL`` in ``text``) starts, and where in
    ``text`` it ends: '#### 3/4' is three quarters, not 3; '#### 1 1/2' one and a half, not 1."""
    fraction = _MIXED.match(text, final.start("neg")) or _FRACTION.match(text, final.start("neg"))
    value = _canonical_fraction(fraction) if fraction else None
    if fraction is not None and value is not None:
        return value, fraction.end()
    return _canonical(final), final.end()


def is_correct(generated: str, reference: str) -> bool:
    """Whether the answer extracted from ``generated`` equals ``reference`` (a number, or a whole GSM8K answer)."""
    expected = normalise_number(reference) or extract_answer(reference)
    return expected is not None and extract_answer(generated) == expected


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """The fraction of ``predictions`` (generated solutions) whose answer matches its reference."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("accuracy of no predictions is undefined")
    return sum(is_correct(p, r) for p, r in zip(predictions, references, strict=True)) / len(predictions)


def strip_calculator(text: str) -> str:
    """``text`` without its calculator annotations: ``"48/2 = <<48/2=24>>24"`` -> ``"48/2 = 24"``."""
    return _ANNOTATION.sub("", text)


# ------------------------------------------------------------------------------------------ boundaries


def step_boundaries(solution: str) -> list[int]:
    """Character offsets in ``solution`` where a reasoning step has just ended: where a <COMP> token may go.

    Sorted, without repeats, never 0 and never inside a ``<<...>>`` annotation. An offset counts when it is

    1. just after a newline, or the end of a non-blank ``solution`` (its last line ended at the ``####`` line);
    2. just after a calculation result: a number that follows an ``=`` outside annotations, or follows an
       annotation (``= $<<12/60=0.2>>0.2`` ends after the last ``0.2``; spaces and one ``$`` may come between);
    3. just after a conclusion sentence: ``.``, ``!`` or ``?`` followed by whitespace or the end, closing a
       sentence (from the previous such mark or line start) that holds an ``=`` or one of the words so,
       therefore, thus, hence, total, altogether, overall, in all.

    Offsets index whatever text is given: apply :func:`strip_calculator` first to label the plain text.
    """
    inside = [m.span() for m in _ANNOTATION.finditer(solution)]

    def outside(i: int) -> bool:
        return not any(start < i < end for start, end in inside)

    found = {m.end() for m in re.finditer("\n", solution)}
    if solution.strip():
        found.add(len(solution))
    found |= {m.end() for m in _RESULT.finditer(solution) if outside(m.end())}
    previous = 0
    for m in _SENTENCE_END.finditer(solution):
        if not outside(m.start()):
            continue
        begin = max(previous, solution.rfind("\n", 0, m.start()) + 1)
        if _CONCLUSION.search(solution, begin, m.start()):
            found.add(m.end())
        previous = m.end()
    return sorted(found)


# ------------------------------------------------------------------------------------------ reading


def _parse_answer(where: str, text: str) -> tuple[str, str]:
    lines = text.rstrip().split("\n")
    last = lines[-1].strip()
    if not last.startswith("####"):
        raise DatasetFormatError(f"{where}: field 'answer' must end with a '#### <number>' line")
    # read as a generated solution's final answer is (extract_answer): a sign standing apart, a fraction or mixed
    # number whole, a unit after it read past ('#### 60 km/h', '#### 15%', '#### 5 1/2 hours'); a second number
    # after it ('#### 5 or 6') leaves the answer unclear
    match = _FINAL.match(last)
    final, end = _final_value(last, match) if match else (None, 0)
    if final is None or re.search(r"\d", last[end:]):
        raise DatasetFormatError(
            f"{where}: field 'answer' has a final answer {last[4:].strip()!r} that is not one number (a number and "
            "a unit, such as '60 km/h', is read as the number, and so is a fraction such as '3/4' or '1 1/2')"
        )
    return "\n".join(lines[:-1]).rstrip(), final


#: What a GSM8K record may hold: the two fields of the original files, and what :func:`write_jsonl` adds.
RECORD_FIELDS = ("question", "answer", "id", "split", "version")


def read_jsonl(path: str | os.PathLike[str]) -> list[Problem]:
    """Read a GSM8K JSON-lines file; a malformed record is reported with its file, line and field.

    ``id``, ``split`` and ``version`` are read when present (files of :func:`write_jsonl`); otherwise the id is
    ``<file stem>-<index>`` and the split is the file stem when it names one (``test.jsonl`` -> ``test``).
    """
    path = Path(path)
    problems = []
    found: set[str] = set()
    for index, (where, record) in enumerate(jsonl_records(path, what="GSM8K file")):
        found |= set(record)
        for key in ("question", "answer"):
            if not isinstance(record.get(key), str) or not record[key].strip():
                raise DatasetFormatError(f"{where}: field {key!r} must be a non-empty string")
        for key in ("split", "version"):
            if not isinstance(record.get(key, ""), str):
                raise DatasetFormatError(f"{where}: field {key!r} must be a string")
        solution, answer = _parse_answer(where, record["answer"])
        problems.append(
            Problem(
                id=str(record.get("id", f"{path.stem}-{index}")),
                question=record["question"],
                solution=solution,
                answer=answer,
                split=record.get("split", path.stem if path.stem in SPLITS else ""),
                version=record.get("version", ""),
            )
        )
    say_ignored_fields(path, found, RECORD_FIELDS, "GSM8K")
    if not problems:  # said here, not as a train_ratio "leaving no training problem" or an empty evaluation
        raise DatasetFormatError(
            f"{path} holds no GSM8K problem: give one JSON object per line with 'question' and 'answer' (the worked "
            "solution, ending in '#### <number>')"
        )
    return problems


def read_split(
    folder_or_file: str | os.PathLike[str],
    split: str,
    *,
    n_validation: int = VALIDATION_SIZE,
    train_ratio: float | None = None,
    seed: int = 0,
) -> list[Problem]:
    """One split of GSM8K, from a file or from a folder holding ``train.jsonl`` and ``test.jsonl``.

    A folder may be the official ``grade_school_math/data/`` or one above it. Validation is the last
    ``n_validation`` problems of ``train.jsonl``, in file order, and ``train`` is the problems before them
    (``n_validation=0``: all of them, the validation problems being read from another file).
    With ``train_ratio``, ``train`` is that share of ``train.jsonl`` and validation the rest instead, drawn
    with ``seed`` (:func:`hold_out`). A file is read whole for ``test``; for ``train`` and ``validation`` it is
    split as ``train.jsonl`` would be with ``train_ratio`` (default :data:`FILE_TRAIN_RATIO`), so that training
    never validates on its own problems (``n_validation=0``, validation read from another file: all of it).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    check_train_ratio(train_ratio)
    root = Path(folder_or_file)
    if not root.is_dir():
        if split == "test" or (n_validation == 0 and split == "train"):
            return [replace(p, split=split) for p in read_jsonl(root)]
        return _side(hold_out(read_jsonl(root), train_ratio or FILE_TRAIN_RATIO, seed), split)
    name = "test.jsonl" if split == "test" else "train.jsonl"
    folder = next((d for d in (root, root / "data", root / "grade_school_math" / "data") if (d / name).is_file()), root)
    if split == "test":
        return [replace(p, split=split) for p in read_jsonl(folder / name)]
    if train_ratio is not None:
        return _side(hold_out(read_jsonl(folder / name), train_ratio, seed), split)
    if n_validation < 0 or (n_validation == 0 and split == "validation"):
        raise ValueError(f"n_validation must be at least 1 to read a validation split, got {n_validation}")
    problems = read_jsonl(folder / name)
    if n_validation == 0:  # validation comes from elsewhere (data.eval_path): train on the whole file
        return [replace(p, split=split) for p in problems]
    if len(problems) <= n_validation:
        raise ValueError(
            f"{folder / name} has {len(problems)} problems, too few to hold out {n_validation} for "
            "validation; hold out a share of them instead (in a training config data.train_ratio=0.8, in Python "
            "read_split(..., train_ratio=0.8) or a smaller n_validation), or name a validation file with "
            "data.eval_path; to evaluate, `ccmem eval gsm8k --split test` reads the folder's test.jsonl"
        )
    chosen = problems[-n_validation:] if split == "validation" else problems[:-n_validation]
    return [replace(p, split=split) for p in chosen]


#: the share of a single file's problems trained on when no ``train_ratio`` is given (the rest: validation)
FILE_TRAIN_RATIO = 0.9


def check_train_ratio(train_ratio: float | None, name: str = "train_ratio") -> None:
    """Refuse a share of training problems outside (0, 1); None (hold out a fixed number) passes."""
    if train_ratio is not None and not 0 < train_ratio < 1:
        raise ValueError(
            f"{name} must be in (0, 1): the share of the training problems trained on, the rest held out for "
            f"validation; got {train_ratio}"
        )


def hold_out(problems: Sequence[Problem], train_ratio: float, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """``problems`` split into (train, validation), ``train_ratio`` of their distinct questions for training.

    The distinct questions (whitespace aside) are put in an order drawn from ``seed`` and the first
    ``round(train_ratio * n)`` go to ``train``: a problem whose question repeats is on the same side as its twin,
    so the two splits never share a question. Each split keeps the problems' own order, labelled with its name.
    """
    check_train_ratio(train_ratio)
    keys = [" ".join(p.question.split()) for p in problems]
    questions = sorted(set(keys))  # not file order: the draw depends only on which questions there are
    random.Random(f"gsm8k-hold-out-{seed}").shuffle(questions)
    n_train = round(train_ratio * len(questions))
    if not 0 < n_train < len(questions):
        side = "training" if n_train == 0 else "validation"
        raise ValueError(
            f"train_ratio={train_ratio} of {len(questions)} distinct questions leaves no {side} problem; "
            "choose a ratio that keeps at least one question on each side"
        )
    trained = set(questions[:n_train])
    train = [replace(p, split="train") for p, k in zip(problems, keys, strict=True) if k in trained]
    validation = [replace(p, split="validation") for p, k in zip(problems, keys, strict=True) if k not in trained]
    return train, validation


def _side(parts: tuple[list[Problem], list[Problem]], split: str) -> list[Problem]:
    return parts[0] if split == "train" else parts[1]


def write_jsonl(path: str | os.PathLike[str], problems: Iterable[Problem]) -> Path:
    """Write problems in GSM8K's format (``question``, ``answer`` ending ``#### N``, plus id/split/version),
    atomically; :func:`read_jsonl` reads them back equal."""
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for p in problems:
            record = {"question": p.question, "answer": p.answer_text, "id": p.id, "split": p.split}
            f.write(json.dumps({**record, "version": p.version}) + "\n")
    return path


# ------------------------------------------------------------------------------------------ generator

NAMES = (
    "Amara", "Ben", "Chiara", "Dmitri", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Keiko", "Liam", "Maya",
    "Nikhil", "Olu", "Priya", "Quinn", "Rosa", "Sami", "Tomas", "Uma", "Viktor", "Wen", "Ximena", "Yusuf", "Zoe",
)  # fmt: skip
ITEMS = (
    ("notebook", "notebooks"), ("pen", "pens"), ("candle", "candles"), ("mug", "mugs"), ("toy car", "toy cars"),
    ("comic", "comics"), ("plant pot", "plant pots"), ("scarf", "scarves"), ("ball", "balls"),
    ("poster", "posters"), ("sandwich", "sandwiches"), ("jar of honey", "jars of honey"),
)  # fmt: skip
MACHINES = (
    ("printer", "prints", "pages"), ("bottling machine", "fills", "bottles"), ("bakery oven", "bakes", "rolls"),
    ("packing robot", "packs", "boxes"), ("sewing machine", "stitches", "patches"),
)  # fmt: skip
BAKES = ("cookies", "muffins", "cupcakes", "brownies", "scones")
INSTRUMENTS = ("piano", "violin", "guitar", "flute", "drums", "cello")
SPENDING = ("a new bike", "groceries", "a concert ticket", "books", "a birthday present", "a winter coat")
PLACES = ("garden", "field", "playground", "paddock", "yard")
VEHICLES = ("train", "bus", "ferry", "truck", "coach")
COLLECTIONS = ("marbles", "beads", "buttons", "balloons", "tulips")

Template = Callable[[random.Random], tuple[str, list[str], int]]  # rng -> (question, solution lines, answer)
TEMPLATES: dict[str, Template] = {}
_OPS: dict[type[ast.operator], Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


def _evaluate(expr: str) -> Fraction:
    """Exact value of an expression of whole numbers and + - * /."""

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        raise ValueError(f"unsupported calculator expression {expr!r}")

    return walk(ast.parse(expr, mode="eval").body)


def _calc(expr: str, money: bool = False) -> tuple[str, int]:
    """GSM8K's way of writing one calculation, ``"48/2 = <<48/2=24>>24"``, and its value."""
    value = _evaluate(expr)
    if value.denominator != 1 or value < 0:
        raise RuntimeError(f"generator bug: {expr} = {value} is not a whole non-negative number")
    v = int(value)
    return f"{expr} = {'$' if money else ''}<<{expr}={v}>>{v}", v


def _template(fn: Template) -> Template:
    TEMPLATES[fn.__name__.lstrip("_")] = fn
    return fn


def _purchases(rng: random.Random) -> tuple[str, str, list[str], int]:
    name = rng.choice(NAMES)
    (_, first), (_, second) = rng.sample(ITEMS, 2)
    a, b, p, q = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 15), rng.randint(2, 15)
    s1, x = _calc(f"{a}*{p}", money=True)
    s2, y = _calc(f"{b}*{q}", money=True)
    s3, total = _calc(f"{x}+{y}", money=True)
    steps = [f"The {first} cost {s1}.", f"The {second} cost {s2}.", f"Altogether {name} spends {s3}."]
    return name, f"{name} buys {a} {first} for ${p} each and {b} {second} for ${q} each.", steps, total


@_template
def _shopping_total(rng: random.Random) -> tuple[str, list[str], int]:
    name, facts, steps, total = _purchases(rng)
    return f"{facts} How much money does {name} spend in total?", steps, total


@_template
def _shopping_change(rng: random.Random) -> tuple[str, list[str], int]:
    name, facts, steps, total = _purchases(rng)
    bill = rng.choice((20, 50, 100))
    count = total // bill + 1
    paid = bill
    if count > 1:
        s4, paid = _calc(f"{count}*{bill}", money=True)
        steps.append(f"{name} hands over {s4}.")
    s5, change = _calc(f"{paid}-{total}", money=True)
    paying = f"a ${bill} bill" if count == 1 else f"{count} ${bill} bills"
    return (
        f"{facts} {name} pays with {paying}. How much change does {name} get?",
        [*steps, f"The change is {s5}."],
        change,
    )


@_template
def _machine_rate(rng: random.Random) -> tuple[str, list[str], int]:
    machine, verb, things = rng.choice(MACHINES)
    rate, hours = rng.randint(3, 40), rng.randint(2, 9)
    s1, minutes = _calc(f"{hours}*60")
    s2, made = _calc(f"{minutes}*{rate}")
    steps = [f"{hours} hours is {s1} minutes.", f"The {machine} {verb} {s2} {things}."]
    facts = f"A {machine} {verb} {rate} {things} every minute."
    if rng.random() < 0.5:
        return f"{facts} How many {things} does it make in {hours} hours?", steps, made
    bad = rng.randint(5, made // 10)
    s3, good = _calc(f"{made}-{bad}")
    question = f"{facts} In {hours} hours, {bad} of its {things} are damaged. How many undamaged {things} does it make?"
    return question, [*steps, f"So {s3} {things} are undamaged."], good


@_template
def _reading_time(rng: random.Random) -> tuple[str, list[str], int]:
    name = rng.choice(NAMES)
    per_day, done = rng.randint(5, 30), rng.randint(10, 120)
    pages = per_day * rng.randint(2, 15) + done
    s1, left = _calc(f"{pages}-{done}")
    s2, days = _calc(f"{left}/{per_day}")
    question = (
        f"{name}'s book has {pages} pages. {name} has already read {done} pages and reads {per_day} pages every "
        f"day. How many more days will it take {name} to finish the book?"
    )
    return question, [f"{name} has {s1} pages left to read.", f"So it will take {s2} more days."], days


@_template
def _sharing(rng: random.Random) -> tuple[str, list[str], int]:
    name, food = rng.choice(NAMES), rng.choice(BAKES)
    trays, per_tray, friends = rng.randint(2, 6), rng.choice((6, 8, 10, 12, 15, 20, 24)), rng.randint(2, 8)
    total = trays * per_tray
    keep = (total % friends or friends) + friends * rng.randint(0, 2)
    while keep >= total:
        keep -= friends
    s1, total = _calc(f"{trays}*{per_tray}")
    s2, shared = _calc(f"{total}-{keep}")
    s3, each = _calc(f"{shared}/{friends}")
    question = (
        f"{name} bakes {trays} trays of {food} with {per_tray} {food} on each tray. {name} keeps {keep} {food} and "
        f"shares the rest equally among {friends} friends. How many {food} does each friend get?"
    )
    return (
        question,
        [f"{name} bakes {s1} {food}.", f"{name} shares {s2} {food}.", f"Each friend gets {s3} {food}."],
        each,
    )


@_template
def _discount(rng: random.Random) -> tuple[str, list[str], int]:
    name, (item, items) = rng.choice(NAMES), rng.choice(ITEMS)
    percent = rng.choice((10, 15, 20, 25, 30, 40, 50))
    step = 100 // math.gcd(percent, 100)  # a price that is a multiple of this gives a whole-dollar discount
    price, count = step * rng.randint(-(-10 // step), 200 // step), rng.randint(2, 6)
    s1, off = _calc(f"{price}*{percent}/100", money=True)
    s2, sale = _calc(f"{price}-{off}", money=True)
    s3, total = _calc(f"{count}*{sale}", money=True)
    question = (
        f"A {item} normally costs ${price}. During a sale it is {percent}% off. {name} buys {count} {items} in the "
        f"sale. How much does {name} pay?"
    )
    steps = [f"The discount on one {item} is {s1}.", f"On sale one {item} costs {s2}.", f"In total {name} pays {s3}."]
    return question, steps, total


@_template
def _ages(rng: random.Random) -> tuple[str, list[str], int]:
    a, b, c = rng.sample(NAMES, 3)
    young, times, older, years = rng.randint(3, 15), rng.choice((2, 3, 4)), rng.randint(2, 12), rng.randint(2, 10)
    word = {2: "twice", 3: "three times", 4: "four times"}[times]
    facts = f"{a} is {older} years older than {b}. {b} is {word} as old as {c}, who is {young} years old."
    s1, b_age = _calc(f"{young}*{times}")
    s2, a_age = _calc(f"{b_age}+{older}")
    steps = [f"{b} is {s1} years old.", f"{a} is {s2} years old."]
    kind = rng.randrange(3)
    if kind == 0:
        s3, answer = _calc(f"{a_age}+{years}")
        return f"{facts} How old will {a} be in {years} years?", [*steps, f"In {years} years {a} will be {s3}."], answer
    s3, total = _calc(f"{a_age}+{b_age}+{young}")
    steps.append(f"Together they are {s3} years old now.")
    if kind == 1:
        return f"{facts} What is the sum of their ages now?", steps, total
    s4, added = _calc(f"3*{years}")
    s5, answer = _calc(f"{total}+{added}")
    steps += [
        f"In {years} years each of the three is {years} years older, which adds {s4} years.",
        f"The sum of their ages will be {s5}.",
    ]
    return f"{facts} What will the sum of their ages be in {years} years?", steps, answer


@_template
def _practice_hours(rng: random.Random) -> tuple[str, list[str], int]:
    name, instrument = rng.choice(NAMES), rng.choice(INSTRUMENTS)
    while True:  # draw until the total is a whole number of hours
        minutes, days, weeks = rng.choice((15, 20, 30, 40, 45, 60, 75, 90)), rng.randint(2, 7), rng.randint(2, 8)
        if minutes * days * weeks % 60 == 0:
            break
    s1, weekly = _calc(f"{minutes}*{days}")
    s2, total = _calc(f"{weekly}*{weeks}")
    s3, hours = _calc(f"{total}/60")
    question = (
        f"{name} practises the {instrument} for {minutes} minutes a day, {days} days a week. How many hours does "
        f"{name} practise in {weeks} weeks?"
    )
    steps = [
        f"Each week {name} practises {s1} minutes.",
        f"In {weeks} weeks that is {s2} minutes.",
        f"That is {s3} hours.",
    ]
    return question, steps, hours


@_template
def _running_distance(rng: random.Random) -> tuple[str, list[str], int]:
    name, track = rng.choice(NAMES), rng.choice((200, 250, 400, 500))
    while True:  # draw until the total is a whole number of kilometres
        laps, days = rng.randint(2, 12), rng.randint(2, 10)
        if laps * track * days % 1000 == 0:
            break
    s1, daily = _calc(f"{laps}*{track}")
    s2, metres = _calc(f"{daily}*{days}")
    s3, km = _calc(f"{metres}/1000")
    question = f"{name} runs {laps} laps of a {track}-metre track every day. How many kilometres in {days} days?"
    steps = [f"Each day {name} runs {s1} metres.", f"In {days} days that is {s2} metres.", f"That is {s3} kilometres."]
    return question, steps, km


@_template
def _saving_weeks(rng: random.Random) -> tuple[str, list[str], int]:
    name, (item, _) = rng.choice(NAMES), rng.choice((*ITEMS, ("bicycle", ""), ("tent", "")))
    weekly, saved = rng.randint(3, 25), rng.randint(5, 90)
    price = weekly * rng.randint(2, 20) + saved
    s1, need = _calc(f"{price}-{saved}", money=True)
    s2, weeks = _calc(f"{need}/{weekly}")
    question = (
        f"{name} wants to buy a {item} that costs ${price}. {name} has already saved ${saved} and saves ${weekly} "
        f"every week. How many weeks will it take {name} to save enough?"
    )
    return question, [f"{name} still needs {s1}.", f"So it takes {s2} weeks."], weeks


@_template
def _earnings_left(rng: random.Random) -> tuple[str, list[str], int]:
    name, thing = rng.choice(NAMES), rng.choice(SPENDING)
    wage, hours, days = rng.randint(8, 30), rng.randint(2, 8), rng.randint(2, 7)
    s1, daily = _calc(f"{wage}*{hours}", money=True)
    s2, earned = _calc(f"{daily}*{days}", money=True)
    spent = rng.randrange(5, earned // 2)
    s3, left = _calc(f"{earned}-{spent}", money=True)
    question = (
        f"{name} earns ${wage} an hour and works {hours} hours a day for {days} days. Then {name} spends ${spent} "
        f"on {thing}. How much money does {name} have left?"
    )
    return question, [f"Each day {name} earns {s1}.", f"In total {name} earns {s2}.", f"{name} has {s3} left."], left


@_template
def _fencing(rng: random.Random) -> tuple[str, list[str], int]:
    place, length, width, cost = rng.choice(PLACES), rng.randint(5, 40), rng.randint(3, 30), rng.randint(2, 15)
    s1, half = _calc(f"{length}+{width}")
    s2, perimeter = _calc(f"{half}*2")
    s3, total = _calc(f"{perimeter}*{cost}", money=True)
    question = (
        f"A rectangular {place} is {length} metres long and {width} metres wide. Fencing costs ${cost} per metre. "
        f"How much does it cost to put a fence all the way around the {place}?"
    )
    steps = [f"One length and one width make {s1} metres.", f"The perimeter is {s2} metres.", f"The fence costs {s3}."]
    return question, steps, total


@_template
def _fractions(rng: random.Random) -> tuple[str, list[str], int]:
    name, things = rng.choice(NAMES), rng.choice(COLLECTIONS)
    parts = rng.choice((3, 4, 5))
    share = {3: "A third", 4: "A quarter", 5: "A fifth"}[parts]
    count = parts * rng.randrange(4, 30, 2 if parts == 4 else 1)  # the non-red rest must split evenly in two
    s1, red = _calc(f"{count}/{parts}")
    s2, rest = _calc(f"{count}-{red}")
    s3, green = _calc(f"{rest}/2")
    question = (
        f"{name} has {count} {things}. {share} of them are red, and the rest are split equally between blue and "
        f"green. How many {things} are green?"
    )
    return question, [f"{s1} {things} are red.", f"{s2} {things} are blue or green.", f"So {s3} are green."], green


@_template
def _travel(rng: random.Random) -> tuple[str, list[str], int]:
    vehicle = rng.choice(VEHICLES)
    v1, t1, v2, t2 = rng.randrange(30, 125, 5), rng.randint(1, 6), rng.randrange(30, 125, 5), rng.randint(1, 6)
    s1, d1 = _calc(f"{v1}*{t1}")
    s2, d2 = _calc(f"{v2}*{t2}")
    s3, total = _calc(f"{d1}+{d2}")
    question = (
        f"A {vehicle} travels at {v1} kilometres per hour for {t1} hours and then at {v2} kilometres per hour for "
        f"{t2} hours. How many kilometres does it travel in total?"
    )
    steps = [
        f"First it travels {s1} kilometres.",
        f"Then it travels {s2} kilometres.",
        f"In total it travels {s3} kilometres.",
    ]
    return question, steps, total


def split_of(question: str) -> str:
    """The split a generated question belongs to, from a hash of its text: no question can be in two splits."""
    bucket = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big") % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def generate(n: int, split: str, seed: int = 0) -> list[Problem]:
    """``n`` distinct arithmetic word problems of ``split`` in GSM8K's format; the same seed gives the same ones."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must not be negative, got {n}")
    rng = random.Random(f"{GENERATOR_VERSION}-{split}-{seed}")
    names = sorted(TEMPLATES)
    problems: list[Problem] = []
    seen: set[str] = set()
    for _ in range(100 * n + 1000):  # ~10 draws per test problem; the rest only guards against an endless loop
        if len(problems) == n:
            return problems
        question, steps, answer = TEMPLATES[rng.choice(names)](rng)
        if question in seen or split_of(question) != split:
            continue
        seen.add(question)
        problems.append(
            Problem(f"{split}-{len(problems)}", question, "\n".join(steps), str(answer), split, GENERATOR_VERSION)
        )
    if len(problems) < n:
        raise RuntimeError(f"could only generate {len(problems)} distinct {split} problems of the {n} asked")
    return problems


# ------------------------------------------------------------------------------------------ training samples

TASK = "gsm8k"


def training_answer(problem: Problem) -> str:
    """What the model learns to write: the worked solution and the ``#### N`` line, calculator annotations removed
    (the model does its own arithmetic in plain text)."""
    return strip_calculator(problem.answer_text)


def examples(problems: Sequence[Problem]) -> list[Any]:
    """Problems as chat examples: the question is the user turn, the worked solution the answer."""
    from ccmem.data.records import MemoryExample

    return [MemoryExample(p.id, [], p.question, training_answer(p), task=TASK) for p in problems]


def reasoning_sample(tokenizer: Any, question: str, solution: str, *, system: str | None = None) -> Any:
    """The question and its worked solution tokenized as :func:`ccmem.data.samples.chat_sample` does, with the
    token offsets of the solution's step ends (:func:`step_boundaries`) in ``steps``.

    The solution is tokenized piece by piece between step ends, so every step end falls between two tokens.
    ``steps["labelled"]`` holds every step end, ``steps["newline"]`` those at a line end; the end of the solution
    itself is not one (nothing is left to compress before the end of the turn).
    """
    from ccmem.data.samples import chat_sample

    frame = chat_sample(tokenizer, [], question, "", system=system)  # the question turn, then only the stop token
    query, stop = frame.tail[: frame.answer_start], frame.tail[frame.answer_start :]
    reply: list[int] = []
    labelled, newline = [], []
    start = 0
    for end in [*step_boundaries(solution), len(solution)]:
        if end <= start:
            continue
        reply += [int(t) for t in tokenizer.encode(solution[start:end], add_special_tokens=False)]
        if end < len(solution.rstrip()):
            labelled.append(len(reply))
            if solution[end - 1] == "\n":
                newline.append(len(reply))
        start = end
    return replace(
        frame,
        tail=query + reply + stop,
        steps={"labelled": sorted(set(labelled)), "newline": sorted(set(newline))},
    )
