"""The session store: SQLite index and transcripts, safetensors memories, crash safety, owners, bad input.

Tests taking ``make_store`` pin the contract every store keeps and run on SQLite and on Redis
(``tests/unit/conftest.py`` starts a redis-server); the others are about the SQLite store's files.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import ccmem
from ccmem.adapter import save_adapter
from ccmem.memory import Memory, MemoryMismatchError, positions_for
from ccmem.serve.sessions import (
    SessionError,
    SessionExistsError,
    SessionMismatchError,
    SessionStore,
    StoreError,
    UnknownSessionError,
    VersionConflictError,
    check_name,
    owner_of,
)
from tests.conftest import randomize_lora, tiny_model

IDENTITY = {"model": "m", "method": "full"}


def memory_of(step: int, slots: int = 3) -> Memory:
    """A small memory whose metadata and sizes record ``step`` (so a loaded version can be matched)."""
    generator = torch.Generator().manual_seed(step)
    keys = torch.randn(1, 2, slots, 8, generator=generator)
    layers = [(keys, keys + 1)]
    return Memory(
        layers=layers, positions=[positions_for(0, slots, keys)], next_position=slots, meta={"step": str(step)}
    )


def test_save_and_reload_a_session_keeps_memory_transcript_and_version(make_store):
    store = make_store()
    store.create("alice", IDENTITY, {"model": "m"})
    transcript = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    record = store.save("alice", memory_of(1), transcript)
    store.close()

    again = make_store().get("alice")
    assert again.version == record.version == 1
    assert again.transcript == transcript and again.turns == 1
    loaded = make_store().memory(again)
    assert loaded is not None and loaded.meta["step"] == "1"
    assert torch.equal(loaded.layers[0][0], memory_of(1).layers[0][0])


def test_a_save_replaces_the_previous_memory_file(tmp_path):
    store = SessionStore(tmp_path)
    store.create("s", IDENTITY, {})
    store.save("s", memory_of(1), [{"role": "user", "content": "a"}])
    record = store.save("s", memory_of(2), [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    files = sorted(p.name for p in (tmp_path / "memories").rglob("*.safetensors"))
    assert files == ["s.2.safetensors"] and record.memory_slots == 3


def test_database_runs_in_wal_mode(tmp_path):
    SessionStore(tmp_path).create("s", IDENTITY, {})
    with sqlite3.connect(tmp_path / "sessions.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_sessions_of_one_owner_are_invisible_to_another(make_store):
    store = make_store()
    alice, bob = owner_of("token-a"), owner_of("token-b")
    store.create("notes", IDENTITY, {}, owner=alice)
    with pytest.raises(UnknownSessionError):
        store.get("notes", owner=bob)
    with pytest.raises(UnknownSessionError):
        store.delete("notes", owner=bob)
    assert [r.name for r in store.list(alice)] == ["notes"] and store.list(bob) == []
    store.create("notes", IDENTITY, {}, owner=bob)  # the same name for another owner is another session
    assert store.count() == 2


def test_tokens_are_never_stored(tmp_path):
    store = SessionStore(tmp_path)
    store.create("notes", IDENTITY, {}, owner=owner_of("token-a"))
    assert "token-a" not in (tmp_path / "sessions.db").read_bytes().decode("latin1")


@pytest.mark.parametrize("name", ["../etc", "a/b", "", ".hidden", "x" * 65, "a b", "a..b", "ü"])
def test_unsafe_session_names_are_refused(make_store, name):
    store = make_store()
    with pytest.raises(SessionError, match="invalid session name"):
        store.create(name, IDENTITY, {})
    with pytest.raises(SessionError, match="invalid session name"):
        store.get(name)


def test_safe_names_pass():
    assert check_name("chat-2024_01.v2") == "chat-2024_01.v2"


def test_creating_twice_and_unknown_sessions_say_so(make_store):
    store = make_store()
    store.create("s", IDENTITY, {})
    with pytest.raises(SessionExistsError, match="exists already"):
        store.create("s", IDENTITY, {})
    with pytest.raises(UnknownSessionError, match="no session 'nope'; create it first"):
        store.get("nope")
    store.create("carol", IDENTITY, {})  # made by `ccmem chat --session carol`: no token
    with pytest.raises(UnknownSessionError, match="no session 'carol' for this token") as err:
        store.get("carol", owner=owner_of("secret"))  # a server with --token: chat cannot help; say whose it is
    assert "ccmem chat --session carol creates it" not in str(err.value)


def test_a_stale_version_is_refused_instead_of_dropping_turns(make_store):
    store = make_store()
    store.create("s", IDENTITY, {})
    store.save("s", memory_of(1), [{"role": "user", "content": "a"}])
    with pytest.raises(VersionConflictError, match="another request"):
        store.save("s", memory_of(2), [{"role": "user", "content": "a"}], expect_version=0)


def test_a_transcript_that_does_not_extend_the_stored_one_is_refused(make_store):
    store = make_store()
    store.create("s", IDENTITY, {})
    store.save("s", memory_of(1), [{"role": "user", "content": "a"}])
    with pytest.raises(SessionError, match="does not extend"):
        store.save("s", memory_of(2), [{"role": "user", "content": "b"}])


def test_the_session_limit_is_enforced(make_store):
    store = make_store(max_sessions=2)
    store.create("a", IDENTITY, {})
    store.create("b", IDENTITY, {})
    with pytest.raises(SessionError, match="limit of 2 sessions"):
        store.create("c", IDENTITY, {})


def test_a_record_read_before_another_save_is_told_to_read_again_not_that_its_memory_is_damaged(make_store):
    """SQLite: the memory file of a record read before another process's save was swept, and reading it said
    "missing" (a 500 "damaged: delete the session" from the server, for a healthy session)."""
    store = make_store()
    store.create("s", IDENTITY, {})
    old = store.save("s", memory_of(1), [{"role": "user", "content": "a"}])
    make_store().save("s", memory_of(2), [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(VersionConflictError, match="read it again"):
        store.memory(old)


def test_delete_removes_the_session_and_its_transcript(make_store):
    store = make_store()
    store.create("s", IDENTITY, {})
    record = store.save("s", memory_of(1), [{"role": "user", "content": "a"}])
    store.delete("s")
    assert not store.exists("s") and store.count() == 0 and store.list() == []
    with pytest.raises(UnknownSessionError):
        store.delete("s")
    store.create("s", IDENTITY, {})
    assert store.get("s").transcript == []  # no message of the deleted session comes back
    with pytest.raises(VersionConflictError):  # a save read before the delete does not land in the new session
        store.save("s", memory_of(2), [{"role": "user", "content": "a"}], expect_version=record.version)


def test_delete_removes_the_memory_files(tmp_path):
    store = SessionStore(tmp_path)
    store.create("s", IDENTITY, {})
    store.save("s", memory_of(1), [{"role": "user", "content": "a"}])
    store.delete("s")
    assert not list((tmp_path / "memories").rglob("*.safetensors"))


def test_deleting_a_session_keeps_the_files_of_sessions_whose_name_starts_with_its_own(tmp_path):
    store = SessionStore(tmp_path)
    for name in ("zed", "zed.x", "zed.2"):  # "zed.2.1.safetensors" would match a plain "zed.*" pattern
        store.create(name, IDENTITY, {})
        store.save(name, memory_of(1), [{"role": "user", "content": name}])
    store.delete("zed")
    for name in ("zed.x", "zed.2"):
        assert store.memory(store.get(name)) is not None  # their memories still load
    assert sorted(p.name for p in (tmp_path / "memories").rglob("*.safetensors")) == [
        "zed.2.1.safetensors",
        "zed.x.1.safetensors",
    ]


def killed_mid_write(path) -> None:
    """Leave what ``kill -9`` leaves when it hits a write of ``path``: the temporary of atomic_path."""
    script = (
        "import time\n"
        "from ccmem.fileio import atomic_path\n"
        f"with atomic_path({str(path)!r}) as tmp:\n"
        "    tmp.write_bytes(b'half a memory')\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), *sys.path]))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_deleting_a_session_removes_the_temporary_of_a_write_that_was_killed(tmp_path):
    store = SessionStore(tmp_path)
    for name in ("zed", "zed.x"):
        store.create(name, IDENTITY, {})
        store.save(name, memory_of(1), [{"role": "user", "content": name}])
    folder = tmp_path / "memories" / "local"
    killed_mid_write(folder / "zed.2.safetensors")  # the store stays open: only delete can sweep it
    killed_mid_write(folder / "zed.x.2.safetensors")
    store.delete("zed")
    assert [p.name for p in folder.glob(".*.tmp")] == [next(folder.glob(".zed.x.2.*.tmp")).name]


def test_opening_a_store_sweeps_temporaries_of_killed_writes_and_nothing_else(tmp_path):
    store = SessionStore(tmp_path)
    store.create("s", IDENTITY, {})
    store.save("s", memory_of(1), [{"role": "user", "content": "a"}])
    store.close()
    folder = tmp_path / "memories" / "local"
    killed_mid_write(folder / "s.2.safetensors")
    killed_mid_write(tmp_path / "notes.txt")  # not a memory file: not the store's to remove
    running = folder / f".s.2.safetensors.{os.getpid()}.abc123.tmp"  # a save still running (this process)
    users = [folder / ".s.tmp", folder / ".s.2.safetensors.tmp", folder / ".s.2.safetensors.1x.a.tmp", running]
    for path in users:
        path.write_text("kept")
    SessionStore(tmp_path).close()
    assert sorted(folder.glob(".*.tmp")) == sorted(users)
    assert len(list(tmp_path.glob(".notes.txt.*.tmp"))) == 1
    assert store.memory(SessionStore(tmp_path).get("s")) is not None


def test_list_is_most_recent_first(make_store):
    store = make_store()
    for name in ("a", "b", "c"):
        store.create(name, IDENTITY, {})
    store.save("a", memory_of(1), [{"role": "user", "content": "x"}])
    assert [r.name for r in store.list()] == ["a", "c", "b"]


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path):
    (tmp_path / "sessions.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a ccmem session database"):
        SessionStore(tmp_path)


def test_another_applications_sqlite_database_is_refused_and_left_untouched(tmp_path):
    import sqlite3

    db = sqlite3.connect(tmp_path / "sessions.db")
    db.execute("CREATE TABLE sessions (id INTEGER PRIMARY KEY, data TEXT)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match=r"another application \(tables: sessions\), not a ccmem session store"):
        SessionStore(tmp_path)
    db = sqlite3.connect(tmp_path / "sessions.db")
    assert [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")] == ["sessions"]


def test_a_store_whose_index_was_deleted_is_refused_instead_of_starting_empty(tmp_path):
    """With sessions.db gone, a new empty index hid every session and the next save reused their names."""
    store = SessionStore(tmp_path)
    store.create("bob", IDENTITY, {})
    store.save("bob", memory_of(1), [{"role": "user", "content": "a"}])
    store.close()
    for leftover in tmp_path.glob("sessions.db*"):
        leftover.unlink()
    with pytest.raises(StoreError, match=r"holds 1 session memory files .* but no sessions\.db.*Put it back"):
        SessionStore(tmp_path)
    assert not (tmp_path / "sessions.db").exists()  # nothing was written


def test_a_store_that_cannot_be_written_says_so_not_that_its_database_is_foreign(tmp_path, monkeypatch):
    SessionStore(tmp_path).close()
    monkeypatch.setattr(os, "access", lambda path, mode: mode != os.W_OK)

    def unwritable(*args, **kwargs):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(sqlite3, "connect", unwritable)
    with pytest.raises(StoreError, match=r"cannot be written .*give a folder this user can write"):
        SessionStore(tmp_path)


def test_a_missing_memory_file_is_a_clear_error(tmp_path):
    store = SessionStore(tmp_path)
    store.create("s", IDENTITY, {})
    record = store.save("s", memory_of(1), [{"role": "user", "content": "a"}])
    store.memory_path(record).unlink()
    with pytest.raises(MemoryMismatchError, match="is missing"):
        store.memory(record)


def test_a_save_that_loses_a_race_leaves_the_winners_memory_file_alone(tmp_path):
    """Two processes saving one session at once both wrote NAME.2.safetensors; the loser was refused by version,
    but its file had replaced the winner's: version 2 held one process's transcript and the other's memory."""
    mine, theirs = SessionStore(tmp_path), SessionStore(tmp_path)  # two processes on one store
    mine.create("s", IDENTITY, {})
    mine.save("s", memory_of(1), [{"role": "user", "content": "a"}])
    read = mine.get

    def read_then_the_other_process_saves(name, owner=""):
        record = read(name, owner)
        theirs.save("s", memory_of(2), [*record.transcript, {"role": "user", "content": "theirs"}])
        return record

    mine.get = read_then_the_other_process_saves  # type: ignore[method-assign]
    with pytest.raises(VersionConflictError):
        mine.save("s", memory_of(3), [{"role": "user", "content": "a"}, {"role": "user", "content": "mine"}])
    record = theirs.get("s")
    assert record.version == 2 and record.transcript[-1]["content"] == "theirs"
    assert theirs.memory(record).meta["step"] == "2"  # their memory, not the loser's


def test_a_delete_leaves_the_memory_of_a_session_another_process_makes_right_after_it(tmp_path):
    """The delete removed the memory files after its commit: another process that re-created the name and saved
    in between lost its version 1's file."""
    mine, theirs = SessionStore(tmp_path), SessionStore(tmp_path)
    mine.create("s", IDENTITY, {})
    mine.save("s", memory_of(1), [{"role": "user", "content": "old"}])
    commit = mine._transaction

    @contextlib.contextmanager
    def then_the_other_process_recreates_it():
        with commit() as db:
            yield db
        if not theirs.exists("s"):
            theirs.create("s", IDENTITY, {})
            theirs.save("s", memory_of(2), [{"role": "user", "content": "new"}])

    mine._transaction = then_the_other_process_recreates_it  # type: ignore[method-assign]
    mine.delete("s")
    record = theirs.get("s")
    assert record.transcript == [{"role": "user", "content": "new"}]
    assert theirs.memory(record).meta["step"] == "2"


class _FailingCommit:
    """A connection whose first commit of a write fails, as a disk that filled up or went read-only makes it."""

    def __init__(self, db):
        self.db, self.writing, self.failed = db, False, False

    def execute(self, sql, *args):
        if sql == "BEGIN IMMEDIATE":
            self.writing = True
        elif sql == "COMMIT" and self.writing and not self.failed:
            self.failed = True
            raise sqlite3.OperationalError("disk I/O error")
        elif sql in ("COMMIT", "ROLLBACK"):
            self.writing = False
        return self.db.execute(sql, *args)

    def executemany(self, sql, rows):
        return self.db.executemany(sql, rows)


def test_a_delete_whose_commit_fails_leaves_the_session_whole(tmp_path):
    """The memory files were unlinked before the commit: a failed delete left a listed session without memory."""
    store = SessionStore(tmp_path)
    store.create("s", IDENTITY, {})
    store.save("s", memory_of(1), [{"role": "user", "content": "a"}])
    store._db = _FailingCommit(store._db)
    with pytest.raises(StoreError, match=r"failed .*disk I/O error.*retry"):
        store.delete("s")
    record = store.get("s")
    assert record.version == 1 and record.transcript == [{"role": "user", "content": "a"}]
    assert store.memory(record).meta["step"] == "1"
    store.delete("s")  # the retry works, and removes the files
    assert not store.exists("s") and not list((tmp_path / "memories").rglob("*.safetensors"))


def test_a_save_whose_commit_fails_keeps_the_previous_version_and_leaves_no_file(tmp_path):
    store = SessionStore(tmp_path)
    store.create("s", IDENTITY, {})
    store.save("s", memory_of(1), [{"role": "user", "content": "a"}])
    store._db = _FailingCommit(store._db)
    with pytest.raises(StoreError, match="disk I/O error"):
        store.save("s", memory_of(2), [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    record = store.get("s")
    assert record.version == 1 and record.transcript == [{"role": "user", "content": "a"}]
    assert store.memory(record).meta["step"] == "1"
    assert sorted(p.name for p in (tmp_path / "memories").rglob("*.safetensors")) == ["s.1.safetensors"]
    record = store.save("s", memory_of(2), [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert record.version == 2 and store.memory(record).meta["step"] == "2"


def test_a_memory_file_that_cannot_be_written_is_a_store_error_and_changes_nothing(tmp_path, monkeypatch):
    store = SessionStore(tmp_path)
    store.create("s", IDENTITY, {})

    def disk_full(self, path, *args, **kwargs):
        raise OSError(28, f"cannot write {path} (No space left on device)")

    monkeypatch.setattr(Memory, "save", disk_full)
    with pytest.raises(StoreError, match="No space left on device"):
        store.save("s", memory_of(1), [{"role": "user", "content": "a"}])
    assert store.get("s").version == 0


class _SavingBetweenStatements:
    """A connection that lets another process save once, just before the transcript of a record is read."""

    def __init__(self, db, save):
        self.db, self.save = db, save

    def execute(self, sql, *args):
        if sql.startswith("SELECT role, content") and self.save is not None:
            save, self.save = self.save, None
            save()
        return self.db.execute(sql, *args)


def test_a_record_never_pairs_one_versions_row_with_the_next_versions_transcript(tmp_path):
    mine, theirs = SessionStore(tmp_path), SessionStore(tmp_path)
    mine.create("s", IDENTITY, {})
    mine.save("s", memory_of(1), [{"role": "user", "content": "a"}])
    both = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    mine._db = _SavingBetweenStatements(mine._db, lambda: theirs.save("s", memory_of(2), both))  # type: ignore
    record = mine.get("s")
    assert (record.version, len(record.transcript)) in ((1, 1), (2, 2))
    assert mine.get("s").version == 2


# ---------------------------------------------------------------- crash safety

WRITER = textwrap.dedent(
    """
    import sys
    from ccmem.serve.sessions import SessionStore
    from tests.unit.test_sessions import memory_of, IDENTITY
    store = SessionStore(sys.argv[1])
    if not store.exists("s"):
        store.create("s", IDENTITY, {})
    print("ready", flush=True)
    while True:
        record = store.get("s")
        step = len(record.transcript) + 1
        transcript = record.transcript + [{"role": "user", "content": str(step)}]
        store.save("s", memory_of(step, slots=2 + step % 5), transcript, expect_version=record.version)
    """
)


def test_kill_9_at_random_points_leaves_the_last_version_loadable(tmp_path):
    """A writer saving in a loop is killed with SIGKILL at random moments; every time, the store opens, the
    recorded version's memory loads and matches the transcript, and no other version's file lingers past a save."""
    rng = random.Random(0)
    root = tmp_path / "store"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), *sys.path]))
    saved = []
    for _ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, env=env, cwd=os.getcwd()
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        store = SessionStore(root)
        record = store.get("s")
        steps = [int(m["content"]) for m in record.transcript]
        assert steps == list(range(1, len(steps) + 1))  # no message lost or doubled
        memory = store.memory(record)
        if record.version:
            assert memory is not None and memory.meta["step"] == str(len(steps))
            assert memory.num_slots == 2 + len(steps) % 5
        saved.append(record.version)
        store.close()
    assert saved[-1] > saved[0] > 0  # the writers really saved between kills


# ---------------------------------------------------------------- with a CompressedLM


@pytest.fixture
def lm():
    return tiny_model("llama-gqa")


def test_open_restores_memory_and_history_of_a_compressed_session(make_store, lm):
    store = make_store()
    first = ccmem.load(lm, method="ccm-concat")
    store.open("talk", first)
    first.remember("my dog is rex", "nice")
    store.commit("talk", first)

    second = ccmem.load(lm, method="ccm-concat")
    record = store.open("talk", second)
    assert record.turns == 1 and second.history == first.history
    assert second.memory.num_slots == first.memory.num_slots
    assert torch.equal(second.memory.layers[0][0], first.memory.layers[0][0])
    query = second.query_ids("what is my dog called?")
    assert list(second.stream_ids(query, 5)) == list(first.stream_ids(query, 5))


def test_a_session_made_with_another_method_is_refused_by_name(make_store, lm):
    store = make_store()
    store.open("talk", ccmem.load(lm, method="ccm-concat"))
    with pytest.raises(SessionMismatchError, match="method='ccm-concat'"):
        store.open("talk", ccmem.load(lm, method="full"))


def adapter_file(lm, tmp_path, seed: int):
    """A ccm-concat adapter for ``lm`` with its own (seeded, non-zero) trainable state."""
    method = ccmem.get_method("ccm-concat", n_tok=2)
    randomize_lora(method, lm, seed=seed)
    return save_adapter(method, lm, tmp_path / f"{lm.name}-{seed}.safetensors")


def test_a_session_made_with_another_model_is_refused_by_name(make_store, lm):
    store = make_store()
    first = ccmem.load(lm, method="ccm-concat", n_tok=2)
    store.open("talk", first)
    first.remember("my dog is rex", "nice")
    store.commit("talk", first)
    other = ccmem.load(tiny_model("qwen2"), method="ccm-concat", n_tok=2)  # same method and options
    before = (list(other.history), other.memory)
    with pytest.raises(SessionMismatchError, match=r"made with model='\w+' \(model tiny-llama-gqa.*\(model tiny-qwen"):
        store.open("talk", other)
    assert (other.history, other.memory) == before  # nothing of the session leaked in
    assert make_store().get("talk").turns == 1  # and the session is as it was


def test_a_session_made_with_another_adapter_is_refused_by_name(make_store, lm, tmp_path):
    store = make_store()
    x, y = adapter_file(lm, tmp_path, seed=1), adapter_file(lm, tmp_path, seed=2)
    first = ccmem.load(lm, method="ccm-concat", adapter=x)
    store.open("talk", first)
    first.remember("my dog is rex", "nice")
    store.commit("talk", first)
    made_with = first.method.adapter_hash
    for other in (ccmem.load(lm, method="ccm-concat", adapter=y), ccmem.load(lm, method="ccm-concat", n_tok=2)):
        used_with = other.method.adapter_hash  # another trained state, then none at all
        before = (list(other.history), other.memory)
        with pytest.raises(SessionMismatchError, match=f"adapter='{made_with}'.*adapter='{used_with}'"):
            store.open("talk", other)
        assert (other.history, other.memory) == before
    again = ccmem.load(lm, method="ccm-concat", adapter=x)  # the adapter that made it: accepted
    assert store.open("talk", again).turns == 1 and again.history == first.history


def test_another_model_is_named_before_its_adapter(make_store, lm, tmp_path):
    """Adapters are per model, so another model always brings another adapter: the model is what to name."""
    store = make_store()
    store.open("talk", ccmem.load(lm, method="ccm-concat", adapter=adapter_file(lm, tmp_path, seed=1)))
    qwen = tiny_model("qwen2")
    other = ccmem.load(qwen, method="ccm-concat", adapter=adapter_file(qwen, tmp_path, seed=1))
    with pytest.raises(SessionMismatchError, match="was made with model="):
        store.open("talk", other)


def test_open_without_create_refuses_an_unknown_session(make_store, lm):
    with pytest.raises(UnknownSessionError):
        make_store().open("nope", ccmem.load(lm, method="full"), create=False)


def test_session_locks_do_not_pile_up_for_names_no_request_holds(tmp_path):
    """A lock per name ever asked for (existing or not) was kept for good: any client could grow the server."""
    import asyncio
    import gc

    store = SessionStore(tmp_path)

    async def ask(name):
        async with store.lock(name, "owner"):
            assert store.lock(name, "owner") is store.lock(name, "owner")  # one lock per session while held
            await asyncio.sleep(0)

    async def many():
        await asyncio.gather(*(ask(f"s{i}") for i in range(200)), ask("s1"), ask("s1"))

    asyncio.run(many())
    gc.collect()
    assert len(store._session_locks) == 0


def test_a_store_folder_under_a_file_is_a_clear_error(tmp_path):
    """`ccmem serve --store afile/sub` said only "[Errno 20] Not a directory"."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StoreError, match=r"afile/sub cannot be made: .*afile is a file; give a folder"):
        SessionStore(tmp_path / "afile" / "sub")
    with pytest.raises(StoreError, match=r"afile is a file; give a folder"):
        SessionStore(tmp_path / "afile")
