"""The training record every method lays out (:class:`Sample`), and how a chat becomes one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ccmem.chat import ChatFormat, Message


@dataclass
class Sample:
    """One interaction as token ids: ``[sink][c1]...[ck][tail]``.

    ``chunks`` are the context segments (turns, demonstrations), compressed one step each by recurrent
    methods; ``tail[answer_start:]`` are the tokens trained on (the answer); everything before them (sink,
    context, the question) is read but never a label.
    """

    chunks: list[list[int]]
    tail: list[int]
    sink: list[int] = field(default_factory=list)
    answer_start: int = 0
    #: Token offsets into the answer (``tail[answer_start:]``) after which a reasoning step ends, by how they were
    #: found (``labelled``: after a calculation or a conclusion; ``newline``: at a line end); reasoning
    #: compression cuts the answer there.
    steps: dict[str, list[int]] = field(default_factory=dict)
    #: The chunks are trained on too (a reasoning trace cut into segments), not only the answer in the tail.
    label_chunks: bool = False

    @property
    def tokens(self) -> list[int]:
        """Every token in reading order (what full attention reads)."""
        return [*self.sink, *(t for c in self.chunks for t in c), *self.tail]


def chat_sample(
    tokenizer: Any,
    turns: list[tuple[str, str]],
    question: str,
    answer: str,
    *,
    system: str | None = None,
) -> Sample:
    """Tokenize exactly as :class:`ccmem.CompressedLM` does at inference: system prompt as the sink, one
    chunk per (user, assistant) turn, then the question with the generation prompt; only the answer and
    its end-of-turn token are labels."""
    fmt = ChatFormat(tokenizer)
    history: list[Message] = []
    sink: list[int] = []
    if system is not None:
        history = [{"role": "system", "content": system}]
        sink = fmt.delta_ids([], history)
    chunks = []
    for user, assistant in turns:
        new: list[Message] = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        chunks.append(fmt.delta_ids(history, new))
        history = history + new
    query = fmt.delta_ids(history, [{"role": "user", "content": question}], generation_prompt=True)
    reply = fmt.answer_ids(answer) + fmt.end_of_turn_ids()  # the answer ends the turn: the model learns to stop
    return Sample(chunks=chunks, tail=query + reply, sink=sink, answer_start=len(query))
