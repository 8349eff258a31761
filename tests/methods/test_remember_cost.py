"""Folding one finished turn into memory costs one forward over that turn, never a re-reading of the history."""

from __future__ import annotations

import pytest
import torch

import ccmem
from ccmem.api import CompressedLM
from tests.conftest import randomize_lora, tiny_model

TURN = ("What is the name of my dog again?", "Your dog is called Biscuit, you told me.")


def history(n_turns: int) -> list[tuple[str, str]]:
    return [(f"Turn {i}: tell me something new please.", f"Here is fact number {i} for you.") for i in range(n_turns)]


def reads_while_remembering(session: CompressedLM) -> list[int]:
    """Tokens each forward of the decoder stack reads while the session remembers :data:`TURN`."""
    reads: list[int] = []

    def count(module, args, kwargs):
        x = kwargs.get("input_ids")
        x = kwargs.get("inputs_embeds") if x is None else x
        reads.append(int(x.shape[1]))

    handle = session.lm.model.base_model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        session.remember(*TURN)
    finally:
        handle.remove()
    return reads


@pytest.mark.parametrize(("name", "options"), [("full", {}), ("ccm-concat", {"n_tok": 3}), ("ccm-merge", {"n_tok": 4})])
def test_remembering_a_turn_reads_only_that_turn_whatever_the_history(name, options):
    lm = tiny_model(positions=4096)
    method = ccmem.get_method(name, **options)
    if method.trainable:
        randomize_lora(method, lm)
    comp_tokens = options.get("n_tok", 0)  # the <COMP> tokens read with the turn (full has none)
    reads = {}
    for n_turns in (1, 30):
        session = CompressedLM(lm, method, system_prompt="You are helpful.")
        for user, assistant in history(n_turns):
            session.remember(user, assistant)
        before = session.memory.next_position
        messages = [{"role": "user", "content": TURN[0]}, {"role": "assistant", "content": TURN[1]}]
        turn_tokens = len(lm.tokenizer.encode(session.format.delta(session.history, messages)))
        reads[n_turns] = reads_while_remembering(session)
        assert reads[n_turns] == [turn_tokens + comp_tokens]  # one forward over the new turn and its <COMP> tokens
        assert session.memory.next_position == before + turn_tokens + comp_tokens
    assert reads[30] == reads[1]  # 29 more turns of history cost nothing when a new turn is folded in
    assert session.memory.next_position > 10 * reads[30][0]  # the history really was long


def test_the_count_sees_every_forward():
    """The hook counts what the model reads: reading a query with the memory shows up as one forward."""
    lm = tiny_model()
    session = CompressedLM(lm, ccmem.get_method("full"), system_prompt="sys")
    reads: list[int] = []
    handle = lm.model.base_model.register_forward_pre_hook(
        lambda m, a, k: reads.append(int(k["input_ids"].shape[1])), with_kwargs=True
    )
    try:
        list(session.stream_ids(torch.tensor([[5, 6, 7]]), 3, stop_ids=set()))
    finally:
        handle.remove()
    assert reads == [3, 1, 1]
