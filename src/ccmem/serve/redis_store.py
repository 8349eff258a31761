"""Sessions in Redis, so that several ``ccmem serve`` workers (processes or machines) share them.

The same contract as the SQLite :class:`ccmem.serve.sessions.SessionStore` (owners, names, versions, the rules
of a save), plus a lock per session that holds across processes: any worker can answer any session, and two
requests for one session never interleave. Keys (``<p>`` the prefix, ``<o>`` the owner, ``<n>`` the name)::

    <p>:info                hash    the schema version of the keys below
    <p>:all                 set     "<o>/<n>" of every session (the server's limit counts all owners)
    <p>:index:<o>           zset    the owner's session names, scored by their last update
    <p>:session:<o>:<n>     hash    identity, settings (JSON), version, memory_bytes, memory_slots, created, updated
    <p>:messages:<o>:<n>    list    the transcript, one JSON message per item
    <p>:memory:<o>:<n>:<v>  string  the memory of version v: a safetensors file's bytes (:meth:`Memory.save`)
    <p>:lock:<o>:<n>        string  the per-session lock: a random token that expires

Names and owners hold no ``:`` or ``/`` (:func:`check_name`; owners are hex hashes), so keys cannot collide.

A save is one MULTI/EXEC transaction under WATCH of the session's hash: the new version's memory, the new
messages, the counters and the removal of the previous memory land together or not at all. Every change of a
session writes its hash, so a save whose session was saved, deleted or created again since it was read is
refused (:class:`VersionConflictError`, or :class:`UnknownSessionError` once deleted) instead of dropping turns.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.exceptions import AuthenticationError, LockError, RedisError
from redis.lock import Lock

from ccmem.chat import Message
from ccmem.memory import CompactMemory, Memory, MemoryMismatchError
from ccmem.serve.sessions import (
    SCHEMA_VERSION,
    BaseSessionStore,
    SessionExistsError,
    SessionLimitError,
    SessionRecord,
    StoreError,
    UnknownSessionError,
    VersionConflictError,
    check_name,
    check_update,
    limit_message,
    unknown_session,
)

logger = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

#: Seconds a lock lives without renewal: a worker that crashes (kill -9, lost machine) frees its sessions this long
#: after its last renewal. A live holder renews every third of it, so a lock lasts as long as its request; 30 s leaves a
#: stalled event loop (a long save, a GC pause) two missed renewals before the lock could lapse.
LOCK_TTL = 30.0
#: Seconds a request waits for a session another request holds, before it is refused with 409 "busy, retry".
#: Requests for one session queue behind each other; two minutes covers a queue of several long generations.
LOCK_WAIT = 120.0
#: Seconds one request may keep a session: renewal stops after this, so a lock its request never released (a request
#: dropped before its answer started, a stuck thread) lapses like a crashed worker's instead of blocking the session
#: until the worker restarts. Ten minutes is far above one answer of --max-new-tokens on a CPU.
LOCK_HOLD = 600.0
#: Seconds between attempts while waiting (Redis locks are polled; loopback round trips are ~0.1 ms).
LOCK_POLL = 0.02


class SessionBusyError(VersionConflictError):
    """Another request held the session for longer than this one would wait (HTTP 409: retry later)."""


def redacted(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _unreachable(url: str, err: BaseException) -> StoreError:
    """The error for a Redis that cannot be used; when nothing answers at ``url``, it says how to start one."""
    message = f"cannot use Redis at {redacted(url)}: {str(err).rstrip('.')}"  # redis ends some with a period
    if isinstance(err, redis.ConnectionError | redis.TimeoutError) and not isinstance(err, AuthenticationError):
        port = urlsplit(url).port or 6379
        message += (
            f". Start one with `redis-server --port {port}` (or give the URL of a running Redis with --redis / "
            "$CCMEM_REDIS)"
        )
    return StoreError(message)


def _reporting(method: Callable[P, T]) -> Callable[P, T]:
    """Turn redis-py's errors into a :class:`StoreError` that names the URL (one line at the CLI, no traceback)."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(*args, **kwargs)
        except RedisError as err:
            store = args[0]
            assert isinstance(store, RedisSessionStore)
            raise _unreachable(store.url, err) from err

    return wrapper


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


class RedisSessionStore(BaseSessionStore):
    """Sessions (records, transcripts, safetensors memories) in the Redis at ``url`` (``redis://HOST:PORT/DB``).

    ``prefix`` namespaces the keys, so several stores (or tests) can share one Redis. Thread-safe (redis-py's
    connection pool); any number of processes may share one store. ``lock_ttl``, ``lock_wait``, ``lock_hold``:
    see :data:`LOCK_TTL`, :data:`LOCK_WAIT`, :data:`LOCK_HOLD`.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "ccmem",
        max_sessions: int | None = None,
        lock_ttl: float = LOCK_TTL,
        lock_wait: float = LOCK_WAIT,
        lock_hold: float = LOCK_HOLD,
    ):
        self.url = url
        self.prefix = prefix
        self.max_sessions = max_sessions
        self.lock_ttl, self.lock_wait, self.lock_hold = lock_ttl, lock_wait, lock_hold
        try:
            self._redis = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30)
        except ValueError as err:
            raise StoreError(f"{redacted(url)!r} is not a Redis URL ({err}); use redis://HOST:PORT/DB") from None
        try:
            self._redis.ping()
            self._redis.hsetnx(self._key("info"), "schema_version", str(SCHEMA_VERSION))
            found = int(_text(self._redis.hget(self._key("info"), "schema_version")) or SCHEMA_VERSION)
        except RedisError as err:
            self._redis.close()
            raise _unreachable(url, err) from None
        if found > SCHEMA_VERSION:
            self._redis.close()
            raise StoreError(
                f"the sessions under prefix {prefix!r} in Redis at {redacted(url)} were written by a newer ccmem "
                f"(schema {found}, this one reads {SCHEMA_VERSION}); upgrade ccmem or use another --redis database"
            )

    def __repr__(self) -> str:
        return f"RedisSessionStore({redacted(self.url)!r}, prefix={self.prefix!r})"

    # ------------------------------------------------------------------ keys

    def _key(self, kind: str, owner: str | None = None, name: str | None = None, version: int | None = None) -> str:
        parts = [self.prefix, kind] + [p for p in (owner, name) if p is not None]
        return ":".join(parts + ([str(version)] if version is not None else []))

    def _member(self, owner: str, name: str) -> str:
        return f"{owner}/{name}"

    def _transaction(self, attempt: Callable[[Any], None], *watched: str) -> None:
        """Run ``attempt(pipe)`` under WATCH of ``watched``: it reads, then calls ``pipe.multi()`` and queues the
        writes; if a watched key changes before EXEC, nothing is written and ``attempt`` runs again."""
        self._redis.transaction(attempt, *watched)

    # ------------------------------------------------------------------ queries

    def _record(self, owner: str, name: str, fields: dict[bytes, bytes], messages: list[bytes]) -> SessionRecord:
        value = {k.decode(): v.decode() for k, v in fields.items()}
        return SessionRecord(
            name=name,
            owner=owner,
            identity=json.loads(value["identity"]),
            settings=json.loads(value["settings"]),
            transcript=[json.loads(m) for m in messages],
            version=int(value["version"]),
            memory_bytes=int(value["memory_bytes"]),
            memory_slots=int(value["memory_slots"]),
            created=float(value["created"]),
            updated=float(value["updated"]),
        )

    @_reporting
    def get(self, name: str, owner: str = "") -> SessionRecord:
        """The session ``name`` of ``owner``; :class:`UnknownSessionError` if there is none."""
        check_name(name)
        with self._redis.pipeline(transaction=True) as pipe:  # one consistent snapshot of record and transcript
            pipe.hgetall(self._key("session", owner, name))
            pipe.lrange(self._key("messages", owner, name), 0, -1)
            fields, messages = pipe.execute()
        if not fields:
            raise unknown_session(name, owner)
        return self._record(owner, name, fields, messages)

    @_reporting
    def exists(self, name: str, owner: str = "") -> bool:
        check_name(name)
        return bool(self._redis.exists(self._key("session", owner, name)))

    @_reporting
    def list(self, owner: str = "") -> list[SessionRecord]:
        """The sessions of ``owner``, most recently updated first."""
        records = []
        for raw in self._redis.zrevrange(self._key("index", owner), 0, -1):
            try:
                records.append(self.get(_text(raw), owner))
            except UnknownSessionError:  # deleted since the index was read
                continue
        return records

    @_reporting
    def count(self) -> int:
        """Sessions of all owners (the server's limit counts them all)."""
        return int(self._redis.scard(self._key("all")))

    # ------------------------------------------------------------------ changes

    @_reporting
    def create(self, name: str, identity: dict[str, str], settings: dict[str, Any], owner: str = "") -> SessionRecord:
        """A new, empty session; :class:`SessionExistsError` if the name is taken (for this owner)."""
        check_name(name)
        key, everyone = self._key("session", owner, name), self._key("all")

        def attempt(pipe: Any) -> None:
            if pipe.exists(key):
                raise SessionExistsError(f"a session named {name!r} exists already; pick another name")
            if self.max_sessions is not None and int(pipe.scard(everyone)) >= self.max_sessions:
                raise SessionLimitError(limit_message(self.max_sessions))
            now = time.time()
            pipe.multi()
            pipe.hset(
                key,
                mapping={
                    "identity": json.dumps(identity, sort_keys=True),
                    "settings": json.dumps(settings),
                    "version": 0,
                    "memory_bytes": 0,
                    "memory_slots": 0,
                    "created": repr(now),
                    "updated": repr(now),
                },
            )
            pipe.delete(self._key("messages", owner, name))
            pipe.sadd(everyone, self._member(owner, name))
            pipe.zadd(self._key("index", owner), {name: now})

        self._transaction(attempt, key, everyone)  # watching the set: two creates never both pass the limit
        return self.get(name, owner)

    @_reporting
    def save(
        self,
        name: str,
        memory: Memory | CompactMemory,
        transcript: Sequence[Message],
        owner: str = "",
        *,
        expect_version: int | None = None,
    ) -> SessionRecord:
        """Store a new version: ``memory`` and the whole ``transcript`` (which must extend the stored one), in one
        transaction; ``expect_version`` as :meth:`SessionStore.save`."""
        record = self.get(name, owner)
        check_update(record, transcript, expect_version)
        data = memory_bytes(memory)  # serialised before the transaction: WATCH covers only the short write
        new = [json.dumps(m, ensure_ascii=False) for m in transcript[len(record.transcript) :]]
        key = self._key("session", owner, name)
        version = record.version + 1

        def attempt(pipe: Any) -> None:
            current, created = pipe.hmget(key, "version", "created")
            if current is None:
                raise UnknownSessionError(f"session {name!r} was deleted while it was being saved")
            if int(current) != record.version or float(created) != record.created:
                raise VersionConflictError(
                    f"session {name!r} was saved by another request meanwhile (version {int(current)}); retry"
                )
            now = time.time()
            pipe.multi()
            pipe.set(self._key("memory", owner, name, version), data)
            if record.version:
                pipe.delete(self._key("memory", owner, name, record.version))
            if new:
                pipe.rpush(self._key("messages", owner, name), *new)
            fields = {"version": version, "memory_bytes": memory.nbytes, "memory_slots": memory.num_slots}
            pipe.hset(key, mapping=fields | {"updated": repr(now)})
            pipe.zadd(self._key("index", owner), {name: now})

        self._transaction(attempt, key)
        return self.get(name, owner)

    @_reporting
    def delete(self, name: str, owner: str = "") -> None:
        """Remove the session, its transcript and its memory."""
        check_name(name)
        key = self._key("session", owner, name)

        def attempt(pipe: Any) -> None:
            version = pipe.hget(key, "version")
            if version is None:
                raise unknown_session(name, owner)
            pipe.multi()
            pipe.delete(key, self._key("messages", owner, name), self._key("memory", owner, name, int(version)))
            pipe.srem(self._key("all"), self._member(owner, name))
            pipe.zrem(self._key("index", owner), name)

        self._transaction(attempt, key)

    # ------------------------------------------------------------------ memories

    @_reporting
    def memory(self, record: SessionRecord, **load_kwargs: Any) -> Memory | None:
        """The memory of ``record``'s version, validated (``load_kwargs`` as :func:`ccmem.memory.load_memory`);
        None before the first save."""
        if record.version == 0:
            return None
        data = self._redis.get(self._key("memory", record.owner, record.name, record.version))
        if data is None:
            current = self._redis.hget(self._key("session", record.owner, record.name), "version")
            if current is not None and int(current) != record.version:
                raise VersionConflictError(
                    f"session {record.name!r} was saved by another request since it was read (version "
                    f"{int(current)}, read {record.version}); read it again"
                )
            raise MemoryMismatchError(
                f"the memory of session {record.name!r} (version {record.version}) is missing from Redis at "
                f"{redacted(self.url)}"
            )
        return memory_from_bytes(
            data if isinstance(data, bytes) else str(data).encode(),
            f"session {record.name!r} (version {record.version}) in Redis at {redacted(self.url)}",
            **load_kwargs,
        )

    # ------------------------------------------------------------------ locks and lifetime

    def lock(self, name: str, owner: str = "") -> RedisSessionLock:
        """A lock of the session held across processes (see :class:`RedisSessionLock`); use one per request."""
        lock = Lock(self._redis, self._key("lock", owner, name), timeout=self.lock_ttl, thread_local=False)
        return RedisSessionLock(self, lock, name)

    def close(self) -> None:
        self._redis.close()


class RedisSessionLock:
    """An async context manager holding one session's Redis lock (redis-py's :class:`redis.lock.Lock`: a random
    token set with NX and an expiry, released only by its holder).

    Waiting polls every :data:`LOCK_POLL` seconds without blocking the event loop, up to the store's
    ``lock_wait`` (then :class:`SessionBusyError`). While held, a task renews it every third of ``lock_ttl``, so a
    long request keeps it (up to ``lock_hold``) and a crashed worker's lock lapses ``lock_ttl`` after its last
    renewal. A lock that lapsed anyway (the event loop stalled past the ttl) is only logged: the save's version
    check still refuses a save that would drop another request's turns.
    """

    def __init__(self, store: RedisSessionStore, lock: Lock, name: str):
        self.store, self._lock, self.name = store, lock, name
        self._renewal: asyncio.Task[None] | None = None

    def _try(self, call: Callable[[], T]) -> T:
        try:
            return call()
        except LockError:
            raise
        except RedisError as err:
            raise _unreachable(self.store.url, err) from err

    async def __aenter__(self) -> RedisSessionLock:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.store.lock_wait
        while not self._try(lambda: self._lock.acquire(blocking=False)):
            if loop.time() >= deadline:
                raise SessionBusyError(
                    f"session {self.name!r} is busy: other requests held it for the {self.store.lock_wait:g} s this "
                    "one waited; retry later"
                )
            await asyncio.sleep(LOCK_POLL)
        self._renewal = asyncio.create_task(self._renew())
        return self

    async def _renew(self) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + self.store.lock_hold
        while True:
            await asyncio.sleep(self.store.lock_ttl / 3)
            if loop.time() >= until:
                logger.warning(
                    "session %r has been held for %g s; its lock is no longer renewed", self.name, self.store.lock_hold
                )
                return
            try:
                self._try(self._lock.reacquire)
            except (LockError, StoreError) as err:
                logger.warning("lost the lock of session %r (%s); its save is still checked by version", self.name, err)
                return

    async def __aexit__(self, *exc: object) -> None:
        renewal, self._renewal = self._renewal, None
        if renewal is not None:
            renewal.cancel()  # it waits in a sleep (a renewal itself does not await): it renews no more
        # released before anything is awaited: a request whose client went mid-stream runs this in a cancelled
        # scope, where an await raises at once (the session then stayed locked for the lock's ttl)
        try:
            self._try(self._lock.release)
        except (LockError, StoreError) as err:  # lapsed, or Redis gone: the ttl frees it either way
            logger.warning("could not release the lock of session %r: %s", self.name, err)
        if renewal is not None:
            await asyncio.gather(renewal, return_exceptions=True)


def memory_bytes(memory: Memory | CompactMemory) -> bytes:
    """``memory`` as the bytes of its safetensors file (:meth:`Memory.save`: same format, same checks on load)."""
    with tempfile.TemporaryDirectory(prefix="ccmem-redis-") as tmp:
        return memory.save(Path(tmp) / "memory.safetensors").read_bytes()


def memory_from_bytes(data: bytes, where: str, **load_kwargs: Any) -> Memory:
    """The memory saved as ``data`` (:func:`memory_bytes`), validated by :meth:`Memory.load`; errors name ``where``."""
    with tempfile.TemporaryDirectory(prefix="ccmem-redis-") as tmp:
        path = Path(tmp) / "memory.safetensors"
        path.write_bytes(data)
        try:
            return Memory.load(path, **load_kwargs)
        except MemoryMismatchError as err:
            text = (
                str(err)
                .replace(f"memory {path}", f"the memory of {where}")
                .replace(str(path), f"the memory of {where}")
            )
            raise MemoryMismatchError(text) from None
