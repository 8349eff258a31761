"""Training-free KV-cache eviction: what StreamingLLM, H2O, SnapKV, TOVA, key-norm and Expected Attention share.

Each ``add`` reads the new context tokens with the memory (an ordinary forward that fills the cache, and that
records, through :mod:`ccmem.patching`, the attention weights or queries a method asks for), then keeps at most
the budget of the entries that are not the sink: the method scores every candidate entry per layer and per
key/value head, entries it must keep get the layer's best score plus one, and the top ones are kept, in
position order. Each head keeps its own entries (as NVIDIA kvpress does), so positions are stored per head.

The budget counts the context (the sink, i.e. the system prompt, is always kept on top of it):
``ratio`` keeps ``max(1, floor(ratio · context tokens so far))`` entries, the rounding of kvpress's
``compression_ratio = 1 - ratio``; ``max_slots`` caps the whole memory (sink included) instead. ``ratio=1``
keeps everything and equals ``full``. Across several ``add`` calls the budget follows the context length, and
entries kept earlier compete with the new ones.
"""

from __future__ import annotations

import logging
import math
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ccmem.loading import LoadedModel
from ccmem.memory import KV, Memory
from ccmem.methods.base import Method, context_count, option, positions_after, read_batch, run_decoder
from ccmem.patching.attention import CAPTURE_KWARG, AttentionCapture, compression_attention

logger = logging.getLogger(__name__)


@dataclass
class Candidates:
    """What scoring sees after the new tokens were read: every layer's cache and the candidate entries in it.

    ``layers`` and ``positions`` hold the whole cache (sink first); the candidates are the slots from ``sink`` on
    (entries kept by earlier adds, then the ``n_new`` new tokens). ``capture`` holds what the forward recorded.
    """

    layers: list[KV]
    positions: list[torch.Tensor]
    sink: int
    n_new: int
    next_position: int
    capture: AttentionCapture | None
    memory: Memory  # the memory before this add (for a method's carried state)

    def keys(self, layer: int) -> torch.Tensor:
        return self.layers[layer][0][:, :, self.sink :]

    def values(self, layer: int) -> torch.Tensor:
        return self.layers[layer][1][:, :, self.sink :]

    def candidate_positions(self, layer: int) -> torch.Tensor:
        return self.positions[layer][:, :, self.sink :]


@dataclass
class Scores:
    """Per layer ``[batch, kv_heads, candidates]`` scores (higher is kept first) and the entries to keep anyway.

    ``carry`` holds per-entry tensors of the same shape that the method needs at the next ``add`` (H2O's
    accumulated attention); they are kept for the entries that survive, in ``Memory.state``.
    """

    scores: list[torch.Tensor]
    forced: list[torch.Tensor] | None = None
    carry: dict[str, list[torch.Tensor]] = field(default_factory=dict)


@dataclass
class KVEviction(Method):
    """Keep a budget of the context's key/value entries, ranked by a score (not registered itself)."""

    kind: ClassVar[str] = "training-free"
    budgeted: ClassVar[bool] = True
    batchable: ClassVar[bool] = True
    #: True for methods whose ``carry`` must be updated at every add, even when nothing is evicted.
    carries_state: ClassVar[bool] = False

    ratio: float = option(0.125, "share of the context's key/value entries kept, in (0, 1]; 1 keeps all (= full)")
    max_slots: int | None = option(None, "cap on the memory's slots in all, sink included (replaces ratio)")

    def check_options(self) -> None:
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1] (the share of the context kept), got {self.ratio}")
        if self.max_slots is not None and self.max_slots < 1:
            raise ValueError(f"max_slots must be at least 1, got {self.max_slots}")

    # ------------------------------------------------------------------ what a method provides

    def capture(self, n_new: int) -> AttentionCapture | None:
        """What the forward that reads ``n_new`` new tokens should record (``None``: nothing)."""
        return None

    def score(self, lm: LoadedModel, c: Candidates) -> Scores:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared machinery

    def changes_reading(self, lm: LoadedModel) -> bool:
        return False  # attention is only captured while context is added

    def install(self, lm: LoadedModel, stack: ExitStack) -> None:
        if self.needs_attention:
            stack.enter_context(compression_attention(lm.model))

    def budget(self, sink: int, context_tokens: int) -> int:
        """Entries the compressed segment may hold once ``context_tokens`` of context were added."""
        if self.max_slots is not None:
            if self.max_slots < sink:
                raise ValueError(
                    f"max_slots={self.max_slots} is below the {sink} slots of the sink (the system prompt); "
                    "raise max_slots or use a shorter system prompt"
                )
            return self.max_slots - sink
        return max(1, math.floor(context_tokens * self.ratio + 1e-9))

    def add_sink(self, lm: LoadedModel, memory: Memory, ids: torch.Tensor) -> Memory:
        out = super().add_sink(lm, memory, ids)
        self.budget(out.sink, 0)  # a max_slots below the sink is refused before any context is added
        return out

    def add(self, lm: LoadedModel, memory: Memory, ids: torch.Tensor) -> Memory:
        capture = self.capture(ids.shape[-1])
        cache = memory.to_cache()
        extra: dict[str, Any] = {CAPTURE_KWARG: capture} if capture else {}
        run_decoder(lm, ids, cache, memory.next_position, **extra)
        return self._evict(lm, memory, Memory.layers_of(cache), capture, ids.shape[-1])

    def add_batch(self, lm: LoadedModel, memories: list[Memory], ids: list[torch.Tensor]) -> list[Memory]:
        n_max = max(int(i.shape[-1]) for i in ids)
        capture = self.capture(n_max)
        extra: dict[str, Any] = {}
        if capture is not None:
            capture.query_mask = torch.zeros(len(ids), n_max, dtype=torch.bool, device=lm.device)
            for b, i in enumerate(ids):
                capture.query_mask[b, n_max - i.shape[-1] :] = True
            extra[CAPTURE_KWARG] = capture
        read = read_batch(lm, memories, ids, **extra)
        return [
            self._evict(lm, m, layers, capture.row(b, read.key_columns[b], n) if capture else None, n)
            for b, (m, layers, n) in enumerate(zip(memories, read.layers, read.n_new, strict=True))
        ]

    def _evict(
        self, lm: LoadedModel, memory: Memory, layers: list[KV], capture: AttentionCapture | None, n_new: int
    ) -> Memory:
        """Keep the budget of ``layers`` (the memory's entries, then the ``n_new`` just read)."""
        positions = positions_after(memory, layers, n_new)
        context = int(memory.state.get("context_tokens", torch.tensor(0))) + n_new
        keep = self.budget(memory.sink, context)
        state: dict[str, torch.Tensor] = {"context_tokens": torch.tensor(context)}
        candidates = Candidates(layers, positions, memory.sink, n_new, memory.next_position + n_new, capture, memory)
        n_candidates = layers[0][0].shape[2] - memory.sink
        scored = self.score(lm, candidates) if keep < n_candidates or self.carries_state else None
        if keep >= n_candidates:
            if scored is not None:
                state |= {name: torch.stack(per_layer) for name, per_layer in scored.carry.items()}
            return memory.with_layers(layers, positions, advance=n_new, state=state)
        assert scored is not None
        if scored.forced is not None:
            _say_forced_over_budget(self, int(scored.forced[0].sum(dim=-1).max()), keep)
        kept_layers, kept_positions = [], []
        carried: dict[str, list[torch.Tensor]] = {name: [] for name in scored.carry}
        for i, (k, v) in enumerate(layers):
            index = self._select(scored, i, candidates.candidate_positions(i), keep)
            s = memory.sink
            gather = index[..., None].expand(-1, -1, -1, k.shape[-1])
            kept_layers.append(
                (
                    torch.cat([k[:, :, :s], k[:, :, s:].gather(2, gather)], dim=2),
                    torch.cat([v[:, :, :s], v[:, :, s:].gather(2, gather)], dim=2),
                )
            )
            kept_positions.append(torch.cat([positions[i][:, :, :s], positions[i][:, :, s:].gather(2, index)], dim=2))
            for name, per_layer in scored.carry.items():
                carried[name].append(per_layer[i].gather(2, index))
        state |= {name: torch.stack(per_layer) for name, per_layer in carried.items()}
        return memory.with_layers(kept_layers, kept_positions, advance=n_new, state=state)

    def check_memory(self, memory: Memory) -> None:
        """An eviction method continues from the context tokens seen so far and, per kept entry, what it carries
        (H2O's attention received): one value per layer, head and entry after the sink."""
        context_count(memory)
        if not memory.layers:
            return
        k = memory.layers[0][0]
        wanted = (len(memory.layers), k.shape[0], k.shape[1], k.shape[2] - memory.sink)
        for name, tensor in memory.state.items():
            if name != "context_tokens" and (tuple(tensor.shape) != wanted or not bool(torch.isfinite(tensor).all())):
                raise ValueError(
                    f"its state {name} must be finite, of shape {wanted} (layers, 1, heads, entries), "
                    f"got {tuple(tensor.shape)}"
                )

    @staticmethod
    def _select(scored: Scores, layer: int, candidate_positions: torch.Tensor, keep: int) -> torch.Tensor:
        """Indices (into the candidates) of the ``keep`` best entries per head, in position order."""
        scores = scored.scores[layer].double()  # float64: positions added below stay exact beside the scores
        if scored.forced is not None:
            forced = scored.forced[layer]
            best = scores[~forced].max() if bool((~forced).any()) else scores.new_tensor(0.0)
            # forced entries rank above every other; among themselves the newest first, so a window wider than the
            # budget (h2o's recent=100 where 50 are kept) keeps its newest entries, not an arbitrary pick of ties
            scores = torch.where(forced, best + 1 + candidate_positions.to(scores.dtype), scores)
        index = scores.topk(keep, dim=-1).indices
        order = candidate_positions.gather(2, index).argsort(dim=-1)
        return index.gather(2, order)

    # ------------------------------------------------------------------ helpers for scores

    @staticmethod
    def group_mean(per_query_head: torch.Tensor, kv_heads: int) -> torch.Tensor:
        """``[batch, query_heads, n]`` -> ``[batch, kv_heads, n]``: mean over the query heads sharing a KV head."""
        batch, heads, n = per_query_head.shape
        return per_query_head.view(batch, kv_heads, heads // kv_heads, n).mean(dim=2)

    def sink_mask(self, c: Candidates, layer: int, n_sink: int) -> torch.Tensor:
        """Candidates among the first ``n_sink`` positions of the interaction (StreamingLLM's attention sinks)."""
        return c.candidate_positions(layer) < n_sink

    def newest_mask(self, c: Candidates, layer: int, n: int) -> torch.Tensor:
        """Candidates among the ``n`` most recent context tokens (just read)."""
        return c.candidate_positions(layer) >= c.next_position - n


_SAID_OVER_BUDGET: set[tuple[str, str]] = set()


def _say_forced_over_budget(method: Method, forced: int, keep: int) -> None:
    """Warn, once per method and options, that the entries it always keeps (a recent window, sinks) are more than
    its budget: only the newest ``keep`` of them stay, which the option did not say."""
    if forced <= keep:
        return
    key = (method.name, repr(method))
    if key in _SAID_OVER_BUDGET:
        return
    _SAID_OVER_BUDGET.add(key)
    logger.warning(
        "%s: the %d entries it always keeps (its recent window or sinks) are more than the %d its budget keeps here; "
        "only the newest %d stay (give a smaller window, or a larger ratio or max_slots)",
        method.name, forced, keep, keep,
    )  # fmt: skip


def check_n_sink(n_sink: int) -> None:
    if n_sink < 0:
        raise ValueError(f"n_sink must not be negative, got {n_sink}")
