"""Threads sharing a model or a session, as a web app's handlers do: they take turns and lose nothing."""

from __future__ import annotations

import threading

import pytest
import torch

import ccmem
from ccmem.api import ContextTooLongError
from ccmem.memory import MemoryMismatchError
from tests.conftest import randomize_lora, tiny_model


def _run(workers):
    errors = []

    def guarded(work):
        try:
            work()
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=guarded, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_sessions_of_different_methods_on_one_model_in_threads_equal_one_after_another():
    """A thread decoding with ccm-concat ran under the LoRA hooks another thread's ccm-merge had installed: wrong
    answers without an error, or 'LoRA gate of shape ... does not match'."""
    lm = tiny_model()
    turns = [(f"fact {i} is w{i}", "ok") for i in range(4)]
    bases = {}
    for method in ("ccm-concat", "ccm-merge", "full", "snapkv"):
        options = {"n_tok": 2} if method.startswith("ccm") else {}
        bases[method] = ccmem.load(lm, method, system_prompt="Hi.", **options)
        if method.startswith("ccm"):
            randomize_lora(bases[method].method, lm)  # so that a forward under the wrong hooks shows

    def chat(session):
        for u, a in turns:
            session.remember(u, a)
        return session.memory.num_slots, session.generate("which fact?", max_new_tokens=4)

    alone = {m: chat(base.fork()) for m, base in bases.items()}
    together = {}

    def work(method):
        return lambda: together.update({method: chat(bases[method].fork())})

    assert _run([work(m) for m in bases]) == []
    assert together == alone


def test_threads_sharing_one_session_lose_no_turn():
    """Four threads remembering on one session: the transcript held 9 turns and the memory 3 turns' worth."""
    session = ccmem.load(tiny_model(), "ccm-concat", n_tok=2, system_prompt="Hi.")
    start = session.memory.num_slots

    def work(k):
        return lambda: [session.remember(f"thread {k} turn {i}", "ok") for i in range(3)]

    assert _run([work(k) for k in range(4)]) == []
    turns = [m for m in session.history if m["role"] == "user"]
    assert len(turns) == 12 and session.memory.num_slots == start + 12 * 2  # 2 <COMP> slots per exchange


def test_restore_refuses_a_memory_of_another_method_as_load_memory_does(tmp_path):
    lm = tiny_model()
    concat = ccmem.load(lm, "ccm-concat", n_tok=2, system_prompt="Hi.")
    concat.remember("My dog is Rex.", "Nice.")
    full = ccmem.load(lm, "full", system_prompt="Hi.")
    with pytest.raises(MemoryMismatchError, match="the restored memory was made with method='ccm-concat'"):
        full.restore(concat.memory, concat.history)


def test_one_add_longer_than_the_model_says_to_add_it_in_parts():
    """The advice was 'use a method that keeps fewer slots', which cannot help one add longer than the model."""
    session = ccmem.load(tiny_model(), "ccm-merge", n_tok=2, system_prompt="Hi.")
    with pytest.raises(ContextTooLongError, match=r"add the text in parts \(several add\(\) calls"):
        session.add_ids(torch.randint(3, 90, (300,)).tolist())
    for part in range(3):  # the same text in parts goes in
        session.add_ids(torch.randint(3, 90, (100,), generator=torch.Generator().manual_seed(part)).tolist())


def test_a_misspelt_sampling_argument_or_a_session_for_a_model_is_said_at_the_call():
    session = ccmem.load(tiny_model(), "none", system_prompt="Hi.")
    with pytest.raises(TypeError, match="generate"):
        session.generate("hi", temprature=0.5)  # was a TypeError naming stream_ids(), at the first piece
    with pytest.raises(TypeError, match="stream"):
        session.stream("hi", temprature=0.5)
    with pytest.raises(ValueError, match=r"not a session: pass the session's model, ccmem\.load\(session\.lm"):
        ccmem.load(session, "full")


@pytest.mark.parametrize("batch", ["generate_batch", "add_batch"])
def test_batched_calls_hold_each_sessions_lock_as_its_own_calls_do(monkeypatch, batch):
    """generate_batch re-based a session's memory (make_room) without its lock: an add() another thread finished
    meanwhile was overwritten by the memory read before it."""
    from ccmem import api

    lm = tiny_model(positions=64)
    sessions = [ccmem.load(lm, "ccm-concat", n_tok=1, system_prompt=f"sys {i}") for i in range(2)]
    held = []
    original = api.make_room

    def taken_elsewhere(lock) -> bool:  # whether another thread could not take the lock now
        got = []

        def probe():
            got.append(lock.acquire(blocking=False))
            if got[0]:
                lock.release()

        thread = threading.Thread(target=probe)
        thread.start()
        thread.join()
        return not got[0]

    def spy(lm_, memory, n, *reading):
        held.append([taken_elsewhere(s._lock) for s in sessions])
        return original(lm_, memory, n, *reading)

    monkeypatch.setattr(api, "make_room", spy)
    if batch == "generate_batch":
        ccmem.generate_batch(sessions, ["a question?", "another?"], max_new_tokens=2)
    else:
        api.add_batch(sessions, [[{"role": "user", "content": "hi"}]] * 2)
    assert held and all(all(row) for row in held)
    with pytest.raises(ValueError, match="a session is given twice"):
        api.add_batch([sessions[0], sessions[0]], [[{"role": "user", "content": "hi"}]] * 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 2.5}, "max_new_tokens must be a whole number of tokens, got 2.5"),
        ({"max_new_tokens": "5"}, "max_new_tokens must be a whole number of tokens, got '5'"),
        ({"max_new_tokens": None}, "max_new_tokens must be a whole number of tokens, got None"),
        ({"temperature": "hot"}, "temperature must be a number, got 'hot'"),
        ({"top_p": None}, "top_p must be a number, got None"),
        ({"temperature": 1.0, "seed": "abc"}, "seed must be an integer, got 'abc'"),
    ],
)
def test_a_generation_argument_of_the_wrong_type_is_named_at_the_call(kwargs, message):
    """They were TypeErrors from inside the loop ('<' not supported ...), and for stream() only at the first piece."""
    session = ccmem.load(tiny_model(), "full", system_prompt="Hi.")
    with pytest.raises(ValueError, match=message):
        session.stream("hi", **kwargs)  # no piece asked for
    with pytest.raises(ValueError, match=message):
        ccmem.generate_batch([session], ["hi"], **kwargs)


def test_a_numpy_seed_is_an_integer_as_a_numpy_max_new_tokens_is():
    """np.int64(7) was refused as 'seed must be an integer', while max_new_tokens took np.int64."""
    np = pytest.importorskip("numpy")
    session = ccmem.load(tiny_model(), "full", system_prompt="Hi.")
    as_int = session.generate("hi", 4, temperature=1.0, seed=7)
    assert session.generate("hi", np.int64(4), temperature=1.0, seed=np.int64(7)) == as_int
    assert ccmem.generate_batch([session], ["hi"], 4, temperature=1.0, seed=[np.int64(7)]) == [as_int]


def test_a_system_prompt_that_is_not_text_and_a_batch_of_models_are_refused(tmp_path):
    lm = tiny_model()
    with pytest.raises(ValueError, match="system_prompt must be text or None"):
        ccmem.load(lm, "full", system_prompt=5)  # was saved, then refused by its own session as a damaged file
    with pytest.raises(ValueError, match="session 0 is a LoadedModel, not a session"):
        ccmem.generate_batch([lm], ["a"])
    session = ccmem.load(lm, "full", system_prompt="Hi.")
    session.add("some context")
    path = session.save_memory(tmp_path / "m.safetensors", dtype=torch.float16)  # a torch dtype, as load() takes
    assert ccmem.load(lm, "full", system_prompt="Hi.").load_memory(path).num_slots == session.memory.num_slots


def test_fork_waits_for_a_reset_in_another_thread():
    """fork() took no turn: a copy made while reset() re-read the system prompt held an empty history and memory,
    and its next add rendered the chat template's default system prompt into the memory, without an error."""
    session = ccmem.load(tiny_model(), "full", system_prompt="Hi.")
    forked = []
    with session._lock:  # another call (a reset) is under way on this session
        thread = threading.Thread(target=lambda: forked.append(session.fork()))
        thread.start()
        thread.join(timeout=0.5)
        assert thread.is_alive() and not forked  # fork waits its turn
    thread.join()
    assert forked[0].history == session.history and forked[0].memory is session.memory
