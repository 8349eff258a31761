"""Turn a chat (context turns, a question, its answer) into a parallel-training :class:`Sample`."""

from __future__ import annotations

from typing import Any

from ccmem.chat import ChatFormat, Message
from ccmem.methods.ccm import Sample


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

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    sink: list[int] = []
    if system is not None:
        history = [{"role": "system", "content": system}]
        sink = encode(fmt.delta([], history))
    chunks = []
    for user, assistant in turns:
        new: list[Message] = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        chunks.append(encode(fmt.delta(history, new)))
        history = history + new
    query = encode(fmt.delta(history, [{"role": "user", "content": question}], generation_prompt=True))
    reply = encode(answer)
    eos = getattr(tokenizer, "eos_token_id", None)
    stops = fmt.stop_ids()
    if stops:  # the answer ends the turn, so the model learns to stop
        reply.append(eos if eos in stops else min(stops))
    return Sample(chunks=chunks, tail=query + reply, sink=sink, answer_start=len(query))
