"""Text of any length at constant memory: attention sink + compressed blocks + a raw window, positions re-based.

The cache of a stream is laid out as::

    slot:     0 .. s-1        s .. s+c-1                 s+c .. s+c+w-1        (next block)
              [ sink (raw) ]  [ compressed (<= C slots) ] [ window (raw, <= W) ] [ block being read ]
    position: 0 .. s-1        s .. s+c-1                 s+c .. s+c+w-1        s+c+w ..

Every slot is rotated for the position of its own index (StreamingLLM's rule: positions within the cache, not
within the text), so no position id ever reaches ``sink + C + W + block``, however long the text. Each step
reads one block of tokens with the cache; what no longer fits the window leaves it, oldest first. With a
compressor (CCM), the tokens leaving the window are read once more, with the sink and the compressed slots,
followed by ``n_tok`` <COMP> tokens, whose keys/values join the compressed segment as one *group*. When the
groups pass ``C`` slots, the two oldest are merged into one (their average, weighted by the blocks each stands
for: the oldest group becomes CCM-merge's running average of everything old; with a ``scorer``, a merge trained
with ``weighting=learned``, by the softmax of its slots' scores instead). A layout with ``banks`` (CCM-merge's
option: ``C = banks · n_tok``) merges as that method does instead: the new group goes into the oldest bank, and
the blend moves last, so block t of the compressed stream lands in bank ``(t-1) mod banks``. Slots that move to
another index have their keys re-rotated (:func:`ccmem.rope.rotate_keys`).

A sparse method (``sentinel``, ``local``, ``scattered``) compresses a leaving block by reading it through its
sparse mask and keeping the entries later tokens may still see: ``1 - r`` of the block, each re-rotated onto
consecutive slots. Its compressed segment is a queue: past ``comp_slots`` the oldest slots leave
(``StreamLayout.drop_oldest``), so it holds the most history that fits at its density.

**A blended slot's position.** A merged group is not written at one position: ``Memory.positions`` marks its
slots ``-1``, as CCM-merge does. Under re-basing a blend is rotated for the index it occupies, like every slot:
before two groups are averaged, the newer one is rotated onto the older one's slots, so both parts agree on
one position, and the blend moves with its index afterwards.

``full`` (``grow=True``) keeps every token at its text position and stops where the model's positions end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch

from ccmem.loading import LoadedModel
from ccmem.memory import KV, Memory, positions_for
from ccmem.methods.base import positions_after, run_decoder
from ccmem.rope import apply_rotation, layer_frequencies, rotation

#: ``compressor(seen, ids, start)``: keys/values of the slots that stand for ``ids`` (``[1, n]``), read after
#: the memory ``seen`` from position ``start``; their positions start at ``start + n`` (CCM's <COMP> tokens).
Compressor = Callable[[Memory, torch.Tensor, int], list[KV]]
#: ``scorer(group)``: ``[layers, batch, kv_heads, slots]`` log-weights of a new group's slots when groups merge (a
#: CCM-merge trained with ``weighting=learned``); without one, merged groups weigh by the blocks they stand for.
Scorer = Callable[[list[KV]], torch.Tensor]


class StreamOptionError(ValueError):
    """Stream settings that cannot work (the message names the option)."""


class PositionLimitError(RuntimeError):
    """A read would pass the last position the stream may use (``full`` stops here)."""


@dataclass(frozen=True)
class StreamLayout:
    """What a stream keeps: ``sink`` first tokens, at most ``comp_slots`` compressed slots written ``n_tok`` per
    block that leaves a ``window`` of recent tokens, read ``block`` tokens at a time. ``grow``: keep everything
    (``full``). ``drop_oldest``: a compressor writes any number of slots per block (``sentinel``, ``local``,
    ``scattered`` keep the entries their sparse attention still sees), and compressed slots past ``comp_slots``
    leave oldest first, since slots of unrelated tokens cannot be averaged. ``banks`` (CCM-merge with that
    option; 0 for the others): ``comp_slots`` is ``banks`` groups, and a new group past them merges into the
    oldest, which then moves last (without it, the two oldest groups merge)."""

    sink: int
    window: int
    comp_slots: int = 0
    block: int = 32
    n_tok: int = 0
    grow: bool = False
    drop_oldest: bool = False
    banks: int = 0

    @property
    def compresses(self) -> bool:
        """Blocks leaving the window go through a compressor."""
        return self.n_tok > 0 or self.drop_oldest

    @property
    def kept_slots(self) -> int:
        """Slots held between blocks once the stream is past its start (its constant memory)."""
        return self.sink + self.comp_slots + self.window

    @property
    def positions_needed(self) -> int:
        """The most positions one forward uses: reading a block after a full cache, or compressing a block."""
        return max(self.kept_slots + self.block, self.sink + self.comp_slots + self.block + self.n_tok)

    def check(self, limit: int | None) -> None:
        """Raise :class:`StreamOptionError` naming the option that does not fit."""
        if self.banks and self.window < 0:
            raise StreamOptionError(
                f"ccm-merge's {self.banks} banks of {self.n_tok} slots need {self.comp_slots} slots, more than the "
                f"{self.comp_slots + self.window} that comp_slots and window give the other methods; raise window "
                "or comp_slots"
            )
        for name in ("sink", "window", "comp_slots"):
            if getattr(self, name) < 0:
                raise StreamOptionError(f"{name} must not be negative (got {getattr(self, name)})")
        if self.block < 1:
            raise StreamOptionError(f"block must be at least 1 token (got {self.block})")
        if self.drop_oldest and self.comp_slots < 1:
            raise StreamOptionError(
                f"a sparse method keeps the entries of the blocks leaving its window in comp_slots slots: give "
                f"comp_slots at least 1 (got {self.comp_slots})"
            )
        if self.banks and self.comp_slots != self.banks * self.n_tok:
            raise StreamOptionError(
                f"a merge with {self.banks} banks of {self.n_tok} slots keeps comp_slots={self.banks * self.n_tok} "
                f"(got {self.comp_slots})"
            )
        if self.n_tok and (self.comp_slots < self.n_tok or self.comp_slots % self.n_tok):
            raise StreamOptionError(
                f"comp_slots={self.comp_slots} must be a positive multiple of the {self.n_tok} slots one "
                "compressed block writes (n_tok)"
            )
        if not self.grow and self.kept_slots < 1:
            raise StreamOptionError("sink + comp_slots + window keep nothing; give the window at least one token")
        if limit is not None and not self.grow and self.positions_needed > limit:
            raise StreamOptionError(
                f"{self.kept_slots} slots kept (sink + comp_slots + window, shared alike by every method) and a "
                f"block of {self.block} need {self.positions_needed} positions, more than the {limit} allowed "
                "(max_positions); lower window, comp_slots or block, or raise max_positions"
            )


#: The stream methods (the layouts below) and those run by default (ccm-merge has no streaming adapter: its chat one
#: was never trained on text read as a stream reads it).
SPARSE_STREAM_METHODS = ("sentinel", "local", "scattered")
STREAM_METHODS = ("ccm-concat", "ccm-merge", "streaming-llm", "window", "full", *SPARSE_STREAM_METHODS)
DEFAULT_STREAM_METHODS = ("ccm-concat", "streaming-llm", "window", "full")
#: The stream methods that compress what leaves the window with a trained adapter.
COMPRESSING_METHODS = ("ccm-concat", "ccm-merge", *SPARSE_STREAM_METHODS)


def layouts_at_same_memory(
    sink: int, window: int, comp_slots: int, block: int, n_tok: int, *, banks: int = 1
) -> dict[str, StreamLayout]:
    """The layout of each stream method, all keeping ``sink + comp_slots + window`` slots between blocks.

    ``ccm-concat`` keeps them as given; ``ccm-merge`` its ``banks`` groups of ``n_tok`` slots (the memory its
    adapter was trained with) and a window of the rest; ``sentinel``, ``local`` and ``scattered`` them as given,
    their compressed slots a queue of the entries their sparse attention keeps; ``streaming-llm`` the sink and a
    window of the rest; ``window`` a window of them all; ``full`` all.
    """
    total = sink + comp_slots + window
    sparse = StreamLayout(sink, window, comp_slots, block, drop_oldest=True)
    merged = banks * n_tok
    return {
        **dict.fromkeys(SPARSE_STREAM_METHODS, sparse),
        "ccm-concat": StreamLayout(sink, window, comp_slots, block, n_tok),
        "ccm-merge": StreamLayout(sink, total - sink - merged, merged, block, n_tok, banks=banks),
        "streaming-llm": StreamLayout(sink, total - sink, 0, block),
        "window": StreamLayout(0, total, 0, block),
        "full": StreamLayout(0, 0, 0, block, grow=True),
    }


def _cat(parts: list[list[KV]]) -> list[KV]:
    """Layer-wise concatenation along the slot axis of the parts that hold slots."""
    parts = [p for p in parts if _length(p)]
    if not parts:
        return []
    return [
        (torch.cat([p[i][0] for p in parts], -2), torch.cat([p[i][1] for p in parts], -2)) for i in range(len(parts[0]))
    ]


def _slots(layers: list[KV], start: int, end: int) -> list[KV]:
    return [(k[..., start:end, :], v[..., start:end, :]) for k, v in layers]


def _length(layers: list[KV]) -> int:
    return int(layers[0][0].shape[-2]) if layers else 0


class KVStream:
    """One stream's cache: :meth:`read` a block, get its hidden states; memory stays within the layout."""

    def __init__(
        self,
        lm: LoadedModel,
        layout: StreamLayout,
        *,
        compressor: Compressor | None = None,
        scorer: Scorer | None = None,
        limit: int | None = None,
    ):
        if (compressor is None) == layout.compresses:
            raise StreamOptionError("a layout compressing what leaves its window needs a compressor, and only it")
        layout.check(limit)
        self.lm = lm
        self.layout = layout
        self.compressor = compressor
        self.limit = limit
        self.freqs = None if layout.grow else layer_frequencies(lm)
        self.memory = Memory()
        self.window_ids = torch.zeros(1, 0, dtype=torch.long, device=lm.device)
        self.weights: list[int] = []  # per compressed group: the blocks it stands for
        self.scorer = scorer
        self.log_weights: list[torch.Tensor] = []  # per compressed group, with a scorer: log sum exp of its scores
        self.tokens_read = 0
        self.peak_bytes = 0  # the largest key/value cache one forward ran with
        shape = lm.kv_shape  # keys and values of one slot, all layers: known before the first read (a cap checks it)
        self.slot_bytes = 2 * shape.layers * shape.kv_heads * shape.head_dim * shape.dtype.itemsize
        self.max_position = -1  # the largest position id used

    @property
    def compressed_slots(self) -> int:
        return self.memory.num_slots - self.memory.sink - self.memory.window

    def _use_positions(self, start: int, n: int) -> None:
        if self.limit is not None and start + n > self.limit:
            raise PositionLimitError(f"reading {n} more tokens from position {start} would pass position {self.limit}")
        self.max_position = max(self.max_position, start + n - 1)

    def read(self, ids: torch.Tensor) -> torch.Tensor:
        """Read ``ids`` (``[1, n]``) with the cache; returns their last hidden states, keeps what the layout keeps."""
        m, n = self.memory, ids.shape[1]
        self._use_positions(m.next_position, n)
        cache = m.to_cache()
        hidden = run_decoder(self.lm, ids, cache, m.next_position).last_hidden_state
        layers = Memory.layers_of(cache)
        self.peak_bytes = max(self.peak_bytes, Memory(layers=layers).nbytes)
        self.memory = m.with_layers(layers, positions_after(m, layers, n), advance=n, window=m.window + n)
        self.tokens_read += n
        if not self.layout.grow:
            self.window_ids = torch.cat([self.window_ids, ids], dim=1)
            self._fill_sink()
            self._slide()
        return cast(torch.Tensor, hidden)

    def _fill_sink(self) -> None:
        """The stream's first tokens become the sink (only while nothing has been compressed or evicted)."""
        m = self.memory
        take = min(self.layout.sink - m.sink, m.window)
        if take > 0:
            self.memory = m.with_layers(m.layers, m.positions, sink=m.sink + take, window=m.window - take)
            self.window_ids = self.window_ids[:, take:]

    def _slide(self) -> None:
        """Move what passes the window out of it: into a compressed group, or away; re-base what stays."""
        m = self.memory
        evict = m.window - self.layout.window
        if evict <= 0:
            return
        s, c = m.sink, self.compressed_slots
        sink, comp = _slots(m.layers, 0, s), _slots(m.layers, s, s + c)
        if self.compressor is not None:
            comp = self._add_group(sink, comp, self.window_ids[:, :evict])
        self.window_ids = self.window_ids[:, evict:]
        # the window's first kept slot moves from index s + c + evict to index s + (compressed slots now)
        window = self._rotate(_slots(m.layers, s + c + evict, m.num_slots), _length(comp) - c - evict)
        layers = _cat([sink, comp, window])
        self.memory = m.with_layers(
            layers, self._positions(layers, s), next_position=_length(layers), window=m.window - evict
        )

    def _add_group(self, sink: list[KV], comp: list[KV], ids: torch.Tensor) -> list[KV]:
        """Compress ``ids`` after the sink and compressed slots; append the group, merge the oldest two if over."""
        assert self.compressor is not None
        s, c, n, t = _length(sink), _length(comp), ids.shape[1], self.layout.n_tok
        seen_layers = _cat([sink, comp])
        seen = Memory(layers=seen_layers, positions=self._positions(seen_layers, s), next_position=s + c, sink=s)
        self._use_positions(s + c, n + t)
        self.peak_bytes = max(self.peak_bytes, (s + c + n + t) * self.slot_bytes)
        group = self._rotate(self.compressor(seen, ids, s + c), -n)  # written after the block, moved onto its slots
        comp = _cat([comp, group])
        if self.layout.drop_oldest:
            over = _length(comp) - self.layout.comp_slots
            return self._rotate(_slots(comp, over, _length(comp)), -over) if over > 0 else comp
        self.weights.append(1)
        if self.scorer is not None:
            self.log_weights.append(self.scorer(group))
        if _length(comp) > self.layout.comp_slots:
            comp = self._merge_into_oldest_bank(comp) if self.layout.banks else self._merge_oldest(comp)
        return comp

    def _merge_oldest(self, comp: list[KV]) -> list[KV]:
        """The two oldest groups become their weighted average; the groups after them move ``n_tok`` slots back."""
        t = self.layout.n_tok
        older, newer = _slots(comp, 0, t), self._rotate(_slots(comp, t, 2 * t), -t)
        blend = self._blend(older, newer, 0, 1)
        return _cat([blend, self._rotate(_slots(comp, 2 * t, _length(comp)), -t)])

    def _merge_into_oldest_bank(self, comp: list[KV]) -> list[KV]:
        """The newest group (last) merges into the oldest bank (first); the blend takes the last bank's slots and
        the banks after the oldest move ``n_tok`` slots back (CCM-merge's fold with banks)."""
        t, n = self.layout.n_tok, _length(comp)
        last = n - 2 * t  # the index the blend takes
        older, newer = self._rotate(_slots(comp, 0, t), last), self._rotate(_slots(comp, n - t, n), -t)
        blend = self._blend(older, newer, 0, len(self.weights) - 1)
        # _blend left the blend's weights at index 0: move them last, with the blend
        self.weights.append(self.weights.pop(0))
        if self.scorer is not None:
            self.log_weights.append(self.log_weights.pop(0))
        return _cat([self._rotate(_slots(comp, t, n - t), -t), blend])

    def _blend(self, older: list[KV], newer: list[KV], i: int, j: int) -> list[KV]:
        """The weighted average of groups ``i`` and ``j`` (already on the same slots); their weights become one
        entry at index ``i``."""
        w0, w1 = self.weights[i], self.weights[j]
        if self.scorer is not None:  # a learned merge: each slot's softmax weights, per layer and head
            l0, l1 = self.log_weights[i], self.log_weights[j]
            norm = torch.logaddexp(l0, l1)
            del self.log_weights[j]
            self.log_weights[i] = norm
            a, b = (l0 - norm).exp()[..., None], (l1 - norm).exp()[..., None]
            blend = [
                (k0 * a[x].to(k0.dtype) + k1 * b[x].to(k0.dtype), v0 * a[x].to(v0.dtype) + v1 * b[x].to(v0.dtype))
                for x, ((k0, v0), (k1, v1)) in enumerate(zip(older, newer, strict=True))
            ]
        else:
            blend = [
                ((k0 * w0 + k1 * w1) / (w0 + w1), (v0 * w0 + v1 * w1) / (w0 + w1))
                for (k0, v0), (k1, v1) in zip(older, newer, strict=True)
            ]
        del self.weights[j]
        self.weights[i] = w0 + w1
        return blend

    def _rotate(self, layers: list[KV], delta: int) -> list[KV]:
        """Keys moved by ``delta`` positions (values carry none); one cos/sin table per distinct RoPE table."""
        n = _length(layers)
        if delta == 0 or not n:
            return layers
        assert self.freqs is not None
        tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        out = []
        for (k, v), f in zip(layers, self.freqs, strict=True):
            if id(f) not in tables:
                tables[id(f)] = rotation(delta, n, f, k)
            out.append((apply_rotation(k, *tables[id(f)]), v))
        return out

    def _positions(self, layers: list[KV], sink: int) -> list[torch.Tensor]:
        """Each slot's position: its index, or -1 for the slots of a blended group (see the module docstring)."""
        if not layers:
            return []
        k, t = layers[0][0], self.layout.n_tok
        out = positions_for(0, _length(layers), k)
        for g, w in enumerate(self.weights):
            if w > 1:
                out[..., sink + g * t : sink + (g + 1) * t] = -1
        return [out.clone() for _ in layers]
