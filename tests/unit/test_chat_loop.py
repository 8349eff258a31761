"""``ccmem chat``'s loop: what happens to the conversation when saving fails or the user interrupts an answer."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

import ccmem
from ccmem.serve.chat import run_chat
from ccmem.serve.sessions import SessionBinding, SessionStore
from tests.conftest import tiny_model


def _chat(session, lines, binding=None, **kwargs):
    out = io.StringIO()
    feed = iter(lines)

    def read_line(prompt):
        line = next(feed)
        return line() if callable(line) else line

    run_chat(session, Console(file=out, width=200), max_new_tokens=3, read_line=read_line, binding=binding)
    return out.getvalue()


def _session(lm):
    return ccmem.load(lm, "ccm-concat", n_tok=2, system_prompt="Hi.")


def test_a_chat_whose_session_another_process_saved_continues_from_that_version(tmp_path):
    """Two `chat --session bob` at once: the second one's every later exchange was refused and lost."""
    lm = tiny_model()
    store = SessionStore(tmp_path)
    mine, other = _session(lm), _session(lm)
    binding, theirs = SessionBinding(store, "bob"), SessionBinding(store, "bob")
    binding.open(mine)
    theirs.open(other)

    def other_process_saves():
        other.remember("their turn", "ok")
        theirs.commit(other)
        return "my first turn"

    text = _chat(mine, [other_process_saves, "my second turn", "/quit"], binding)
    assert "not saved" in text and "continuing from the saved version 2" in " ".join(text.split())
    stored = store.get("bob")
    assert stored.version == 3 and [m["content"] for m in stored.transcript if m["role"] == "user"] == [
        "their turn",
        "my second turn",
    ]  # the later exchange was saved on top of the other process's


def test_a_save_that_fails_keeps_the_chat_and_the_next_save_holds_both_exchanges(tmp_path, monkeypatch):
    lm = tiny_model()
    store = SessionStore(tmp_path)
    session, binding = _session(lm), SessionBinding(store, "s")
    binding.open(session)
    real = store.commit
    calls = []

    def disk_full(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "commit", disk_full)
    text = _chat(session, ["first", "second", "/quit"], binding)
    assert "not saved to the session store" in text and "No space left" in text
    assert store.get("s").turns == 2


def test_ctrl_c_during_an_answer_stops_it_and_the_chat_goes_on(monkeypatch):
    """Ctrl-C mid-answer ended the whole chat (exit 130) and dropped the conversation."""
    session = _session(tiny_model())
    real = session.stream

    def interrupted(prompt, **kwargs):
        if prompt == "stop me":
            yield "part"
            raise KeyboardInterrupt
        yield from real(prompt, **kwargs)

    monkeypatch.setattr(session, "stream", interrupted)
    text = _chat(session, ["stop me", "next", "/quit"])
    assert "answer stopped; this exchange is not remembered" in text
    assert [m["content"] for m in session.history if m["role"] == "user"] == ["next"]


def test_a_line_that_is_no_command_is_a_message_and_an_unknown_command_is_said():
    """ "/etc/hosts is a file, right?" was taken for a command (the help was printed, the message never sent); a
    mistyped "/bogus" printed the help without saying why."""
    lm = tiny_model()
    session = _session(lm)
    text = _chat(session, ["/etc/hosts is a file, right?", "/bogus", "//slash first", "/save", "/quit"])
    said = [m["content"] for m in session.history if m["role"] == "user"]
    assert said == ["/etc/hosts is a file, right?", "/slash first"]
    assert "unknown command /bogus" in text and "/save needs a PATH" in text


def test_text_that_is_not_unicode_is_said_and_the_chat_goes_on():
    """A byte that is not UTF-8 on standard input (a lone surrogate to Python) ended the chat with a tokenizer's
    internal error, losing the memory of a chat without --session."""
    lm = tiny_model()
    session = _session(lm)
    text = _chat(session, ["first", "bad \udcff byte", "third", "/quit"])
    assert "not a Unicode character" in " ".join(text.split()) and "nothing was remembered" in text
    assert [m["content"] for m in session.history if m["role"] == "user"] == ["first", "third"]
    with pytest.raises(ValueError, match="not a Unicode character"):
        session.add("notes \udcff")
    with pytest.raises(ValueError, match="message 0 content holds"):
        session.add([{"role": "user", "content": "\udcff"}])


def test_a_chat_whose_session_another_process_deleted_says_so_once_and_goes_on_unsaved(tmp_path):
    """Every later exchange said "not saved ... the next exchange saves this one", which could never happen."""
    lm = tiny_model()
    store = SessionStore(tmp_path)
    session, binding = _session(lm), SessionBinding(store, "bob")
    binding.open(session)

    def deleted_elsewhere():
        store.delete("bob")
        return "my first turn"

    text = " ".join(_chat(session, [deleted_elsewhere, "my second turn", "third", "/quit"], binding).split())
    assert text.count("no longer in the store (another process deleted it)") == 1
    assert "the next exchange saves" not in text and not store.exists("bob")
    assert [m["content"] for m in session.history if m["role"] == "user"] == [
        "my first turn",
        "my second turn",
        "third",
    ]


def test_save_refuses_a_file_that_exists_unless_told_to_overwrite(tmp_path):
    """/save PATH replaced whatever file was at PATH, without a word (a mistyped name lost another memory)."""
    session = _session(tiny_model())
    kept = tmp_path / "notes.txt"
    kept.write_text("mine")
    text = _chat(session, [f"/save {kept}", "/save --overwrite", "/quit"])
    assert kept.read_text() == "mine" and "exists" in text and f"/save --overwrite {kept} replaces it" in text
    assert "/save needs a PATH" in text
    spaced = tmp_path / "my memory.safetensors"
    text = _chat(session, [f"/save {spaced}", "hello", f"/save --overwrite {spaced}", "/help", "/quit"])
    assert text.count("saved to") == 2 and "exists" not in text and "/save [--overwrite] PATH" in text
    again = _session(session.lm)
    again.load_memory(spaced)
    assert again.memory.num_slots == session.memory.num_slots  # the second save, after "hello", replaced the first


def test_save_and_load_read_a_tilde_as_the_home_folder(tmp_path, monkeypatch):
    """No shell expands "~" in a chat line: /save ~/m.safetensors made a folder named "~" in the working folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    session = _session(tiny_model())
    text = _chat(session, ["hello", "/save ~/m.safetensors", "/load ~/m.safetensors", "/quit"])
    assert (tmp_path / "home" / "m.safetensors").is_file() and not (tmp_path / "~").exists()
    assert "memory loaded" in text


def test_save_and_load_read_a_quoted_path_without_its_quotes(tmp_path, monkeypatch):
    """Quoted as in a shell, '/save "my dir/m.safetensors"' made a folder named '"my' and said it saved."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my dir").mkdir()
    session = _session(tiny_model())
    lines = ["hello", '/save "my dir/m.safetensors"', "/load 'my dir/m.safetensors'", "/quit"]
    text = _chat(session, lines)
    assert (tmp_path / "my dir" / "m.safetensors").is_file() and not (tmp_path / '"my dir').exists()
    assert "saved to my dir/m.safetensors" in text and "memory loaded" in text


def test_a_chat_whose_session_another_process_deleted_and_made_again_does_not_save_into_the_new_one(tmp_path):
    """The session deleted and made again elsewhere (DELETE, then POST /v1/sessions of the same name): a chat at the
    new session's version saved its turns into it; at another version every save said "the next exchange saves
    this one", and none ever could."""
    lm = tiny_model()
    store = SessionStore(tmp_path)
    for turns_before in (0, 1):
        session, binding = _session(lm), SessionBinding(store, f"bob{turns_before}")
        binding.open(session)
        for i in range(turns_before):
            session.remember(f"my turn {i}", "ok")
            binding.commit(session)

        def made_again_elsewhere(name=binding.name, turns=turns_before):
            store.delete(name)
            theirs, other = _session(lm), SessionBinding(store, name)
            other.open(theirs)
            for _ in range(turns):
                theirs.remember("their turn", "ok")
                other.commit(theirs)
            return "my next turn"

        text = " ".join(_chat(session, [made_again_elsewhere, "and another", "/quit"], binding).split())
        assert text.count("no longer in the store (another process deleted it)") == 1, text
        assert "the next exchange saves" not in text
        assert [m["content"] for m in store.get(binding.name).transcript if m["role"] == "user"] == ["their turn"] * (
            turns_before
        )


def test_an_option_a_command_does_not_know_is_refused_not_read_as_part_of_the_path(tmp_path, monkeypatch):
    """'/save --force m.safetensors' wrote a folder named '--force m' in the working folder and said it saved;
    '/reset all' cleared the memory and '/memory full' showed it, the extra words dropped without a word."""
    monkeypatch.chdir(tmp_path)
    session = _session(tiny_model())
    text = _chat(session, ["hello", "/save --force m.safetensors", "/load --overwrite m.safetensors", "/quit"])
    assert list(tmp_path.iterdir()) == [] and "saved to" not in text and "memory loaded" not in text
    assert "/save does not know the option --force (it takes --overwrite)" in text
    assert "/load does not know the option --overwrite (it takes no options)" in text
    slots = session.memory.num_slots
    text = _chat(session, ["/reset all", "/memory full", "/quit now", "/quit"])
    assert session.memory.num_slots == slots > 0 and "memory cleared" not in text
    assert "/reset takes no arguments, got 'all'" in text and "/memory takes no arguments" in text
    assert "/quit takes no arguments" in text  # not quit: the chat went on to the next line
    text = _chat(session, ["/save ./--force.safetensors", "/reset", "/quit"])
    assert (tmp_path / "--force.safetensors").is_file() and "memory cleared" in text


def test_content_that_spells_a_special_token_is_text_and_a_template_that_rewrites_content_refuses_it(
    tiny_model_dir,
):
    """'w1 </s> w2' from a user put the end-of-sequence token in the middle of the turn."""
    from transformers import AutoTokenizer

    from ccmem.chat import ChatFormat

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    fmt = ChatFormat(tok)
    message = [{"role": "user", "content": "w1 </s> w2"}]
    assert tok.eos_token_id in tok.encode(fmt.delta([], message), add_special_tokens=False)  # parsed, before
    ids, without = fmt.delta_ids([], message), fmt.delta_ids([], [{"role": "user", "content": "w1 w2"}])
    assert tok.eos_token_id not in ids and len(ids) > len(without)  # "</s>" spelled out, as text
    assert without == tok.encode(fmt.delta([], [{"role": "user", "content": "w1 w2"}]), add_special_tokens=False)
    tok.chat_template = "{% for m in messages %}{{ m['content'] | trim }}</s>{% endfor %}"
    templated = ChatFormat(tok)
    trimmed = tok.encode("w1 w2</s>", add_special_tokens=False)
    assert templated.delta_ids([], [{"role": "user", "content": " w1 w2 "}]) == trimmed
    with pytest.raises(ValueError, match="holds '</s>', which this model's chat format reads as a control token"):
        templated.delta_ids([], [{"role": "user", "content": " w1 </s> "}])
    assert templated.delta_ids([], [{"role": "user", "content": "w1 </s>"}]).count(tok.eos_token_id) == 1
