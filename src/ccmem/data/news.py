"""The packaged news articles as a second source of text for the question generators (``passages``, ``pwc``).

The stories are those of :func:`ccmem.data.c4.packaged_documents`: the Lee corpus in gensim's test data (293
distinct Australian Broadcasting Corporation news stories; ``pip install --no-deps gensim==4.4.0``; gensim is
never imported). Each is cut to at most 600 characters at a sentence end, as the Wikipedia extracts are.
The corpus holds a few versions of one story that differ only further on (the same opening, more paragraphs),
so a story goes to a split by a hash of its lead (below), not of its whole text as in the C4 stand-in, and only
the first story with a given lead is kept (290 of 293): no story, and no opening, is in two splits.

A story has no title and no description. Questions about one name it by its **lead**, its first sentence:
a news lead sums up the story the way a headline does. Generators therefore ask which story a phrase came
from (answer: its lead), how a quote from it continues, or for its first sentence, never for a title.

Which text a generator draws from is its ``source``: ``wiki`` (the packaged Wikipedia summaries; the default,
the generators' first versions, unchanged), ``news`` (these stories) or ``both`` (each item drawn from one or
the other at even odds). Every source has its own generator version.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache

from ccmem.data.c4 import GENSIM_HINT, SPLITS, NewsSourceError, packaged_documents
from ccmem.data.records import split_of

SOURCES = ("wiki", "news", "both")
EXTRACT_CHARS = 600


def check_source(source: str, key: str = "source") -> str:
    """``source`` if it names a source of text, else a ValueError that lists them."""
    if source not in SOURCES:
        raise ValueError(
            f"{key} must be one of {', '.join(SOURCES)} (Wikipedia summaries, news articles, or both), got {source!r}"
        )
    return source


def first_sentence(text: str) -> str:
    """The text up to its first full stop followed by a space (when within 300 characters), else 200 characters."""
    end = text.find(". ")
    return text[: end + 1] if 0 < end < 300 else text[:200]


def shorten(text: str, limit: int = EXTRACT_CHARS) -> str:
    """At most ``limit`` characters, ending at a sentence."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = cut.rfind(". ")
    return cut[: end + 1] if end > 100 else cut


@lru_cache(maxsize=1)
def _stories() -> tuple[dict[str, str], ...]:
    """Every story in file order, one per lead."""
    try:
        documents = [doc for split in SPLITS for doc in packaged_documents(split)]
    except NewsSourceError:
        raise NewsSourceError(
            f"news questions read the news articles in gensim's test data; install them with: {GENSIM_HINT}"
        ) from None
    documents.sort(key=lambda doc: int(doc.source.rsplit(":", 1)[1]))
    out: dict[str, dict[str, str]] = {}
    for doc in documents:
        extract = shorten(re.sub(r"\s+", " ", doc.text).strip())
        lead = first_sentence(extract)
        out.setdefault(lead, {"id": doc.source, "extract": extract, "lead": lead})
    return tuple(out.values())


def articles(split: str) -> tuple[dict[str, str], ...]:
    """The stories of ``split``: ``id`` (packaged file and line), ``extract`` (the story cut to 600 characters,
    spaces normalised) and ``lead`` (its first sentence), split by a hash of the lead."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return tuple(a for a in _stories() if split_of(a["lead"]) == split)


def phrase_after_lead(rng: random.Random, article: dict[str, str], avoid: list[dict[str, str]]) -> str | None:
    """4 to 7 consecutive words of the story after its lead that no story of ``avoid`` contains, or None."""
    words = article["extract"][len(article["lead"]) :].split()
    for _ in range(10):
        n = rng.randint(4, 7)
        if len(words) <= n + 2:
            return None
        start = rng.randrange(0, len(words) - n)
        phrase = " ".join(words[start : start + n]).strip(".,;:()\"'")
        if len(phrase.split()) >= 3 and '"' not in phrase and not any(phrase in other["extract"] for other in avoid):
            return phrase
    return None
