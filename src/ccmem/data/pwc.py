"""IC-Former's data: the Pile and Prompt-with-Context (PwC) jsonl files, and PwC-style data generated offline.

* **Pile** (``{"text": ..., "meta": {"pile_set_name": ...}}`` per line; pretraining): each document is one
  context; the method cuts it into what it compresses and what it predicts.
* **PwC** (``{"input": context, "prompt": ..., "answer": ...}`` per line, sggetao/PwC; instruction finetuning and
  generation): the context is compressed, the prompt is the query, the answer is trained on / generated.

A folder gives ``train``/``validation``/``test`` files. A single file is read whole as the test split (what
``ccmem eval`` and ``ccmem generate`` read), and for training its records are assigned to train or validation by
a hash of their line (1 in 10 validates), so training never validates on what it trains on; a validation file
given as ``data.eval_path`` is read whole. Errors name the
file, line and field.

Offline, :func:`generate` writes PwC records from the packaged Wikipedia summaries (``passages.articles``):
one or two articles as the context, and a prompt of one of several kinds (describe, title, continue a quote,
first sentence), each with an answer read off the articles, and ``options``: the answer among three
distractors of the same kind (other articles' descriptions, titles or first sentences, preferring an article in
the context; other 5-word runs of the same article for a quote), so ``ccmem eval pwc`` also scores accuracy.
Articles are split by a hash of their title, as ``passages`` does, so test contexts are never trained on.
``source="news"`` (``pwc-news-v1``) draws the contexts from the packaged news stories instead
(:mod:`ccmem.data.news`; split by a hash of their lead). A story has no title or description, so there is no
title or describe kind: one story is asked for its first sentence (its lead) or to continue a quote; two stories
are asked to continue a quote or which story mentions a phrase from after its lead (answer: that story's lead;
distractors: the other story's lead first, then other leads). ``source="both"`` (``pwc-mixed-v1``) draws each
record from one source or the other at even odds; ``source="wiki"``, the default, makes the records of
``pwc-wiki-v1`` unchanged.
A PwC file may carry the same optional ``options`` field (a list of strings holding the answer).
"""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path
from typing import Any

from ccmem.data import news
from ccmem.data.formats import document_split, split_file
from ccmem.data.news import check_source, first_sentence
from ccmem.data.passages import draw_source, source_pools
from ccmem.data.records import MemoryExample
from ccmem.fileio import DatasetFormatError, jsonl_records, say_ignored_fields

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "pwc-wiki-v1"
OPTIONS_VERSION = "pwc-options-v1"  # distractors draw from their own generator: the records stay those of v1
#: the generator version of each source (``wiki`` is the first version, unchanged)
VERSIONS = {"wiki": GENERATOR_VERSION, "news": "pwc-news-v1", "both": "pwc-mixed-v1"}
N_OPTIONS = 4
PWC_FIELDS = ("input", "prompt", "answer")


def _records(path: Path, split: str, held_out: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """Records of ``split``: the split's own file in a folder, else the lines of one file hashed into splits (all of
    them for the test split, or when the file is ``held_out``: a validation file, ``data.eval_path``)."""
    if path.is_dir():
        try:
            return list(jsonl_records(split_file(path, split, (".jsonl", ".json"))))
        except FileNotFoundError:
            if split != "validation" or not (path / "val.jsonl").is_file():  # the Pile's name for it
                raise
            return list(jsonl_records(path / "val.jsonl"))
    every = list(jsonl_records(path))
    if split == "test" or held_out:
        return every

    def side(where: str) -> str:
        return "validation" if document_split(f"{path.name}:{where.rsplit(':', 1)[1]}") == "validation" else "train"

    return [(where, r) for where, r in every if side(where) == split]


def _text(record: dict[str, Any], key: str, where: str, *, allow_empty: bool = False) -> str:
    value = record.get(key)
    if key not in record:
        raise DatasetFormatError(f"{where}: missing field {key!r}")
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise DatasetFormatError(f"{where}: field {key!r} must be a non-empty string")
    return value


#: a Pile document evaluated (the test split): up to this many characters compressed, then the continuation scored
PILE_CONTEXT_CHARS = 1600  # ~400 tokens: under IC-Former's max_seq_len of 512
PILE_ANSWER_CHARS = 400


def pile(path: Path, split: str, held_out: bool = False) -> list[MemoryExample]:
    """Pile documents (``text``) as single-segment contexts, for pretraining (the method cuts them into what it
    compresses and what it predicts). The test split is evaluated as continuation: up to
    :data:`PILE_CONTEXT_CHARS` of a document's start compressed, its next word read as the query and the
    :data:`PILE_ANSWER_CHARS` after it scored (perplexity); documents too short for that are left out."""
    read = [(where, _text(r, "text", where, allow_empty=True)) for where, r in _records(path, split, held_out)]
    records = [(where, text) for where, text in read if text.strip()]
    if len(records) < len(read):  # a dump of millions of documents holds a few empty ones: not worth refusing it
        empty = next(where for where, text in read if not text.strip())
        logger.warning("%s: %d empty documents are left out (first: %s)", path, len(read) - len(records), empty)
    if split != "test":
        return [MemoryExample(where, [text], "", "", chat=False, task="pile") for where, text in records]
    made = [(where, _continuation(where, text)) for where, text in records]
    examples = [e for _, e in made if e is not None]
    if len(examples) < len(records):
        short = next(where for where, e in made if e is None)
        logger.warning(
            "%s: %d of %d documents are too short to leave a continuation to score after their context (first: "
            "%s); they are left out",
            path, len(records) - len(examples), len(records), short,
        )  # fmt: skip
    return examples


def _continuation(where: str, text: str) -> MemoryExample | None:
    text = text.strip()
    cut = text.rfind(" ", 0, min(PILE_CONTEXT_CHARS, len(text) * 3 // 4))  # at a word, a quarter left at least
    word = re.match(r"\s*\S+", text[cut:]) if cut > 0 else None
    if word is None:
        return None
    rest = text[cut + word.end() :]
    answer = rest[:PILE_ANSWER_CHARS]
    if len(rest) > PILE_ANSWER_CHARS and " " in answer.strip():
        answer = answer[: answer.rstrip().rfind(" ")]  # end at a word
    if not answer.strip():
        return None
    return MemoryExample(where, [text[:cut]], word.group(0), answer, chat=False, task="pile")


def pwc_example(where: str, record: dict[str, Any]) -> MemoryExample:
    """One PwC record: ``input`` compressed, ``prompt`` asked, ``answer`` expected."""
    context, prompt, answer = (_text(record, key, where) for key in PWC_FIELDS)
    options = record.get("options") or []
    if not isinstance(options, list) or not all(isinstance(o, str) and o.strip() for o in options):
        raise DatasetFormatError(f"{where}: field 'options' must be a list of non-empty strings")
    if options and (len(options) < 2 or len(set(options)) < len(options)):
        raise DatasetFormatError(
            f"{where}: field 'options' must hold at least two different options (one option, or the same twice, "
            f"is always chosen right or ties), got {options!r}; leave it out to score the answer alone"
        )
    if options and answer not in options:
        raise DatasetFormatError(f"{where}: field 'options' must contain the answer {answer!r}")
    return MemoryExample(where, [context], prompt_text(prompt), answer, list(options), chat=False, task="pwc")


def prompt_text(prompt: str) -> str:
    """The query as the LM reads it after the digests: the prompt, then a line break before the answer."""
    return prompt.strip() + "\n"


def pwc(path: Path, split: str, held_out: bool = False) -> list[MemoryExample]:
    records = _records(path, split, held_out)
    examples = [pwc_example(where, r) for where, r in records]
    _say_ignored(path, records)
    return examples


#: every field a PwC record may hold
PWC_RECORD_FIELDS = ("id", *PWC_FIELDS, "options")


def _say_ignored(path: Path, records: list[tuple[str, dict[str, Any]]]) -> None:
    say_ignored_fields(path, (key for _, record in records for key in record), PWC_RECORD_FIELDS, "PwC")


def read_pwc(path: Path) -> list[dict[str, Any]]:
    """Every record of a PwC file (all fields checked), in file order: what ``ccmem generate`` answers."""
    out = []
    records = list(jsonl_records(path))
    for where, record in records:
        pwc_example(where, record)  # checks every field, the optional options too
        out.append({key: record[key] for key in PWC_RECORD_FIELDS if key in record})
    _say_ignored(path, records)
    return out


# ---------------------------------------------------------------------------- offline generator

PROMPTS = {
    "describe": ("What is {title}? Answer in a few words.", "In a few words, what is {title}?"),
    "title": ("What is the text about? Give its title.", "Give this text a title."),
    "continue": ('Which words come right after "{phrase}" in the text?', 'Continue the quote: "{phrase}"'),
    "first": ("Repeat the first sentence of the text.", "What is the first sentence of the text?"),
}
#: news stories (no title): "which" asks which of two stories mentions a phrase, answered by that story's lead
NEWS_PROMPTS = {
    "which": (
        'Which of the stories mentions "{phrase}"? Give its first sentence.',
        'One story says "{phrase}". What is the first sentence of that story?',
    ),
    "continue": PROMPTS["continue"],
    "first": ("Repeat the first sentence of the story.", "What is the first sentence of the story?"),
}


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
            kind, lambda a: first_sentence(a["extract"])
        )
        candidates = [read(a) for a in others + rest if a is not target]
    out: list[str] = []
    for candidate in map(_clean, candidates):
        if candidate and candidate != answer and candidate not in out:
            out.append(candidate)
        if len(out) == N_OPTIONS - 1:
            break
    return out


def generate(n: int, split: str, *, seed: int = 0, source: str = "wiki") -> list[dict[str, Any]]:
    """``n`` PwC records of ``split`` (``input``, ``prompt``, ``answer``, ``options``) from the packaged Wikipedia
    summaries, news stories or both (``source``, see the module)."""
    version = VERSIONS[check_source(source)]
    pools = source_pools(split, source)
    options_version = OPTIONS_VERSION if source == "wiki" else f"{version}-options"
    rng = random.Random(f"{version}-{split}-{seed}")
    out: list[dict[str, Any]] = []
    while len(out) < n:
        drawn = draw_source(rng, source)
        pool = pools[drawn]
        made = (_wiki_record if drawn == "wiki" else _news_record)(rng, pool)
        if made is None:
            continue
        context, prompt, answer, kind, shown, target = made
        answer = _clean(answer)
        options_rng = random.Random(f"{options_version}-{split}-{seed}-{len(out)}")
        options = [answer, *_distractors(options_rng, kind, answer, shown, target, pool)]
        options_rng.shuffle(options)
        out.append({"input": context, "prompt": prompt, "answer": answer, "options": options})
    return out


Made = tuple[str, str, str, str, list[dict], dict]  # context, prompt, answer, kind, articles shown, the one asked


def _wiki_record(rng: random.Random, pool: list[dict]) -> Made | None:
    """One or two Wikipedia articles and a question about one (``pwc-wiki-v1``)."""
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
        prompt, answer = template, first_sentence(target["extract"])
    else:
        quote = _quote(rng, target["extract"])
        if quote is None:
            return None
        prompt, answer = template.format(phrase=quote[0]), quote[1]
    return context, prompt, answer, kind, shown, target


def _news_record(rng: random.Random, pool: list[dict]) -> Made | None:
    """One or two news stories and a question about one (see the module)."""
    shown = rng.sample(pool, rng.choice((1, 1, 2)))
    target = rng.choice(shown)
    kind = rng.choice(("first", "continue") if len(shown) == 1 else ("which", "continue"))
    context = "\n\n".join(a["extract"] for a in shown)
    template = rng.choice(NEWS_PROMPTS[kind])
    if kind == "first":
        return context, template, target["lead"], kind, shown, target
    if kind == "which":
        phrase = news.phrase_after_lead(rng, target, [a for a in shown if a is not target])
        if phrase is None:
            return None
        return context, template.format(phrase=phrase), target["lead"], kind, shown, target
    quote = _quote(rng, target["extract"])
    # a quote the context holds twice has no one continuation; one with quotation marks reads badly in quotes
    if quote is None or '"' in quote[0] or context.count(quote[0]) != 1:
        return None
    return context, template.format(phrase=quote[0]), quote[1], kind, shown, target


def generated(n: int, split: str, *, seed: int = 0, source: str = "wiki") -> list[MemoryExample]:
    """:func:`generate`'s records as examples, named by version, split and place."""
    version = VERSIONS[check_source(source)]
    records = generate(n, split, seed=seed, source=source)
    return [pwc_example(f"{version}:{split}:{i}", r) for i, r in enumerate(records)]


def write_jsonl(records: list[dict[str, Any]], path: Path) -> Path:
    """Write records as PwC jsonl (one object per line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path
