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
