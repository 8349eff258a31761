"""Scattered attention at a compression ratio: the baseline of Ren et al. (EMNLP 2023) that keeps a random subset.

Of ``n`` context tokens a random ``n - floor(r·n)`` stay visible to later tokens (each evicted token still
reads what was kept before it, and itself); the rest are evicted from memory. The reproduction draws one
Bernoulli(1 - r) keep-vector per sequence; ccmem draws a subset of exactly that size, so the memory matches
``local`` and ``sentinel`` entry for entry. The draw is seeded by ``seed`` and the context read so far.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from ccmem.loading import LoadedModel
from ccmem.methods.sparse import SparseMethod, Where
from ccmem.registry import register
from ccmem.sparse_masks import SparseLayout, budget, layout_scattered


@register
@dataclass
class ScatteredAttention(SparseMethod):
    """Scattered attention: later tokens see a random (1 - r) share of the context (a finetuned baseline)."""

    name: ClassVar[str] = "scattered"

    def layout(self, lm: LoadedModel | None, ids: list[int], where: Where, rng: random.Random) -> SparseLayout:
        n = where.context(ids)
        kept_before = where.context_before - where.evicted_before
        total = where.context_before + n
        keep_new = min(n, max(0, budget(total, self.compression_ratio) - kept_before))
        chosen = set(rng.sample(range(n), keep_new))
        return layout_scattered(
            where.sink,
            n,
            where.tail,
            [i in chosen for i in range(n)],
            start_position=where.start_position,
            context_before=where.context_before,
        )
