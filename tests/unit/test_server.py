"""``ccmem serve``: OpenAI-compatible completions over stored sessions, prefix reuse, auth, validation, batching."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import pytest
from fastapi.testclient import TestClient

import ccmem
from ccmem.serve.engine import Engine, Limits, Params
from ccmem.serve.server import bind, create_app
from ccmem.serve.sessions import SessionStore
from tests.conftest import randomize_lora, tiny_model

MODEL = "tiny:ccm-concat"


def make_engine(tmp_path, memory_dtype=None, store=None, **limits) -> Engine:
    lm = tiny_model("llama-gqa", positions=2048)
    base = ccmem.load(lm, method="ccm-concat", n_tok=2, system_prompt="be brief")
    randomize_lora(base.method, lm)  # so that a wrong memory shows in the answers
    defaults = dict(max_new_tokens=16, max_input_tokens=400, max_message_bytes=400, max_sessions=8, max_messages=20)
    limits = Limits(**(defaults | limits))
    store = store if store is not None else SessionStore(tmp_path / "store")
    return Engine(base, store, model_id=MODEL, limits=limits, memory_dtype=memory_dtype)


@pytest.fixture
def engine(tmp_path):
    engine = make_engine(tmp_path)
    yield engine
    engine.close()


@pytest.fixture
def client(engine):
    with TestClient(create_app(engine)) as client:
        yield client


def ask(client, messages, session=None, **body):
    payload = {"model": MODEL, "messages": messages, "max_tokens": 6} | body
    if session is not None:
        payload["session"] = session
    return client.post("/v1/chat/completions", json=payload)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def direct_answer(engine, turns, question, max_new_tokens=6):
    """What the model answers with ``turns`` (user, assistant) compressed one exchange at a time, without the server."""
    session = engine.base.fork()
    for u, a in turns:
        session.remember(u, a)
    return session.generate(question, max_new_tokens=max_new_tokens)


# ---------------------------------------------------------------- sessions


def test_a_session_keeps_the_conversation_between_requests(client, engine):
    made = client.post("/v1/sessions", json={"name": "s1"})
    assert made.status_code == 201 and made.json()["id"] == "s1" and made.json()["turns"] == 0
    first = ask(client, [user("my cat is tom")], session="s1")
    assert first.status_code == 200, first.text
    a1 = first.json()["choices"][0]["message"]["content"]
    assert first.json()["ccmem"]["session"] == "s1"
    second = ask(client, [user("what is my cat called")], session="s1")  # only the new turn
    a2 = second.json()["choices"][0]["message"]["content"]
    assert a2 == direct_answer(engine, [("my cat is tom", a1)], "what is my cat called")
    info = client.get("/v1/sessions/s1").json()
    assert info["turns"] == 2 and info["messages"] == 5  # system + 2 exchanges
    assert info["memory_slots"] > 0
    # the whole conversation, as OpenAI clients send it: only the last message is new
    whole = [user("my cat is tom"), assistant(a1), user("what is my cat called"), assistant(a2), user("and my dog")]
    third = ask(client, whole, session="s1")
    assert third.status_code == 200 and third.json()["ccmem"]["reused_messages"] == 4
    assert client.get("/v1/sessions/s1").json()["turns"] == 3


def test_a_session_survives_a_server_restart(tmp_path):
    engine = make_engine(tmp_path)
    with TestClient(create_app(engine)) as client:
        client.post("/v1/sessions", json={"name": "keep"})
        ask(client, [user("remember 42")], session="keep")
    engine.close()
    engine = make_engine(tmp_path)
    with TestClient(create_app(engine)) as client:
        info = client.get("/v1/sessions/keep").json()
        assert info["turns"] == 1
        assert ask(client, [user("what number")], session="keep").status_code == 200
        assert client.get("/v1/sessions/keep").json()["turns"] == 2
    engine.close()


def test_a_damaged_stored_memory_is_a_server_error_that_hides_the_path_and_says_what_to_do(tmp_path, caplog):
    """A cut memory file came back as a 400 'invalid request' naming the server's own file path."""
    engine = make_engine(tmp_path)
    with TestClient(create_app(engine)) as client:
        client.post("/v1/sessions", json={"name": "cut"})
        assert ask(client, [user("remember 42")], session="cut").status_code == 200
        path = engine.store.memory_path(engine.store.get("cut"))
    engine.close()
    path.write_bytes(path.read_bytes()[:200])
    engine = make_engine(tmp_path)  # restarted: the session is read from the store
    with TestClient(create_app(engine)) as client:
        reply = ask(client, [user("what number")], session="cut")
        assert reply.status_code == 500 and reply.json()["error"]["code"] == "session_damaged"
        assert reply.json()["error"]["type"] == "server_error"  # not the client's: it was invalid_request_error
        message = reply.json()["error"]["message"]
        assert "session 'cut' (version 2) cannot be restored" in message and "DELETE /v1/sessions/cut" in message
        assert "ccmem sessions delete cut" in message
        assert str(tmp_path) not in message and str(path) in caplog.text  # the file is in the server's log only
        assert client.delete("/v1/sessions/cut").status_code in (200, 204)
        assert client.post("/v1/sessions", json={"name": "cut"}).status_code == 201  # made anew
        assert ask(client, [user("hello again")], session="cut").status_code == 200
    engine.close()


def test_a_failed_request_leaves_the_session_as_it_was(client, engine, monkeypatch):
    client.post("/v1/sessions", json={"name": "s"})
    ask(client, [user("hello")], session="s")
    before = client.get("/v1/sessions/s").json()

    def broken(*args, **kwargs):
        raise RuntimeError("the model failed")

    monkeypatch.setattr("ccmem.serve.engine.DecodingBatch.step", broken)
    with pytest.raises(RuntimeError):  # the test client re-raises server errors
        ask(client, [user("this one fails")], session="s")
    monkeypatch.undo()
    assert client.get("/v1/sessions/s").json() == before
    assert ask(client, [user("and this one works")], session="s").status_code == 200  # the lock was released
    assert client.get("/v1/sessions/s").json()["turns"] == 2


def test_whole_conversation_that_does_not_extend_the_session_is_a_conflict(client):
    client.post("/v1/sessions", json={"name": "s"})
    ask(client, [user("hello")], session="s")
    other = [{"role": "system", "content": "be brief"}, user("something else"), assistant("x"), user("hi")]
    response = ask(client, other, session="s")
    assert response.status_code == 409
    assert "do not extend" in response.json()["error"]["message"]


def test_an_edited_first_reply_is_a_conflict_not_a_second_copy_of_the_turns(client, engine):
    """[u1, EDITED, u2] against a session holding [u1, a1, u2, a2] was taken as three new messages: the memory
    then held u1 twice and the edited reply."""
    client.post("/v1/sessions", json={"name": "e"})
    first = ask(client, [user("My dog is Rex.")], session="e").json()["choices"][0]["message"]["content"]
    ask(client, [user("My dog is Rex."), assistant(first), user("and?")], session="e")
    held = client.get("/v1/sessions/e").json()
    edited = ask(client, [user("My dog is Rex."), assistant("EDITED"), user("and?")], session="e")
    assert edited.status_code == 409 and "first reply differs" in edited.json()["error"]["message"]
    assert client.get("/v1/sessions/e").json() == held  # unchanged
    assert ask(client, [user("My dog is Rex.")], session="e").status_code == 200  # a lone repeat: a new message


def test_a_session_made_with_another_method_is_a_conflict_that_names_it(tmp_path, engine, client):
    other = ccmem.load(engine.base.lm, method="full", system_prompt="be brief")
    engine.store.open("made-elsewhere", other)
    response = ask(client, [user("hi")], session="made-elsewhere")
    assert response.status_code == 409 and "method='full'" in response.json()["error"]["message"]


def test_a_session_made_with_another_model_is_a_conflict_that_names_it(engine, client):
    other = ccmem.load(tiny_model("qwen2", positions=2048), method="ccm-concat", n_tok=2, system_prompt="be brief")
    engine.store.open("made-elsewhere", other)
    response = ask(client, [user("hi")], session="made-elsewhere")
    assert response.status_code == 409, response.text
    message = response.json()["error"]["message"]
    assert "was made with model=" in message and f"(model {other.lm.name}," in message
    assert f"(model {engine.base.lm.name}," in message  # both models by name, not only a fingerprint
    assert client.get("/v1/sessions/made-elsewhere").json()["turns"] == 0  # left as it was


def test_a_session_made_with_another_adapter_is_a_conflict_that_names_it(tmp_path, engine, client):
    from ccmem.adapter import save_adapter

    lm = engine.base.lm
    method = ccmem.get_method("ccm-concat", n_tok=2)
    randomize_lora(method, lm, seed=7)
    other = ccmem.load(lm, method="ccm-concat", adapter=save_adapter(method, lm, tmp_path / "x.safetensors"))
    engine.store.open("made-elsewhere", other)
    response = ask(client, [user("hi")], session="made-elsewhere")
    assert response.status_code == 409, response.text
    message = response.json()["error"]["message"]
    assert f"adapter='{other.method.adapter_hash}'" in message and "adapter='untrained'" in message


def test_session_endpoints_list_and_delete(client):
    for name in ("a", "b"):
        assert client.post("/v1/sessions", json={"name": name}).status_code == 201
    assert client.post("/v1/sessions", json={"name": "a"}).status_code == 409
    assert sorted(s["id"] for s in client.get("/v1/sessions").json()["data"]) == ["a", "b"]
    assert client.delete("/v1/sessions/a").json() == {"id": "a", "object": "session", "deleted": True}
    assert client.get("/v1/sessions/a").status_code == 404
    assert ask(client, [user("hi")], session="a").status_code == 404
    unnamed = client.post("/v1/sessions", json={})
    assert unnamed.status_code == 201 and unnamed.json()["id"].startswith("sess-")


# ---------------------------------------------------------------- without a session


def test_prompt_tokens_count_what_was_read_chat_template_included(client, engine):
    """usage.prompt_tokens counted only the messages' own text ('Hi' was 1 token); the template is read too."""
    assert client.post("/v1/sessions", json={"name": "u"}).status_code == 201
    first = ask(client, [user("Hi")], session="u").json()
    assert first["usage"]["prompt_tokens"] == engine.base.fork().query_ids([user("Hi")]).shape[1]
    a1 = first["choices"][0]["message"]["content"]
    second = ask(client, [user("Hi"), assistant(a1), user("Hi again"), assistant("ok"), user("bye")], session="u")
    mirror = engine.base.fork()  # the same conversation through the Python API
    mirror.remember("Hi", a1)
    fold = mirror.format.delta(mirror.history, [user("Hi again"), assistant("ok")])
    mirror.remember("Hi again", "ok")
    read = len(engine.base.lm.tokenizer.encode(fold)) + mirror.query_ids([user("bye")]).shape[1]
    assert second.json()["usage"]["prompt_tokens"] == read


def test_without_a_session_the_longest_known_prefix_is_reused(client, engine):
    q1 = ask(client, [user("I live in Oslo")]).json()["choices"][0]["message"]["content"]
    convo = [user("I live in Oslo"), assistant(q1), user("where do I live")]
    second = ask(client, convo).json()
    assert second["ccmem"]["reused_messages"] == 0  # nothing before this request to reuse
    a2 = second["choices"][0]["message"]["content"]
    assert a2 == direct_answer(engine, [("I live in Oslo", q1)], "where do I live")
    third = ask(client, [*convo, assistant(a2), user("say it again")]).json()
    assert third["ccmem"]["reused_messages"] == 2  # the first exchange's memory came from the cache
    expected = direct_answer(engine, [("I live in Oslo", q1), ("where do I live", a2)], "say it again")
    assert third["choices"][0]["message"]["content"] == expected
    assert third["usage"]["prompt_tokens"] < second["usage"]["prompt_tokens"] + len("where do I live") + len(a2) + 20


def test_reused_messages_never_counts_the_system_message(client):
    """With a session, the same conversation sent with its system message counted one more reused message than
    sent without it; without a session the system message was never counted."""
    system = {"role": "system", "content": "be brief"}
    counts = []
    for name, lead in (("plain", []), ("whole", [system])):
        client.post("/v1/sessions", json={"name": name})
        a1 = ask(client, [user("hi")], session=name).json()["choices"][0]["message"]["content"]
        reply = ask(client, [*lead, user("hi"), assistant(a1), user("again")], session=name)
        counts.append(reply.json()["ccmem"]["reused_messages"])
    a1 = ask(client, [system, user("hello")]).json()["choices"][0]["message"]["content"]
    ask(client, [system, user("hello"), assistant(a1), user("q")])  # keeps the memory of [system, hello, a1]
    reply = ask(client, [system, user("hello"), assistant(a1), user("q"), assistant("z"), user("r")])
    counts.append(reply.json()["ccmem"]["reused_messages"])
    assert counts == [2, 2, 2]


def test_a_held_prefix_that_ends_inside_a_turn_is_not_reused(client, engine, tmp_path):
    """[u1, a1, u2, u3] left the memory of [u1, a1, u2]; [u1, a1, u2, a2, u4] reused it and compressed a2 alone,
    where a fresh server compresses u2 with its reply: the answer depended on what the cache held."""
    assert ask(client, [user("u1"), assistant("a1"), user("u2"), user("u3")]).status_code == 200
    convo = [user("u1"), assistant("a1"), user("u2"), assistant("a2"), user("u4")]
    reply = ask(client, convo).json()
    assert reply["ccmem"]["reused_messages"] == 0  # it was 3: u2 without its reply
    fresh = make_engine(tmp_path / "fresh")
    with TestClient(create_app(fresh)) as other:
        expected = ask(other, convo).json()
    fresh.close()
    assert reply["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"]
    assert reply["ccmem"]["memory_slots"] == expected["ccmem"]["memory_slots"]


def test_streaming_gives_the_same_answer_as_non_streaming(client):
    messages = [user("tell me something")]
    plain = ask(client, messages, max_tokens=10).json()
    body = {"model": MODEL, "messages": messages, "max_tokens": 10, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain["choices"][0]["message"]["content"]  # the same characters, whitespace included
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert all("usage" not in c for c in chunks)  # as OpenAI: no usage unless asked for
    # stream_options.include_usage: OpenAI's shape, a last chunk with no choices (clients read usage there)
    with client.stream("POST", "/v1/chat/completions", json=body | {"stream_options": {"include_usage": True}}) as r:
        counted = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert counted[-1]["choices"] == [] and counted[-1]["usage"] == plain["usage"]
    assert all(c["usage"] is None for c in counted[:-1]) and counted[-2]["choices"][0]["finish_reason"]
    refused = ask(client, messages, stream_options={"include_usage": True})
    assert refused.status_code == 400 and "stream_options applies to streamed answers only" in refused.text


def test_streamed_pieces_join_to_the_stripped_answer_the_session_saves():
    from ccmem.serve.engine import _Trimmed

    pieces = ["  ", "\n1.", " Banana", "\n", " ", "\n2.", " Kiwi\n", "\n", "  "]
    trimmed = _Trimmed()
    sent = [trimmed.push(p) for p in pieces]
    assert "".join(sent) == "".join(pieces).strip() == "1. Banana\n \n2. Kiwi"
    assert sent[:2] == ["", "1."]  # nothing waits longer than the whitespace it holds back


def test_a_streamed_answer_is_saved_as_the_client_received_it(client):
    assert client.post("/v1/sessions", json={"name": "st"}).status_code == 201
    body = {"model": MODEL, "messages": [user("list fruits")], "max_tokens": 10, "stream": True, "session": "st"}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    # the client sends the whole conversation back: it extends what the session holds (nothing compressed twice)
    again = ask(client, [user("list fruits"), assistant(text), user("more")], session="st")
    assert again.status_code == 200, again.text
    assert again.json()["ccmem"]["reused_messages"] == 2


def test_a_stream_that_fails_after_its_status_line_logs_the_fault_and_tells_the_client_no_internals(
    client, engine, monkeypatch, caplog
):
    """A failure after a stream's 200 went out reached the client as its text (internals included) and the server's
    log not at all; the request's own faults are told in full, as the error body of a refused request says them."""
    from ccmem.serve.sessions import VersionConflictError

    assert client.post("/v1/sessions", json={"name": "st"}).status_code == 201
    body = {"model": MODEL, "messages": [user("list fruits")], "max_tokens": 4, "stream": True, "session": "st"}

    def streamed_error() -> dict:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        return events[-1]["error"]

    def broken(*args, **kwargs):
        raise RuntimeError("disk quota at /srv/ccmem/private")

    monkeypatch.setattr(engine.store, "save", broken)
    with caplog.at_level("ERROR", logger="ccmem.serve.server"):
        error = streamed_error()
    assert error["type"] == "server_error" and "/srv/ccmem" not in error["message"] and "log" in error["message"]
    assert "disk quota at /srv/ccmem/private" in caplog.text  # the traceback is in the server's log

    def raced(*args, **kwargs):
        raise VersionConflictError("session 'st' was saved by another request meanwhile")

    monkeypatch.setattr(engine.store, "save", raced)
    error = streamed_error()
    assert error["type"] == "invalid_request_error" and "saved by another request" in error["message"]


def test_a_stop_string_ends_the_answer_before_it(client):
    full = ask(client, [user("go on")], max_tokens=12).json()["choices"][0]["message"]["content"]
    if len(full) < 4:
        pytest.skip("the tiny model's answer is too short to cut")
    stop = full[2:4]
    cut = ask(client, [user("go on")], max_tokens=12, stop=stop).json()["choices"][0]
    assert cut["message"]["content"] == full[: full.index(stop)].strip() and cut["finish_reason"] == "stop"


# ---------------------------------------------------------------- auth


def test_a_session_is_visible_only_to_the_token_that_made_it(engine):
    with TestClient(create_app(engine, tokens=["alpha", "beta"])) as client:
        alpha = {"Authorization": "Bearer alpha"}
        beta = {"Authorization": "Bearer beta"}
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.post("/v1/sessions", json={"name": "mine"}, headers=alpha).status_code == 201
        assert client.get("/v1/sessions/mine", headers=beta).status_code == 404
        assert client.get("/v1/sessions", headers=beta).json()["data"] == []
        body = {"model": MODEL, "messages": [user("hi")], "max_tokens": 2, "session": "mine"}
        assert client.post("/v1/chat/completions", json=body, headers=beta).status_code == 404
        assert client.post("/v1/chat/completions", json=body, headers=alpha).status_code == 200
        health = client.get("/health")  # for load balancers, no token
        assert health.status_code == 200 and "sessions" not in health.json()  # no count of others' sessions
        assert client.get("/openapi.json").status_code == 200  # open, as the README says: it holds no session


def test_a_token_cannot_tell_from_its_usage_which_system_prompts_another_token_used(engine):
    """The memory of a system prompt was kept for all tokens, so a request's usage (the prompt's tokens counted as
    read, or not) told a token whether another had already sent that exact system prompt."""
    with TestClient(create_app(engine, tokens=["alpha", "beta"])) as client:
        messages = [{"role": "system", "content": "w7 w8 w9 are the secret words"}, user("hi")]
        body = {"model": MODEL, "messages": messages, "max_tokens": 2}

        def used(token: str) -> int:
            reply = client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"})
            assert reply.status_code == 200, reply.text
            return reply.json()["usage"]["prompt_tokens"]

        first_alpha, again_alpha = used("alpha"), used("alpha")
        assert again_alpha < first_alpha  # alpha's own prompt is kept for alpha: not read twice
        assert used("beta") == first_alpha  # beta reads it as if no one had sent it


def test_a_request_without_a_valid_token_is_refused_before_its_body_is_read(engine):
    """The token was checked only after FastAPI had read and parsed the body: a stranger's malformed JSON got a
    400 naming what was wrong in it, and an oversized one cost the server its reading."""
    with TestClient(create_app(engine, tokens=["alpha"])) as client:
        broken = {"content": b"{not json", "headers": {"content-type": "application/json"}}
        refused = client.post("/v1/chat/completions", **broken)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        huge = client.post("/v1/chat/completions", **broken | {"headers": {"content-length": str(10**9)}})
        assert huge.status_code == 401
        token = {"Authorization": "Bearer alpha", "content-type": "application/json"}
        allowed = client.post("/v1/chat/completions", content=b"{not json", headers=token)
        assert allowed.status_code == 400  # with the token, the body is read and its error named
        assert client.get("/health").status_code == 200


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"model": MODEL, "messages": []}, 400, "messages"),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
        ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "content"),
        ({"model": MODEL, "messages": [user("x")], "max_tokens": -1}, 400, "max_tokens"),
        ({"model": MODEL, "messages": [user("x")], "max_tokens": 10_000}, 400, "at most 16"),
        ({"model": MODEL, "messages": [user("x")], "temperature": "hot"}, 400, "temperature"),
        ({"model": MODEL, "messages": [user("x")], "temperature": "NaN"}, 400, "temperature: Input should be a finite"),
        ({"model": MODEL, "messages": [user("x")], "seed": 10**23}, 400, "seed: Input should be less than or equal"),
        ({"model": MODEL, "messages": [user("x")], "n": 3}, 400, "n"),
        ({"model": MODEL, "messages": [user("x")], "stream": "yes"}, 400, "stream: Input should be a valid boolean"),
        ({"model": MODEL, "messages": [user("x")], "max_tokens": True}, 400, "max_tokens: Input should be a valid"),
        ({"model": MODEL, "messages": [user("x")], "max_tokens": "3"}, 400, "max_tokens: Input should be a valid"),
        ({"model": MODEL, "messages": [user("x"), assistant("y")]}, 400, "last message must be the user's"),
        ({"model": MODEL, "messages": [user("x"), {"role": "system", "content": "s"}, user("y")]}, 400, "first"),
        ({"model": MODEL, "messages": [user("x" * 500)]}, 413, "at most 400"),
        ({"model": MODEL, "messages": [user("x")] * 21}, 400, "at most 20"),
        ({"model": MODEL, "messages": [user("x")], "session": "../etc"}, 400, "session"),
        ({"model": MODEL, "messages": [user("x")], "session": "ghost"}, 404, "no session 'ghost'"),
        ({"model": "gpt-4", "messages": [user("x")]}, 404, "not served here"),
        ({"messages": [user("x")]}, 400, "model"),
    ],
)
def test_bad_requests_get_a_4xx_that_says_why(client, body, status, message):
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]


def test_malformed_json_and_bad_session_paths_are_4xx(client):
    response = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    assert client.get("/v1/sessions/..%2F..%2Fetc").status_code in (400, 404)
    assert client.get("/v1/sessions/a b").status_code == 400
    assert client.post("/v1/sessions", json={"name": "../x"}).status_code == 400


def test_a_body_over_what_any_valid_request_holds_is_refused_before_it_is_read(client, monkeypatch):
    import json as jsonlib

    parsed = []
    monkeypatch.setattr(jsonlib, "loads", lambda *a, **k: parsed.append(1))  # would the server parse it?
    body = b'{"model": "x", "messages": [{"role": "user", "content": "' + b"x" * 200_000 + b'"}]}'
    response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    monkeypatch.undo()
    assert response.status_code == 413 and "request body of 200061 bytes" in response.json()["error"]["message"]
    assert not parsed
    # the largest request the limits allow still passes the bound: 20 messages of 400 bytes, JSON-escaped
    escaped = [{"role": "user", "content": "\u00e9" * 200} for _ in range(19)] + [user("x")]
    assert client.post("/v1/chat/completions", json={"model": MODEL, "messages": escaped}).status_code != 413


def test_the_servers_own_reply_sent_back_is_not_refused_by_the_message_size_limit(tmp_path):
    """With a --max-message-bytes below the length of an answer, the client that sends the whole conversation back
    (as OpenAI clients do) got 413 for the assistant message the server itself had written."""
    engine = make_engine(tmp_path, max_message_bytes=10)
    with TestClient(create_app(engine)) as client:
        client.post("/v1/sessions", json={"name": "s"})
        for session in ("s", None):
            a1 = ask(client, [user("hi")], session=session, max_tokens=16).json()["choices"][0]["message"]["content"]
            assert len(a1.encode()) > 10  # the premise: the answer is longer than a message may be
            again = ask(client, [user("hi"), assistant(a1), user("more")], session=session)
            assert again.status_code == 200, again.text
        # what the client writes keeps the limit, and the request its total (20 messages of 10 bytes)
        refused = ask(client, [user("x" * 11)])
        assert refused.status_code == 413 and "messages.0.content is 11 bytes" in refused.text
        refused = ask(client, [user("hi"), assistant("y" * 199), user("more")])
        assert refused.status_code == 413 and "205 bytes in all; this server takes at most 200" in refused.text
    engine.close()


def test_a_retry_of_an_answered_request_is_told_so(client):
    assert client.post("/v1/sessions", json={"name": "r"}).status_code == 201
    system = {"role": "system", "content": "be brief"}
    first = ask(client, [system, user("hi")], session="r").json()["choices"][0]["message"]["content"]
    ask(client, [system, user("hi"), assistant(first), user("and?")], session="r")
    retry = ask(client, [system, user("hi")], session="r")  # the first request again: a prefix of the session
    assert retry.status_code == 409 and "are the start of the 5 the session holds" in retry.json()["error"]["message"]


def test_a_resent_or_edited_history_without_a_system_message_is_not_appended_again(client):
    """Without a leading system message, a client's retry of a whole history (or one edited past its first exchange)
    was compressed and appended a second time: the session held every turn twice."""
    assert client.post("/v1/sessions", json={"name": "h"}).status_code == 201
    first = ask(client, [user("I live in Porto.")], session="h").json()["choices"][0]["message"]["content"]
    whole = [user("I live in Porto."), assistant(first), user("and my cat is Tom")]
    assert ask(client, whole, session="h").status_code == 200
    assert client.get("/v1/sessions/h").json()["turns"] == 2
    retry = ask(client, whole, session="h")
    assert retry.status_code == 409 and "a retry of an answered request" in retry.json()["error"]["message"]
    edited = [user("I live in Porto."), assistant(first), user("and my dog is Rex"), assistant("ok"), user("?")]
    changed = ask(client, edited, session="h")
    assert changed.status_code == 409 and "differ from it at message 2" in changed.json()["error"]["message"]
    assert client.get("/v1/sessions/h").json()["turns"] == 2
    again = ask(client, [user("I live in Porto.")], session="h")  # one new message, whatever it says, is new
    assert again.status_code == 200 and client.get("/v1/sessions/h").json()["turns"] == 3


def test_too_many_sessions_is_refused(tmp_path):
    engine = make_engine(tmp_path, max_sessions=2)
    with TestClient(create_app(engine)) as client:
        assert client.post("/v1/sessions", json={}).status_code == 201
        assert client.post("/v1/sessions", json={}).status_code == 201
        refused = client.post("/v1/sessions", json={})
        # 409, not 429: the openai client retries a 429, and retrying cannot free a session
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "session_limit_reached"
        assert "limit of 2 sessions; delete one first" in refused.json()["error"]["message"]
        assert "--max-sessions" in refused.json()["error"]["message"]
        # refused before the model reads the new session's system prompt (it was read, then the limit checked)
        with_system = client.post("/v1/sessions", json={"system_prompt": "a prompt never read"})
        assert with_system.status_code == 409 and "a prompt never read" not in engine._systems
    engine.close()


def test_a_session_too_full_to_keep_the_exchange_is_refused_before_the_answer_is_generated(tmp_path, monkeypatch):
    """The answer was generated, then compressing the exchange into the session passed the model's positions: a 400
    after the work, and the answer lost."""
    lm = tiny_model("llama-gqa", positions=94)
    base = ccmem.load(lm, method="full", system_prompt="be brief")
    engine = Engine(base, SessionStore(tmp_path / "store"), model_id=MODEL, limits=Limits(max_new_tokens=16))
    with TestClient(create_app(engine)) as client:
        assert client.post("/v1/sessions", json={"name": "s"}).status_code == 201
        assert ask(client, [user("m0 w")], session="s", max_tokens=16).status_code == 200
        held = client.get("/v1/sessions/s").json()
        generated = []
        decode = ccmem.serve.engine.decode_batch
        monkeypatch.setattr(ccmem.serve.engine, "decode_batch", lambda *a, **k: generated.append(1) or decode(*a, **k))
        refused = ask(client, [user("m1 w")], session="s", max_tokens=16)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
        assert "keeping this exchange in the session" in refused.json()["error"]["message"]
        assert not generated and client.get("/v1/sessions/s").json() == held
        assert ask(client, [user("m1 w")], max_tokens=16).status_code == 200  # without a session nothing is kept
    engine.close()


def test_an_empty_last_message_is_refused_before_the_messages_ahead_of_it_are_compressed(client, engine):
    client.post("/v1/sessions", json={"name": "s"})
    history = [user("w1 w2 w3"), assistant("w4"), user("w5 w6"), assistant("w7")]
    for session in (None, "s"):
        response = ask(client, [*history, user("  ")], session=session)
        assert response.status_code == 400 and "is empty" in response.json()["error"]["message"]
    assert engine.worker.fold_batches == [] and engine.store.get("s").turns == 0


def test_too_much_new_context_in_one_request_is_refused(client):
    long = [user("w " * 150), assistant("ok"), user("w " * 150), assistant("ok"), user("q")]
    response = ask(client, long)
    assert response.status_code == 400 and "more than the 400 this server" in response.json()["error"]["message"]


def test_a_system_message_counts_against_the_input_limit_and_is_refused_before_it_is_read(tmp_path):
    engine = make_engine(tmp_path, max_input_tokens=100)
    system = {"role": "system", "content": "rule " * 40}  # 200 tokens of the tiny model, under the byte limit
    with TestClient(create_app(engine)) as client:
        refused = ask(client, [system, user("hi")])
        assert refused.status_code == 400, refused.text
        message = refused.json()["error"]["message"]
        assert "system prompt is 200 tokens, more than the 100" in message and "shorten it" in message
        assert "several requests" not in message  # a system prompt cannot be split
        made = client.post("/v1/sessions", json={"name": "s", "system_prompt": system["content"]})
        assert made.status_code == 400 and "shorten it" in made.json()["error"]["message"]
        assert system["content"] not in engine._systems  # never read
        # under the limit alone, but not with the rest of the request: the whole request is counted
        near = {"role": "system", "content": "rule " * 15}
        over = ask(client, [near, user("x" * 60)])
        assert over.status_code == 400 and "more than the 100" in over.json()["error"]["message"]
        assert ask(client, [near, user("x" * 10)]).status_code == 200
    engine.close()


def test_a_port_in_use_is_a_clear_error():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port}"):
        bind("127.0.0.1", port)
    taken.close()


# ---------------------------------------------------------------- batching


def test_concurrent_requests_are_decoded_together_with_the_same_answers(tmp_path):
    engine = make_engine(tmp_path)
    prompts = [[user("a" * (3 + 5 * i))] for i in range(4)]  # different lengths
    params = Params(max_new_tokens=6)

    async def answer(messages):
        result, pieces = await engine.chat("", messages, params)
        return "".join([p async for p in pieces]), result

    async def together():
        release = threading.Event()
        blocker = asyncio.ensure_future(engine.worker.call(release.wait))  # hold the worker while requests queue
        tasks = [asyncio.ensure_future(answer(p)) for p in prompts]
        await asyncio.sleep(0.2)
        release.set()
        await blocker
        return await asyncio.gather(*tasks)

    async def one_by_one():
        return [await answer(p) for p in prompts]

    batched = asyncio.run(together())
    assert max(engine.worker.batches) > 1  # some requests really shared a forward
    engine.worker.batches.clear()
    single = asyncio.run(one_by_one())
    assert max(engine.worker.batches) == 1
    assert [text for text, _ in batched] == [text for text, _ in single]
    engine.close()


def slow_steps(monkeypatch) -> threading.Event:
    """Make each batched decoding step as slow as a real model's (50 ms), so that requests sent after the first
    step has begun (the event returned) come while a batch decodes."""
    from ccmem.generation import DecodingBatch

    step, started = DecodingBatch.step, threading.Event()

    def slow_step(self):
        started.set()
        time.sleep(0.05)
        return step(self)

    monkeypatch.setattr(DecodingBatch, "step", slow_step)
    return started


def test_a_request_that_comes_while_another_decodes_joins_its_batch_with_the_same_answers(tmp_path, monkeypatch):
    """Continuous batching: a request came while another decoded waited for that whole answer, so requests that
    arrive apart (as clients do) never shared a forward. Now its memory is read between the running batch's steps
    and it joins the batch; each answer is what it is alone."""
    engine = make_engine(tmp_path)
    first, second = [user("w1 w2 w3")], [user("w4 w5 w6 w7 w8 w9")]
    params = Params(max_new_tokens=12)

    async def answer(messages):
        result, pieces = await engine.chat("", messages, params)
        return "".join([p async for p in pieces]), result.completion_tokens

    alone = [asyncio.run(answer(first)), asyncio.run(answer(second))]
    assert engine.worker.batches == [1, 1] and alone[0][1] == 12  # the first answer is long enough to join
    assert engine.stats()["answers_per_step"] == 1.0
    started = slow_steps(monkeypatch)

    async def apart():
        running = asyncio.ensure_future(answer(first))
        await asyncio.to_thread(started.wait)
        return list(await asyncio.gather(running, answer(second)))

    engine.worker.batches.clear()
    assert asyncio.run(apart()) == alone
    assert engine.worker.batches == [2]  # one batch, the second request joined it
    assert 1.0 < engine.stats()["answers_per_step"] < 2.0  # steps shared, over all the answers of this engine
    engine.close()


def test_a_request_waiting_for_a_full_batch_takes_the_place_of_the_first_answer_that_finishes(tmp_path, monkeypatch):
    """With --max-batch rows decoding, a new request waited for the whole batch to end; now it joins as soon as a
    row leaves."""
    engine = make_engine(tmp_path, max_batch=2)
    short, long = Params(max_new_tokens=3), Params(max_new_tokens=16)

    async def answer(messages, params):
        result, pieces = await engine.chat("", messages, params)
        return "".join([p async for p in pieces]), result.completion_tokens

    jobs = [([user("w1 w2")], short), ([user("w3 w4")], long), ([user("w5 w6")], long)]
    alone = [asyncio.run(answer(m, p)) for m, p in jobs]
    assert [n for _, n in alone] == [3, 16, 16]
    started = slow_steps(monkeypatch)

    async def three():
        running = [asyncio.ensure_future(answer(m, p)) for m, p in jobs[:2]]
        await asyncio.to_thread(started.wait)
        return await asyncio.gather(*running, answer(*jobs[2]))

    engine.worker.batches.clear()
    assert asyncio.run(three()) == alone
    assert engine.worker.batches == [2]  # one batch, never more than 2 rows: the third took the first's place
    engine.close()


def test_a_compression_held_back_while_a_batch_decodes_runs_within_a_bounded_number_of_steps(tmp_path, monkeypatch):
    """A request whose earlier messages must be compressed first waits while fewer compressions than answers are
    pending, but not for the whole batch: after FOLD_WAIT_STEPS steps it runs, and the request joins the batch."""
    import ccmem.serve.engine as engine_module

    engine = make_engine(tmp_path)
    params = Params(max_new_tokens=16)
    history = [user("w1 w2"), assistant("w3"), user("w4 w5 w6")]

    async def answer(messages):
        result, pieces = await engine.chat("", messages, params)
        return "".join([p async for p in pieces]), result.completion_tokens

    alone = [asyncio.run(answer([user(f"w{i} w{i + 1}")])) for i in (7, 9)]
    assert [n for _, n in alone] == [16, 16]  # both decode to the limit: the batch runs 16 steps
    started = slow_steps(monkeypatch)
    monkeypatch.setattr(engine_module, "FOLD_WAIT_STEPS", 2)

    async def apart():
        running = [asyncio.ensure_future(answer([user(f"w{i} w{i + 1}")])) for i in (7, 9)]
        await asyncio.to_thread(started.wait)
        return await asyncio.gather(*running, answer(history))

    engine.worker.batches.clear()
    got = asyncio.run(apart())
    assert got[:2] == alone and engine.worker.batches == [3]  # its history compressed mid-batch, then it joined
    engine.close()


def test_sessions_compressing_at_once_get_the_memories_they_get_one_at_a_time(tmp_path):
    """Exchanges of different sessions finished together are compressed in one padded read (ccm add_batch)."""
    params = Params(max_new_tokens=4)

    async def talk(engine, name, turns):
        out = []
        for text in turns:
            _, pieces = await engine.chat("", [user(text)], params, session=name)
            out.append("".join([p async for p in pieces]))
        return out

    async def run(engine, together):
        scripts = {f"s{i}": [f"fact {'x' * (2 + 3 * i)}", "what was it"] for i in range(3)}
        for name in scripts:
            await engine.create_session("", name, None)
        if not together:
            return [await talk(engine, n, t) for n, t in scripts.items()]
        release = threading.Event()
        blocker = asyncio.ensure_future(engine.worker.call(release.wait))
        tasks = [asyncio.ensure_future(talk(engine, n, t)) for n, t in scripts.items()]
        await asyncio.sleep(0.2)
        release.set()
        await blocker
        return await asyncio.gather(*tasks)

    first, second = make_engine(tmp_path / "a"), make_engine(tmp_path / "b")
    batched, single = asyncio.run(run(first, True)), asyncio.run(run(second, False))
    assert max(first.worker.fold_batches) > 1 and max(second.worker.fold_batches) == 1
    assert batched == single
    for name in ("s0", "s1", "s2"):
        assert first.store.get(name).memory_slots == second.store.get(name).memory_slots
    first.close()
    second.close()


def test_an_answer_never_read_still_frees_its_session(engine):
    """A client gone before its answer began: closing the unread pieces releases the session's lock."""

    async def scenario():
        await engine.create_session("", "s", None)
        _, pieces = await engine.chat("", [user("first")], Params(max_new_tokens=3), session="s")
        await pieces.aclose()  # never iterated
        _, again = await asyncio.wait_for(engine.chat("", [user("second")], Params(max_new_tokens=3), session="s"), 10)
        return "".join([p async for p in again])

    asyncio.run(scenario())
    assert engine.store.get("s").turns == 1  # the unread answer was not saved; the second one was


def test_an_answer_left_half_read_or_cut_at_a_stop_string_stops_its_decoding(engine, monkeypatch):
    """The model thread decoded a row to max_tokens after its client had gone or its stop string had matched."""
    told = []
    real = engine.worker.generate

    def generate(*args, cancelled=None, **kw):
        told.append(cancelled)
        return real(*args, cancelled=cancelled, **kw)

    monkeypatch.setattr(engine.worker, "generate", generate)

    async def left_after_one_piece():
        _, pieces = await engine.chat("", [user("hello there")], Params(max_new_tokens=16))
        async for _ in pieces:
            assert not told[-1].is_set()  # still reading
            break
        await pieces.aclose()

    asyncio.run(left_after_one_piece())
    assert told[-1].is_set()

    async def full_answer():
        _, pieces = await engine.chat("", [user("go on")], Params(max_new_tokens=12))
        return "".join([p async for p in pieces])

    text = asyncio.run(full_answer())
    stop = text.strip()[2:4]

    async def cut():
        _, pieces = await engine.chat("", [user("go on")], Params(max_new_tokens=12, stop=[stop]))
        out = []
        async for piece in pieces:
            out.append(piece)
        return "".join(out)

    assert stop not in asyncio.run(cut()) and told[-1].is_set()


def test_a_decoding_whose_reader_left_before_it_began_takes_no_place_in_a_batch(engine):
    import torch

    from ccmem.generation import Sampling

    async def scenario():
        release = threading.Event()
        blocker = asyncio.ensure_future(engine.worker.call(release.wait))  # hold the worker while jobs queue
        gone, staying = threading.Event(), threading.Event()
        query = torch.tensor([[5, 6, 7]])
        left = engine.worker.generate(engine.base.memory, query, 8, Sampling(), cancelled=gone)
        kept = engine.worker.generate(engine.base.memory, query, 8, Sampling(), cancelled=staying)
        gone.set()
        release.set()
        await blocker
        items = [await kept.get() for _ in range(9)]
        return await left.get(), items

    first, items = asyncio.run(scenario())
    assert first is None and items[-1] is None and len(items[:-1]) == 8
    assert engine.worker.batches[-1] == 1  # the job whose reader left was not decoded


def test_a_session_deleted_and_made_again_is_not_answered_from_the_old_memory(client, engine):
    client.post("/v1/sessions", json={"name": "s"})
    ask(client, [user("the secret is w1 w2 w3 w4 w5 w6")], session="s")
    assert engine.store.get("s").version == 2
    fresh = make_engine(engine.store.root.parent / "fresh")
    for store in (engine.store, fresh.store):  # deleted and made again by another worker: versions start over
        if store.exists("s"):
            store.delete("s")  # behind this engine's back (its RAM still holds version 2 of the old one)
        store.create("s", engine.identity, {})
        for version in (0, 1):
            store.save("s", engine.base.memory, engine.base.history, expect_version=version)
    reply = ask(client, [user("what is the secret")], session="s").json()
    with TestClient(create_app(fresh)) as other:
        expected = ask(other, [user("what is the secret")], session="s").json()
    assert reply["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"]
    assert reply["ccmem"]["memory_slots"] == expected["ccmem"]["memory_slots"]
    fresh.close()


def test_a_session_deleted_while_it_answers_is_made_again_without_the_old_exchange(engine):
    """DELETE during an answer, then POST of the same name: the answer's save landed in the new session (same
    version number, a transcript it extends), which then held the deleted conversation."""

    async def scenario():
        await engine.create_session("", "s", None)
        _, pieces = await engine.chat("", [user("the old secret")], Params(max_new_tokens=3), session="s")
        deleting = asyncio.ensure_future(engine.delete_session("", "s"))  # another request, while this one answers
        await asyncio.sleep(0.05)
        _ = [p async for p in pieces]
        await asyncio.wait_for(deleting, 10)
        await engine.create_session("", "s", None)

    asyncio.run(scenario())
    assert engine.store.get("s").transcript == [{"role": "system", "content": "be brief"}]


def test_a_store_that_fails_is_a_503_not_a_client_error(client, engine, monkeypatch):
    from ccmem.serve.sessions import StoreError

    def down(*args, **kwargs):
        raise StoreError("the session store at redis://x is unreachable")

    monkeypatch.setattr(engine.store, "get", down)
    monkeypatch.setattr(engine.store, "count", down)
    response = ask(client, [user("hi")], session="s")
    assert response.status_code == 503 and "unreachable" in response.json()["error"]["message"]
    assert client.get("/health").status_code == 503


def test_a_failing_disk_is_a_503_and_a_create_it_breaks_leaves_no_session(client, engine, monkeypatch):
    """A memory file that could not be written was a plain-text 500, and left a half-made session whose name the
    client's retry then found taken."""
    from ccmem.memory import Memory

    save = Memory.save

    def disk_full(self, path, *args, **kwargs):
        raise OSError(28, f"cannot write {path} (No space left on device)")

    monkeypatch.setattr(Memory, "save", disk_full)
    made = client.post("/v1/sessions", json={"name": "s"})
    assert made.status_code == 503, made.text
    error = made.json()["error"]
    assert error["code"] == "store_unavailable" and "No space left on device" in error["message"]
    assert client.get("/v1/sessions/s").status_code == 404
    monkeypatch.setattr(Memory, "save", save)
    assert client.post("/v1/sessions", json={"name": "s"}).status_code == 201  # the retry
    monkeypatch.setattr(Memory, "save", disk_full)
    response = ask(client, [user("hi")], session="s")
    assert response.status_code == 503 and response.json()["error"]["code"] == "store_unavailable"
    assert engine.store.get("s").turns == 0


def test_an_unexpected_fault_is_an_openai_shaped_500(engine, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(engine.store, "list", broken)
    with TestClient(create_app(engine), raise_server_exceptions=False) as client:
        response = client.get("/v1/sessions")
    assert response.status_code == 500  # was a text/plain "Internal Server Error" no client could read
    error = response.json()["error"]
    assert error["type"] == "server_error" and "RuntimeError" in error["message"] and "a bug" not in error["message"]


def test_bad_system_prompts_of_a_new_session_are_400s(client):
    body = '{"name": "s", "system_prompt": "a \\ud800 b"}'  # JSON's escape of a lone surrogate; was a 500
    made = client.post("/v1/sessions", content=body, headers={"Content-Type": "application/json"})
    assert made.status_code == 400 and made.json()["error"]["code"] == "invalid_text"
    assert client.post("/v1/sessions", json={"name": "s"}).status_code == 201
    # a system message after the first is the same mistake with a session as without one
    for session in (None, "s"):
        response = ask(client, [user("hi"), {"role": "system", "content": "be brief"}, user("q")], session=session)
        assert response.status_code == 400 and "may only come first" in response.json()["error"]["message"]


# ---------------------------------------------------------------- a real server and the official client


@contextlib.contextmanager
def serving(engine, tokens=()):
    """The URL of ``engine`` served by uvicorn on a free loopback port, in a thread, until the block ends."""
    import uvicorn

    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, tokens=tokens), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def live_server(engine):
    with serving(engine, tokens=["secret"]) as url:
        yield url


def test_the_official_openai_client_talks_to_a_live_server(live_server):
    from openai import AuthenticationError, NotFoundError, OpenAI

    client = OpenAI(base_url=live_server, api_key="secret", max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    reply = client.chat.completions.create(model=MODEL, messages=[user("hi there")], max_tokens=5)
    assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens >= 1
    client.post("/sessions", body={"name": "live"}, cast_to=dict)
    streamed = client.chat.completions.create(
        model=MODEL, messages=[user("hi there")], max_tokens=5, stream=True, extra_body={"session": "live"}
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert text.strip() == reply.choices[0].message.content  # the same memory (system prompt only), greedy
    info = client.get("/sessions/live", cast_to=dict)
    assert info["turns"] == 1
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model=MODEL, messages=[user("x")], extra_body={"session": "nobody"})
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=live_server, api_key="wrong", max_retries=0).models.list()


def test_a_top_p_below_float_precision_keeps_the_most_likely_token():
    """Found by fuzzing the server: top_p=5e-324 is 0 in float32 and used to keep no token at all."""
    import torch

    from ccmem.generation import Sampling

    logits = torch.tensor([0.1, 3.0, 0.2])
    assert Sampling(temperature=2.0, top_p=5e-324).pick(logits, torch.Generator().manual_seed(0)) == 1


def test_health_names_the_adapter_that_answers(tmp_path):
    from tests.unit.test_sessions import adapter_file

    lm = tiny_model("llama-gqa", positions=2048)
    path = adapter_file(lm, tmp_path, seed=3)
    base = ccmem.load(lm, method="ccm-concat", n_tok=2, adapter=path)
    engine = Engine(base, SessionStore(tmp_path / "store"), model_id=MODEL, limits=Limits())
    with TestClient(create_app(engine)) as client:
        health = client.get("/health").json()
    engine.close()
    assert health["adapter"] == base.adapter.hash and str(tmp_path) not in json.dumps(health)


def test_a_token_limit_over_the_servers_is_named_as_the_client_gave_it(client):
    for field in ("max_tokens", "max_completion_tokens"):
        reply = ask(client, [user("hi")], **{field: 10_000})
        assert reply.status_code == 400 and f"{field} is 10000, this server allows at most 16" in reply.text


def test_sampling_without_a_seed_varies_and_with_one_repeats(client):
    """Unseeded sampling always started from torch's one default seed: 'random' answers were the same every time."""
    body = {"temperature": 1.5, "max_tokens": 12}
    unseeded = {
        ask(client, [user("tell me something")], **body).json()["choices"][0]["message"]["content"] for _ in range(3)
    }
    assert len(unseeded) > 1
    seeded = {
        ask(client, [user("tell me something")], seed=7, **body).json()["choices"][0]["message"]["content"]
        for _ in range(2)
    }
    assert len(seeded) == 1


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"logprobs": True}, "logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"42": 5}}, "logit_bias"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}, "tools"),
    ],
)
def test_openai_parameters_that_would_change_the_answer_are_refused_not_ignored(client, extra, named):
    reply = ask(client, [user("hi")], **extra)
    assert reply.status_code == 400 and f"{named} is not supported by ccmem serve" in reply.json()["error"]["message"]


@pytest.mark.parametrize(
    ("extra", "hint"),
    [({"temprature": 1.5}, "did you mean 'temperature'?"), ({"max_token": 3}, "did you mean 'max_tokens'?"),
     ({"top_k": 5}, "ccmem serve takes ")],
)  # fmt: skip
def test_an_unknown_parameter_is_refused_and_named_not_ignored(client, extra, hint):
    """A misspelled temperature used to be dropped: the client got a greedy answer and no word about it."""
    reply = ask(client, [user("hi")], **extra)
    message = reply.json()["error"]["message"]
    assert reply.status_code == 400 and f"unrecognized request argument {next(iter(extra))!r}" in message
    assert hint in message


def test_openai_defaults_nulls_developer_role_lone_surrogates_and_model_lookup(client):
    """What the openai client sends: null for 'the default', the 'developer' role; a lone surrogate was a 500."""
    plain = ask(client, [user("hi")])
    nulls = ask(client, [user("hi")], temperature=None, top_p=None, n=None, stream=None, stop=None, seed=None)
    assert nulls.status_code == 200 and nulls.json()["choices"] == plain.json()["choices"]
    harmless = ask(client, [user("hi")], logprobs=False, response_format={"type": "text"}, tool_choice="none",
                   user="u1", metadata={"k": "v"}, store=False, parallel_tool_calls=True)  # fmt: skip
    assert harmless.status_code == 200 and harmless.json()["choices"] == plain.json()["choices"]
    developer = ask(client, [{"role": "developer", "content": "be brief"}, user("hi")])
    system = ask(client, [{"role": "system", "content": "be brief"}, user("hi")])
    assert developer.status_code == 200 and developer.json()["choices"] == system.json()["choices"]
    broken = client.post(
        "/v1/chat/completions",
        content=json.dumps({"model": MODEL, "messages": [user("a_SURROGATE_b")]}).replace("_SURROGATE_", "\\ud800"),
        headers={"content-type": "application/json"},
    )
    assert broken.status_code == 400 and "not a Unicode character" in broken.json()["error"]["message"]
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert client.get("/v1/models/other").status_code == 404


def test_many_system_prompts_with_a_small_cache_keep_working(tmp_path):
    engine = make_engine(tmp_path, prefix_cache=1)
    with TestClient(create_app(engine)) as client:
        for i in range(3):
            messages = [{"role": "system", "content": f"prompt {i}"}, user("hi")]
            assert ask(client, messages).status_code == 200
        assert len(engine._systems) <= 2
    engine.close()


def test_sessions_held_at_int8_take_less_memory_and_answer_alike_from_ram_and_from_the_store(tmp_path):
    import shutil

    from safetensors import safe_open

    engine = make_engine(tmp_path / "a", memory_dtype="int8")
    plain = make_engine(tmp_path / "b")
    replies = {}
    for name, e in (("int8", engine), ("float32", plain)):
        with TestClient(create_app(e)) as client:
            client.post("/v1/sessions", json={"name": "s"})
            ask(client, [user("my number is w1 w2 w3")], session="s")
            replies[name] = ask(client, [user("and again")], session="s").json()  # from the RAM copy
    record = engine.store.get("s")
    with safe_open(str(engine.store.memory_path(record)), "pt") as f:
        assert f.metadata()["storage"] == "int8"
    assert record.memory_bytes < plain.store.get("s").memory_bytes / 2  # scales cost more at head_dim 8
    assert replies["int8"]["ccmem"]["memory_slots"] == replies["float32"]["ccmem"]["memory_slots"]
    assert replies["int8"]["ccmem"]["memory_bytes"] == record.memory_bytes  # a reply says what is stored
    shutil.copytree(tmp_path / "a" / "store", tmp_path / "c" / "store")
    restarted = make_engine(tmp_path / "c", memory_dtype="int8")  # the same session read back from a file
    with TestClient(create_app(engine)) as warm, TestClient(create_app(restarted)) as cold:
        assert (
            ask(warm, [user("once more")], session="s").json()["choices"]
            == ask(cold, [user("once more")], session="s").json()["choices"]
        )
    for e in (engine, plain, restarted):
        e.close()


def test_auto_holds_a_float32_models_sessions_at_float16_and_one_past_its_range_at_bfloat16(tmp_path):
    """`ccmem serve`'s default (--memory-dtype auto): half the bytes of float32; a memory that float16 cannot
    hold (a value past 65504) is kept at bfloat16 rather than refused or turned into inf."""
    from safetensors import safe_open

    from ccmem.precision import PrecisionRangeError

    engine = make_engine(tmp_path / "a", memory_dtype="auto")
    plain = make_engine(tmp_path / "b")
    assert engine.memory_dtype == "float16"
    for e in (engine, plain):
        with TestClient(create_app(e)) as client:
            client.post("/v1/sessions", json={"name": "s"})
            assert ask(client, [user("my number is w1 w2 w3")], session="s").status_code == 200
    record = engine.store.get("s")
    with safe_open(str(engine.store.memory_path(record)), "pt") as f:
        assert f.metadata()["storage"] == "float16"
    assert record.memory_bytes * 2 == plain.store.get("s").memory_bytes

    memory = engine.base.fork().memory
    k, v = memory.layers[0]
    memory.layers[0] = (k, v * 0 + 1e6)  # a value float16 cannot hold
    assert engine._held(memory).storage == "bfloat16"
    named = make_engine(tmp_path / "c", memory_dtype="float16")
    with pytest.raises(PrecisionRangeError, match="bfloat16"):  # asked for float16 by name: said, not changed
        named._held(memory)
    for e in (engine, plain, named):
        e.close()


def test_an_unknown_memory_dtype_is_refused_naming_the_choices(tmp_path):
    with pytest.raises(ValueError, match="int8"):
        make_engine(tmp_path, memory_dtype="int4")


def test_serve_on_port_0_says_which_port_it_took_and_a_foreign_address_is_named(tmp_path, monkeypatch, capfd):
    """The banner said port 0 and uvicorn, given a socket, prints none: the server could not be found."""
    import re

    import uvicorn

    from ccmem.serve.server import bind, run

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    # uvicorn's logging setup (dictConfig) closes every handler there is, pytest's log capture among them, which
    # failed the next capture step ("I/O operation on closed file") after some other tests
    monkeypatch.setattr(uvicorn.Config, "configure_logging", lambda self: None)
    run(make_engine(tmp_path), port=0)
    said = re.search(r"listening on http://127\.0\.0\.1:(\d+)/v1", capfd.readouterr().err)
    assert said and int(said.group(1)) > 0
    with pytest.raises(ValueError, match="is the address one of this machine's"):  # not "the port is in use"
        bind("10.255.255.1", 0)


def test_request_shape_errors_say_what_to_send(client):
    """A bare POST /v1/sessions was refused although both fields are optional; malformed JSON said "9: JSON decode
    error"; a body sent without its content type said "Input should be a valid dictionary"; deleting an unknown
    session advised creating it first."""
    assert client.post("/v1/sessions").status_code == 201
    bad = client.post(
        "/v1/chat/completions", content=b'{"model": "x", bad', headers={"content-type": "application/json"}
    )
    assert bad.status_code == 400 and "not valid JSON (at character 15)" in bad.json()["error"]["message"]
    untyped = client.post("/v1/chat/completions", content=json.dumps({"model": MODEL, "messages": []}).encode())
    assert untyped.status_code == 400 and "Content-Type: application/json" in untyped.json()["error"]["message"]
    gone = client.delete("/v1/sessions/ghost")
    assert gone.status_code == 404 and gone.json()["error"]["message"].startswith("no session 'ghost' to delete")


def test_a_session_system_prompt_has_the_limit_of_any_message(tmp_path):
    """POST /v1/sessions capped system_prompt at 8,192 characters whatever --max-message-bytes allowed, while the
    same prompt as a system message of a chat request passed."""
    engine = make_engine(tmp_path, max_message_bytes=20_000, max_input_tokens=20_000)
    with TestClient(create_app(engine)) as client:
        long = client.post("/v1/sessions", json={"name": "a", "system_prompt": "w " * 5000})  # 10,000 bytes
        assert long.status_code in (200, 201, 400), long.text  # 400: a context too long for the tiny model
        over = client.post("/v1/sessions", json={"name": "b", "system_prompt": "w " * 10_001})
        assert over.status_code == 413 and "at most 20000" in over.json()["error"]["message"]
    engine.close()


def test_a_client_gone_while_its_turn_is_saved_leaves_the_session_locked_until_the_save_ends(engine, monkeypatch):
    """The save of a streamed turn runs after its last piece; a client that left then cancelled the request while
    the save went on in its thread, so the session's lock was freed before that save committed: the next request
    read the version before it and was refused (409) after answering."""
    from openai import OpenAI

    saving, real = threading.Event(), engine.store.save

    def slow(*args, **kwargs):
        saving.set()
        time.sleep(1.0)
        return real(*args, **kwargs)

    with serving(engine, tokens=["secret"]) as url:
        client = OpenAI(base_url=url, api_key="secret", max_retries=0)
        client.post("/sessions", body={"name": "gone"}, cast_to=dict)
        monkeypatch.setattr(engine.store, "save", slow)  # the turns' saves, not the one that made the session
        stream = client.chat.completions.create(
            model=MODEL, messages=[user("hi there")], max_tokens=4, stream=True, extra_body={"session": "gone"}
        )
        leaving = threading.Thread(target=lambda: saving.wait(30) and stream.response.close())
        leaving.start()
        with contextlib.suppress(Exception):  # the read the client broke off
            for _ in stream:
                pass
        leaving.join()
        assert saving.is_set()
        saving.clear()
        reply = client.chat.completions.create(
            model=MODEL, messages=[user("and now")], max_tokens=4, extra_body={"session": "gone"}
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert client.get("/sessions/gone", cast_to=dict)["turns"] == 2  # the turn of the client that left is kept
