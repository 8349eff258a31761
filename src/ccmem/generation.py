"""The decoding loops: token ids one at a time, reading a query with a memory, calling the method each step.

Chat, the server, evaluation and tests all generate through :func:`decode`, so a method's
:meth:`~ccmem.methods.base.Method.decode_step` (evict, compress a finished segment) runs wherever text is
generated. :func:`decode_batch` decodes several sessions (each its own memory and query) in one padded
forward per step, with the same tokens as :func:`decode` row by row. The memory itself is never changed:
the loops work on a copy in a transformers cache.

An encoder-decoder model (T5) reads the query in its encoder with the memory (the method's
:meth:`~ccmem.methods.base.Method.encoder_states`); its decoder then starts from the decoder start token and
cross-attends to those states.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ccmem.loading import LoadedModel
from ccmem.memory import Memory, check_meta
from ccmem.methods.base import DecodeRows, DecodeState, Method, pad_rows, padding_is_exact, positions, run_decoder
from ccmem.modules import GATE_KWARG

T = TypeVar("T")

#: Tokens of answer a decoding loop's cache makes room for at the start (:meth:`Memory.to_cache`); a longer
#: answer grows it by that room or a quarter of what it holds, whichever is more.
ROOM = 256


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked: greedy (``temperature=0``) or sampled with nucleus ``top_p``."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be 0 (greedy) or a finite positive number, got {self.temperature}")
        if self.seed is not None and (not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.seed is not None:  # a NumPy integer (np.random's seeds) is one, as max_new_tokens takes it
            object.__setattr__(self, "seed", int(self.seed))
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"seed must be a 64-bit integer (-2**63 to 2**64 - 1), got {self.seed}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (the probability mass sampled from), got {self.top_p}")

    def generator(self, device: torch.device) -> torch.Generator:
        """The random stream this sampling draws from: seeded with :attr:`seed` when given (the same seed, the same
        answer), else from the system's entropy (each call samples anew; an unseeded generator always started
        from torch's one default seed, so "random" answers repeated)."""
        generator = torch.Generator(device=device)
        if self.seed is not None:
            generator.manual_seed(_seed32(self.seed))
        else:
            generator.seed()
        return generator

    def pick(self, logits: torch.Tensor, generator: torch.Generator) -> int:
        if self.temperature == 0:
            return int(logits.argmax())
        logits = logits.double()  # float64: a temperature below float32's range (1e-300) is not rounded to 0
        # shifted so the largest is 0 first: a tiny temperature then sends the others to -inf (greedy in the
        # limit) instead of overflowing every logit to inf, which softmax turns into NaN
        probs = torch.softmax((logits - logits.max()) / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < self.top_p
            keep[0] = True  # the most likely token always stays (a top_p below float precision keeps only it)
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=generator))


def _seed32(seed: int) -> int:
    """The seed torch's CPU generator is given: ``seed`` itself from 0 to 2**32 - 1 (as before), any other 64-bit
    seed mixed down to 32 bits (splitmix64's finalizer). The Mersenne Twister behind ``manual_seed`` keeps only a
    seed's low 32 bits, so seeds 1 and 2**32 + 1 (or -1 and 2**32 - 1) sampled the same answer; now only chance
    (2**-32) makes two seeds coincide."""
    if 0 <= seed < 2**32:
        return seed
    mask = 2**64 - 1
    z = seed & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) & (2**32 - 1)


def check_max_new_tokens(value: Any, least: int = 1) -> int:
    """``value`` if it is a whole number of tokens (at least ``least``), else a ``ValueError`` naming it."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"max_new_tokens must be a whole number of tokens, got {value!r}")
    if value < least:
        raise ValueError(f"max_new_tokens must be at least {least}, got {value}")
    return int(value)


def decode(
    lm: LoadedModel,
    method: Method,
    memory: Memory,
    query: torch.Tensor,
    max_new_tokens: int,
    *,
    sampling: Sampling = Sampling(),
    stop_ids: set[int] = frozenset(),  # type: ignore[assignment]
    stats: dict[str, Any] | None = None,
) -> Iterator[int]:
    """Yield generated token ids one by one after reading ``query`` (``[1, n]``) with ``memory``.

    ``stats``, when given, is kept up to date while decoding: ``peak_kv_bytes`` (the largest the cache grew,
    memory included), ``kv_bytes`` (its size now) and the method's own counters (``insertions``: reasoning
    steps compressed).

    The method is attached for each model call only (and not at all if it does not change reading), so a
    generator left half-consumed never leaves hooks on the model. Generation stops after a token in
    ``stop_ids`` (which is yielded) or ``max_new_tokens``.
    """
    generator = sampling.generator(lm.device)
    if lm.is_encoder_decoder:
        state, inputs, forward = _seq2seq_start(lm, method, memory, query)
    else:
        room = int(query.shape[1]) + min(max_new_tokens, ROOM)  # each step then writes its entry in place
        state = DecodeState(cache=memory.to_cache(room), position=memory.next_position, memory=memory, tokens=[])
        inputs = query

        def forward(x: torch.Tensor) -> Any:
            position_ids = positions(state.position, x.shape[1], lm.device)
            return lm.model.base_model(input_ids=x, cache=state.cache, position_ids=position_ids, use_cache=True)

    feed: torch.Tensor | None = None  # embeddings the method feeds right after the token (Method.feed_after)
    for _ in range(max_new_tokens):
        with torch.no_grad(), method.attached(lm, reading=feed is None):
            # the token, or the token then the method's embeddings (gated LoRA on), in one forward
            out = forward(inputs) if feed is None else _forward_with_feed(lm, state, inputs, feed)
            state.position += inputs.shape[1] + (0 if feed is None else int(feed.shape[0]))
            state.fed += inputs[0].tolist()
            state.hidden = out.last_hidden_state[:, -1]
            token = sampling.pick(method.decode_logits(lm, state), generator)
            state.tokens.append(token)
            method.decode_step(lm, state)
            feed = method.feed_after(lm, state)
            if stats is not None:
                _update(stats, state)
        yield token
        if token in stop_ids:
            return
        inputs = torch.tensor([[token]], device=lm.device)


def _forward_with_feed(lm: LoadedModel, state: DecodeState, ids: torch.Tensor, feed: torch.Tensor) -> Any:
    """One decoder forward over the token ``ids`` (``[1, 1]``) followed by ``feed`` (``[n, hidden]``), the gate on
    at the fed positions only."""
    if lm.is_encoder_decoder:
        raise NotImplementedError("feeding a method's embeddings while decoding runs on decoder-only models")
    embeds = torch.cat([lm.model.get_input_embeddings()(ids), feed[None].to(lm.model.dtype)], dim=1)
    gate = torch.zeros(1, int(embeds.shape[1]), dtype=torch.bool, device=lm.device)
    gate[:, ids.shape[1] :] = True
    return run_decoder(lm, None, state.cache, state.position, inputs_embeds=embeds, **{GATE_KWARG: gate})


def _seq2seq_start(
    lm: LoadedModel, method: Method, memory: Memory, query: torch.Tensor
) -> tuple[DecodeState, torch.Tensor, Callable[[torch.Tensor], Any]]:
    """Where an encoder-decoder model starts decoding: the query encoded with the memory once, the decoder's start
    token, and the decoder's forward cross-attending to them (``state.position`` counts decoder positions)."""
    from ccmem.patching.seq2seq import decoder_cache, decoder_of, decoder_start

    with torch.no_grad(), method.attached(lm):
        encoder_hidden = method.encoder_states(lm, memory, query)
    state = DecodeState(cache=decoder_cache(), position=0, memory=memory, tokens=[])

    def forward(x: torch.Tensor) -> Any:
        return decoder_of(lm.model)(
            input_ids=x, encoder_hidden_states=encoder_hidden, cache=state.cache, use_cache=True
        )

    return state, torch.tensor([[decoder_start(lm.model)]], device=lm.device), forward


def _update(stats: dict[str, Any], state: DecodeState) -> None:
    from ccmem.patching.seq2seq import cache_bytes

    _count(stats, cache_bytes(state.cache), state)


def _count(stats: dict[str, Any], size: int, state: DecodeState) -> None:
    stats["kv_bytes"] = size
    stats["peak_kv_bytes"] = max(stats.get("peak_kv_bytes", 0), size)
    stats.update({k: v for k, v in state.extra.items() if isinstance(v, int | float)})


def decode_batch(
    lm: LoadedModel,
    method: Method,
    memories: Sequence[Memory],
    queries: Sequence[torch.Tensor],
    max_new_tokens: int | Sequence[int],
    *,
    sampling: Sampling | Sequence[Sampling] = Sampling(),
    stop_ids: set[int] = frozenset(),  # type: ignore[assignment]
    stats: Sequence[dict[str, Any]] | None = None,
    stopped: Callable[[int], bool] | None = None,
) -> Iterator[list[int | None]]:
    """:func:`decode` for several sessions at once: each step yields one entry per row, the token generated for
    that row, or ``None`` where it gave none: it has finished (its stop token yielded, or its ``max_new_tokens``
    reached, or ``stopped(row)`` said so), or it spent the step feeding tokens of its method's own
    (``ccm-reason`` compressing a step).

    ``stopped``, asked after every step, ends a row early: its reader is gone (a client that disconnected, an
    answer cut at a stop string), so the batch no longer decodes it.

    Row ``i`` reads ``queries[i]`` (``[1, n_i]``) with ``memories[i]``; memories may differ in length and
    positions. ``max_new_tokens`` and ``sampling`` are one for all rows or one per row (a row's seed gives
    the tokens :func:`decode` gives with that seed). All active rows share one padded forward per step
    (:class:`DecodingBatch`, which a server uses to let rows join between steps); rows leave the batch as they
    finish. A method may change rows as they decode (``ccm-reason`` compresses each row's finished steps) through
    :meth:`~ccmem.methods.base.Method.decode_logits_batch`. A method that cannot decode in a batch
    (:attr:`~ccmem.methods.base.Method.decode_batchable` False: it hooks each step) has its rows decoded one by
    one in step with each other: the same tokens, without the speed-up. ``stats``, one dict per row, are kept
    as :func:`decode` keeps its ``stats`` (KV bytes count each row's own entries, not the padding).
    Arguments are checked when called, before the first step.
    """
    n = len(memories)
    if len(queries) != n:
        raise ValueError(f"{n} memories but {len(queries)} queries")
    # 0 is a row that gives nothing (a finished reader); 2.5 decoded 3 tokens, None failed inside the loop
    limits = [check_max_new_tokens(k, least=0) for k in _per_row(max_new_tokens, n, "max_new_tokens")]
    samplings = _per_row(sampling, n, "sampling")
    for i, s in enumerate(samplings):
        _check_sampling(i, s)
    for i, q in enumerate(queries):
        _check_query(lm, i, q)
    expect = method.memory_meta(lm)
    for i, m in enumerate(memories):
        _check_memory(i, m, expect)
    if stats is not None and len(stats) != n:
        raise ValueError(f"stats has {len(stats)} dicts for {n} rows; give one per row")
    row_stats = list(stats) if stats is not None else None
    if (
        not method.decode_batchable
        or lm.is_encoder_decoder
        or not _padding_exact(lm, method, memories, queries, limits)
    ):
        rows = [
            decode(lm, method, m, q, k, sampling=s, stop_ids=stop_ids, stats=row_stats[b] if row_stats else None)
            for b, (m, q, k, s) in enumerate(zip(memories, queries, limits, samplings, strict=True))
        ]
        return _in_step(rows, limits, stop_ids, stopped)
    batch = DecodingBatch(lm, method, stop_ids=stop_ids, stopped=stopped)
    for b in range(n):
        batch._enqueue(memories[b], queries[b], limits[b], samplings[b], row_stats[b] if row_stats else None)
    return _steps(batch, n)


def _check_sampling(i: int, s: Any) -> None:
    if not isinstance(s, Sampling):
        raise ValueError(f"sampling {i} is a {type(s).__name__}; give Sampling(temperature, top_p, seed)")


def _check_query(lm: LoadedModel, i: int, q: Any) -> None:
    if not isinstance(q, torch.Tensor) or q.dim() != 2 or q.shape[0] != 1 or q.shape[1] == 0:
        shape = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"query {i} must be one non-empty sequence of ids, shape [1, n]; got {shape}")
    # else an IndexError or a dtype error from inside the embedding, naming no query
    if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise ValueError(f"query {i} must hold token ids (ints), got {q.dtype} values")
    low, high = int(q.min()), int(q.max())  # each a pass over the query, and a device sync on a GPU
    if low < 0 or high >= lm.vocab_size:
        raise ValueError(
            f"query {i} holds token id {high if low >= 0 else low}, outside this model's vocabulary "
            f"(0..{lm.vocab_size - 1})"
        )


def _check_memory(i: int, m: Any, expect: dict[str, str]) -> None:
    if not isinstance(m, Memory):
        raise ValueError(f"memory {i} is a {type(m).__name__}, not a ccmem.Memory")
    # another method's memory (a snapkv one decoded by ccm-concat) decoded without a word, as score_batch refuses
    check_meta(m.meta, expect, f"memory {i}")


def _padding_exact(
    lm: LoadedModel, method: Method, memories: Sequence[Memory], queries: Sequence[torch.Tensor], limits: list[int]
) -> bool:
    """Whether decoding the rows in one padded batch gives each row's own tokens (encoder-decoder models decode one
    session at a time). On a sliding-window model the padding between a row's memory and its query counts against
    the window: exact while the longest row, answer included, fits in it; a method that feeds tokens of its own
    while decoding (ccm-reason's <COMP>) grows rows by more than the answer, so it decodes row by row there."""
    slots = [max(m.slots_per_layer, default=0) for m in memories]
    return _exact(lm, method, slots, [int(q.shape[1]) + k for q, k in zip(queries, limits, strict=True)])


def _exact(lm: LoadedModel, method: Method, slots: list[int], extents: list[int]) -> bool:
    """:func:`_padding_exact` for rows of ``slots`` cache columns, each still to read ``extents`` more positions."""
    if lm.is_encoder_decoder:
        return False
    if lm.sliding_window is not None and type(method).decode_logits_batch is not Method.decode_logits_batch:
        return False
    return padding_is_exact(lm, slots, extents)


def _per_row(value: T | Sequence[T], n: int, name: str) -> list[T]:
    if isinstance(value, Sequence):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values for {n} rows; give one, or one per row")
        return list(value)
    return [value] * n


def _in_step(
    rows: list[Iterator[int]], limits: list[int], stop_ids: set[int], stopped: Callable[[int], bool] | None = None
) -> Iterator[list[int | None]]:
    """Single-row decoders advanced together, with :func:`decode_batch`'s step format."""
    counts = [0] * len(rows)
    active = [k > 0 for k in limits]
    while any(active):
        step: list[int | None] = [None] * len(rows)
        for b, row in enumerate(rows):
            if active[b]:
                token = step[b] = next(row)
                counts[b] += 1
                active[b] = token not in stop_ids and counts[b] < limits[b]
        yield step
        if stopped is not None:
            active = [a and not stopped(b) for b, a in enumerate(active)]


def _steps(batch: DecodingBatch, n: int) -> Iterator[list[int | None]]:
    """A :class:`DecodingBatch` of rows ``0..n-1`` stepped to its end, with :func:`decode_batch`'s step format."""
    while batch.active:
        tokens = batch.step()
        yield [tokens.get(b) for b in range(n)]


@dataclass
class _Row:
    memory: Memory
    query: torch.Tensor
    limit: int
    sampling: Sampling
    generator: torch.Generator
    stats: dict[str, Any] | None
    count: int = 0  # tokens given so far

    @property
    def left(self) -> int:
        """Tokens it may still give."""
        return self.limit - self.count


class DecodingBatch:
    """A batched decoding that rows may join between steps (continuous batching, as serving engines do): the loop
    behind :func:`decode_batch`, for a caller whose rows come while others decode (``ccmem serve``).

    :meth:`add` checks a row as :func:`decode_batch` does and queues it under the id it returns; the next
    :meth:`step` reads the queued rows' queries with their memories in one padded forward of their own, beside
    the running rows' forward of their next tokens, then joins them to the running rows
    (:meth:`~ccmem.methods.base.DecodeRows.joined`). Every row gets the tokens it would get decoded alone. A row
    leaves when it gives a stop token or its ``max_new_tokens``, or where ``stopped(row)`` says so (asked before
    every step: its reader is gone). Join only rows that :meth:`fits`: on a sliding-window model, a row whose
    padding the window would not hold waits for another batch. A method that cannot decode in a batch (it hooks
    every step) or an encoder-decoder model is refused: :func:`decode_batch` steps such rows one by one.
    """

    def __init__(
        self,
        lm: LoadedModel,
        method: Method,
        *,
        stop_ids: set[int] = frozenset(),  # type: ignore[assignment]
        stopped: Callable[[int], bool] | None = None,
    ) -> None:
        if not method.decode_batchable or lm.is_encoder_decoder:
            what = "an encoder-decoder model" if lm.is_encoder_decoder else f"{method.name} (it hooks every step)"
            raise ValueError(f"{what} cannot decode rows in one padded batch; decode_batch steps them one by one")
        self.lm, self.method, self.stop_ids, self.stopped = lm, method, stop_ids, stopped
        self._expect = method.memory_meta(lm)
        self._rows: list[_Row] = []  # every row added, by id
        self._queued: list[int] = []  # ids read in the next step
        self._group: DecodeRows | None = None  # the running rows' cache, mask and states
        self._ids: list[int] = []  # the id of each running row
        self._last: list[int | None] = []  # each running row's token of the last step (None: it fed tokens)
        self._keep: list[int] = []  # running rows (indices) that go on after the last step
        shape = lm.kv_shape
        self._entry_bytes = 2 * shape.layers * shape.kv_heads * shape.head_dim * shape.dtype.itemsize

    def add(
        self,
        memory: Memory,
        query: torch.Tensor,
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        stats: dict[str, Any] | None = None,
    ) -> int:
        """Queue a row (checked as :func:`decode_batch` checks its rows; a ``ValueError`` names what is wrong) and
        return its id; it decodes from the next :meth:`step`. A row of 0 tokens is finished at once."""
        key = len(self._rows)
        limit = check_max_new_tokens(max_new_tokens, least=0)
        _check_sampling(key, sampling)
        _check_query(self.lm, key, query)
        _check_memory(key, memory, self._expect)
        return self._enqueue(memory, query, limit, sampling, stats)

    def _enqueue(
        self, memory: Memory, query: torch.Tensor, limit: int, sampling: Sampling, stats: dict[str, Any] | None
    ) -> int:
        key = len(self._rows)
        self._rows.append(_Row(memory, query, limit, sampling, sampling.generator(self.lm.device), stats))
        if limit > 0:
            self._queued.append(key)
        return key

    def fits(self, memory: Memory, query: torch.Tensor, max_new_tokens: int) -> bool:
        """Whether a row of ``memory`` and ``query`` decoding up to ``max_new_tokens`` can join these rows and still
        get its own tokens (and they theirs)."""
        rows = [self._rows[i] for i in self._queued]
        slots = [max(r.memory.slots_per_layer, default=0) for r in rows] + [max(memory.slots_per_layer, default=0)]
        extents = [int(r.query.shape[1]) + r.limit for r in rows] + [int(query.shape[1]) + max_new_tokens]
        if self._group is not None:  # its columns so far and the most any running row still adds
            slots.append(int(self._group.attention_mask.shape[1]) + 1)
            extents.append(max(self._rows[i].left for i in self._ids))
        return _exact(self.lm, self.method, slots, extents)

    @property
    def running(self) -> list[int]:
        """Ids of the rows still decoding (queued ones included)."""
        self._prune()
        return [*self._ids, *self._queued]

    @property
    def active(self) -> bool:
        """Whether any row is still to decode."""
        return bool(self.running)

    def step(self) -> dict[int, int | None]:
        """One step of every running row (the running rows' forward, and one for the rows that join): ``{id:
        token}``, ``None`` for a row that fed tokens of its method's own instead of giving one."""
        self._prune()
        tokens: list[int | None] = []
        if self._group is not None:
            inputs, widths, fed = _next_inputs(self.lm, self._group, self._last)
            tokens += self._forward(self._group, self._ids, inputs, widths, fed)
        if self._queued:
            joining, self._queued = self._queued, []
            rows = [self._rows[i] for i in joining]
            widest = max(int(r.query.shape[1]) for r in rows)
            room = widest + min(max(r.limit for r in rows), ROOM)
            padded = pad_rows(self.lm, [r.memory for r in rows], [r.query for r in rows], room=room)
            group = DecodeRows(
                cache=padded.cache,
                attention_mask=padded.attention_mask,
                rows=[
                    DecodeState(cache=None, position=r.memory.next_position, memory=r.memory, tokens=[]) for r in rows
                ],
            )
            inputs = {"input_ids": padded.inputs, "position_ids": padded.position_ids}
            widths = [int(r.query.shape[1]) for r in rows]
            tokens += self._forward(group, joining, inputs, widths, [r.query[0].tolist() for r in rows])
            if self._group is None:
                self._group = group
            else:
                left = max(self._rows[i].left for i in [*self._ids, *joining])
                self._group = self._group.joined(group, room=min(left, ROOM))
            self._ids = [*self._ids, *joining]
        out: dict[int, int | None] = {}
        self._keep = []
        if self._group is None:
            return out
        entries = self._group.attention_mask.sum(dim=1).tolist()
        for i, (key, token) in enumerate(zip(self._ids, tokens, strict=True)):
            row = self._rows[key]
            out[key] = token
            if token is not None:
                row.count += 1
                if row.stats is not None:  # as decode counts: after a step's compression
                    _count(row.stats, int(entries[i]) * self._entry_bytes, self._group.rows[i])
            if token is None or (token not in self.stop_ids and row.count < row.limit):
                self._keep.append(i)
        self._last = tokens
        return out

    def _forward(
        self,
        group: DecodeRows,
        ids: list[int],
        inputs: dict[str, torch.Tensor],
        widths: list[int],
        fed: list[list[int]],
    ) -> list[int | None]:
        """One forward of ``group`` over ``inputs``; each row's token picked (``None`` where its method feeds)."""
        lm, method = self.lm, self.method
        gated = GATE_KWARG in inputs  # some row feeds <COMP> tokens: the method's gated LoRA must be on
        with torch.no_grad(), method.attached(lm, reading=not gated):
            out = lm.model.base_model(attention_mask=group.attention_mask, cache=group.cache, use_cache=True, **inputs)
            for i, row in enumerate(group.rows):
                row.position += widths[i]
                row.fed += fed[i]
                row.hidden = out.last_hidden_state[i : i + 1, -1]
            logits = method.decode_logits_batch(lm, group)
            tokens: list[int | None] = []
            for i, (key, row) in enumerate(zip(ids, group.rows, strict=True)):
                if row.feed is not None:
                    tokens.append(None)
                    continue
                spec = self._rows[key]
                token = spec.sampling.pick(logits[i], spec.generator)
                row.tokens.append(token)
                row.feed = method.feed_after(lm, row)  # fed right after the token, in the next forward
                tokens.append(token)
        return tokens

    def _prune(self) -> None:
        """Rows that finished in the last step, or whose reader is gone, leave the batch (and the columns only they
        used)."""
        if self._group is None:
            return
        keep = self._keep
        if self.stopped is not None:
            keep = [i for i in keep if not self.stopped(self._ids[i])]
        if not keep:
            self._group, self._ids, self._last, self._keep = None, [], [], []
            return
        if len(keep) < len(self._ids):
            self._group.compact(keep)  # the finished rows leave, and the columns only they used
            self._ids = [self._ids[i] for i in keep]
            self._last = [self._last[i] for i in keep]
        self._keep = list(range(len(keep)))


@torch.no_grad()
def _next_inputs(
    lm: LoadedModel, batch: DecodeRows, tokens: list[int | None]
) -> tuple[dict[str, torch.Tensor], list[int], list[list[int]]]:
    """The next forward's inputs: each row's new token, the embeddings its method asked to feed, or both (the token
    first), right-aligned with padding masked out; the batch's mask grows by the widest row. Also each row's width
    and fed token ids."""
    device = lm.device
    feeds = [row.feed for row in batch.rows]
    widths = [(t is not None) + (0 if f is None else int(f.shape[0])) for t, f in zip(tokens, feeds, strict=True)]
    fed = [[t] if t is not None else [] for t in tokens]
    positions = [row.position for row in batch.rows]
    if all(f is None for f in feeds):  # every row feeds a token: plain ids, one column
        batch.attention_mask = torch.cat([batch.attention_mask, batch.attention_mask.new_ones(len(tokens), 1)], dim=1)
        ids = torch.tensor(fed, device=device)
        return {"input_ids": ids, "position_ids": torch.tensor([[p] for p in positions], device=device)}, widths, fed
    width = max(widths)
    embed = lm.model.get_input_embeddings()
    token_embeds = embed(torch.tensor([[0 if t is None else t] for t in tokens], device=device))  # [B, 1, H]
    x = token_embeds.new_zeros(len(tokens), width, token_embeds.shape[-1])  # padding: masked out below
    mask = batch.attention_mask.new_zeros(len(tokens), width)
    position_ids = torch.zeros(len(tokens), width, dtype=torch.long, device=device)
    gate = torch.zeros(len(tokens), width, dtype=torch.bool, device=device)
    for i, (row, feed) in enumerate(zip(batch.rows, feeds, strict=True)):
        n = widths[i]
        if tokens[i] is not None:
            x[i, width - n] = token_embeds[i, 0]
        if feed is not None:
            x[i, width - len(feed) :] = feed.to(x.dtype)
            gate[i, width - len(feed) :] = True
            row.feed = None
        mask[i, width - n :] = 1
        position_ids[i, width - n :] = torch.arange(row.position, row.position + n, device=device)
    batch.attention_mask = torch.cat([batch.attention_mask, mask], dim=1)
    return {"inputs_embeds": x, "position_ids": position_ids, GATE_KWARG: gate}, widths, fed
