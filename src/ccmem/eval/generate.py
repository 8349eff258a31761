"""Answers for a Prompt-with-Context file (the IC-Former seed's ``generate.py``): for each record, compress its
``input`` into a fresh memory, ask its ``prompt``, generate greedily until the end of the answer, and write one
JSON line per record (the reference answer and its ROUGE-L beside the output), whatever the method.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ccmem.api import CompressedLM
from ccmem.data.pwc import pwc_example
from ccmem.data.records import to_sample
from ccmem.eval.harness import read_context, rouge_l
from ccmem.fileio import atomic_path


def answer_records(
    session: CompressedLM, records: Sequence[dict[str, str]], *, max_new_tokens: int = 256
) -> Iterator[dict[str, Any]]:
    """One output row per PwC record (``input``, ``prompt``, ``answer``), in order; its ``id`` is the record's own
    when it has one, else its place in the file (0 for the first). A record that cannot be answered (a context too
    long for the method) raises :class:`ValueError` naming it."""
    tokenizer = session.lm.tokenizer
    stops = set(session.format.stop_ids())
    if getattr(tokenizer, "eos_token_id", None) is not None:
        stops.add(int(tokenizer.eos_token_id))

    def start(i: int) -> Iterator[int]:
        """Record ``i``'s context compressed into a fresh memory, and its answer's tokens (lazily)."""
        record = records[i]
        example = pwc_example(f"record {i + 1}", record)
        query = to_sample(tokenizer, example, system=session.system_prompt)
        try:
            read_context(session, example)
            return session.stream_ids(query.tail[: query.answer_start], max_new_tokens, stop_ids=stops)
        except ValueError as err:
            raise ValueError(f"record {i + 1} (id {record.get('id', i)!r}): {err}") from None

    if len(records) > 1:  # the longest record first, unanswered: one too long is refused before the others' work
        start(max(range(len(records)), key=lambda i: _length(tokenizer, records[i])))
    for i, record in enumerate(records):
        tokens: list[int] = []
        with torch.no_grad():
            for token in start(i):
                if token in stops:
                    break
                tokens.append(token)
        output = str(tokenizer.decode(tokens, skip_special_tokens=True)).strip()
        yield {
            "id": record.get("id", i),
            "prompt": record["prompt"],
            "answer": record["answer"],
            "output": output,
            "rouge_l": round(rouge_l(output, record["answer"]), 4),
            "memory_slots": session.memory.num_slots,
        }


def _length(tokenizer: Any, record: dict[str, str]) -> int:
    return len(tokenizer.encode(record["input"])) + len(tokenizer.encode(record["prompt"]))


def generate_file(
    session: CompressedLM,
    records: Sequence[dict[str, str]],
    output: Path,
    *,
    max_new_tokens: int = 256,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Answer ``records`` and write them to ``output`` (JSON lines, written atomically); return the rows. If a
    record fails, the answers before it are written (and the error, naming the record, says so)."""
    rows: list[dict[str, Any]] = []
    try:
        for row in answer_records(session, records, max_new_tokens=max_new_tokens):
            rows.append(row)
            if progress:
                progress(len(rows))
    except ValueError as err:
        if not rows:
            raise
        _write(rows, output)
        raise ValueError(f"{err} (the {len(rows)} answers before it are in {output})") from None
    _write(rows, output)
    return rows


def _write(rows: Sequence[dict[str, Any]], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
