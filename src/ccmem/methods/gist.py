"""Gisting (Mu et al., NeurIPS 2023, arXiv:2304.08467): the whole context compressed once into gist tokens.

The baseline CCM builds on: one <COMP> block after the *entire* context, no recurrence. In a growing
interaction each ``add`` therefore recompresses everything seen so far (kept as ``Memory.context_ids``),
which costs a pass over the whole history per turn but keeps memory at ``n_tok`` slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ccmem.loading import LoadedModel
from ccmem.memory import Memory
from ccmem.methods.base import updated_memory
from ccmem.methods.ccm import CCM, appended


@dataclass
class Gist(CCM):
    """Gist tokens: ``n_tok`` <COMP> slots summarising the whole context at once."""

    name: ClassVar[str] = "gist"
    update: ClassVar[str] = "concat"

    def add(self, lm: LoadedModel, memory: Memory, ids: torch.Tensor) -> Memory:
        context = ids if memory.context_ids is None else torch.cat([memory.context_ids, ids], dim=-1)
        sink = torch.arange(memory.sink, device=lm.device)
        # The sink occupies positions 0..sink-1, so the context always restarts right after it.
        base = Memory(layers=memory.select(sink), next_position=memory.sink, sink=memory.sink, meta=memory.meta)
        layers = appended(base, self.compress_step(lm, base, context))
        return updated_memory(base, layers, steps=1, advance=context.shape[-1] + self.n_tok, context_ids=context)
