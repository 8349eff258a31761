"""TOVA (Oren et al., 2024, arXiv:2401.06104): Transformers are multi-state RNNs; keep the entries the newest
token attends to most.

As kvpress's ``TOVAPress``, once per ``add``: the attention weights of the last context token (averaged over
all query heads, so every key/value head keeps the same entries) rank the others; that token itself is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ccmem.loading import LoadedModel
from ccmem.methods.eviction import Candidates, KVEviction, Scores
from ccmem.patching.attention import AttentionCapture
from ccmem.registry import register


@register
@dataclass
class TOVA(KVEviction):
    """TOVA: keep the entries the newest context token attends to most (all heads together)."""

    name: ClassVar[str] = "tova"
    paper: ClassVar[str] = "Oren et al., Transformers are Multi-State RNNs, 2024"
    needs_attention: ClassVar[bool] = True

    def capture(self, n_new: int) -> AttentionCapture:
        return AttentionCapture(queries_wanted=1)

    def score(self, lm: LoadedModel, c: Candidates) -> Scores:
        assert c.capture is not None
        scores, forced = [], []
        for i, (k, _) in enumerate(c.layers):
            shared = c.capture.weights[i][:, :, c.sink :].mean(dim=1, keepdim=True)  # over every query head
            scores.append(shared.expand(-1, k.shape[1], -1))
            forced.append(self.newest_mask(c, i, 1))
        return Scores(scores, forced)
