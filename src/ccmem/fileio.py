"""Atomic file writes (a crash mid-write never leaves a half-written memory, adapter or dataset) and the one
JSON-lines reader whose errors name the file and line."""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (some data packages import code ccmem
    never needs), or None when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


class DatasetFormatError(ValueError):
    """A data file that does not have the expected format; the message names file, line and field."""


def read_utf8(path: str | os.PathLike[str]) -> str:
    """The text of ``path``, a byte-order mark dropped; a file in another encoding is refused by name (the bare
    UnicodeDecodeError named neither the file nor what to do)."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DatasetFormatError(
            f"{path}: not UTF-8 text (byte {err.start} is {err.object[err.start : err.start + 1]!r}); save it as UTF-8"
        ) from None


def say_ignored_fields(path: str | os.PathLike[str], found: Iterable[str], reads: Iterable[str], fmt: str) -> None:
    """Warn once, naming the fields ``found`` in a user's records that the ``fmt`` format does not read (``reads``,
    named in the warning in the order given): a field of theirs dropped without a word looked read."""
    reads = list(reads)
    ignored = sorted(set(found) - set(reads))
    if ignored:
        several = len(ignored) > 1
        logger.warning(
            "%s: field%s %s %s not part of the %s format and %s ignored (it reads %s)",
            path, "s" if several else "", ", ".join(ignored), "are" if several else "is", fmt,
            "were" if several else "was", ", ".join(reads),
        )  # fmt: skip


def jsonl_records(path: str | os.PathLike[str], what: str = "dataset file") -> Iterator[tuple[str, dict[str, Any]]]:
    """``("<file>:<line>", record)`` for each non-empty line of a JSON-lines file of objects (gzipped when its name
    ends in ``.gz``, as C4's ``.json.gz`` shards); a line, encoding or archive that is not right is named."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    line_no = 0
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows tools) is dropped
            head = f.read(4096).lstrip()
            f.seek(0)
            if head.startswith("["):  # a JSON list of objects (as many tools export), read whole
                yield from _json_list(path, f.read())
                return
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    hint = ""
                    stripped = line.strip()
                    if stripped.endswith(",") and stripped.startswith("{"):  # a whole object, then a list's comma
                        try:
                            json.loads(stripped[:-1])
                            hint = "; drop the comma after the object: a JSON-lines file has no separators"
                        except json.JSONDecodeError:
                            pass
                    if not hint and stripped.endswith(("{", "[", ",")):  # opens or continues a pretty-printed one
                        hint = "; a JSON-lines file holds one whole object per line (not pretty-printed JSON)"
                    raise DatasetFormatError(f"{where}: not valid JSON ({err.msg}){hint}") from None
                if not isinstance(record, dict):
                    hint = " (one object per line, or the whole file one JSON list)" if isinstance(record, list) else ""
                    raise DatasetFormatError(f"{where}: expected a JSON object, got {type(record).__name__}{hint}")
                yield where, record
    except UnicodeDecodeError:
        raise DatasetFormatError(f"{path}: not UTF-8 text (near line {line_no + 1})") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise DatasetFormatError(f"{path}: not a complete gzip file ({err})") from None


def _json_list(path: Path, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """``("<file>: item <i>", record)`` for each object of a file holding one JSON list."""
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetFormatError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(records, list):
        raise DatasetFormatError(f"{path}: expected JSON lines or a JSON list of objects")
    for i, record in enumerate(records, start=1):
        where = f"{path}: item {i}"
        if not isinstance(record, dict):
            raise DatasetFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks after boot (Linux ``/proc/<pid>/stat``, field 22); None where
    that cannot be read. Two processes that held one PID in turn differ in it."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _writer_gone(pid: int, started: int | None) -> bool:
    """Whether the process that wrote a temporary (named with its ``pid`` and, where known, its start ``started``)
    is gone: no process has that PID, or the one that has it started at another time (the system reused the PID
    after the writer died, quickly in a container)."""
    if not _alive(pid):
        return True
    return started is not None and _start_ticks(pid) not in (None, started)


def temporary_prefix(name: str) -> str:
    """The start of the name of a temporary that will become ``name`` (``mkstemp``/``mkdtemp`` add a random part and
    ``.tmp``): the writer's pid and start, which :func:`sweep_stale_temporaries` reads back."""
    started = _start_ticks(os.getpid())
    return f".{name}.{os.getpid()}{'' if started is None else f'-{started}'}."


def temporary_of(name: str) -> tuple[str, int, int | None] | None:
    """``(file name, writer's pid, writer's start in clock ticks or None)`` of a temporary that :func:`atomic_path`
    names ``.<name>.<pid>-<start>.<random>.tmp`` (``.<name>.<pid>.<random>.tmp`` where the start cannot be read,
    and before ccmem recorded it); None for any other name."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    parts = name[1 : -len(".tmp")].rsplit(".", 2)
    if len(parts) != 3 or not parts[0]:
        return None
    pid, _, started = parts[1].partition("-")
    if not pid.isdigit() or (started and not started.isdigit()):
        return None
    return parts[0], int(pid), int(started) if started else None


def sweep_stale_temporaries(path: Path) -> list[Path]:
    """Remove temporaries of ``path`` left by a process that was killed mid-write (``kill -9``); return them.

    :func:`atomic_path` names its temporary ``.<name>.<pid>-<start>.<random>.tmp``; one whose writer is no longer
    running (no process has its PID, or the one that has it started at another time) can never be renamed into
    place, so it is only taking space (a folder's, such as a built-in model's
    copy in the cache, hundreds of MB).
    """
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        made = temporary_of(tmp.name)
        if made is not None and made[0] == path.name and _writer_gone(made[1], made[2]):
            with contextlib.suppress(OSError):
                if tmp.is_dir() and not tmp.is_symlink():
                    shutil.rmtree(tmp)
                else:
                    tmp.unlink()
                removed.append(tmp)
    return removed


def readable_by_all(folder: Path) -> None:
    """Give ``folder`` and what it holds the permissions of a folder and files made normally (what the umask
    leaves of 0o777 and 0o666): ``mkdtemp`` makes the folder private, so a shared cache (``$CCMEM_CACHE`` filled
    by root in an image, read by another user) could not be read, and the copy was made again or failed."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
    os.chmod(folder, 0o777 & ~umask)


def file_in_the_way(folder: Path) -> Path | None:
    """``folder`` or the first of its parents that exists and is not a folder (so ``folder`` cannot be made),
    else None: found before long work, not when its results are written."""
    return next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)


def _fsync(path: str | os.PathLike[str]) -> None:
    """Flush a file's data (or a folder's entries) to disk; a file system that cannot (some network mounts, or
    folders on Windows) is left to its own guarantees."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    A crash leaves the previous file intact; the temporary a killed process leaves behind is swept by the next
    write of the same file. The data is flushed to disk before the rename, and the rename after it, so a power
    cut too leaves either file whole (what a session store's committed version relies on).
    """
    path = Path(path)
    if path.is_dir() or (path.exists() and not path.is_symlink() and not path.is_file()):
        # a rename would put a regular file where a device, pipe or socket was (as root: /dev/null)
        kind = "a directory" if path.is_dir() else "not a regular file (a device, pipe or socket)"
        raise OSError(errno.EINVAL, f"cannot write {path}: it is {kind}; give the path of a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path.name), suffix=".tmp")
    except OSError as err:  # said of the file asked for, not of the temporary's made-up name
        raise OSError(err.errno, f"cannot write {path} ({err.strerror})") from None
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it the permissions of an ordinary file
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
