"""Pure functions that lay out a compression sequence and build its attention masks and position ids.

No model code lives here: everything is a function of segment lengths, so each rule can be pictured,
property-tested against a slow loop (``tests/unit/test_masks.py``) and reused by training and inference.

Vocabulary
----------
A *parallel* sequence holds a whole interaction in one row, so that one forward pass trains every
compression step at once (CCM, section 3.3)::

    [sink][c1][C1][c2][C2] ... [ck][Ck][tail]

``sink``  optional tokens every position sees and that stay in memory (a system prompt, BOS).
``ct``    context chunk t (1-based).
``Ct``    the ``n_tok`` <COMP> tokens appended to chunk t; their keys/values become memory.
``tail``  what is read with the memory only: the query and, in training, its answer.

Memory after step t, ``Mem(t)``:
  concat: all of C1..Ct;  merge: the running average ``(1-1/t)·Mem(t-1) + (1/t)·Ct`` slot by slot (with
  ``banks=B``: B running averages, step t going into bank ``(t-1) mod B``).
Recurrent: chunk t and Ct see ``Mem(t-1)``; non-recurrent: they see only their own chunk (and the sink).
The tail always sees ``Mem(k)``, and with ``recent=R`` also the last R raw tokens of chunk k (a window of recent
text kept beside the compressed memory; no chunk sees an earlier chunk's raw tokens).

Merge needs keys that no token owns (averages of <COMP> keys). The plan therefore has ``M`` extra key
columns after the ``L`` real ones: column ``L+m`` holds the merged key/value of the m-th <COMP> position,
computed inside attention as ``mix_weights @ comp_keys``; see :mod:`ccmem.patching.attention`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

__all__ = [
    "MaskPlan",
    "Role",
    "build_plan",
    "collate_plans",
    "layout",
    "reference_allowed",
    "to_additive",
    "windowed",
]


class Role(IntEnum):
    """What a position of the parallel sequence is."""

    SINK = 0
    CHUNK = 1
    COMP = 2
    TAIL = 3


@dataclass(frozen=True)
class Layout:
    """Per-position description of a parallel sequence (all tensors have length ``L``)."""

    role: torch.Tensor  # Role of each position
    step: torch.Tensor  # chunk index t (1-based) for CHUNK/COMP, k+1 for TAIL, 0 for SINK
    slot: torch.Tensor  # <COMP> slot index j for COMP positions, -1 elsewhere

    @property
    def length(self) -> int:
        return int(self.role.numel())


def layout(chunk_lengths: list[int], n_tok: int, tail_length: int, sink_length: int = 0) -> Layout:
    """Describe ``[sink][c1][C1]...[ck][Ck][tail]`` position by position."""
    if n_tok < 1:
        raise ValueError(f"n_tok must be at least 1 (got {n_tok}): each chunk needs a <COMP> token to compress into")
    if any(n < 0 for n in chunk_lengths) or tail_length < 0 or sink_length < 0:
        raise ValueError("segment lengths must be non-negative")
    roles, steps, slots = [Role.SINK] * sink_length, [0] * sink_length, [-1] * sink_length
    for t, n in enumerate(chunk_lengths, start=1):
        roles += [Role.CHUNK] * n + [Role.COMP] * n_tok
        steps += [t] * (n + n_tok)
        slots += [-1] * n + list(range(n_tok))
    k = len(chunk_lengths)
    roles += [Role.TAIL] * tail_length
    steps += [k + 1] * tail_length
    slots += [-1] * tail_length
    return Layout(
        role=torch.tensor([int(r) for r in roles], dtype=torch.long),
        step=torch.tensor(steps, dtype=torch.long),
        slot=torch.tensor(slots, dtype=torch.long),
    )


@dataclass(frozen=True)
class MaskPlan:
    """Everything attention needs to run a parallel CCM forward.

    ``allowed[q, k]`` is True where query ``q`` may attend key column ``k``; columns ``0..L-1`` are the
    real positions, columns ``L..L+M-1`` the merged <COMP> entries (``M = 0`` for concat).
    ``mix_index[m]`` is the position of the m-th <COMP> token and ``mix_weights[m, m']`` the weight of
    <COMP> ``m'`` in merged entry ``m``. ``comp`` marks <COMP> positions (the gate of the conditional LoRA).
    ``order[k]`` is where key column ``k`` sits in the cache that recurrent inference reads (merged entries
    come right after the sink there); :func:`windowed` counts a sliding window in that order.
    Batched plans (from :func:`collate_plans`) carry a leading batch dimension on every tensor.
    """

    allowed: torch.Tensor
    position_ids: torch.Tensor
    comp: torch.Tensor
    mix_index: torch.Tensor
    mix_weights: torch.Tensor
    order: torch.Tensor

    @property
    def merges(self) -> bool:
        return self.mix_index.shape[-1] > 0


def _visible(
    q_role: torch.Tensor,
    q_step: torch.Tensor,
    k_role: torch.Tensor,
    k_step: torch.Tensor,
    merge: bool,
    recurrent: bool,
) -> torch.Tensor:
    """Broadcasting rule for real key columns (causality is applied by the caller)."""
    sink = k_role == Role.SINK
    same_step = (q_step == k_step) & (q_role != Role.SINK) & (k_role != Role.SINK)
    # Inside one step: chunk tokens see their chunk; <COMP> tokens see their chunk and earlier <COMP> of
    # the step; the tail sees itself. (A chunk token never precedes a later <COMP> of its step causally.)
    memory_reader = (q_role == Role.TAIL) | recurrent
    older_comp = (k_role == Role.COMP) & (k_step < q_step) & memory_reader & (q_role != Role.SINK)
    if merge:
        older_comp = torch.zeros_like(older_comp)  # merged entries replace raw older <COMP> keys
    return sink | same_step | older_comp


def build_plan(
    chunk_lengths: list[int],
    n_tok: int,
    tail_length: int,
    *,
    sink_length: int = 0,
    update: str = "concat",
    recurrent: bool = True,
    position_offset: int = 0,
    bidirectional: bool = False,
    banks: int = 1,
    recent: int = 0,
) -> MaskPlan:
    """Build the attention plan of one parallel CCM sequence.

    Concat, recurrent, two chunks of 2 tokens, ``n_tok=1``, tail of 2 (``x`` = attends, ``.`` = masked)::

                  c1 c1 C1 c2 c2 C2 t  t
        c1        x  .  .  .  .  .  .  .
        c1        x  x  .  .  .  .  .  .
        C1        x  x  x  .  .  .  .  .
        c2        .  .  x  x  .  .  .  .      <- chunk 2 reads Mem(1) = C1, not c1
        c2        .  .  x  x  x  .  .  .
        C2        .  .  x  x  x  x  .  .
        t         .  .  x  .  .  x  x  .      <- the tail reads Mem(2) = C1 C2 only
        t         .  .  x  .  .  x  x  x

    Merge replaces the older-<COMP> columns by merged columns appended after the sequence::

                  c1 c1 C1 c2 c2 C2 t  t  | M1 M2     M1 = C1, M2 = (C1 + C2) / 2
        c2        .  .  .  x  .  .  .  .  | x  .
        C2        .  .  .  x  x  x  .  .  | x  .
        t         .  .  .  .  .  .  x  .  | .  x

    With ``banks=B`` (merge only) step t is averaged into bank ``(t-1) mod B`` only, and a reader sees the
    merged entries of the last B steps, the latest state of every bank (``M1 = C1, M2 = C2, M3 = (C1 + C3) / 2``
    for B = 2).

    With ``recent=R`` the tail also reads the last R tokens of the last chunk raw (R = 1 above: the tail's rows
    get an ``x`` under the second ``c2``); the chunks and their <COMP> read as without it.

    Non-recurrent (``recurrent=False``): chunks and their <COMP> see only themselves and the sink.
    Position ids are the sequence index (plus ``position_offset``), the same ids recurrent inference uses.

    ``bidirectional=True`` is the encoder's plan (T5): the steps stay causal, since step t must not read
    what comes later for recurrence to hold, but each step reads itself in full, as one encoder forward of the
    step would. A chunk never reads its own <COMP> tokens, so the context is read as the plain encoder reads
    it; the sink and the tail see themselves in full::

                  c1 c1 C1 c2 c2 C2 t  t
        c1        x  x  .  .  .  .  .  .
        C1        x  x  x  .  .  .  .  .
        c2        .  .  x  x  x  .  .  .      <- c2 sees all of its chunk, not C2
        C2        .  .  x  x  x  x  .  .
        t         .  .  x  .  .  x  x  x
    """
    if update not in ("concat", "merge"):
        raise ValueError(f"update must be 'concat' or 'merge', got {update!r}")
    if banks < 1:
        raise ValueError(f"banks must be at least 1, got {banks}")
    if recent < 0 or (recent and bidirectional):
        raise ValueError(f"recent must be non-negative, and 0 in an encoder's plan (got {recent})")
    lay = layout(chunk_lengths, n_tok, tail_length, sink_length)
    merge = update == "merge"
    q_role, k_role = lay.role[:, None], lay.role[None, :]
    q_step, k_step = lay.step[:, None], lay.step[None, :]
    length = lay.length
    if bidirectional:  # steps stay causal through _visible; inside a step only chunk -> its own <COMP> is cut
        causal = ~((q_role == Role.CHUNK) & (k_role == Role.COMP) & (q_step == k_step))
    else:
        causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = _visible(q_role, q_step, k_role, k_step, merge, recurrent) & causal
    if recent and chunk_lengths:
        last = len(chunk_lengths)
        end = sink_length + sum(chunk_lengths) + n_tok * (last - 1)  # one past chunk k's last token
        raw = torch.zeros(length, dtype=torch.bool)
        raw[max(end - recent, end - chunk_lengths[-1]) : end] = True
        allowed |= (lay.role == Role.TAIL)[:, None] & raw[None, :]

    comp = lay.role == Role.COMP
    comp_pos = comp.nonzero().flatten()
    if merge:
        c_step, c_slot = lay.step[comp_pos], lay.slot[comp_pos]
        same_slot = (c_slot[:, None] == c_slot[None, :]) & ((c_step[:, None] - c_step[None, :]) % banks == 0)
        earlier = c_step[None, :] <= c_step[:, None]
        count = (c_step - 1) // banks + 1  # steps in the bank of each <COMP>, up to its own
        mix_weights = (same_slot & earlier).to(torch.float32) / count[:, None].to(torch.float32)
        # Merged entry of step s is its bank's memory after s: read by chunks s+1 .. s+B and their <COMP>
        # (recurrent) and by the tail when s is among the last B steps (then no later step has updated the bank).
        reader = (lay.role[:, None] == Role.TAIL) | (
            recurrent & ((lay.role[:, None] == Role.CHUNK) | (lay.role[:, None] == Role.COMP))
        )
        behind = lay.step[:, None] - c_step[None, :]
        merged_cols = reader & (behind >= 1) & (behind <= banks)
        allowed = torch.cat([allowed, merged_cols], dim=1)
        # In the recurrent cache the merged memory sits between the sink and the chunk being read.
        order = torch.cat([torch.arange(length) + len(comp_pos), sink_length + torch.arange(len(comp_pos))])
        order[:sink_length] = torch.arange(sink_length)
    else:
        comp_pos = comp_pos[:0]
        mix_weights = torch.zeros(0, 0)
        order = torch.arange(length)
    return MaskPlan(
        allowed=allowed,
        position_ids=torch.arange(length, dtype=torch.long) + position_offset,
        comp=comp,
        mix_index=comp_pos,
        mix_weights=mix_weights,
        order=order,
    )


def reference_allowed(
    chunk_lengths: list[int],
    n_tok: int,
    tail_length: int,
    *,
    sink_length: int = 0,
    update: str = "concat",
    recurrent: bool = True,
    bidirectional: bool = False,
    banks: int = 1,
    recent: int = 0,
) -> list[list[bool]]:
    """Slow, literal version of ``build_plan(...).allowed``: what each token may read, spelled out.

    Kept for the property tests; it walks the interaction step by step the way recurrent inference does.
    """
    lay = layout(chunk_lengths, n_tok, tail_length, sink_length)
    roles, steps = lay.role.tolist(), lay.step.tolist()
    length = len(roles)
    comp_positions = [i for i, r in enumerate(roles) if r == Role.COMP]
    merge = update == "merge"
    width = length + (len(comp_positions) if merge else 0)
    rows = []
    for q in range(length):
        row = [False] * width
        for k in range(length if bidirectional else q + 1):
            if bidirectional and roles[q] == Role.CHUNK and roles[k] == Role.COMP and steps[k] == steps[q]:
                continue  # an encoder's chunk is read without its <COMP> tokens
            if roles[k] == Role.SINK:
                row[k] = True
            elif roles[q] == Role.SINK:
                continue
            elif steps[k] == steps[q]:
                row[k] = True  # own chunk, own <COMP> so far, or own tail
            elif roles[k] == Role.COMP and steps[k] < steps[q] and not merge and (recurrent or roles[q] == Role.TAIL):
                row[k] = True  # concat memory: every older <COMP>
            elif roles[q] == Role.TAIL and roles[k] == Role.CHUNK and steps[k] == len(chunk_lengths):
                after = sum(1 for j in range(k + 1, length) if roles[j] == Role.CHUNK and steps[j] == steps[k])
                row[k] = after < recent  # the raw window: the last chunk's last `recent` tokens
        if merge and roles[q] != Role.SINK and (recurrent or roles[q] == Role.TAIL):
            for m, pos in enumerate(comp_positions):
                if steps[q] - banks <= steps[pos] <= steps[q] - 1:
                    row[length + m] = True  # each bank's memory before step t: its average up to its last step
        rows.append(row)
    return rows


def collate_plans(plans: list[MaskPlan]) -> MaskPlan:
    """Right-pad single-sequence plans into one batch.

    Padding queries attend only to themselves (so no softmax row is empty); padding keys are masked.
    """
    if not plans:
        raise ValueError("collate_plans needs at least one plan")
    lengths = [p.position_ids.numel() for p in plans]
    n_mix = [p.mix_index.numel() for p in plans]
    length, m = max(lengths), max(n_mix)
    batch = len(plans)
    allowed = torch.zeros(batch, length, length + m, dtype=torch.bool)
    position_ids = torch.zeros(batch, length, dtype=torch.long)
    comp = torch.zeros(batch, length, dtype=torch.bool)
    mix_index = torch.zeros(batch, m, dtype=torch.long)
    mix_weights = torch.zeros(batch, m, m)
    order = torch.arange(length + m).repeat(batch, 1) + length + m  # padding columns: after every real one
    for b, (p, n, nm) in enumerate(zip(plans, lengths, n_mix, strict=True)):
        order[b, :n] = p.order[:n]
        order[b, length : length + nm] = p.order[n:]
        allowed[b, :n, :n] = p.allowed[:, :n]
        allowed[b, :n, length : length + nm] = p.allowed[:, n:]
        pad = torch.arange(n, length)
        allowed[b, pad, pad] = True
        position_ids[b, :n] = p.position_ids
        if n < length:
            position_ids[b, n:] = p.position_ids[-1] + 1 if n else 0
        comp[b, :n] = p.comp
        mix_index[b, :nm] = p.mix_index
        mix_weights[b, :nm, :nm] = p.mix_weights
    return MaskPlan(allowed, position_ids, comp, mix_index, mix_weights, order)


def windowed(allowed: torch.Tensor, order: torch.Tensor, window: int) -> torch.Tensor:
    """``allowed`` restricted to a sliding window: each query keeps its last ``window`` allowed keys.

    "Last" is counted in ``order``, the order of the keys in the cache recurrent inference reads, which is
    what a sliding-window model's own mask counts in (a key ``window`` or more slots back is not seen).
    CCM-concat, recurrent, ``n_tok=1``, window 3 (``x`` = attends; ``-`` = allowed but out of the window)::

                  c1 c1 C1 c2 c2 C2 t  t
        c2        .  .  x  x  .  .  .  .
        c2        .  .  x  x  x  .  .  .
        C2        .  .  -  x  x  x  .  .      <- C1 is 3 slots back: [C1][c2][c2][C2]
        t         .  .  x  .  .  x  x  .
        t         .  .  -  .  .  x  x  x      <- the tail's cache is [C1][C2][t][t]
    """
    if window < 1:
        raise ValueError(f"a sliding window must hold at least one key, got {window}")
    batched = allowed.dim() == 3
    allowed = allowed if batched else allowed[None]
    order = order if order.dim() == 2 else order[None].expand(allowed.shape[0], -1)
    rank = order.argsort(dim=-1)  # column index at each cache slot
    in_order = allowed.gather(2, rank[:, None, :].expand_as(allowed))
    from_end = in_order.flip(-1).cumsum(-1).flip(-1)  # allowed keys at or after each slot
    kept = in_order & (from_end <= window)
    out = torch.zeros_like(allowed).scatter(2, rank[:, None, :].expand_as(allowed), kept)
    return out if batched else out[0]


def to_additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean ``allowed`` (``[B, Lq, Lk]`` or ``[Lq, Lk]``) -> additive ``[B, 1, Lq, Lk]`` mask for attention."""
    if allowed.dim() == 2:
        allowed = allowed[None]
    zero = torch.zeros((), dtype=dtype)
    neg = torch.tensor(torch.finfo(dtype).min, dtype=dtype)
    return torch.where(allowed, zero, neg)[:, None]
