"""StreamingLLM (Xiao et al., ICLR 2024, arXiv:2309.17453): the first tokens as attention sinks plus a window of
the most recent ones.

As kvpress's ``StreamingLLMPress``: the first ``n_sink`` positions of the interaction and the most recent
entries fill the budget; kept keys keep their positions (no re-rotation). While generating, the cache is held
at the size it had once the query was read: each new token evicts the oldest entry after the sinks, so a long
answer runs in constant memory as in the paper. Where the budget does not bind, nothing is evicted while
generating either: ``ratio=1`` generates as ``full`` does, and ``max_slots`` lets the cache grow up to it.
Sessions decoded together (``decode_batch``) evict the same entries, masked out of the padded batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ccmem.loading import LoadedModel
from ccmem.memory import drop_entries
from ccmem.methods.base import DecodeRows, DecodeState, option
from ccmem.methods.eviction import Candidates, KVEviction, Scores, check_n_sink
from ccmem.registry import register


@register
@dataclass
class StreamingLLM(KVEviction):
    """StreamingLLM: keep attention-sink tokens and a window of the most recent context."""

    name: ClassVar[str] = "streaming-llm"
    paper: ClassVar[str] = "Xiao et al., Efficient Streaming Language Models with Attention Sinks, ICLR 2024"

    n_sink: int = option(4, "first positions of the interaction always kept (the system prompt counts)")

    def check_options(self) -> None:
        super().check_options()
        check_n_sink(self.n_sink)

    def score(self, lm: LoadedModel, c: Candidates) -> Scores:
        scores = [c.candidate_positions(i).float() for i in range(len(c.layers))]  # newer ranks higher
        return Scores(scores, forced=[self.sink_mask(c, i, self.n_sink) for i in range(len(c.layers))])

    def _decode_limit(self, size: int) -> float:
        """The cache size generation holds, given its ``size`` once the query was read."""
        if self.max_slots is not None:
            return max(size, self.max_slots)
        return float("inf") if self.ratio >= 1 else size

    def _evicted(self, state: DecodeState, size: int) -> int | None:
        """Which of the ``size`` entries (in the order written) this step evicts: the oldest after the sinks, once
        the cache is past the size it had after the query (remembered in ``state.extra``); None if none goes."""
        first = max(state.memory.sink, min(self.n_sink, size))  # entries before this are sinks
        limit = state.extra.setdefault("limit", self._decode_limit(size))
        return first if size > limit and first < size else None

    def decode_step(self, lm: LoadedModel, state: DecodeState) -> None:
        """Hold the cache at its size after the query: each generated token evicts the oldest non-sink entry."""
        layers = state.cache.layers
        gone = self._evicted(state, int(layers[0].keys.shape[-2]))
        if gone is None:
            return
        for layer in layers:
            drop_entries(layer, gone, gone + 1)

    def decode_logits_batch(self, lm: LoadedModel, batch: DecodeRows) -> torch.Tensor:
        """:meth:`decode_step` for every row of a padded batch: the entry a row alone would evict is masked out
        (its column is freed when the batch is re-packed). Kept keys keep their positions either way, so the row
        attends to exactly what it attends to alone."""
        for i, row in enumerate(batch.rows):
            real = batch.attention_mask[i].nonzero().flatten()  # the row's entries, in the order written
            gone = self._evicted(row, int(real.numel()))
            if gone is not None:
                batch.attention_mask[i, real[gone]] = 0
        return super().decode_logits_batch(lm, batch)
