"""``ccmem demo``: every method on the pre-defined conversations, side by side."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ccmem.adapter import default_methods
from ccmem.api import CompressedLM, load
from ccmem.eval.harness import check_options_apply, options_for
from ccmem.examples import EXAMPLES, Example
from ccmem.loading import LoadedModel

logger = logging.getLogger(__name__)


@dataclass
class DemoRow:
    """One answer, with what it cost. Written as a JSON line by ``ccmem demo --out``."""

    example: str
    method: str
    adapter: str  # the adapter file's hash (as eval rows give it), "untrained", or "-" (methods without an adapter)
    question: str
    answer: str
    correct: bool  # the free-generation answer contains the expected word
    option_correct: bool  # the expected option has the highest likelihood among the question's options
    memory_slots: int
    memory_bytes: int
    compress_seconds: float
    answer_seconds: float


def run_session(session: CompressedLM, example: Example, max_new_tokens: int) -> Iterator[DemoRow]:
    """Compress the example's turns, then answer each question from memory."""
    started = time.perf_counter()
    for user, assistant in example.turns:
        session.remember(user, assistant)
    compress_seconds = time.perf_counter() - started
    method = session.method
    adapter = ("untrained" if session.adapter is None else session.adapter.hash) if method.kind == "learned" else "-"
    for question in example.questions:
        started = time.perf_counter()
        answer = session.generate(question.text, max_new_tokens=max_new_tokens)
        # Options are scored as the start of the answer, the way the model would phrase it.
        chosen = session.choose(question.text, question.options) if question.distractors else -1
        yield DemoRow(
            example=example.name,
            method=method.name,
            adapter=adapter,
            question=question.text,
            answer=answer,
            correct=question.expected.lower() in answer.lower(),
            option_correct=chosen == 0,
            memory_slots=session.memory.num_slots,
            memory_bytes=session.memory.nbytes,
            compress_seconds=round(compress_seconds, 3),
            answer_seconds=round(time.perf_counter() - started, 3),
        )


def run_demo(
    lm: LoadedModel,
    methods: Sequence[str] | None = None,
    *,
    options: dict[str, Any] | None = None,
    max_new_tokens: int = 24,
    examples: Sequence[Example] = EXAMPLES,
    out: Path | None = None,
) -> Iterator[DemoRow]:
    """Yield a :class:`DemoRow` per (method, question); one model is shared by every method in turn.

    ``methods``: default, the baselines and the learned methods that have an adapter for the model.

    ``options`` are method options, each given to the methods that declare it (e.g. ``n_tok`` to CCM and gist).
    """
    options = options or {}
    methods = default_methods(lm.name) if methods is None else methods
    check_options_apply(methods, options)
    for name in methods:
        session = load(lm, method=name, **options_for(name, options))
        for example in examples:
            session.reset()
            for row in run_session(session, example, max_new_tokens):
                if out is not None:
                    with out.open("a") as f:
                        f.write(json.dumps(asdict(row)) + "\n")
                yield row
