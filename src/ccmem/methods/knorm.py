"""Key-norm eviction (Devoto et al., EMNLP 2024, arXiv:2406.11430): keys with a small L2 norm attract
attention, so the entries with the largest key norms are dropped.

As kvpress's ``KnormPress``: the score is minus the norm of the cached (rotated) key, per key/value head;
nothing else is forced. No attention weights are needed.

Models that normalise their keys before attention (a ``k_norm`` layer: Qwen3, Gemma 3, OLMo 2) give keys of
almost equal norms, so the ranking says little there; :meth:`KeyNorm.check_model` warns.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ccmem.loading import LoadedModel
from ccmem.methods.eviction import Candidates, KVEviction, Scores
from ccmem.registry import register

logger = logging.getLogger(__name__)
_checked: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models already looked at (once per model)


@register
@dataclass
class KeyNorm(KVEviction):
    """Key-norm: keep the entries whose keys have the smallest L2 norm."""

    name: ClassVar[str] = "knorm"
    paper: ClassVar[str] = (
        "Devoto et al., A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression, EMNLP 2024"
    )

    def check_model(self, lm: LoadedModel) -> None:
        super().check_model(lm)
        if lm.model in _checked:  # check_model runs at every attach
            return
        _checked.add(lm.model)
        normed = [name for name, _ in lm.model.named_modules() if name.rsplit(".", 1)[-1] in ("k_norm", "k_layernorm")]
        if normed:
            logger.warning(
                "knorm ranks keys by their norm, but %s normalises its keys (%s), so their norms barely differ and "
                "which entries it keeps is close to arbitrary; snapkv, expected-attention or h2o rank by attention",
                lm.name,
                normed[0],
            )

    def score(self, lm: LoadedModel, c: Candidates) -> Scores:
        return Scores([-c.keys(i).float().norm(dim=-1) for i in range(len(c.layers))])
