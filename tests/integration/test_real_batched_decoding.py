"""decode_batch on the real default model with its shipped adapters: the tokens each session gets alone."""

from __future__ import annotations

import pytest

import ccmem
from ccmem.generation import decode, decode_batch
from ccmem.loading import load_model

pytestmark = pytest.mark.real_model

TURNS = [
    ("My dog is called Biscuit.", "Nice name!"),
    ("I live in Porto.", "Lovely city."),
    ("My favourite colour is green.", "Noted."),
]


@pytest.mark.parametrize("method", ["ccm-concat", "ccm-merge", "full"])
def test_sessions_of_different_lengths_decode_together_as_alone(method):
    lm = load_model("smollm2-135m")
    sessions = []
    for n in (0, 1, 3):  # an empty history, one turn, three turns
        s = ccmem.load(lm, method=method)
        for user, assistant in TURNS[:n]:
            s.remember(user, assistant)
        sessions.append(s)
    queries = [
        s.query_ids(q) for s, q in zip(sessions, ["Hi!", "Where do I live?", "What is my dog called?"], strict=True)
    ]
    alone = [list(decode(lm, s.method, s.memory, q, 12)) for s, q in zip(sessions, queries, strict=True)]
    steps = list(decode_batch(lm, sessions[0].method, [s.memory for s in sessions], queries, 12))
    assert [[step[b] for step in steps] for b in range(3)] == alone
