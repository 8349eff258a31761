"""The IC-Former block (Wang et al., In-Context Former, Findings of EMNLP 2024, arXiv:2406.13618).

A few transformer layers in which only ``num_query_tokens`` learnable *digest* tokens are queries. Their keys
and values are the context's token embeddings (from the target LM's own frozen embedding layer, never updated
by the former) followed by the digest tokens themselves; the outputs are soft-prompt embeddings for the LM.
The attention pattern of one chunk of ``n`` context tokens and ``q`` digests::

                    keys:  c0 c1 c2 ... c(n-1) | d0 d1 d2 ... d(q-1)
    query d0              1  1  1  ...  1      |  1  .  .  ...  .
    query d1              1  1  1  ...  1      |  1  1  .  ...  .
    ...                   (every context token)|  (causal among digests)
    query d(q-1)          1  1  1  ...  1      |  1  1  1  ...  1

Context tokens are never queries (no context self-attention), so a layer costs ``O(q * (n + q))`` instead of
the LM's ``O(n^2)`` over all its layers: that is where the compression speed comes from. Positions are rotary:
context token ``j`` at position ``j``; digest ``i`` at ``n + i`` in the paper's layout (``locality=False``: the
digests read the context "after" it), or, by default, at the centre of the ``i``-th of ``q`` equal segments of
the context, ``(i + 1/2) n / q - 1/2`` (``locality=True``, see below).

Where ccmem differs from the reference code, and why:

* The former is sized from the target LM (hidden size, heads, MLP width), so its outputs are the LM's input
  embeddings without a projection (the reference config defaults to LLaMA-7B sizes and must be edited per LM).
* The digest part of each layer's keys/values is that layer's digest states (the paper's description: digests
  attend to previous digests); the reference code feeds the first layer's digest embeddings to every layer.
* The final norm's weight starts at the LM embeddings' RMS, so an untrained former already emits inputs of the
  LM's embedding scale (the reference starts at 1, fine for LLaMA-7B's scale, far off for small LMs).
* ``locality=True`` (the default) gives the former a start that the LM can already read. After the paper's
  layout and random init, 100 pretraining steps here left the frozen LM writing back 0.2% of a context's tokens
  (chance): a digest placed after the context can only find "its" part through the relative distance
  ``n + i - j``, which changes with every context length. So each digest sits at the centre of its segment, each
  head subtracts a learned distance penalty ``slope * |p_digest - p_key| / max(1, n / q)`` from its scores
  (ALiBi-like, in segment lengths, sharp at init: slopes 4 to 16), and the value and output
  projections start as the identity: an untrained former emits, per digest, a distance-weighted mean of its
  segment's embeddings, which the LM already reads as text (a copy of the context when ``n <= q``: teacher-forced
  reconstruction of 128-token passages from 128 untrained digests 0.74 nats per token, 88% right, against 5.04
  and 23% in the paper's layout; README). Training moves on from there; nothing is frozen. Whether pretraining
  then learns to compress 4:1 within a CPU budget is still open (40 steps traded the copy for a weaker reliance
  on the digests). ``locality=False`` is the paper's layout, kept for comparison.
* Contexts of different lengths are batched (right-padded, masked, each row with its own digest positions), so
  training uses padded batches instead of the reference's one-sample loop; a padded row computes exactly what
  it computes alone.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (computed in float32)."""

    def __init__(self, size: int, eps: float = 1e-6, scale: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((size,), float(scale)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h).to(x.dtype)


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate ``x`` (``[batch, heads, length, head_dim]``) by ``positions`` (``[batch, length]``), halves layout."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (torch.arange(half, device=x.device, dtype=torch.float32) / half))
    angles = positions.float()[:, None, :, None] * inv_freq  # [batch, 1, length, half]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class ICFormerLayer(nn.Module):
    """Digest queries over ``[context; digests]`` keys/values, then a gated MLP (both pre-norm, residual)."""

    def __init__(self, hidden: int, heads: int, intermediate: int, theta: float, locality: bool = False):
        super().__init__()
        self.heads, self.head_dim, self.theta = heads, hidden // heads, theta
        # per-head distance penalty (log of the slope, so it stays positive), 4 .. 16 per segment length at init:
        # sharp, so a digest starts as its segment's central tokens, which the LM reads as text (measured: at one
        # digest per token the frozen SmolLM2 writes 128-token passages back with 88% of tokens right; with
        # slopes from 1/4 to 4 the blends read as noise, worse than no context); training may widen them
        self.log_slope = nn.Parameter(torch.linspace(math.log(4), math.log(16), heads)) if locality else None
        self.context_norm = RMSNorm(hidden)
        self.digest_norm = RMSNorm(hidden)
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.mlp_norm = RMSNorm(hidden)
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        digests: torch.Tensor,
        context: torch.Tensor,
        key_positions: torch.Tensor,
        mask: torch.Tensor,
        distance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``distance`` (``[batch, q, n + q]``, in segment lengths) is what the locality penalty scales."""
        q_len = digests.shape[1]
        d = self.digest_norm(digests)
        kv_in = torch.cat([self.context_norm(context), d], dim=1)
        q = rotary(self._split(self.q_proj(d)), key_positions[:, -q_len:], self.theta)
        k = rotary(self._split(self.k_proj(kv_in)), key_positions, self.theta)
        v = self._split(self.v_proj(kv_in))
        bias: torch.Tensor = mask[:, None]
        if self.log_slope is not None and distance is not None:
            penalty = self.log_slope.exp().to(q.dtype)[None, :, None, None] * distance[:, None].to(q.dtype)
            bias = torch.where(mask[:, None], -penalty, torch.finfo(q.dtype).min)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        digests = digests + self.o_proj(out.transpose(1, 2).reshape(digests.shape))
        h = self.mlp_norm(digests)
        return digests + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class ICFormer(nn.Module):
    """Learnable digest tokens cross-attending to context embeddings; returns soft-prompt embeddings.

    ``markers`` are three extra learned LM-input embeddings read after the digests: ``AE`` (reconstruct the
    context, pretraining), ``LM`` (continue the text, pretraining) and ``FT`` (answer a prompt: finetuning and
    inference), as the reference's special tokens.
    """

    AE, LM, FT = 0, 1, 2

    def __init__(
        self,
        hidden_size: int,
        num_hidden_layers: int = 3,
        num_query_tokens: int = 128,
        num_heads: int = 8,
        intermediate_size: int | None = None,
        rope_theta: float = 10000.0,
        init_from: torch.Tensor | None = None,
        locality: bool = False,
    ):
        super().__init__()
        self.locality = locality
        if hidden_size % num_heads or (hidden_size // num_heads) % 2:
            raise ValueError(f"hidden_size {hidden_size} must split into {num_heads} heads of even size")
        generator = torch.Generator().manual_seed(0)
        if init_from is not None:  # start the digests and markers near ordinary token embeddings
            mean, std = init_from.float().mean(0), init_from.float().std(0)
            scale = float(init_from.float().pow(2).mean().sqrt())
        else:
            mean, std, scale = torch.zeros(hidden_size), torch.ones(hidden_size), 1.0
        # with locality the digests start small: their positions pick their segments, the segment is the content
        digest_scale = 0.01 if locality else 1.0
        self.digest = nn.Parameter(
            digest_scale * (mean + 0.1 * std * torch.randn(num_query_tokens, hidden_size, generator=generator))
        )
        self.markers = nn.Parameter(mean + 0.1 * std * torch.randn(3, hidden_size, generator=generator))
        self.layers = nn.ModuleList(
            ICFormerLayer(hidden_size, num_heads, intermediate_size or 4 * hidden_size, rope_theta, locality)
            for _ in range(num_hidden_layers)
        )
        self.norm = RMSNorm(hidden_size, scale=scale)
        for layer in self.layers:
            for module in layer.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=0.02, generator=generator)
            if locality:  # values pass through: an untrained former emits its segments' (weighted) embeddings
                block = cast(ICFormerLayer, layer)
                with torch.no_grad():
                    block.v_proj.weight.copy_(torch.eye(hidden_size))
                    block.o_proj.weight.copy_(torch.eye(hidden_size))

    @property
    def num_query_tokens(self) -> int:
        return int(self.digest.shape[0])

    def forward(self, context: torch.Tensor, lengths: list[int] | None = None) -> torch.Tensor:
        """Digests ``[batch, q, hidden]`` of right-padded context embeddings ``[batch, n, hidden]`` (``lengths``:
        each row's real tokens; default: all ``n``)."""
        batch, n, _ = context.shape
        q = self.num_query_tokens
        device = context.device
        lengths = lengths or [n] * batch
        real = torch.tensor(lengths, device=device)
        cols = torch.arange(n, device=device)
        slots = torch.arange(q, device=device)
        distance = None
        if self.locality:  # the centre of each digest's segment; distances in segment lengths (at least a token)
            segment = real[:, None].float() / q
            digest_pos = (slots + 0.5) * segment - 0.5
            key_positions = torch.cat([cols.float().expand(batch, n), digest_pos], dim=1)
            distance = (digest_pos[:, :, None] - key_positions[:, None, :]).abs() / segment.clamp(min=1.0)[:, :, None]
        else:
            digest_pos = real[:, None] + slots
            key_positions = torch.cat([cols.expand(batch, n), digest_pos], dim=1)
        causal = torch.ones(q, q, dtype=torch.bool, device=device).tril()
        mask = torch.cat([(cols[None] < real[:, None])[:, None].expand(batch, q, n), causal.expand(batch, q, q)], 2)
        hidden = self.digest.to(context.dtype)[None].expand(batch, q, -1)
        for layer in self.layers:
            hidden = layer(hidden, context, key_positions, mask, distance)
        return self.norm(hidden)

    def marker(self, which: int, dtype: torch.dtype) -> torch.Tensor:
        """One marker embedding as ``[1, hidden]``."""
        return self.markers[which : which + 1].to(dtype)

    def flops_per_chunk(self, n: int) -> int:
        """Multiply-adds x2 of compressing one chunk of ``n`` tokens (projections, attention, MLP)."""
        q, hidden = self.num_query_tokens, int(self.digest.shape[1])
        total = 0
        for layer in self.layers:
            inter = int(cast(ICFormerLayer, layer).gate_proj.weight.shape[0])
            total += 2 * q * hidden * hidden * 2  # q and o projections of the digests
            total += 2 * (n + q) * hidden * hidden * 2  # k and v projections of context and digests
            total += 2 * 2 * q * (n + q) * hidden  # scores and weighted sum
            total += 2 * q * hidden * inter * 3  # gated MLP
        return total
