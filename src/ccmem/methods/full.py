"""The two reference points of every report: the whole context, and no context at all."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ccmem.loading import LoadedModel
from ccmem.memory import Memory
from ccmem.methods.base import Method, run_decoder, updated_memory


@dataclass
class FullContext(Method):
    """Keep every context token in the key/value cache (the upper bound on quality and on memory)."""

    name = "full"

    def add(self, lm: LoadedModel, memory: Memory, ids: torch.Tensor) -> Memory:
        cache = memory.to_cache()
        run_decoder(lm, ids, cache, memory.next_position)
        return updated_memory(memory, Memory.layers_of(cache), steps=memory.steps + 1, advance=ids.shape[-1])


@dataclass
class NoContext(Method):
    """Drop the context (keep only the attention sink): the lower bound every compression must beat."""

    name = "none"
    uses_positions = False

    def add(self, lm: LoadedModel, memory: Memory, ids: torch.Tensor) -> Memory:
        # Positions do not advance either: the model sees the query as if the context never happened.
        return memory
