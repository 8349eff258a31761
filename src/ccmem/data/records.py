"""The one record every dataset loader produces, and how it becomes a training :class:`Sample`.

A :class:`MemoryExample` is context to compress (chat turns or plain-text segments, one compression
step each), then a query, its answer and, for classification tasks, the answer options. Training and
evaluation read the same records, so a loader written once serves ``ccmem train`` and ``ccmem eval``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from ccmem.chat import ChatFormat
from ccmem.data.samples import chat_sample
from ccmem.methods.ccm import Sample

Turn = tuple[str, str]


def split_of(name: str) -> str:
    """The split a document belongs to by the hash of its name (70% train, 10% validation, 20% test), so that
    no document is ever in two splits, whatever else is added to the corpus."""
    bucket = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10
    return "test" if bucket < 2 else "validation" if bucket < 3 else "train"


@dataclass
class MemoryExample:
    """Context segments, then ``query`` -> ``answer``.

    ``chat=True``: ``context`` holds (user, assistant) turns and the query is a new user turn, all in
    the model's chat template. ``chat=False``: ``context`` holds plain-text segments (demonstrations,
    profile items, paragraphs) and the query is plain text continued by the answer.
    """

    id: str
    context: list[Any]  # list[Turn] when chat else list[str]
    query: str
    answer: str
    options: list[str] = field(default_factory=list)
    chat: bool = True
    task: str = ""
    groups: dict[str, str] = field(
        default_factory=dict
    )  # e.g. {"distance": "2-4"}: accuracy is also reported per group

    def __post_init__(self) -> None:
        if self.options and self.answer not in self.options:
            raise ValueError(f"example {self.id}: the answer {self.answer!r} is not one of its options")


def examples_digest(examples: list[MemoryExample]) -> str:
    """A short hash of what the examples hold (context, query, answer, options): rows measured on other data
    never share a config hash, whatever file or generator setting produced it."""
    blob = json.dumps(
        [[e.id, e.context, e.query, e.answer, e.options, e.chat] for e in examples], sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def text_sample(tokenizer: Any, segments: list[str], query: str, answer: str, *, system: str | None = None) -> Sample:
    """Plain-text counterpart of :func:`chat_sample`: each segment is one chunk, the answer continues the query."""

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    sink = ChatFormat(tokenizer).delta_ids([], [{"role": "system", "content": system}]) if system else []
    query_ids = encode(query)
    return Sample(
        chunks=[encode(s) for s in segments],
        tail=query_ids + encode(answer),
        sink=sink,
        answer_start=len(query_ids),
    )


def to_sample(tokenizer: Any, example: MemoryExample, *, system: str | None = None) -> Sample:
    """Tokenize ``example`` exactly as :class:`ccmem.CompressedLM` reads it at evaluation time."""
    if example.task == "gsm8k":  # a reasoning trace: also where its steps end
        from ccmem.data.gsm8k import reasoning_sample

        return reasoning_sample(tokenizer, example.query, example.answer, system=system)
    if example.chat:
        return chat_sample(tokenizer, example.context, example.query, example.answer, system=system)
    sample = text_sample(tokenizer, example.context, example.query, example.answer, system=system)
    if example.task == "stream":  # text read as a stream: every block is language-modelled, not only the last
        sample.label_chunks = True
    return sample
