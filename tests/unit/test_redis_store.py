"""Sessions in Redis: atomic saves under contention, the cross-process session lock, clear errors, and two real
``ccmem serve`` workers sharing one Redis (the store contract itself runs on both stores in test_sessions.py)."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from ccmem.memory import MemoryMismatchError
from ccmem.serve.redis_store import RedisSessionStore, SessionBusyError, redacted
from ccmem.serve.sessions import StoreError, VersionConflictError, owner_of
from tests.unit.conftest import free_port
from tests.unit.test_cli import run_cli
from tests.unit.test_sessions import IDENTITY, memory_of


@pytest.fixture
def store(redis_url):
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    made = []

    def make(**kwargs):
        made.append(RedisSessionStore(redis_url, prefix=prefix, **kwargs))
        return made[-1]

    yield make
    for s in made:
        s.close()


def user(text):
    return {"role": "user", "content": text}


# ---------------------------------------------------------------- saves


def test_concurrent_saves_from_several_clients_lose_no_message(store):
    """Eight clients (own connections, as eight workers) append to one session at once, each retrying a refused
    save from a fresh read: every message lands once, in a transcript whose every version saved one message."""
    store().create("s", IDENTITY, {})
    refused = []

    def client(i: int) -> None:
        mine = store()
        for step in range(3):
            while True:
                record = mine.get("s")
                try:
                    mine.save(
                        "s", memory_of(i), [*record.transcript, user(f"{i}.{step}")], expect_version=record.version
                    )
                    break
                except VersionConflictError:
                    refused.append(i)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    record = store().get("s")
    contents = [m["content"] for m in record.transcript]
    assert sorted(contents) == sorted(f"{i}.{s}" for i in range(8) for s in range(3))
    for i in range(8):  # each client's messages in its own order
        assert [c for c in contents if c.startswith(f"{i}.")] == [f"{i}.{s}" for s in range(3)]
    assert record.version == 24
    assert refused  # the clients really raced
    check = store()
    assert (
        len(check._redis.keys(f"{check.prefix}:memory:*")) == 1
    )  # each save replaced the previous version's memory in its transaction


def test_a_memory_damaged_in_redis_is_refused_naming_the_session(store):
    s = store()
    s.create("s", IDENTITY, {})
    record = s.save("s", memory_of(1), [user("a")])
    s._redis.set(s._key("memory", "", "s", record.version), b"not safetensors")
    with pytest.raises(MemoryMismatchError, match=r"the memory of session 's' \(version 1\) in Redis at redis://"):
        s.memory(record)


def test_a_record_read_before_a_save_does_not_get_the_newer_memory(store):
    s = store()
    s.create("s", IDENTITY, {})
    old = s.save("s", memory_of(1), [user("a")])
    s.save("s", memory_of(2), [user("a"), user("b")])
    with pytest.raises(VersionConflictError, match="read it again"):
        s.memory(old)


# ---------------------------------------------------------------- errors


def test_redis_not_reachable_names_the_url_and_how_to_start_one():
    port = free_port()
    with pytest.raises(
        StoreError, match=rf"cannot use Redis at redis://127.0.0.1:{port}/0: .*redis-server --port {port}"
    ):
        RedisSessionStore(f"redis://127.0.0.1:{port}/0")
    with pytest.raises(StoreError, match="is not a Redis URL"):
        RedisSessionStore("http://127.0.0.1:6379")


def test_passwords_are_not_shown():
    assert redacted("redis://user:secret@host:6380/2") == "redis://user:***@host:6380/2"
    assert redacted("redis://host:6379/0") == "redis://host:6379/0"


def test_serve_with_an_unreachable_redis_is_one_line_before_the_model_loads(monkeypatch, capsys, tmp_path):
    port = free_port()
    args = ["serve", "--port", str(free_port()), "--model", "no-such-model"]
    code, out = run_cli(monkeypatch, capsys, *args, "--redis", f"redis://127.0.0.1:{port}/0")
    flat = " ".join(out.split())
    assert code == 2 and f"redis-server --port {port}" in flat and "Traceback" not in out and ".." not in flat
    monkeypatch.setenv("CCMEM_REDIS", f"redis://127.0.0.1:{port}/0")
    code, out = run_cli(monkeypatch, capsys, *args, "--store", str(tmp_path))
    assert code == 2 and "not both" in out
    code, out = run_cli(monkeypatch, capsys, "serve", "--help")
    assert "--redis" in out and "CCMEM_REDIS" in out


# ---------------------------------------------------------------- the session lock


def test_the_lock_makes_a_second_holder_wait(store):
    """Two clients (own connections, as two workers) take one session's lock: the second enters only after the
    first has left; another session's lock is not held up."""
    first, second = store(), store()
    events = []

    async def hold(s, who, name="s", seconds=0.3):
        async with s.lock(name):
            events.append(f"{who} in")
            await asyncio.sleep(seconds)
            events.append(f"{who} out")

    async def main():
        a = asyncio.create_task(hold(first, "a"))
        await asyncio.sleep(0.05)
        await asyncio.gather(hold(second, "b"), hold(second, "c", name="other", seconds=0.0))

        await a

    asyncio.run(main())
    assert events[:2] == ["a in", "c in"] and events.index("b in") == events.index("a out") + 1


def test_a_lock_outlives_its_ttl_while_held_and_a_waiter_gives_up_with_409(store):
    holder, waiter = store(lock_ttl=0.3), store(lock_wait=0.6)

    async def main():
        async with holder.lock("s"):
            with pytest.raises(SessionBusyError, match="session 's' is busy"):  # renewed past 2 ttls
                async with waiter.lock("s"):
                    pass

    asyncio.run(main())
    assert issubclass(SessionBusyError, VersionConflictError)  # the server answers 409


def test_a_lock_never_released_lapses_once_held_past_its_hold_limit(store):
    """A request dropped before it released its session (the lock object is simply left behind) stops being renewed
    after ``lock_hold`` and lapses, instead of keeping the session from every worker until a restart."""
    holder, waiter = store(lock_ttl=0.3, lock_hold=0.6), store()

    async def main():
        await holder.lock("s").__aenter__()  # never exited
        started = time.monotonic()
        async with waiter.lock("s"):
            return time.monotonic() - started

    waited = asyncio.run(main())
    assert 0.6 <= waited < 2.0


def test_a_client_gone_mid_stream_frees_its_session_at_once(store, tmp_path):
    """The official client closes a streamed answer after a few chunks: the next request for the session is answered
    at once, unsaved turn left out. The lock's release was awaited in the request the server had cancelled, so it
    never ran and the session stayed locked until the lock's ttl lapsed (a 409 "busy" for a waiter meanwhile)."""
    from openai import OpenAI

    from tests.unit.test_server import MODEL, make_engine, serving

    engine = make_engine(tmp_path, store=store(lock_wait=5.0), max_new_tokens=64)
    try:
        with serving(engine) as url:
            client = OpenAI(base_url=url, api_key="-", max_retries=0)
            client.post("/sessions", body={"name": "s"}, cast_to=dict)
            body = dict(model=MODEL, max_tokens=64, extra_body={"session": "s"})
            chunks = client.chat.completions.create(messages=[user("w1 w2 w3")], stream=True, **body)
            for i, _ in enumerate(chunks):
                if i == 2:
                    break
            chunks.close()  # gone mid-answer
            started = time.monotonic()
            client.chat.completions.create(messages=[user("w4")], **body)
            waited = time.monotonic() - started
        record = engine.store.get("s")
    finally:
        engine.close()
    assert waited < 2.0
    assert [m["content"] for m in record.transcript if m["role"] == "user"] == ["w4"]


HOLDER = textwrap.dedent(
    """
    import sys, time
    import redis
    from redis.lock import Lock
    lock = Lock(redis.Redis.from_url(sys.argv[1]), sys.argv[2], timeout=float(sys.argv[3]))
    assert lock.acquire(blocking=False)
    print("held", flush=True)
    time.sleep(60)
    """
)


def test_a_lock_held_by_a_killed_process_lapses_after_its_ttl(store, redis_url):
    """Another process holds the session's lock and is killed with SIGKILL (a crashed worker): a request waits,
    then gets the session once the dead holder's lock has expired."""
    s = store()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, redis_url, s._key("lock", "", "s"), "1.0"], stdout=subprocess.PIPE
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    killed = time.monotonic()

    async def main():
        async with s.lock("s"):
            return time.monotonic() - killed

    waited = asyncio.run(main())
    assert 0.2 < waited < 1.5


# ---------------------------------------------------------------- two real workers on one Redis


def start_worker(model_dir, url, port):
    command = [sys.executable, "-m", "ccmem.cli", "serve", "--model", str(model_dir), "--method", "ccm-merge"]
    command += ["--port", str(port), "--redis", url, "--log-level", "warning", "--system", "", "--max-batch", "4"]
    env = dict(os.environ, CCMEM_TOKENS="t1")
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_ready(server, client):
    for _ in range(600):
        try:
            return next(m.id for m in client.models.list())
        except Exception:
            if server.poll() is not None:
                raise AssertionError(server.stdout.read().decode() if server.stdout else "worker exited") from None
            time.sleep(0.1)
    raise AssertionError("the worker did not answer within 60 s")


def test_two_serve_workers_share_sessions_and_never_interleave_one(tiny_model_dir, redis_url):
    """Worker A creates a session, B continues it; then concurrent requests for that session at both workers
    (half of them streaming) all succeed, and the transcript holds each request's message followed by its own
    answer, one turn per request."""
    from openai import OpenAI

    url = f"{redis_url}/1"  # a database of its own: the workers use the default key prefix
    ports = [free_port(), free_port()]
    workers = [start_worker(tiny_model_dir, url, port) for port in ports]
    try:
        a, b = (OpenAI(base_url=f"http://127.0.0.1:{p}/v1", api_key="t1", max_retries=0) for p in ports)
        model = wait_ready(workers[0], a)
        assert wait_ready(workers[1], b) == model

        def ask(client, text, session, stream=False):
            body = dict(model=model, messages=[user(text)], max_tokens=4, extra_body={"session": session})
            if not stream:
                return text, client.chat.completions.create(**body).choices[0].message.content
            chunks = client.chat.completions.create(**body, stream=True)
            return text, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()

        a.post("/sessions", body={"name": "shared"}, cast_to=dict)
        answers = [ask(a, "w1 w2 w3", "shared"), ask(b, "w4 w5", "shared")]
        assert b.get("/sessions/shared", cast_to=dict)["turns"] == 2
        b.post("/sessions", body={"name": "made-on-b"}, cast_to=dict)
        ask(a, "w6", "made-on-b")  # each worker answers any session

        texts = [f"w{10 + i} w{30 + i}" for i in range(8)]
        barrier = threading.Barrier(len(texts))

        def racing(i):
            barrier.wait()
            return ask((a, b)[i % 2], texts[i], "shared", stream=i % 4 >= 2)

        with ThreadPoolExecutor(len(texts)) as pool:
            answers += list(pool.map(racing, range(len(texts))))  # a 409 or 500 would raise here

        with RedisSessionStore(url) as sessions:
            record = sessions.get("shared", owner_of("t1"))
        assert record.turns == 2 + len(texts) and record.version == 1 + 2 + len(texts)
        pairs = [
            (u["content"], r["content"]) for u, r in zip(record.transcript[::2], record.transcript[1::2], strict=True)
        ]
        assert all(m["role"] == "user" for m in record.transcript[::2])
        assert all(m["role"] == "assistant" for m in record.transcript[1::2])
        assert pairs[:2] == answers[:2] and sorted(pairs[2:]) == sorted(answers[2:])
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(timeout=20)


def test_chat_keeps_its_session_in_the_redis_that_serve_shares(monkeypatch, capsys, tiny_model_dir, redis_url):
    """`ccmem chat --session` had no --redis: beside `ccmem serve --redis` it kept its sessions in SQLite, another
    store, so the chat and the server never shared one."""
    name = f"chat-{uuid.uuid4().hex[:8]}"
    common = ["chat", "--model", str(tiny_model_dir), "--method", "ccm-concat", "--n-tok", "2", "--system", ""]
    common += ["--max-new-tokens", "3", "--session", name, "--redis", redis_url]
    monkeypatch.setattr("sys.stdin", io.StringIO("w1 w2 w3\n/quit\n"))
    code, out = run_cli(monkeypatch, capsys, *common)
    assert code == 0, out
    store = RedisSessionStore(redis_url)
    try:
        assert store.get(name).turns == 1  # what a `ccmem serve --redis` worker reads
    finally:
        store.delete(name)
        store.close()
    code, out = run_cli(monkeypatch, capsys, *common, "--store", str(tiny_model_dir))
    assert code == 2 and "not both" in out
