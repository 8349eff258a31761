"""Sentinel-token KV compression (Ren et al., Context Compression for Auto-regressive Transformers with Sentinel
Tokens, EMNLP 2023, arXiv:2310.08152).

Spans of the context are wrapped as ``<CL> span <CR>``: the span's tokens read what was kept before them and
their own span, ``<CR>`` reads the span, and every later token sees ``<CR>`` instead of the span, whose
entries (and ``<CL>``) are then evicted from memory. Spans are chosen until ``floor(r·n)`` of ``n`` context
entries are evicted (a span of ``L`` tokens frees ``L - 1``: its ``<CR>`` stays), so the memory holds
``n - floor(r·n)`` entries, as ``local`` and ``scattered`` do.

Spans are random (lengths uniform in ``[min_span, max_span]`` tokens, the last one cut to hit the ratio
exactly; the reproduction draws 2..25 *words*) or whole sentences (``spans=sentence``; ccmem's rule-based
splitter on token boundaries, :func:`ccmem.sparse_masks.sentence_spans`, not the seed's spaCy: sentences can
overshoot the ratio by less than one sentence). ``<CL>``/``<CR>`` are two trained input embeddings, not
vocabulary entries, so any tokenizer works and a user's text can never contain them. Sentinels take no position
of their own (each copies the position of the token before it), as in the reproduction.

ccmem differs from the reproduction in two details, both to make inference really evict: a sink (system
prompt) stays visible to every token, and spans are drawn on tokens rather than on words.
Where the new context of one ``add`` is too short for a span, the eviction it owes is carried to the next.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from ccmem.loading import LoadedModel
from ccmem.methods.base import option
from ccmem.methods.sparse import SparseMethod, Where
from ccmem.registry import register
from ccmem.sparse_masks import (
    MIN_SPAN,
    SparseLayout,
    choose_sentences,
    choose_spans,
    evicted_target,
    layout_sentinel,
    sentence_spans,
)

SPAN_KINDS = ("random", "sentence")


@register
@dataclass
class Sentinel(SparseMethod):
    """Sentinel tokens: spans wrapped in <CL> ... <CR> are evicted, their <CR> keys/values stand for them."""

    name: ClassVar[str] = "sentinel"
    needs_adapter: ClassVar[bool] = True
    uses_sentinels: ClassVar[bool] = True
    runtime_options: ClassVar[frozenset[str]] = SparseMethod.runtime_options | {"spans", "min_span", "max_span"}

    spans: str = option("random", "how spans are chosen: 'random' token spans or whole 'sentence's")
    min_span: int = option(2, "shortest random span, in tokens (at least 2)")
    max_span: int = option(25, "longest random span, in tokens")

    def check_options(self) -> None:
        super().check_options()
        if self.spans not in SPAN_KINDS:
            raise ValueError(f"spans must be one of {SPAN_KINDS}, got {self.spans!r}")
        if not MIN_SPAN <= self.min_span <= self.max_span:
            raise ValueError(
                f"span lengths need {MIN_SPAN} <= min_span <= max_span (a span of one token saves nothing), "
                f"got min_span={self.min_span}, max_span={self.max_span}"
            )

    def layout(self, lm: LoadedModel | None, ids: list[int], where: Where, rng: random.Random) -> SparseLayout:
        n = where.context(ids)
        need = evicted_target(where.context_before + n, self.compression_ratio) - where.evicted_before
        if where.context_before == 0 and need > 0 and n < self.min_span:
            raise ValueError(
                f"a text of {n} context tokens is shorter than one span ({self.min_span} tokens): sentinel "
                "compression needs longer text, or compression_ratio=0"
            )
        context = ids[where.sink : where.sink + n]
        if need <= 0:
            spans: list[tuple[int, int]] = []
        elif self.spans == "random":
            spans = choose_spans(n, need, rng, min_span=self.min_span, max_span=self.max_span)
        else:
            spans = choose_sentences(sentence_spans(self._token_texts(lm, context)), need, rng)
        return layout_sentinel(
            where.sink,
            n,
            where.tail,
            spans,
            start_position=where.start_position,
            context_before=where.context_before,
        )

    def _token_texts(self, lm: LoadedModel | None, ids: list[int]) -> list[str]:
        if lm is not None:
            return [str(lm.tokenizer.decode([i])) for i in ids]
        reader = getattr(self, "_pieces", None)
        if reader is None:
            raise RuntimeError("spans=sentence needs the tokenizer: build the method for a model first (module_for)")
        return list(reader(ids))
