"""Local attention at a compression ratio: the baseline of Ren et al. (EMNLP 2023) that forgets the oldest context.

The context token with index ``j`` attends to indices ``floor(r·j) .. j`` (the reproduction's rule), so after
``n`` tokens the memory keeps the last ``n - floor(r·n)`` entries: as many as ``sentinel`` keeps at the same
ratio. Unlike ``streaming-llm`` it is finetuned (a LoRA, rank 16) to read with that mask, and it keeps no
attention sinks beyond the system prompt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from ccmem.loading import LoadedModel
from ccmem.methods.sparse import SparseMethod, Where
from ccmem.registry import register
from ccmem.sparse_masks import SparseLayout, layout_local


@register
@dataclass
class LocalAttention(SparseMethod):
    """Local attention: each token sees the most recent (1 - r) share of the context (a finetuned baseline)."""

    name: ClassVar[str] = "local"

    def layout(self, lm: LoadedModel | None, ids: list[int], where: Where, rng: random.Random) -> SparseLayout:
        return layout_local(
            where.sink,
            where.context(ids),
            where.tail,
            self.compression_ratio,
            start_position=where.start_position,
            context_before=where.context_before,
        )
