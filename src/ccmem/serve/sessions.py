"""Named sessions that outlive a process: a compressed memory, its transcript and the settings that made it.

One :class:`SessionStore` is a folder::

    <root>/sessions.db                          SQLite (WAL): one row per session, one per transcript message
    <root>/memories/<owner>/<name>.<version>.safetensors   the memory of each saved version

A save takes SQLite's write lock and checks the version it read, writes the new memory file (atomically, under
the next version number), then commits the new version and the new transcript messages in that one transaction,
then removes the previous file (so a save that loses a race never overwrites the winner's file). A process
killed at any point leaves the last committed version loadable and the database consistent: a file of a version
that was never committed is ignored (and overwritten by the next save of that version); a file of an older
version that survived the kill is swept on the next save; the temporary file of a write that was killed is swept
when the store is opened and when its session is deleted.

Sessions belong to an *owner* (the hash of a bearer token for the server; ``""`` for local use): another owner
neither sees nor can guess them (its lookups answer "no such session", as for a name never used).
``ccmem chat --session NAME``, the Python API (:meth:`SessionStore.open`) and ``ccmem serve`` share one store.
:class:`BaseSessionStore` holds what every store shares (the rules of a save, ``open``/``commit`` with a
:class:`CompressedLM`); :class:`ccmem.serve.redis_store.RedisSessionStore` keeps sessions in Redis instead, so
that several server processes share them.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ccmem.chat import Message
from ccmem.fileio import file_in_the_way, sweep_stale_temporaries, temporary_of
from ccmem.memory import CompactMemory, Memory, MemoryMismatchError, weights_differ

if TYPE_CHECKING:
    from ccmem.api import CompressedLM

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# a session's memory file: NAME.VERSION.safetensors
MEMORY_FILE_PATTERN = re.compile(r"^(?P<name>.+)\.\d+\.safetensors$")
NAME_RULE = "1-64 characters: letters, digits, '_', '-', '.', starting with a letter or digit, without '..'"
StoreT = TypeVar("StoreT", bound="BaseSessionStore")


class SessionError(ValueError):
    """A session request that cannot be served; the message says why and what to do."""


class UnknownSessionError(SessionError, KeyError):
    """No session of that name for this owner."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class SessionExistsError(SessionError):
    """A session of that name already exists for this owner."""


class SessionMismatchError(SessionError):
    """The session was made with another model, method, adapter or options than the one asked to use it."""


class SessionLimitError(SessionError):
    """The store holds as many sessions as it may (``max_sessions``): one must be deleted first."""


def limit_message(max_sessions: int) -> str:
    return (
        f"the store holds its limit of {max_sessions} sessions; delete one first (DELETE /v1/sessions/NAME, "
        "`ccmem sessions delete NAME`, or SessionStore.delete) or give the server a larger --max-sessions"
    )


class StoreError(SessionError):
    """The store's database cannot be used (not a SQLite file, made by a newer ccmem, ...)."""


class StoreFailedError(StoreError):
    """The store failed at an operation that a working one does (a disk full or read-only, a database locked too
    long); ``cause`` is the database's or the file system's error."""

    def __init__(self, message: str, cause: BaseException):
        super().__init__(message)
        self.cause = cause


class DamagedSessionError(SessionError):
    """The stored memory of a session cannot be read back (missing, cut short, hand-edited): the store's fault,
    not the request's. ``public`` is the message without the store's file paths."""

    def __init__(self, message: str, public: str):
        super().__init__(message)
        self.public = public


class VersionConflictError(SessionError):
    """The session changed since it was read (another request or process saved it first)."""


def check_name(name: str) -> str:
    """``name`` if it is a safe session name (usable in a file path), else :class:`SessionError`."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise SessionError(f"invalid session name {name!r}: use {NAME_RULE}")
    return name


def owner_of(token: str | None) -> str:
    """The owner id of a bearer token (its hash: tokens are never stored), or ``""`` without one."""
    return hashlib.sha256(token.encode()).hexdigest()[:32] if token else ""


@dataclass(frozen=True)
class SessionRecord:
    """What the store knows about one session (the memory itself is read by :meth:`SessionStore.memory`)."""

    name: str
    owner: str
    identity: dict[str, str]  # the method's memory_meta: model fingerprint, method, options, adapter hash
    settings: dict[str, Any]  # how to recreate the session: model, method, adapter path, options, system prompt
    transcript: list[Message]
    version: int
    memory_bytes: int
    memory_slots: int
    created: float
    updated: float

    @property
    def turns(self) -> int:
        """Finished user messages in the transcript."""
        return sum(1 for m in self.transcript if m["role"] == "user")


def unknown_session(name: str, owner: str = "") -> UnknownSessionError:
    """The error for a session ``name`` that this owner does not have (the same words from every store)."""
    if owner:  # a bearer token's: local sessions (ccmem chat, the Python API) belong to no token
        return UnknownSessionError(
            f"no session {name!r} for this token; a session belongs to the token that created it (sessions of "
            "`ccmem chat --session` belong to none: a server started without --token reaches them); create it "
            "with POST /v1/sessions"
        )
    return UnknownSessionError(
        f"no session {name!r}; create it first (ccmem chat --session {name} creates it, the server "
        "creates one with POST /v1/sessions)"
    )


def check_update(record: SessionRecord, transcript: Sequence[Message], expect_version: int | None) -> None:
    """Refuse a save of ``transcript`` over ``record``: a stale ``expect_version``, or a transcript that does not
    extend the stored one (every store applies these rules before writing)."""
    if expect_version is not None and record.version != expect_version:
        raise VersionConflictError(
            f"session {record.name!r} was saved by another request (version {record.version}, expected "
            f"{expect_version}); read it again and retry"
        )
    old = record.transcript
    if list(transcript[: len(old)]) != old:
        raise SessionError(f"the new transcript of session {record.name!r} does not extend the stored one")


class BaseSessionStore(abc.ABC):
    """What the engine, ``ccmem chat --session`` and the Python API need of a session store.

    Subclasses keep records, transcripts and memories (:class:`SessionStore` in SQLite and files, the Redis store
    in Redis); ``open``/``commit`` with a :class:`CompressedLM` are shared. ``max_sessions`` bounds
    :meth:`create` (all owners together; None: no bound).
    """

    max_sessions: int | None

    @abc.abstractmethod
    def get(self, name: str, owner: str = "") -> SessionRecord:
        """The session ``name`` of ``owner``; :class:`UnknownSessionError` if there is none."""

    @abc.abstractmethod
    def exists(self, name: str, owner: str = "") -> bool:
        """Whether ``owner`` has a session ``name``."""

    @abc.abstractmethod
    def list(self, owner: str = "") -> list[SessionRecord]:
        """The sessions of ``owner``, most recently updated first."""

    @abc.abstractmethod
    def count(self) -> int:
        """Sessions of all owners (the server's limit counts them all)."""

    @abc.abstractmethod
    def create(self, name: str, identity: dict[str, str], settings: dict[str, Any], owner: str = "") -> SessionRecord:
        """A new, empty session; :class:`SessionExistsError` if the name is taken (for this owner)."""

    @abc.abstractmethod
    def save(
        self,
        name: str,
        memory: Memory | CompactMemory,
        transcript: Sequence[Message],
        owner: str = "",
        *,
        expect_version: int | None = None,
    ) -> SessionRecord:
        """Store the next version: ``memory`` and the whole ``transcript`` (:func:`check_update`'s rules)."""

    @abc.abstractmethod
    def delete(self, name: str, owner: str = "") -> None:
        """Remove the session, its transcript and its memory."""

    @abc.abstractmethod
    def memory(self, record: SessionRecord, **load_kwargs: Any) -> Memory | None:
        """The memory of ``record``'s version, validated; None before the first save."""

    @abc.abstractmethod
    def lock(self, name: str, owner: str = "") -> contextlib.AbstractAsyncContextManager[Any]:
        """An async lock held while one request works on the session."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the store's connections."""

    def __enter__(self: StoreT) -> StoreT:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ with a CompressedLM

    def open(self, name: str, session: CompressedLM, owner: str = "", *, create: bool = True) -> SessionRecord:
        """Put the stored memory and transcript of ``name`` into ``session`` (creating the session if ``create``).

        Refuses (:class:`SessionMismatchError`) a session made with another model, method, options or adapter,
        naming what differs.
        """
        identity = session.method.memory_meta(session.lm)
        if not self.exists(name, owner):
            if not create:
                self.get(name, owner)  # raises UnknownSessionError
            record = self.create(name, identity, settings_of(session), owner)
            return self.save(name, session.memory, session.history, owner, expect_version=record.version)
        record = self.get(name, owner)
        check_identity(record, identity, settings_of(session))
        self.restore(record, session, identity)
        return record

    def restore(self, record: SessionRecord, session: CompressedLM, identity: dict[str, str]) -> None:
        """Put ``record``'s stored memory and transcript into ``session`` (nothing before the first save); a
        memory that cannot be read back (missing, cut short, hand-edited) raises :class:`DamagedSessionError`."""
        try:
            # the digest last, in session.restore: a specific message first where one applies
            memory = self.memory(
                record, expect=identity, shape=session.lm.kv_shape, device=session.lm.device, verify=False
            )
            if memory is not None:
                session.restore(memory, record.transcript)
        except MemoryMismatchError as err:
            what = f"session {record.name!r} (version {record.version}) cannot be restored"
            todo = (
                f"delete the session to start it over (`ccmem sessions delete {record.name}`, or DELETE "
                f"/v1/sessions/{record.name} on a server) or use another name"
            )
            raise DamagedSessionError(
                f"{what}: {err}; {todo}",
                f"{what}: its stored memory is missing or damaged (the server log names the file); {todo}",
            ) from None

    def commit(
        self, name: str, session: CompressedLM, owner: str = "", *, expect_version: int | None = None
    ) -> SessionRecord:
        """Save ``session``'s memory and transcript as the next version of ``name``."""
        return self.save(name, session.memory, session.history, owner, expect_version=expect_version)


class SessionStore(BaseSessionStore):
    """Sessions in SQLite plus safetensors memory files under ``root`` (created if missing).

    Thread-safe (one connection guarded by a lock); several processes may share one store (SQLite WAL with a
    busy timeout), and :meth:`save` with ``expect_version`` refuses to overwrite a version it did not read.
    """

    def __init__(self, root: str | os.PathLike[str], *, max_sessions: int | None = None):
        self.root = Path(root).expanduser()
        self.max_sessions = max_sessions
        blocked = file_in_the_way(self.root)
        if blocked is not None:
            where = "is a file" if blocked == self.root else f"cannot be made: {blocked} is a file"
            raise StoreError(f"the session store {self.root} {where}; give a folder (it holds sessions.db)")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(
                f"cannot make the session store {self.root} ({err.strerror}); give a folder you can write"
            ) from None
        self.db_path = self.root / "sessions.db"
        self._lock = threading.RLock()
        # a lock lives while a request holds or awaits it: names asked for once do not pile up for good
        self._session_locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = weakref.WeakValueDictionary()
        orphans = [] if self.db_path.exists() else list((self.root / "memories").rglob("*.safetensors"))
        if orphans:  # a new empty index would hide these sessions, and the next save of a name would reuse it
            raise StoreError(
                f"the session store {self.root} holds {len(orphans)} session memory files (e.g. {orphans[0]}) but "
                "no sessions.db, the index of its sessions and their transcripts: it was deleted or moved. Put it "
                f"back, or move {self.root / 'memories'} away to start an empty store there"
            )
        try:
            self._db = sqlite3.connect(self.db_path, timeout=30.0, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a committed version survives a power cut too
            self._db.execute("PRAGMA foreign_keys=ON")
            self._create_schema()
        except (sqlite3.DatabaseError, StoreFailedError) as failure:
            cause = failure.cause if isinstance(failure, StoreFailedError) else failure
            if not os.access(self.root, os.W_OK) or "readonly" in str(cause):
                raise StoreError(
                    f"the session store {self.root} cannot be written ({cause}); give a folder this user can write"
                ) from None
            raise StoreError(
                f"{self.db_path} is not a ccmem session database ({cause}); point the store at another folder "
                "or move that file away"
            ) from None
        self._sweep_temporaries()

    # ------------------------------------------------------------------ schema

    def _create_schema(self) -> None:
        with self._transaction() as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if tables and "store_info" not in tables:  # another application's database: never write into it
                raise StoreError(
                    f"{self.db_path} is an SQLite database of another application (tables: "
                    f"{', '.join(sorted(tables))}), not a ccmem session store; point the store at another folder"
                )
            db.execute("CREATE TABLE IF NOT EXISTS store_info (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = db.execute("SELECT value FROM store_info WHERE key='schema_version'").fetchone()
            if row is None:
                db.execute("INSERT INTO store_info VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.db_path} was written by a newer ccmem (schema {row[0]}, this one reads "
                    f"{SCHEMA_VERSION}); upgrade ccmem"
                )
            db.execute(
                """CREATE TABLE IF NOT EXISTS sessions (
                    owner TEXT NOT NULL, name TEXT NOT NULL,
                    identity TEXT NOT NULL, settings TEXT NOT NULL,
                    version INTEGER NOT NULL DEFAULT 0,
                    memory_bytes INTEGER NOT NULL DEFAULT 0, memory_slots INTEGER NOT NULL DEFAULT 0,
                    created REAL NOT NULL, updated REAL NOT NULL,
                    PRIMARY KEY (owner, name))"""
            )
            db.execute(
                """CREATE TABLE IF NOT EXISTS messages (
                    owner TEXT NOT NULL, name TEXT NOT NULL, seq INTEGER NOT NULL,
                    role TEXT NOT NULL, content TEXT NOT NULL,
                    PRIMARY KEY (owner, name, seq),
                    FOREIGN KEY (owner, name) REFERENCES sessions (owner, name) ON DELETE CASCADE)"""
            )

    def _failed(self, err: sqlite3.Error | OSError) -> StoreFailedError:
        """The store's own failure (a disk full or gone read-only, a database locked past the timeout) as a
        :class:`StoreError`: the server answers 503, not the request's fault, and the CLI prints one line."""
        return StoreFailedError(
            f"the session store {self.root} failed ({err}); nothing of this change was kept: check that its disk "
            "has room and that this user can write it, then retry",
            err,
        )

    @contextlib.contextmanager
    def _transaction(self, undo: Sequence[Callable[[], object]] = ()) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: other processes wait instead of failing mid-way). Whatever fails,
        the COMMIT included, rolls it back whole, running ``undo`` first (still under the write lock, so another
        process's write cannot come between); the store's own errors come out as :class:`StoreError`."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as err:
                raise self._failed(err) from None
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException as err:
                for step in undo:
                    with contextlib.suppress(OSError):
                        step()
                with contextlib.suppress(sqlite3.Error):  # a failed COMMIT may have ended the transaction already
                    self._db.execute("ROLLBACK")
                if isinstance(err, sqlite3.Error | OSError) and not isinstance(err, sqlite3.IntegrityError):
                    raise self._failed(err) from None
                raise

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: its statements see one version of the store, so a session's row and its
        transcript never come from two saves of another process."""
        with self._lock:
            try:
                self._db.execute("BEGIN")
            except sqlite3.Error as err:
                raise self._failed(err) from None
            try:
                yield self._db
            except sqlite3.Error as err:
                raise self._failed(err) from None
            finally:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def lock(self, name: str, owner: str = "") -> contextlib.AbstractAsyncContextManager[Any]:
        """An async lock held while one request works on the session (in this process; several processes on one
        SQLite store rely on :meth:`save`'s version check instead, and the Redis store locks across them)."""
        with self._lock:  # get-or-make in one step: two threads asking at once share one lock
            held = self._session_locks.get((owner, name))
            if held is None:
                held = self._session_locks[(owner, name)] = asyncio.Lock()
            return held

    # ------------------------------------------------------------------ files

    def _folder(self, owner: str) -> Path:
        return self.root / "memories" / (owner or "local")

    def memory_path(self, record: SessionRecord) -> Path | None:
        """The memory file of the record's version (None before the first save)."""
        if record.version == 0:
            return None
        return self._folder(record.owner) / f"{record.name}.{record.version}.safetensors"

    def _memory_files(self, owner: str, name: str) -> Iterator[tuple[int, Path]]:
        """(version, path) of every memory file of session ``name``: ``NAME.VERSION.safetensors`` only, never the
        files of a session whose name merely starts with ``NAME.`` (``zed.x.2.safetensors`` is not ``zed``'s)."""
        for path in self._folder(owner).glob(f"{name}.*.safetensors"):
            version = path.name[len(name) + 1 : -len(".safetensors")]
            if version.isdigit():
                yield int(version), path

    def _sweep(self, owner: str, name: str, keep: int) -> None:
        """Remove memory files of versions older than ``keep`` (left by a save that was killed before cleanup)."""
        for version, path in self._memory_files(owner, name):
            if version < keep:
                with contextlib.suppress(OSError):
                    path.unlink()

    def _sweep_temporaries(self, owner: str | None = None, name: str | None = None) -> None:
        """Remove the temporaries of memory files whose writer was killed mid-write (of one session, or of all);
        only files named as the store names them, and only of a writer no longer running (a save in progress in
        another process keeps its own)."""
        folders = [self._folder(owner)] if owner is not None else (self.root / "memories").glob("*")
        for folder in folders:
            for tmp in folder.glob(".*.tmp"):
                made = temporary_of(tmp.name)  # the memory file it was to become, and who wrote it
                match = MEMORY_FILE_PATTERN.match(made[0]) if made is not None else None
                if made and match and NAME_PATTERN.match(match["name"]) and name in (None, match["name"]):
                    sweep_stale_temporaries(folder / made[0])

    # ------------------------------------------------------------------ queries

    def _record(self, db: sqlite3.Connection, row: tuple[Any, ...]) -> SessionRecord:
        """The record of a ``sessions`` row, with its transcript read in the same :meth:`_snapshot`."""
        owner, name, identity, settings, version, nbytes, slots, created, updated = row
        messages = db.execute(
            "SELECT role, content FROM messages WHERE owner=? AND name=? ORDER BY seq", (owner, name)
        ).fetchall()
        return SessionRecord(
            name=name,
            owner=owner,
            identity=json.loads(identity),
            settings=json.loads(settings),
            transcript=[{"role": r, "content": c} for r, c in messages],
            version=version,
            memory_bytes=nbytes,
            memory_slots=slots,
            created=created,
            updated=updated,
        )

    _COLUMNS = "owner, name, identity, settings, version, memory_bytes, memory_slots, created, updated"

    def get(self, name: str, owner: str = "") -> SessionRecord:
        """The session ``name`` of ``owner``; :class:`UnknownSessionError` if there is none."""
        check_name(name)
        with self._snapshot() as db:
            row = db.execute(f"SELECT {self._COLUMNS} FROM sessions WHERE owner=? AND name=?", (owner, name)).fetchone()
            if row is None:
                raise unknown_session(name, owner)
            return self._record(db, row)

    def exists(self, name: str, owner: str = "") -> bool:
        check_name(name)
        with self._snapshot() as db:
            row = db.execute("SELECT 1 FROM sessions WHERE owner=? AND name=?", (owner, name)).fetchone()
        return row is not None

    def list(self, owner: str = "") -> list[SessionRecord]:
        """The sessions of ``owner``, most recently updated first."""
        with self._snapshot() as db:
            rows = db.execute(
                f"SELECT {self._COLUMNS} FROM sessions WHERE owner=? ORDER BY updated DESC", (owner,)
            ).fetchall()
            return [self._record(db, row) for row in rows]

    def count(self) -> int:
        """Sessions of all owners (the server's limit counts them all)."""
        with self._snapshot() as db:
            return int(db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0])

    # ------------------------------------------------------------------ changes

    def create(self, name: str, identity: dict[str, str], settings: dict[str, Any], owner: str = "") -> SessionRecord:
        """A new, empty session; :class:`SessionExistsError` if the name is taken (for this owner)."""
        check_name(name)
        now = time.time()
        with self._transaction() as db:
            if self.max_sessions is not None:
                n = int(db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0])
                if n >= self.max_sessions:
                    raise SessionLimitError(limit_message(self.max_sessions))
            try:
                db.execute(
                    "INSERT INTO sessions (owner, name, identity, settings, created, updated) VALUES (?,?,?,?,?,?)",
                    (owner, name, json.dumps(identity, sort_keys=True), json.dumps(settings), now, now),
                )
            except sqlite3.IntegrityError:
                raise SessionExistsError(f"a session named {name!r} exists already; pick another name") from None
        return self.get(name, owner)

    def save(
        self,
        name: str,
        memory: Memory | CompactMemory,
        transcript: Sequence[Message],
        owner: str = "",
        *,
        expect_version: int | None = None,
    ) -> SessionRecord:
        """Store a new version: ``memory`` and the whole ``transcript`` (which must extend the stored one).

        ``expect_version``: refuse (:class:`VersionConflictError`) if another save happened since that version
        was read, instead of silently dropping its turns.
        """
        record = self.get(name, owner)
        check_update(record, transcript, expect_version)
        old = record.transcript
        version = record.version + 1
        folder = self._folder(owner)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise self._failed(err) from None
        path = folder / f"{name}.{version}.safetensors"
        now = time.time()
        undo: list[Callable[[], object]] = []
        with self._transaction(undo) as db:
            current = db.execute("SELECT version FROM sessions WHERE owner=? AND name=?", (owner, name)).fetchone()
            if current is None:
                raise UnknownSessionError(f"session {name!r} was deleted while it was being saved")
            if current[0] != record.version:
                raise VersionConflictError(
                    f"session {name!r} was saved by another request meanwhile (version {current[0]}); retry"
                )
            # written under the write lock, once the version is known to be free: a save that loses the race to
            # another process must not overwrite the memory file of the version that process just committed
            memory.save(path)  # atomic; not yet the session's memory: the commit below makes it so
            undo.append(lambda: path.unlink(missing_ok=True))  # if that commit fails, the file is nobody's
            db.executemany(
                "INSERT INTO messages (owner, name, seq, role, content) VALUES (?,?,?,?,?)",
                [(owner, name, i, m["role"], m["content"]) for i, m in enumerate(transcript) if i >= len(old)],
            )
            db.execute(
                "UPDATE sessions SET version=?, memory_bytes=?, memory_slots=?, updated=? WHERE owner=? AND name=?",
                (version, memory.nbytes, memory.num_slots, now, owner, name),
            )
        self._sweep(owner, name, keep=version)
        return self.get(name, owner)

    def delete(self, name: str, owner: str = "") -> None:
        """Remove the session, its transcript and its memory files. A delete that fails (its commit included)
        leaves the session whole: the files go only once the deletion is committed."""
        self.get(name, owner)  # unknown -> UnknownSessionError
        with self._transaction() as db:
            db.execute("DELETE FROM messages WHERE owner=? AND name=?", (owner, name))
            db.execute("DELETE FROM sessions WHERE owner=? AND name=?", (owner, name))
        try:
            # under a write lock again, which a save holds while it writes its file: between the two, another
            # process may have re-created the name and saved its version 1, whose file must stay
            with self._transaction() as db:
                if db.execute("SELECT 1 FROM sessions WHERE owner=? AND name=?", (owner, name)).fetchone() is None:
                    for _, path in self._memory_files(owner, name):
                        with contextlib.suppress(OSError):
                            path.unlink()
        except StoreError as err:  # the session is gone; its files are left over, read by nothing
            logger.warning("session %r was deleted but its memory files were not removed: %s", name, err)
        self._sweep_temporaries(owner, name)

    # ------------------------------------------------------------------ memories

    def memory(self, record: SessionRecord, **load_kwargs: Any) -> Memory | None:
        """The memory of ``record``'s version, validated (``load_kwargs`` as :func:`ccmem.memory.load_memory`);
        None before the first save."""
        path = self.memory_path(record)
        if path is None:
            return None
        if not path.is_file():
            with self._snapshot() as db:
                current = db.execute(
                    "SELECT version FROM sessions WHERE owner=? AND name=?", (record.owner, record.name)
                ).fetchone()
            if current is not None and current[0] != record.version:  # swept by a newer save: not damaged
                raise VersionConflictError(
                    f"session {record.name!r} was saved by another request since it was read (version "
                    f"{current[0]}, read {record.version}); read it again"
                )
            raise MemoryMismatchError(
                f"the memory file of session {record.name!r} (version {record.version}) is missing: {path}"
            )
        return Memory.load(path, **load_kwargs)


def settings_of(session: CompressedLM) -> dict[str, Any]:
    """What a session was made with, in the user's terms (shown by stats; the identity is what is checked)."""
    return {
        "model": session.lm.name,
        "method": session.method.name,
        "options": {
            k: v if isinstance(v, int | float | str | bool) or v is None else str(v)
            for k, v in session.method.options().items()
        },
        "adapter": session.method.adapter_hash if session.method.trainable else None,
        "system_prompt": session.system_prompt,
    }


def check_identity(record: SessionRecord, identity: dict[str, str], settings: dict[str, Any] | None = None) -> None:
    """Refuse to use ``record`` with a model/method/adapter whose memory identity differs, naming the difference
    (and, given the :func:`settings_of` of what it is being used with, its model and method by name too)."""
    # The most fundamental difference first: another model also means another adapter (adapters are per model),
    # and "adapter" sorts before "model", so a plain sort would blame the adapter.
    first = ("model", "stage1", "method", "adapter")
    keys = set(record.identity) | set(identity)
    for key in [k for k in first if k in keys] + sorted(keys - set(first)):
        have, want = record.identity.get(key, ""), identity.get(key, "")
        if key == "weights" and not weights_differ(have, want):
            continue  # recorded by newer sessions only, and compared at one precision
        if have != want:
            made = record.settings
            now = f" (model {settings.get('model')}, method {settings.get('method')})" if settings else ""
            raise SessionMismatchError(
                f"session {record.name!r} was made with {key}={have!r} (model {made.get('model')}, method "
                f"{made.get('method')}), but it is being used with {key}={want!r}{now}; use the same model, "
                "method and adapter, or start a new session"
            )


def default_store_root() -> Path:
    """``$CCMEM_SESSIONS``, else ``~/.local/share/ccmem/sessions``."""
    configured = os.environ.get("CCMEM_SESSIONS")
    return Path(configured) if configured else Path.home() / ".local" / "share" / "ccmem" / "sessions"


@dataclass
class SessionBinding:
    """One :class:`CompressedLM` kept in sync with one stored session (what ``ccmem chat --session`` uses)."""

    store: BaseSessionStore
    name: str
    owner: str = ""
    version: int = 0
    created: float | None = None  # which session of that name: one deleted and made again is another

    def open(self, session: CompressedLM) -> SessionRecord:
        """Load the stored session into ``session`` (or create it)."""
        record = self.store.open(self.name, session, self.owner)
        self.version, self.created = record.version, record.created
        return record

    def commit(self, session: CompressedLM) -> SessionRecord:
        """Save ``session`` as the next version; refuses if another process saved the session meanwhile, or deleted
        it (:class:`UnknownSessionError`, also where it made a session of the same name again)."""
        # the version alone passes a session made again that reached this version: the save went into it
        if self.created is not None and self.store.get(self.name, self.owner).created != self.created:
            raise UnknownSessionError(f"session {self.name!r} was deleted and made again by another process")
        record = self.store.commit(self.name, session, self.owner, expect_version=self.version)
        self.version = record.version
        return record

    def reset(self, session: CompressedLM) -> SessionRecord:
        """Start the session over: its transcript and memory are replaced by ``session``'s (just reset)."""
        self.store.delete(self.name, self.owner)
        self.version = 0
        return self.open(session)
