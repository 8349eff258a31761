"""The two reference points of every report: the whole context, and no context at all."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ccmem.loading import LoadedModel
from ccmem.memory import Memory
from ccmem.methods.base import Method, answer_loss, run_decoder, updated_memory


@dataclass
class FlatBatch:
    """Whole interactions as plain causal sequences (right-padded), labels on the answers only."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor


@dataclass
class FullContext(Method):
    """Keep every context token in the key/value cache (the upper bound on quality and on memory)."""

    name = "full"

    def add(self, lm: LoadedModel, memory: Memory, ids: torch.Tensor) -> Memory:
        cache = memory.to_cache()
        run_decoder(lm, ids, cache, memory.next_position)
        return updated_memory(memory, Memory.layers_of(cache), steps=memory.steps + 1, advance=ids.shape[-1])

    def make_batch(self, samples: list[Any], pad_id: int = 0) -> FlatBatch:
        """Each sample as ``[sink][c1]...[ck][tail]`` read with ordinary causal attention (stage-1 finetuning)."""
        rows = [[*s.sink, *(t for c in s.chunks for t in c), *s.tail] for s in samples]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for b, (row, s) in enumerate(zip(rows, samples, strict=True)):
            ids[b, : len(row)] = torch.tensor(row)
            mask[b, : len(row)] = 1
            answer = len(row) - len(s.tail) + s.answer_start
            labels[b, answer : len(row)] = ids[b, answer : len(row)]
        return FlatBatch(ids, labels, mask)

    def training_loss(self, lm: LoadedModel, batch: FlatBatch) -> torch.Tensor:
        hidden = lm.model.base_model(
            input_ids=batch.input_ids.to(lm.device), attention_mask=batch.attention_mask.to(lm.device), use_cache=False
        ).last_hidden_state
        return answer_loss(lm, hidden, batch.labels)


@dataclass
class NoContext(Method):
    """Drop the context (keep only the attention sink): the lower bound every compression must beat."""

    name = "none"
    uses_positions = False

    def add(self, lm: LoadedModel, memory: Memory, ids: torch.Tensor) -> Memory:
        # Positions do not advance either: the model sees the query as if the context never happened.
        return memory
