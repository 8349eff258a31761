"""Pure functions behind the sparse-attention methods (``sentinel``, ``local``, ``scattered``): which spans a
text gives up, how the sequence is laid out, and who may attend to whom.

No model code lives here; everything is a function of token counts and a random generator, so each rule is
pictured below, tested against a slow loop (:func:`reference_allowed`) and shared by training and inference.

Vocabulary
----------
The three methods of Ren et al. (EMNLP 2023, "Context Compression for Auto-regressive Transformers with
Sentinel Tokens") keep at compression ratio ``r`` only ``n - floor(r·n)`` key/value entries of ``n`` context
tokens. A layout holds, per position, a :class:`Kind`::

    SINK   a system prompt / BOS: seen by everyone, always kept
    TEXT   an ordinary context token
    OPEN   <CL>, opening a span (sentinel only)
    SPAN   a token inside a span (sentinel only)
    CLOSE  <CR>, closing a span; its keys/values stand for the span once it is evicted
    TAIL   read with the memory (a query, its answer): sees what was kept, never evicts anything

Sentinel, span of 2 (``s s``) between text ``a`` and ``b`` (``x`` = attends, ``.`` = masked)::

              a  CL s  s  CR b
        a     x  .  .  .  .  .
        CL    .  x  .  .  .  .      <- <CL> only marks the span
        s     x  .  x  .  .  .      <- span tokens see what is kept before the span, and their span
        s     x  .  x  x  .  .
        CR    .  x  x  x  x  .      <- <CR> reads its own span only (then the span is evicted)
        b     x  .  .  .  x  x      <- later tokens see <CR>, never the span

Local attention at ratio ``r``: the query with context index ``j`` sees context indices ``floor(r·j) .. j``.
Scattered attention: a random subset of the context is kept; a query sees the kept earlier tokens and itself.
A TAIL query sees what the next context token would see; that is exactly what the memory keeps.

Sentinel tokens take no position of their own: each copies the position of the token before it (as the
reproduction does), so the text's position ids are the ones ``full`` gives it.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import torch

__all__ = [
    "Kind",
    "SparseLayout",
    "budget",
    "choose_spans",
    "evicted_target",
    "layout_local",
    "layout_scattered",
    "layout_sentinel",
    "reference_allowed",
    "sentence_spans",
]

#: A span never goes below this many tokens: one token in a span saves nothing (its <CR> replaces it).
MIN_SPAN = 2


class Kind(IntEnum):
    """What a position of a sparse layout is."""

    SINK = 0
    TEXT = 1
    OPEN = 2
    SPAN = 3
    CLOSE = 4
    TAIL = 5


def evicted_target(n: int, ratio: float) -> int:
    """Entries the methods give up once ``n`` context tokens were read: ``floor(ratio · n)``."""
    return math.floor(ratio * n + 1e-9)


def budget(n: int, ratio: float) -> int:
    """Entries of ``n`` context tokens the methods keep: ``n - floor(ratio · n)``."""
    return n - evicted_target(n, ratio)


# ---------------------------------------------------------------------------- spans


def choose_spans(
    n: int, need: int, rng: random.Random, *, min_span: int = MIN_SPAN, max_span: int = 25
) -> list[tuple[int, int]]:
    """Random non-overlapping spans ``(start, end)`` (end exclusive) of ``range(n)`` that evict exactly ``need``
    entries (at most ``n - 1``: one entry always stays).

    A span of ``L`` tokens evicts ``L - 1`` entries (its tokens go, its <CR> stays; <CL> is never kept).
    Lengths are drawn uniformly from ``[min_span, max_span]`` and the last one is cut to hit ``need``; where
    the spans would not fit in ``n`` tokens (high ratios), two are merged into one longer span, which evicts
    as much with one token fewer. The spans are then shuffled and spread over the text with uniformly random
    gaps (which may be empty: spans may touch).
    """
    if min_span < MIN_SPAN or max_span < min_span:
        raise ValueError(f"span lengths need {MIN_SPAN} <= min_span <= max_span, got {min_span}..{max_span}")
    need = min(need, n - 1)
    if need <= 0:
        return []
    lengths: list[int] = []
    left = need
    while left > 0:
        length = min(rng.randint(min_span, max_span), left + 1)
        lengths.append(length)
        left -= length - 1
    while sum(lengths) > n:  # one span alone (need + 1 <= n tokens) always fits
        last = lengths.pop()
        lengths[-1] += last - 1
    rng.shuffle(lengths)
    free = n - sum(lengths)
    bars = sorted(rng.sample(range(free + len(lengths)), len(lengths)))  # stars and bars: random gaps
    spans, position = [], 0
    for i, length in enumerate(lengths):
        gap = bars[i] - (bars[i - 1] + 1 if i else 0)
        start = position + gap
        spans.append((start, start + length))
        position = start + length
    return spans


_END = re.compile(r"[.!?…][\"'”’)\]]*\s*$")


def sentence_spans(pieces: Sequence[str]) -> list[tuple[int, int]]:
    """Sentences of a tokenized text as ``(start, end)`` token ranges (end exclusive), covering every token.

    The splitter works on token boundaries, so it can never split a token: a sentence ends after a token
    whose text ends in ``. ! ? …`` (closing quotes or brackets allowed) when the next token starts with
    whitespace, and after a token holding a line break. ``pieces[i]`` is the text of token ``i``.
    """
    spans, start = [], 0
    for i, piece in enumerate(pieces):
        nxt = pieces[i + 1] if i + 1 < len(pieces) else " "
        ends = ("\n" in piece) or (bool(_END.search(piece)) and (nxt[:1].isspace() or piece[-1:].isspace()))
        if ends:
            spans.append((start, i + 1))
            start = i + 1
    if start < len(pieces):
        spans.append((start, len(pieces)))
    return spans


def choose_sentences(sentences: Sequence[tuple[int, int]], need: int, rng: random.Random) -> list[tuple[int, int]]:
    """Random whole sentences (of at least two tokens) that evict ``need`` entries, overshooting by less than one
    sentence: first, in random order, those that fit in what is still needed; then, if some is still owed, the
    shortest sentence that covers it (or the longest left, and the rest is owed)."""
    pool = [s for s in sentences if s[1] - s[0] >= MIN_SPAN]
    rng.shuffle(pool)
    chosen, left = [], []
    for s in pool:
        if 0 < s[1] - s[0] - 1 <= need:
            chosen.append(s)
            need -= s[1] - s[0] - 1
        else:
            left.append(s)
    if need > 0 and left:
        covering = [s for s in left if s[1] - s[0] - 1 >= need]
        chosen.append(min(covering, key=lambda s: s[1] - s[0]) if covering else max(left, key=lambda s: s[1] - s[0]))
    return sorted(chosen)


# ---------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class SparseLayout:
    """Per-position description of a sparse sequence (every tensor has length ``L``).

    ``source[i]`` is the index of position ``i`` in the token sequence given (``-1`` for sentinels);
    ``index`` the context index used by local attention's horizon (``-1`` outside the context);
    ``horizon[i]`` the first context index query ``i`` may see; ``kept[i]`` whether position ``i`` stays
    visible to later queries once read (what a memory holds); ``span`` the span id (``-1`` outside spans).
    """

    kind: torch.Tensor
    source: torch.Tensor
    index: torch.Tensor
    horizon: torch.Tensor
    kept: torch.Tensor
    span: torch.Tensor
    position_ids: torch.Tensor
    final_horizon: int = 0  # the horizon of a query after the layout (what a memory of it keeps)

    @property
    def length(self) -> int:
        return int(self.kind.numel())

    def kept_after(self) -> torch.Tensor:
        """``[L]`` bool: the positions a memory holds once the whole layout was read."""
        return self.kept & ((self.index >= self.final_horizon) | (self.kind == Kind.SINK))

    def allowed_with_memory(self, memory_sink: int, memory_index: torch.Tensor) -> torch.Tensor:
        """``[L, M + L]`` bool: what this layout's queries attend when read after a memory of ``M`` slots.

        The memory's first ``memory_sink`` slots are its sink (seen by all); the others are kept context
        entries with context indices ``memory_index`` (``[M - memory_sink]``), seen by readers within their
        horizon. The layout's own columns follow :meth:`allowed`.
        """
        reader = (self.kind == Kind.TEXT) | (self.kind == Kind.SPAN) | (self.kind == Kind.TAIL)
        old = reader[:, None] & (memory_index[None, :] >= self.horizon[:, None])
        sink = torch.ones(self.length, memory_sink, dtype=torch.bool)
        return torch.cat([sink, old, self.allowed()], dim=1)

    def allowed(self) -> torch.Tensor:
        """``[L, L]`` bool: query row may attend key column (causal, and the rules of the module docstring)."""
        kind, span = self.kind, self.span
        q_kind, k_kind = kind[:, None], kind[None, :]
        same_span = (span[:, None] == span[None, :]) & (span[:, None] >= 0)
        causal = torch.ones(self.length, self.length, dtype=torch.bool).tril()
        diagonal = torch.eye(self.length, dtype=torch.bool)
        reader = (q_kind == Kind.TEXT) | (q_kind == Kind.SPAN) | (q_kind == Kind.TAIL)
        persistent = self.kept[None, :] & (self.index[None, :] >= self.horizon[:, None])
        from_span = same_span & (
            ((q_kind == Kind.CLOSE) & ((k_kind == Kind.OPEN) | (k_kind == Kind.SPAN)))
            | ((q_kind == Kind.SPAN) & (k_kind == Kind.SPAN))
        )
        tail_keys = (q_kind == Kind.TAIL) & (k_kind == Kind.TAIL)
        sink = k_kind == Kind.SINK
        return causal & (diagonal | sink | (reader & persistent) | from_span | tail_keys)

    def labels(self, ids: Sequence[int], trained: torch.Tensor) -> torch.Tensor:
        """``[L]`` next-token labels in the ``labels[i + 1]`` convention of :func:`ccmem.methods.base.answer_loss`.

        Every token ``t`` of ``ids`` with ``trained[t]`` is predicted once, from the last non-sentinel position
        before it (a sentinel is never a target and never predicts).
        """
        out = torch.full((self.length,), -100, dtype=torch.long)
        previous = -1  # layout position of the last non-sentinel token
        for i, s in enumerate(self.source.tolist()):
            if s < 0:
                continue
            if previous >= 0 and bool(trained[s]):
                out[previous + 1] = ids[s]  # hidden[previous] predicts it
            previous = i
        return out


def _layout(
    kinds: list[int],
    source: list[int],
    span: list[int],
    kept: list[bool],
    *,
    ratio_horizon: float,
    start_position: int,
    context_before: int,
) -> SparseLayout:
    """Fill in positions, context indices and horizons of a list of kinds."""
    positions, index, horizon = [], [], []
    position = start_position - 1
    context = context_before  # context tokens read before this position
    for kind in kinds:
        if kind in (Kind.OPEN, Kind.CLOSE):
            positions.append(max(position, 0))  # a sentinel copies the position of the token before it
            index.append(context)  # (sentinel layouts have no horizon: every kept <CR> stays visible)
            horizon.append(0)
            continue
        position += 1
        positions.append(position)
        if kind == Kind.SINK:
            index.append(-1)
            horizon.append(0)
        elif kind == Kind.TAIL:
            index.append(1 << 40)  # later than any context: always inside a tail query's horizon
            horizon.append(evicted_target(context, ratio_horizon))
        else:
            index.append(context)
            horizon.append(evicted_target(context, ratio_horizon))
            context += 1
    sink_or_tail = [k in (Kind.SINK, Kind.TAIL) for k in kinds]
    return SparseLayout(
        final_horizon=evicted_target(context, ratio_horizon),
        kind=torch.tensor(kinds, dtype=torch.long),
        source=torch.tensor(source, dtype=torch.long),
        index=torch.tensor(index, dtype=torch.long),
        horizon=torch.tensor(horizon, dtype=torch.long),
        kept=torch.tensor([k or s for k, s in zip(kept, sink_or_tail, strict=True)], dtype=torch.bool),
        span=torch.tensor(span, dtype=torch.long),
        position_ids=torch.tensor(positions, dtype=torch.long),
    )


def _plain(sink: int, context: int, tail: int) -> tuple[list[int], list[int]]:
    kinds = [Kind.SINK] * sink + [Kind.TEXT] * context + [Kind.TAIL] * tail
    return [int(k) for k in kinds], list(range(sink + context + tail))


def layout_local(
    sink: int, context: int, tail: int, ratio: float, *, start_position: int = 0, context_before: int = 0
) -> SparseLayout:
    """``[sink][context][tail]`` where context query ``j`` sees context indices ``floor(ratio·j) .. j``.

    Ratio 0.5, six context tokens (``x`` = attends)::

              0  1  2  3  4  5
        0     x
        1     x  x
        2     .  x  x          <- floor(0.5·2) = 1: token 0 is gone
        3     .  x  x  x
        4     .  .  x  x  x
        5     .  .  x  x  x  x
        tail  .  .  .  x  x  x  <- floor(0.5·6) = 3: the memory keeps 6 - 3 entries
    """
    kinds, source = _plain(sink, context, tail)
    return _layout(
        kinds,
        source,
        [-1] * len(kinds),
        [True] * len(kinds),
        ratio_horizon=ratio,
        start_position=start_position,
        context_before=context_before,
    )


def layout_scattered(
    sink: int, context: int, tail: int, keep: Sequence[bool], *, start_position: int = 0, context_before: int = 0
) -> SparseLayout:
    """``[sink][context][tail]`` where context token ``i`` stays visible to later queries only if ``keep[i]``.

    An evicted token still reads everything kept before it (and itself); no later token sees it.
    """
    if len(keep) != context:
        raise ValueError(f"keep has {len(keep)} entries for {context} context tokens")
    kinds, source = _plain(sink, context, tail)
    kept = [True] * sink + [bool(k) for k in keep] + [True] * tail
    return _layout(
        kinds,
        source,
        [-1] * len(kinds),
        kept,
        ratio_horizon=0.0,
        start_position=start_position,
        context_before=context_before,
    )


def layout_sentinel(
    sink: int,
    context: int,
    tail: int,
    spans: Sequence[tuple[int, int]],
    *,
    start_position: int = 0,
    context_before: int = 0,
) -> SparseLayout:
    """``[sink][context with <CL> span <CR> around each span][tail]``; spans index the context tokens.

    Spans must be sorted, non-overlapping, at least two tokens long, inside ``range(context)``.
    """
    previous_end = 0
    for start, end in spans:
        if not (previous_end <= start and end - start >= MIN_SPAN and end <= context):
            raise ValueError(
                f"spans must be sorted, non-overlapping ranges of at least {MIN_SPAN} tokens inside the "
                f"{context} context tokens, got {list(spans)}"
            )
        previous_end = end
    kinds = [int(Kind.SINK)] * sink
    source = list(range(sink))
    span_id = [-1] * sink
    starts = {s: (i, e) for i, (s, e) in enumerate(spans)}
    t = 0
    while t < context:
        if t in starts:
            i, end = starts[t]
            kinds += [int(Kind.OPEN)] + [int(Kind.SPAN)] * (end - t) + [int(Kind.CLOSE)]
            source += [-1] + [sink + u for u in range(t, end)] + [-1]
            span_id += [i] * (end - t + 2)
            t = end
        else:
            kinds.append(int(Kind.TEXT))
            source.append(sink + t)
            span_id.append(-1)
            t += 1
    kinds += [int(Kind.TAIL)] * tail
    source += [sink + context + u for u in range(tail)]
    span_id += [-1] * tail
    kept = [k in (Kind.SINK, Kind.TEXT, Kind.CLOSE, Kind.TAIL) for k in kinds]
    return _layout(
        kinds, source, span_id, kept, ratio_horizon=0.0, start_position=start_position, context_before=context_before
    )


def reference_allowed(layout: SparseLayout) -> list[list[bool]]:
    """Slow, literal version of :meth:`SparseLayout.allowed`, for the property tests."""
    kinds = [Kind(k) for k in layout.kind.tolist()]
    spans, index = layout.span.tolist(), layout.index.tolist()
    horizon, kept = layout.horizon.tolist(), layout.kept.tolist()
    rows = []
    for q, qk in enumerate(kinds):
        row = []
        for k, kk in enumerate(kinds):
            if k > q:
                ok = False
            elif k == q or kk == Kind.SINK:
                ok = True
            elif qk == Kind.OPEN:
                ok = False  # <CL> reads nothing but itself (and the sink)
            elif qk == Kind.CLOSE:
                ok = spans[k] == spans[q] and kk in (Kind.OPEN, Kind.SPAN)  # <CR> reads its span
            elif qk == Kind.SPAN and kk == Kind.SPAN and spans[k] == spans[q]:
                ok = True
            elif kk == Kind.TAIL:
                ok = qk == Kind.TAIL
            else:  # a reader (text, span, tail) and an earlier key outside its span
                ok = kept[k] and index[k] >= horizon[q]
            row.append(ok)
        rows.append(row)
    return rows
