"""Records of the files text corpora are downloaded as, and the files of one split in a dataset folder.

:func:`records` reads, whatever the corpus:

* **JSON lines**, plain (``.jsonl``) or gzip-compressed (``.jsonl.gz``, ``.json.gz``: how allenai/c4 ships);
* **JSON** (``.json``): a list of objects, ``{"data": [...]}``, or JSON lines under a ``.json`` name (what
  ``datasets.Dataset.to_json`` writes);
* **parquet** (``.parquet``; the Hugging Face hub layout, needs pyarrow), reading only the columns asked for.

Every error is a :class:`~ccmem.fileio.DatasetFormatError` naming the file, and the line or record.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ccmem.fileio import DatasetFormatError, jsonl_records, read_utf8

RECORD_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")
EVAL_HINT = "pip install 'ccmem[eval]'"
#: The names a split's files answer to (``validation`` also to ``valid`` and ``dev``).
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "dev"), "test": ("test",)}


def has_suffix(path: Path, suffixes: Iterable[str]) -> bool:
    """Whether ``path``'s name ends with one of ``suffixes`` (which may hold two dots: ``.json.gz``)."""
    return any(path.name.endswith(s) for s in suffixes)


def records(path: str | Path, *, columns: tuple[str, ...] = ()) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, record)`` for each record of a JSON-lines (maybe gzip), JSON or parquet file.

    ``columns``: for parquet, read only these (each must exist); other formats yield whole records.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no dataset file at {path}")
    if path.name.endswith(".parquet"):
        yield from _parquet(path, columns)
    elif path.name.endswith(".gz"):
        yield from jsonl_records(path)
    elif path.name.endswith(".json"):
        yield from json_records(path)
    elif path.name.endswith(".jsonl"):
        yield from jsonl_records(path)
    else:
        raise DatasetFormatError(f"{path}: expected one of {', '.join(RECORD_SUFFIXES)}")


def _object(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise DatasetFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def json_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, record)`` for each record of a ``.json`` file: a list of objects, ``{"data": [...]}``, one
    object, or JSON lines under a ``.json`` name."""
    try:
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError as err:
        if err.msg != "Extra data":
            raise DatasetFormatError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        yield from jsonl_records(path)  # JSON lines under a .json name
        return
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    elif isinstance(data, dict):
        data = [data]  # JSON lines of one record
    if not isinstance(data, list):
        raise DatasetFormatError(f"{path}: expected a JSON list of objects, or one object per line")
    for i, record in enumerate(data):
        yield f"{path}:record {i + 1}", _object(record, f"{path}:record {i + 1}")


def _parquet(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: {EVAL_HINT}") from None
    try:
        table_file = pq.ParquetFile(path)
        names = table_file.schema_arrow.names
        missing = [c for c in columns if c not in names]
        if missing:
            raise DatasetFormatError(f"{path}: no column {missing[0]!r} (it has {', '.join(names) or 'none'})")
        table = table_file.read(columns=list(columns) or None)
    except (pa.ArrowInvalid, OSError) as err:
        raise DatasetFormatError(f"{path}: not a readable parquet file ({err})") from None
    for i, record in enumerate(table.to_pylist()):
        yield f"{path}:record {i + 1}", record


def split_files(folder: Path, split: str, suffixes: tuple[str, ...], expected: str) -> list[Path]:
    """The files of ``split`` under ``folder``, sorted (shards like ``test-00000-of-00002.parquet`` together).

    A file belongs to ``split`` when its name holds one of the split's names (``validation`` also answers to
    ``valid`` and ``dev``) between separators. Files of one split in two folders (``wikitext-2-raw-v1`` beside
    ``wikitext-103-raw-v1``) are refused rather than mixed; ``expected`` says in the error what was looked for.
    """
    names = SPLIT_NAMES[split]
    pattern = re.compile(rf"(^|[_\-.])({'|'.join(names)})([_\-.]|$)")
    found = sorted(p for p in folder.rglob("*") if p.is_file() and has_suffix(p, suffixes) and pattern.search(p.name))
    if not found:
        raise DatasetFormatError(f"{folder}: no {split} split; expected {expected}")
    parents = sorted({p.parent for p in found})
    if len(parents) > 1:
        raise DatasetFormatError(
            f"{folder}: {split} files in {len(parents)} folders ({', '.join(str(p) for p in parents)}); "
            "point at one of them"
        )
    kinds = sorted({next(s for s in suffixes if p.name.endswith(s)) for p in found})
    if len(kinds) > 1:
        raise DatasetFormatError(f"{parents[0]}: {split} files in several formats ({', '.join(kinds)}); keep one")
    return found
