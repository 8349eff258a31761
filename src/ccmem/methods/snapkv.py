"""SnapKV (Li et al., NeurIPS 2024, arXiv:2404.14469): the last tokens of the context (the observation window)
vote for the entries they attend to, smoothed by pooling.

As kvpress's ``SnapKVPress``: the attention weights of the last ``window_size`` context queries (softmax over
every key, not renormalised) are averaged over those queries, average-pooled over neighbouring entries
(``kernel_size``, zero padding) per query head, then averaged over the query heads of each key/value head; the
window itself is always kept. A context added in pieces shorter than the window uses the whole piece.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ccmem.loading import LoadedModel
from ccmem.methods.base import option
from ccmem.methods.eviction import Candidates, KVEviction, Scores
from ccmem.patching.attention import AttentionCapture
from ccmem.registry import register


@register
@dataclass
class SnapKV(KVEviction):
    """SnapKV: keep the entries the last context tokens attend to most (pooled), and those tokens."""

    name: ClassVar[str] = "snapkv"
    paper: ClassVar[str] = "Li et al., SnapKV: LLM Knows What You are Looking for Before Generation, NeurIPS 2024"
    needs_attention: ClassVar[bool] = True

    window_size: int = option(64, "last context tokens whose attention votes (the observation window), kept")
    kernel_size: int = option(5, "width of the average pooling over neighbouring entries (odd)")

    def check_options(self) -> None:
        super().check_options()
        if self.window_size < 1:
            raise ValueError(f"window_size must be at least 1, got {self.window_size}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {self.kernel_size}")

    def capture(self, n_new: int) -> AttentionCapture:
        return AttentionCapture(queries_wanted=min(self.window_size, n_new))

    def score(self, lm: LoadedModel, c: Candidates) -> Scores:
        assert c.capture is not None
        window = min(self.window_size, c.n_new)
        scores, forced = [], []
        for i, (k, _) in enumerate(c.layers):
            votes = c.capture.weights[i][:, :, c.sink :] / window  # [B, Hq, candidates]
            outside = votes[..., : votes.shape[-1] - window]
            pooled = outside  # nothing before the window yet: nothing to pool
            if outside.shape[-1]:
                pooled = torch.nn.functional.avg_pool1d(
                    outside, self.kernel_size, stride=1, padding=self.kernel_size // 2, count_include_pad=True
                )
            grouped = self.group_mean(pooled, k.shape[1])
            scores.append(torch.cat([grouped, grouped.new_zeros(*grouped.shape[:2], window)], dim=-1))
            forced.append(self.newest_mask(c, i, window))
        return Scores(scores, forced)
