"""Pre-defined test conversations (CCM's ``src/test.py`` idea): facts stated early, asked about later.

Edit or extend these to try your own; ``ccmem demo`` runs every method on each of them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Question:
    text: str
    expected: str  # a word the right answer contains (case-insensitive); also the right option
    distractors: tuple[str, ...] = ()  # wrong options for likelihood scoring

    @property
    def options(self) -> list[str]:
        return [self.expected, *self.distractors]


@dataclass(frozen=True)
class Example:
    name: str
    turns: list[tuple[str, str]]  # (user, assistant) pairs, each compressed as one chunk
    questions: list[Question]


EXAMPLES: list[Example] = [
    Example(
        name="personal facts",
        turns=[
            (
                "Hi! My name is Alice and I live in Lisbon.",
                "Nice to meet you, Alice! Lisbon is a beautiful city.",
            ),
            ("I have a dog called Biscuit.", "Biscuit is a lovely name for a dog."),
            ("I work as a nurse at the city hospital.", "That sounds like rewarding work."),
            ("My favourite food is grilled sardines.", "Grilled sardines are a Lisbon classic!"),
        ],
        questions=[
            Question("What is the name of my dog?", "Biscuit", ("Max", "Luna", "Rocky")),
            Question("In which city do I live?", "Lisbon", ("Madrid", "Paris", "Berlin")),
            Question("What is my job?", "nurse", ("teacher", "lawyer", "pilot")),
        ],
    ),
]
