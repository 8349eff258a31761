"""Key-norm eviction (Devoto et al., EMNLP 2024, arXiv:2406.11430): keys with a small L2 norm attract
attention, so the entries with the largest key norms are dropped.

As kvpress's ``KnormPress``: the score is minus the norm of the cached (rotated) key, per key/value head;
nothing else is forced. No attention weights are needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ccmem.loading import LoadedModel
from ccmem.methods.eviction import Candidates, KVEviction, Scores
from ccmem.registry import register


@register
@dataclass
class KeyNorm(KVEviction):
    """Key-norm: keep the entries whose keys have the smallest L2 norm."""

    name: ClassVar[str] = "knorm"
    paper: ClassVar[str] = (
        "Devoto et al., A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression, EMNLP 2024"
    )

    def score(self, lm: LoadedModel, c: Candidates) -> Scores:
        return Scores([-c.keys(i).float().norm(dim=-1) for i in range(len(c.layers))])
