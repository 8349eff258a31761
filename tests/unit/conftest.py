"""A real Redis for the session-store tests: Debian's ``redis-server`` on a free loopback port, started here."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ccmem.serve.sessions import BaseSessionStore, SessionStore


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``redis://127.0.0.1:PORT`` of a redis-server that lives for the test run (no persistence, in a tmp dir)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server); the Redis store is not tested")
    import redis

    folder = tmp_path_factory.mktemp("redis")
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    server = subprocess.Popen(
        [*command, "--dir", str(folder)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=folder
    )
    url = f"redis://127.0.0.1:{port}"
    client = redis.Redis.from_url(url)
    try:
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if server.poll() is not None:
                    output = server.stdout.read().decode() if server.stdout else ""
                    pytest.fail(f"redis-server exited: {output}")
                time.sleep(0.02)
        else:
            pytest.fail("redis-server did not answer within 4 s")
        yield url
    finally:
        client.close()
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path) -> Iterator[Callable[..., BaseSessionStore]]:
    """Opens the store under test, each call a new connection to the same sessions (as another process would):
    SQLite in ``tmp_path``, or Redis under a prefix of this test's own."""
    opened: list[BaseSessionStore] = []
    if request.param == "redis":
        from ccmem.serve.redis_store import RedisSessionStore

        url, prefix = request.getfixturevalue("redis_url"), f"test-{uuid.uuid4().hex[:12]}"

        def make(**kwargs: Any) -> BaseSessionStore:
            opened.append(RedisSessionStore(url, prefix=prefix, **kwargs))
            return opened[-1]
    else:

        def make(**kwargs: Any) -> BaseSessionStore:
            opened.append(SessionStore(tmp_path, **kwargs))
            return opened[-1]

    yield make
    for store in opened:
        store.close()
