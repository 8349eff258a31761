"""C4 as users download it, a reproducible sample of its documents, prefix/continuation pairs, and an offline
stand-in made from packaged news articles.

allenai/c4 ships ``en/c4-{train,validation}.NNNNN-of-NNNNN.json.gz`` (1024 train and 8 validation shards):
gzip-compressed JSON lines, one web page per line::

    {"text": "Beginners BBQ Class Taking Place in Missoula!\\nDo you want to get better ...",
     "timestamp": "2019-04-25T12:57:54Z", "url": "https://klyq.com/beginners-bbq-class-..."}

The same records as plain ``.jsonl``/``.json`` (a list, or JSON lines under a ``.json`` name) read alike.
:func:`read_c4` takes a file, a glob (``c4/en/c4-validation.*.json.gz``) or a folder (its ``split`` shards)
and draws ``n_docs`` documents: those with the smallest hash of (seed, file name, line), a uniform sample
that is the same on every machine, whatever order the files are listed in and wherever they lie.
:func:`prefix_and_continuation` cuts a tokenized document into a prefix to read and the continuation to
compare with what a model writes after it.

Offline, :func:`packaged_documents` draws documents in the same record shape from the news articles of the
Lee corpus packaged in gensim's test data (``gensim/test/test_data/lee_background.cor``: 300 Australian
Broadcasting Corporation news stories, one per line, 293 distinct, 45 to 620 words, median 163; installed
with ``pip install --no-deps gensim==4.4.0``; gensim itself is never imported). C4 is web text of every kind;
this is news only, and shorter documents, so report which was used. Documents go to splits by a hash of
their text, so no document is in two splits.
"""

from __future__ import annotations

import glob
import hashlib
import heapq
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ccmem.data.recordfiles import records, split_files
from ccmem.data.records import split_of
from ccmem.fileio import DatasetFormatError, package_dir

SUFFIXES = (".json.gz", ".jsonl.gz", ".jsonl", ".json")
SPLITS = ("train", "validation", "test")
PACKAGED_NEWS = "test/test_data/lee_background.cor"
GENSIM_HINT = "pip install --no-deps gensim==4.4.0"


class NewsSourceError(FileNotFoundError):
    """The packaged news articles (gensim's test data) are not installed."""


@dataclass(frozen=True)
class C4Document:
    """One C4 record; ``source`` says where it was read (``file:line``)."""

    text: str
    url: str
    timestamp: str
    source: str


def c4_files(path_or_glob: str | Path, split: str = "validation") -> list[Path]:
    """The files to read, sorted: those a glob matches, a file itself, or the ``split`` shards under a folder."""
    spec = os.path.expanduser(str(path_or_glob))
    if any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"no file matches {spec}")
        return files
    path = Path(spec)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no C4 file or folder at {path}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    expected = f"c4-{split}.NNNNN-of-NNNNN.json.gz (allenai/c4 en) or {split}.jsonl with a 'text' field"
    return split_files(path, split, SUFFIXES, expected)


def _document(record: dict[str, object], where: str) -> C4Document:
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DatasetFormatError(f"{where}: field 'text' must be a non-empty string (a C4 document)")
    url, timestamp = record.get("url"), record.get("timestamp")
    return C4Document(text, "" if url is None else str(url), "" if timestamp is None else str(timestamp), where)


def _rank(seed: int, file_name: str, where: str) -> bytes:
    """The sort key that samples: a hash of the seed, the file's name and the record's place in it."""
    return hashlib.sha256(f"{seed}\0{file_name}\0{where.rsplit(':', 1)[1]}".encode()).digest()


def _sample(ranked: Iterable[tuple[bytes, int, C4Document]], n_docs: int | None, what: str) -> list[C4Document]:
    """The ``n_docs`` documents of smallest rank (all when None), in reading order."""
    if n_docs is None:
        return [doc for _, _, doc in ranked]
    if n_docs < 1:
        raise ValueError(f"n_docs must be at least 1, got {n_docs}")
    chosen = heapq.nsmallest(n_docs, ranked, key=lambda item: item[0])
    if len(chosen) < n_docs:
        raise ValueError(f"{n_docs} documents asked for, but {what} holds only {len(chosen)}")
    return [doc for _, _, doc in sorted(chosen, key=lambda item: item[1])]


def read_c4(
    path_or_glob: str | Path, n_docs: int | None = None, seed: int = 0, *, split: str = "validation"
) -> list[C4Document]:
    """``n_docs`` documents sampled reproducibly (all of them when None), in reading order (see the module)."""
    files = c4_files(path_or_glob, split)

    def ranked() -> Iterator[tuple[bytes, int, C4Document]]:
        order = 0
        for file in files:
            for where, record in records(file):
                yield _rank(seed, file.name, where), order, _document(record, where)
                order += 1

    return _sample(ranked(), n_docs, str(path_or_glob))


def prefix_and_continuation(
    token_ids: Sequence[int], prefix_len: int, continuation_len: int
) -> tuple[list[int], list[int]]:
    """The first ``prefix_len`` tokens and the ``continuation_len`` that follow them; the rest is dropped."""
    if prefix_len < 1 or continuation_len < 1:
        raise ValueError(f"prefix_len and continuation_len must be at least 1, got {prefix_len}, {continuation_len}")
    if len(token_ids) < prefix_len + continuation_len:
        raise ValueError(
            f"a document of {len(token_ids)} tokens is shorter than the prefix ({prefix_len}) and continuation "
            f"({continuation_len}) together; skip it or ask for less"
        )
    ids = [int(t) for t in token_ids[: prefix_len + continuation_len]]
    return ids[:prefix_len], ids[prefix_len:]


def packaged_documents(split: str = "test", n_docs: int | None = None, seed: int = 0) -> list[C4Document]:
    """News documents of ``split`` from gensim's packaged Lee corpus (see the module), sampled as
    :func:`read_c4` samples; ``url`` names the packaged file and line, ``timestamp`` is empty."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = package_dir("gensim")
    path = root / PACKAGED_NEWS if root is not None else None
    if path is None or not path.is_file():
        raise NewsSourceError(f"the offline C4 stand-in reads gensim's packaged news; install it with: {GENSIM_HINT}")
    seen: set[str] = set()

    def ranked() -> Iterator[tuple[bytes, int, C4Document]]:
        with path.open(encoding="utf-8-sig") as f:
            for line_no, line in enumerate(f, start=1):
                text = line.strip()
                if not text or text in seen or split_of(text) != split:
                    continue
                seen.add(text)  # the corpus repeats 7 of its stories
                where = f"gensim:{PACKAGED_NEWS}:{line_no}"
                yield _rank(seed, path.name, where), line_no, C4Document(text, where, "", where)

    return _sample(ranked(), n_docs, f"the {split} split of {path}")
