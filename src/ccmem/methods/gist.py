"""Gisting (Mu et al., NeurIPS 2023, arXiv:2304.08467): the whole context compressed once into gist tokens.

The baseline CCM builds on: one <COMP> block after the *entire* context, no recurrence. In a growing
interaction each ``add`` therefore recompresses everything seen so far (kept in ``Memory.state`` as
``context_ids``, which is not key/value memory), which costs a pass over the whole history per turn but keeps
memory at ``n_tok`` slots. Trained with the same recipe as CCM (the reference's ``comp_type fixed``): the
parallel layout is CCM's with the whole context as one chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ccmem.data.samples import Sample
from ccmem.loading import LoadedModel
from ccmem.memory import Memory, concat_layers, concat_positions
from ccmem.methods.ccm import CompTokens, ParallelBatch, lay_out
from ccmem.registry import register


@register
@dataclass
class Gist(CompTokens):
    """Gist tokens: ``n_tok`` <COMP> slots summarising the whole context at once."""

    name: ClassVar[str] = "gist"
    paper: ClassVar[str] = "Mu et al., Learning to Compress Prompts with Gist Tokens, NeurIPS 2023"

    def positions_needed(self, memory: Memory, n_tokens: int) -> int:
        # The context restarts right after the sink each time; only the first add places the gist tokens.
        return n_tokens + (0 if "context_ids" in memory.state else self.n_tok)

    def add(self, lm: LoadedModel, memory: Memory, ids: torch.Tensor) -> Memory:
        return self.add_batch(lm, [memory], [ids])[0]

    def add_batch(self, lm: LoadedModel, memories: list[Memory], ids: list[torch.Tensor]) -> list[Memory]:
        contexts, bases = [], []
        for memory, new in zip(memories, ids, strict=True):
            previous = memory.state.get("context_ids")
            contexts.append(new if previous is None else torch.cat([previous.to(new.device), new], dim=-1))
            # The sink occupies positions 0..sink-1, so the context always starts right after it.
            base = memory.prefix(memory.sink)
            bases.append(base.with_layers(base.layers, base.positions, next_position=memory.sink))
        out = []
        for base, context, comp in zip(bases, contexts, self.compress_batch(lm, bases, contexts), strict=True):
            start = base.sink + context.shape[-1]
            out.append(
                base.with_layers(
                    concat_layers([base.layers, comp]),
                    concat_positions([base.positions, self.comp_positions(comp, start)]),
                    next_position=start + self.n_tok,
                    state={"context_ids": context},
                )
            )
        return out

    def lay_out(self, samples: list[Sample], pad_id: int) -> ParallelBatch:
        whole = [Sample([[t for c in s.chunks for t in c]], s.tail, s.sink, s.answer_start) for s in samples]
        return lay_out(whole, pad_id, n_tok=self.n_tok, update="concat", recurrent=True)

    def sample_length(self, sample: Sample) -> int:
        return len(sample.tokens) + self.n_tok
