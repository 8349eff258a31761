"""Expected Attention (Devoto et al., 2025, arXiv:2510.00636): keep the entries that *future* queries are
expected to attend to, estimated from the statistics of the queries seen so far.

As kvpress's ``ExpectedAttentionPress``, per layer and query head: the mean ``μ`` and covariance ``Σ`` of the
context's queries before position encoding (positions from ``n_sink`` on), rotated by the average of the RoPE
rotations ``R`` of the next ``n_future_positions`` positions (``μ' = Rμ``, ``Σ' = RΣRᵀ``), give each key the
log of its expected attention under a Gaussian query, ``μ'·k/√d + kᵀΣ'k/(2d)`` (the second term with
``use_covariance``); a softmax over the non-sink entries, a mean over the query heads of each key/value head
and (``use_vnorm``) a product with the value's norm give the score. The first ``n_sink`` positions are kept.

ccmem reads the queries as the attention layer receives them (after RoPE) and undoes the rotation with the
model's own rotary embedding, so any model whose rotary embedding covers the whole head works.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import ClassVar

import torch

from ccmem.loading import LoadedModel
from ccmem.methods.base import option
from ccmem.methods.eviction import Candidates, KVEviction, Scores, check_n_sink
from ccmem.patching.attention import AttentionCapture
from ccmem.registry import register
from ccmem.rope import half_split_pairing, layers_without_rope, rotate_half


def rotary_tables(
    lm: LoadedModel, positions: torch.Tensor, like: torch.Tensor, layer: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of the model's rotary embedding of decoder layer ``layer`` at ``positions`` (``[1, n]``), each
    ``[n, head_dim]`` (models with a RoPE per layer type, such as Gemma 3's local and global layers, get that
    layer's; a layer without RoPE, such as SmolLM3's every fourth, gets no rotation: cos 1, sin 0)."""
    rotary = getattr(lm.model.base_model, "rotary_emb", None)
    if rotary is None:
        raise ValueError(
            f"expected-attention needs rotary position embeddings, which this {lm.model.config.model_type} model "
            "does not expose (model.rotary_emb); use a LLaMA-, Mistral- or Qwen-style model, or another method"
        )
    extra = {}
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        extra["layer_type"] = lm.model.config.get_text_config().layer_types[layer]
    cos, sin = rotary(like, positions.to(like.device), **extra)
    frequencies = getattr(rotary, "inv_freq", None)
    if isinstance(frequencies, torch.Tensor) and 2 * cos.shape[-1] == like.shape[-1] == 2 * len(frequencies):
        # GPT-OSS's tables hold each frequency once (it turns the two halves with them); LLaMA's hold it twice
        cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
    if cos.shape[-1] != like.shape[-1]:
        raise ValueError(
            f"expected-attention needs a rotary embedding over the whole head ({like.shape[-1]} dims), but this "
            f"model rotates {cos.shape[-1]}; use another method"
        )
    if layer in layers_without_rope(lm):  # its queries were never rotated, nor will future ones be
        return torch.ones_like(cos[0], dtype=torch.float32), torch.zeros_like(sin[0], dtype=torch.float32)
    return cos[0].float(), sin[0].float()


def unrotate(query: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``query`` as it was before the rotary embedding whose tables at its positions are ``cos``/``sin``. The tables
    of YaRN RoPE carry its attention factor ``s`` (``s·R_p``), so the inverse is ``R_-p / s``, not ``s·R_-p``: the
    query statistics would come out ``s²`` times too large (1.3 for YaRN's factor 4, as Qwen2.5 and gpt-oss use)."""
    return (query * cos - rotate_half(query) * sin) / (cos * cos + sin * sin)


@register
@dataclass
class ExpectedAttention(KVEviction):
    """Expected Attention: keep the entries future queries are expected to attend to (query statistics)."""

    name: ClassVar[str] = "expected-attention"
    paper: ClassVar[str] = (
        "Devoto et al., Expected Attention: KV Cache Compression by Estimating Attention from Future Queries "
        "Distribution, 2025"
    )
    needs_attention: ClassVar[bool] = True  # reads the queries through the attention layer

    n_future_positions: int = option(512, "future positions whose average rotation is applied to the query stats")
    n_sink: int = option(4, "first positions of the interaction always kept (the system prompt counts)")
    use_covariance: bool = option(True, "add the query covariance term kᵀΣ'k/(2d)")
    use_vnorm: bool = option(True, "multiply each score by the norm of the entry's value")
    epsilon: float = option(0.0, "added to the score before the value-norm product")

    def check_options(self) -> None:
        super().check_options()
        check_n_sink(self.n_sink)
        if self.n_future_positions < 1:
            raise ValueError(f"n_future_positions must be at least 1, got {self.n_future_positions}")
        # the score is an expected attention probability: a negative offset would turn its ranking around
        if not 0 <= self.epsilon < float("inf"):
            raise ValueError(f"epsilon must be >= 0 and finite, got {self.epsilon}")

    def check_model(self, lm: LoadedModel) -> None:
        super().check_model(lm)
        # a model without RoPE (GPT-2) has no pairing: rotary_tables below says it has no RoPE
        if getattr(lm.model.base_model, "rotary_emb", None) is not None and not half_split_pairing(lm):
            raise ValueError(
                f"expected-attention undoes LLaMA-style RoPE, but this {lm.model.config.model_type} model pairs "
                "neighbouring dimensions; use another method"
            )
        # a rotary embedding over part of the head (GPT-NeoX, Pythia) was refused only by the first add that
        # evicted, after its forward
        head = torch.zeros(1, 1, 1, lm.kv_shape.head_dim, dtype=lm.dtype, device=lm.device)
        rotary_tables(lm, torch.zeros(1, 1, dtype=torch.long), head)

    def capture(self, n_new: int) -> AttentionCapture:
        return AttentionCapture(queries_wanted=None, want_weights=False, want_queries=True)

    def score(self, lm: LoadedModel, c: Candidates) -> Scores:
        assert c.capture is not None
        start = c.next_position - c.n_new
        new_positions = torch.arange(start, c.next_position)[None]
        future = torch.arange(c.next_position, c.next_position + self.n_future_positions)[None]
        scores, forced = [], []
        for i, (k, _) in enumerate(c.layers):
            query = c.capture.queries[i].float()  # [B, Hq, n, d], rotated
            cos, sin = rotary_tables(lm, new_positions, query, i)
            plain = unrotate(query, cos, sin)
            plain = plain[:, :, (new_positions[0] >= self.n_sink).to(plain.device)]
            sink = self.sink_mask(c, i, self.n_sink)
            if plain.shape[2] == 0:  # nothing but sinks read: no statistics yet, keep the order of arrival
                scores.append(c.candidate_positions(i).float())
                forced.append(sink)
                continue
            mean = plain.mean(dim=2)  # [B, Hq, d]
            centred = plain - mean[:, :, None]
            cov = centred.transpose(2, 3) @ centred / plain.shape[2]  # [B, Hq, d, d], biased as kvpress
            rotation = self._average_rotation(lm, future, query, i)  # [d, d]
            mean = mean @ rotation.T
            keys = c.keys(i).float().repeat_interleave(query.shape[1] // k.shape[1], dim=1)  # [B, Hq, C, d]
            d = query.shape[-1]
            logits = (keys @ mean[..., None])[..., 0] * c.capture.scaling[i]
            if self.use_covariance:
                cov = rotation @ cov @ rotation.T
                logits = logits + ((keys @ cov) * keys).sum(-1) / (2 * d)
            logits = logits.masked_fill(sink.repeat_interleave(query.shape[1] // k.shape[1], dim=1), float("-inf"))
            expected = torch.softmax(logits, dim=-1).nan_to_num(0.0)
            score = self.group_mean(expected, k.shape[1])
            if self.use_vnorm:
                score = (score + self.epsilon) * c.values(i).float().norm(dim=-1)
            scores.append(score)
            forced.append(sink)
        return Scores(scores, forced)

    def _average_rotation(self, lm: LoadedModel, future: torch.Tensor, like: torch.Tensor, layer: int) -> torch.Tensor:
        """``(1/F) Σ_p R_p`` over the future positions, as a ``[d, d]`` matrix acting on plain queries."""
        cos, sin = rotary_tables(lm, future, like, layer)
        d = like.shape[-1]
        half = d // 2
        swap = torch.zeros(d, d, device=cos.device)  # rotate_half as a matrix: [a; b] -> [-b; a]
        swap[:half, half:] = -torch.eye(half, device=cos.device)
        swap[half:, :half] = torch.eye(half, device=cos.device)
        return torch.diag(cos.mean(0)) + torch.diag(sin.mean(0)) @ swap
