"""``ccmem sessions``: the stored sessions listed, shown and deleted without a model or a server."""

from __future__ import annotations

import pytest

from ccmem.serve.sessions import SessionStore, owner_of
from tests.unit.test_cli import run_cli
from tests.unit.test_sessions import memory_of

SETTINGS = {"model": "smollm2-135m", "method": "ccm-concat", "adapter": "abc123", "system_prompt": "Be brief."}


@pytest.fixture
def store(tmp_path):
    """A store with two sessions of no token (one with two turns) and one of the token "tok"."""
    with SessionStore(tmp_path / "store") as sessions:
        for name, owner in (("alice", ""), ("bob", ""), ("carol", owner_of("tok"))):
            sessions.create(name, {"model": "m"}, SETTINGS, owner)
        talk = [
            {"role": "user", "content": "My dog is called Rex."},
            {"role": "assistant", "content": "Nice name."},
            {"role": "user", "content": "[not markup] What is my dog called?"},
            {"role": "assistant", "content": "Rex."},
        ]
        sessions.save("alice", memory_of(1, slots=5), talk)
    return tmp_path / "store"


def test_list_shows_the_sessions_of_no_token_or_of_the_token_given(monkeypatch, capsys, store):
    monkeypatch.delenv("CCMEM_TOKEN", raising=False)
    code, text = run_cli(monkeypatch, capsys, "sessions", "list", "--store", str(store))
    assert code == 0 and "alice" in text and "bob" in text and "carol" not in text
    assert "smollm2-135m, ccm-concat, adapter abc123" in text
    code, text = run_cli(monkeypatch, capsys, "sessions", "list", "--store", str(store), "--token", "tok")
    assert code == 0 and "carol" in text and "alice" not in text
    code, text = run_cli(monkeypatch, capsys, "sessions", "list", "--store", str(store), "--token", "other")
    assert code == 0 and "no sessions of this token" in text


def test_show_prints_what_made_the_session_and_the_end_of_its_transcript(monkeypatch, capsys, store):
    code, text = run_cli(monkeypatch, capsys, "sessions", "show", "alice", "--store", str(store), "--messages", "2")
    assert code == 0, text
    assert "version 1" in text and "2 (4 messages)" in text and "5 slots" in text and "'Be brief.'" in text
    assert "[not markup] What is my dog called?" in text and "Rex." in text  # user text is not console markup
    assert "Nice name." not in text and "2 before them" in text
    code, text = run_cli(monkeypatch, capsys, "sessions", "show", "nobody", "--store", str(store))
    assert code == 2 and "no session 'nobody'" in text and "Traceback" not in text


def test_delete_removes_the_sessions_named_and_only_once_all_are_known(monkeypatch, capsys, store):
    code, text = run_cli(monkeypatch, capsys, "sessions", "delete", "alice", "nobody", "--store", str(store), "--yes")
    assert code == 2 and "no session 'nobody'" in text
    with SessionStore(store) as sessions:
        assert sessions.exists("alice")  # nothing deleted when one name is unknown
    code, text = run_cli(monkeypatch, capsys, "sessions", "delete", "alice", "bob", "--store", str(store), "-y")
    assert code == 0 and "deleted alice" in text and "deleted bob" in text
    with SessionStore(store) as sessions:
        assert not sessions.exists("alice") and not sessions.exists("bob")
        assert sessions.exists("carol", owner_of("tok"))
    assert not list((store / "memories").rglob("*.safetensors"))


def test_delete_asks_first_and_a_no_keeps_the_session(monkeypatch, capsys, store):
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("n\n"))
    code, text = run_cli(monkeypatch, capsys, "sessions", "delete", "bob", "--store", str(store))
    assert code == 1 and "delete 1 session(s)" in text and "Aborted" in text
    with SessionStore(store) as sessions:
        assert sessions.exists("bob")


def test_a_damaged_session_that_no_chat_can_open_can_be_deleted(monkeypatch, capsys, store):
    for path in (store / "memories").rglob("alice.*.safetensors"):
        path.write_bytes(b"cut short")
    code, text = run_cli(monkeypatch, capsys, "sessions", "delete", "alice", "--store", str(store), "--yes")
    assert code == 0 and "deleted alice" in text


@pytest.mark.parametrize("command", [["list"], ["show", "alice"], ["delete", "alice", "--yes"]])
def test_a_folder_that_holds_no_store_is_refused_and_left_as_it_was(monkeypatch, capsys, tmp_path, command):
    """A mistyped --store listed "no sessions" and left a new empty store there."""
    typo = tmp_path / "sesions"
    code, text = run_cli(monkeypatch, capsys, "sessions", *command, "--store", str(typo))
    assert code == 2 and "no session store at" in text and "--store" in text
    assert not typo.exists()
