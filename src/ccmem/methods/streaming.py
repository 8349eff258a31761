"""StreamingLLM (Xiao et al., ICLR 2024, arXiv:2309.17453): the first tokens as attention sinks plus a window of
the most recent ones.

As kvpress's ``StreamingLLMPress``: the first ``n_sink`` positions of the interaction and the most recent
entries fill the budget; kept keys keep their positions (no re-rotation). While generating, the cache is held
at the size it had once the query was read: each new token evicts the oldest entry after the sinks, so a long
answer runs in constant memory as in the paper. Where the budget does not bind, nothing is evicted while
generating either: ``ratio=1`` generates as ``full`` does, and ``max_slots`` lets the cache grow up to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ccmem.loading import LoadedModel
from ccmem.methods.base import DecodeState, option
from ccmem.methods.eviction import Candidates, KVEviction, Scores, check_n_sink
from ccmem.registry import register


@register
@dataclass
class StreamingLLM(KVEviction):
    """StreamingLLM: keep attention-sink tokens and a window of the most recent context."""

    name: ClassVar[str] = "streaming-llm"
    paper: ClassVar[str] = "Xiao et al., Efficient Streaming Language Models with Attention Sinks, ICLR 2024"
    decode_batchable: ClassVar[bool] = False  # decode_step evicts from each session's own cache

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

    def decode_step(self, lm: LoadedModel, state: DecodeState) -> None:
        """Hold the cache at its size after the query: each generated token evicts the oldest non-sink entry."""
        layers = state.cache.layers
        size = int(layers[0].keys.shape[-2])
        limit = state.extra.setdefault("limit", self._decode_limit(size))
        if size <= limit:
            return
        first = max(state.memory.sink, min(self.n_sink, size))  # entries before this are sinks
        for layer in layers:
            layer.keys = torch.cat([layer.keys[:, :, :first], layer.keys[:, :, first + 1 :]], dim=2)
            layer.values = torch.cat([layer.values[:, :, :first], layer.values[:, :, first + 1 :]], dim=2)
