"""IC-Former's data: the Pile and Prompt-with-Context (PwC) jsonl files, and PwC-style data generated offline.

* **Pile** (``{"text": ..., "meta": {"pile_set_name": ...}}`` per line; pretraining): each document is one
  context; the method cuts it into what it compresses and what it predicts.
* **PwC** (``{"input": context, "prompt": ..., "answer": ...}`` per line, sggetao/PwC; instruction finetuning and
  generation): the context is compressed, the prompt is the query, the answer is trained on / generated.

A single file holds every split unless a folder gives ``train``/``validation``/``test`` files; then records are
assigned to splits by a hash of their line, so no record is in two splits. Errors name the file, line and field.

Offline, :func:`generate` writes PwC records from the packaged Wikipedia summaries (``passages.articles``):
one or two articles as the context, and a prompt of one of several kinds (describe, title, continue a quote,
first sentence), each with an answer read off the articles, and ``options``: the answer among three
distractors of the same kind (other articles' descriptions, titles or first sentences, preferring an article in
the context; other 5-word runs of the same article for a quote), so ``ccmem eval pwc`` also scores accuracy.
Articles are split by a hash of their title, as ``passages`` does, so test contexts are never trained on.
A PwC file may carry the same optional ``options`` field (a list of strings holding the answer).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from ccmem.data.formats import document_split, split_file
from ccmem.data.passages import articles
from ccmem.data.records import MemoryExample, split_of
from ccmem.fileio import DatasetFormatError, jsonl_records

GENERATOR_VERSION = "pwc-wiki-v1"
OPTIONS_VERSION = "pwc-options-v1"  # distractors draw from their own generator: the records stay those of v1
N_OPTIONS = 4
PWC_FIELDS = ("input", "prompt", "answer")


def _records(path: Path, split: str) -> list[tuple[str, dict[str, Any]]]:
    """Records of ``split``: the split's own file in a folder, else the lines of one file hashed into splits."""
    if path.is_dir():
        try:
            return list(jsonl_records(split_file(path, split, (".jsonl",))))
        except FileNotFoundError:
            if split != "validation" or not (path / "val.jsonl").is_file():  # the Pile's name for it
                raise
            return list(jsonl_records(path / "val.jsonl"))
    every = list(jsonl_records(path))
    return [(where, r) for where, r in every if document_split(f"{path.name}:{where.rsplit(':', 1)[1]}") == split]


def _text(record: dict[str, Any], key: str, where: str, *, allow_empty: bool = False) -> str:
    value = record.get(key)
    if key not in record:
        raise DatasetFormatError(f"{where}: missing field {key!r}")
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise DatasetFormatError(f"{where}: field {key!r} must be a non-empty string")
    return value


def pile(path: Path, split: str) -> list[MemoryExample]:
    """Pile documents (``text``) as single-segment contexts, for pretraining."""
    return [
        MemoryExample(where, [_text(r, "text", where)], "", "", chat=False, task="pile")
        for where, r in _records(path, split)
    ]


def pwc_example(where: str, record: dict[str, Any]) -> MemoryExample:
    """One PwC record: ``input`` compressed, ``prompt`` asked, ``answer`` expected."""
    context, prompt, answer = (_text(record, key, where) for key in PWC_FIELDS)
    options = record.get("options") or []
    if not isinstance(options, list) or not all(isinstance(o, str) and o.strip() for o in options):
        raise DatasetFormatError(f"{where}: field 'options' must be a list of non-empty strings")
    if options and answer not in options:
        raise DatasetFormatError(f"{where}: field 'options' must contain the answer {answer!r}")
    return MemoryExample(where, [context], prompt_text(prompt), answer, list(options), chat=False, task="pwc")


def prompt_text(prompt: str) -> str:
    """The query as the LM reads it after the digests: the prompt, then a line break before the answer."""
    return prompt.strip() + "\n"


def pwc(path: Path, split: str) -> list[MemoryExample]:
    return [pwc_example(where, r) for where, r in _records(path, split)]


def read_pwc(path: Path) -> list[dict[str, Any]]:
    """Every record of a PwC file (all fields checked), in file order: what ``ccmem generate`` answers."""
    out = []
    for where, record in jsonl_records(path):
        pwc_example(where, record)  # checks every field, the optional options too
        out.append({key: record[key] for key in (*PWC_FIELDS, "options") if key in record})
    return out


# ---------------------------------------------------------------------------- offline generator

PROMPTS = {
    "describe": ("What is {title}? Answer in a few words.", "In a few words, what is {title}?"),
    "title": ("What is the text about? Give its title.", "Give this text a title."),
    "continue": ('Which words come right after "{phrase}" in the text?', 'Continue the quote: "{phrase}"'),
    "first": ("Repeat the first sentence of the text.", "What is the first sentence of the text?"),
}


def _first_sentence(text: str) -> str:
    end = text.find(". ")
    return text[: end + 1] if 0 < end < 300 else text[:200]


def _quote(rng: random.Random, text: str) -> tuple[str, str] | None:
    words = text.split()
    if len(words) < 16:
        return None
    start = rng.randrange(0, len(words) - 12)
    return " ".join(words[start : start + 5]), " ".join(words[start + 5 : start + 10])


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _distractors(
    rng: random.Random, kind: str, answer: str, shown: list[dict], target: dict, pool: list[dict]
) -> list[str]:
    """``N_OPTIONS - 1`` distinct wrong answers of the answer's kind (see the module docstring)."""
    if kind == "continue":
        words = target["extract"].split()
        starts = list(range(len(words) - 4))
        rng.shuffle(starts)
        candidates = [" ".join(words[s : s + 5]) for s in starts]
    else:
        others = [a for a in shown if a is not target]  # the other article in the context: the hardest
        rest = rng.sample(pool, min(len(pool), 4 * N_OPTIONS))
        read = {"describe": lambda a: a["description"], "title": lambda a: a["title"]}.get(
            kind, lambda a: _first_sentence(a["extract"])
        )
        candidates = [read(a) for a in others + rest if a is not target]
    out: list[str] = []
    for candidate in map(_clean, candidates):
        if candidate and candidate != answer and candidate not in out:
            out.append(candidate)
        if len(out) == N_OPTIONS - 1:
            break
    return out


def generate(n: int, split: str, *, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` PwC records of ``split`` (``input``, ``prompt``, ``answer``, ``options``) from the packaged Wikipedia
    summaries."""
    pool = [a for a in articles() if split_of(a["title"]) == split]
    rng = random.Random(f"{GENERATOR_VERSION}-{split}-{seed}")
    out: list[dict[str, Any]] = []
    while len(out) < n:
        shown = rng.sample(pool, rng.choice((1, 1, 2)))
        target = rng.choice(shown)
        kind = rng.choice([k for k in PROMPTS if len(shown) == 1 or k == "describe"])
        context = "\n\n".join(f"{a['title']}\n{a['extract']}" if len(shown) > 1 else a["extract"] for a in shown)
        template = rng.choice(PROMPTS[kind])
        if kind == "describe":
            prompt, answer = template.format(title=target["title"]), target["description"]
        elif kind == "title":
            prompt, answer = template, target["title"]
        elif kind == "first":
            prompt, answer = template, _first_sentence(target["extract"])
        else:
            quote = _quote(rng, target["extract"])
            if quote is None:
                continue
            prompt, answer = template.format(phrase=quote[0]), quote[1]
        answer = _clean(answer)
        options_rng = random.Random(f"{OPTIONS_VERSION}-{split}-{seed}-{len(out)}")
        options = [answer, *_distractors(options_rng, kind, answer, shown, target, pool)]
        options_rng.shuffle(options)
        out.append({"input": context, "prompt": prompt, "answer": answer, "options": options})
    return out


def generated(n: int, split: str, *, seed: int = 0) -> list[MemoryExample]:
    return [pwc_example(f"{GENERATOR_VERSION}:{split}:{i}", r) for i, r in enumerate(generate(n, split, seed=seed))]


def write_jsonl(records: list[dict[str, Any]], path: Path) -> Path:
    """Write records as PwC jsonl (one object per line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path
