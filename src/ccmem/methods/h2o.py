"""H2O (Zhang et al., NeurIPS 2023, arXiv:2306.14048): heavy hitters, the entries that have received the most
attention so far.

As kvpress's ``ObservedAttentionPress`` (its H2O-style press): every context query's attention weights are
accumulated per entry, averaged over the query heads of each key/value head, and divided by the number of
queries that could attend to the entry (its age), so old entries are not favoured for being old. The sums are
carried in the memory, so each ``add`` continues the accumulation. ``recent`` also keeps a window of the newest
tokens, as the paper does (kvpress keeps none, the default here).
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
class H2O(KVEviction):
    """H2O: keep the heavy hitters, the entries with the most attention received per query so far."""

    name: ClassVar[str] = "h2o"
    paper: ClassVar[str] = (
        "Zhang et al., H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs, NeurIPS 2023"
    )
    needs_attention: ClassVar[bool] = True
    carries_state: ClassVar[bool] = True

    recent: int = option(0, "most recent context tokens always kept, within the budget (the paper's window)")

    def check_options(self) -> None:
        super().check_options()
        if self.recent < 0:
            raise ValueError(f"recent must not be negative, got {self.recent}")

    def capture(self, n_new: int) -> AttentionCapture:
        return AttentionCapture(queries_wanted=None)  # every new query

    def score(self, lm: LoadedModel, c: Candidates) -> Scores:
        assert c.capture is not None
        previous = c.memory.state.get("attention_sum")
        scores, sums, forced = [], [], []
        for i, (k, _) in enumerate(c.layers):
            received = self.group_mean(c.capture.weights[i][:, :, c.sink :], k.shape[1])
            if previous is not None:  # entries kept by earlier adds carry what they had received
                old = previous[i].to(received.device)
                received = received + torch.cat([old, torch.zeros_like(received[..., old.shape[-1] :])], dim=-1)
            queries_seen = (c.next_position - c.candidate_positions(i)).clamp(min=1)
            scores.append(received / queries_seen)
            sums.append(received)
            forced.append(self.newest_mask(c, i, self.recent))
        return Scores(scores, forced, carry={"attention_sum": sums})
