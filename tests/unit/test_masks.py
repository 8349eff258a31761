"""Mask builders against the slow, literal reference, plus the pictures in their docstrings."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ccmem.masks import Role, build_plan, collate_plans, layout, reference_allowed, windowed

chunk_lists = st.lists(st.integers(min_value=0, max_value=5), min_size=0, max_size=4)


@settings(max_examples=150, deadline=None)
@given(
    chunks=chunk_lists,
    n_tok=st.integers(1, 3),
    tail=st.integers(0, 4),
    sink=st.integers(0, 3),
    update=st.sampled_from(["concat", "merge"]),
    recurrent=st.booleans(),
    banks=st.integers(1, 3),
    recent=st.integers(0, 6),
)
def test_build_plan_matches_reference_loop(chunks, n_tok, tail, sink, update, recurrent, banks, recent):
    banks = banks if update == "merge" else 1
    kw = dict(sink_length=sink, update=update, recurrent=recurrent, banks=banks, recent=recent)
    plan = build_plan(chunks, n_tok, tail, **kw)
    assert plan.allowed.tolist() == reference_allowed(chunks, n_tok, tail, **kw)


def drawn(allowed: torch.Tensor) -> list[str]:
    return ["".join("x" if v else "." for v in row) for row in allowed.tolist()]


@pytest.mark.parametrize(
    ("recent", "tail_rows"),
    [
        (0, ["..x..xx.", "..x..xxx"]),
        (1, ["..x.xxx.", "..x.xxxx"]),  # recent=1: the tail rows gain the second c2, nothing else changes
        (5, ["..xxxxx.", "..xxxxxx"]),  # at most the whole last chunk
    ],
)
def test_concat_picture_from_docstring(recent, tail_rows):
    plan = build_plan([2, 2], 1, 2, update="concat", recent=recent)
    chunks = ["x.......", "xx......", "xxx.....", "..xx....", "..xxx...", "..xxxx.."]
    assert drawn(plan.allowed) == chunks + tail_rows


def test_merge_weights_are_running_averages():
    plan = build_plan([1, 1, 1], 2, 1, update="merge")
    # <COMP> order: step1 slot0, step1 slot1, step2 slot0, ...; merged entry of step 3, slot 0:
    weights = plan.mix_weights
    assert torch.allclose(weights[4], torch.tensor([1 / 3, 0, 1 / 3, 0, 1 / 3, 0]))
    assert torch.allclose(weights.sum(-1), torch.ones(6))


def test_banked_merge_averages_each_bank_and_reads_every_bank():
    """banks=2 over 5 steps of one <COMP>: steps 1, 3, 5 average in one bank, 2 and 4 in the other; the tail
    reads the latest entry of each bank (steps 4 and 5), chunk 4 reads steps 2 and 3."""
    plan = build_plan([1] * 5, 1, 1, update="merge", banks=2)
    weights = plan.mix_weights
    assert torch.allclose(weights[4], torch.tensor([1 / 3, 0, 1 / 3, 0, 1 / 3]))
    assert torch.allclose(weights[3], torch.tensor([0, 1 / 2, 0, 1 / 2, 0]))
    assert torch.allclose(weights[1], torch.tensor([0, 1.0, 0, 0, 0]))
    length = 11  # 5 x (chunk + <COMP>) + tail
    assert plan.allowed[-1, length:].tolist() == [False, False, False, True, True]
    assert plan.allowed[6, length:].tolist() == [False, True, True, False, False]  # chunk of step 4
    with pytest.raises(ValueError, match="banks"):
        build_plan([1], 1, 1, update="merge", banks=0)


def test_tail_reads_only_last_merged_memory():
    plan = build_plan([2, 2], 1, 1, update="merge")
    length = 7
    tail_row = plan.allowed[-1]
    assert tail_row[:length].tolist() == [False] * 6 + [True]
    assert tail_row[length:].tolist() == [False, True]


def test_non_recurrent_chunks_do_not_see_memory():
    plan = build_plan([2, 2], 1, 1, update="concat", recurrent=False)
    second_chunk_first_token = 3
    assert plan.allowed[second_chunk_first_token].tolist() == [False, False, False, True, False, False, False]
    assert plan.allowed[-1, 2] and plan.allowed[-1, 5]  # the tail still reads every <COMP>


def test_layout_roles_and_slots():
    lay = layout([2, 1], 2, 1, sink_length=1)
    assert lay.role.tolist() == [
        Role.SINK,
        Role.CHUNK,
        Role.CHUNK,
        Role.COMP,
        Role.COMP,
        Role.CHUNK,
        Role.COMP,
        Role.COMP,
        Role.TAIL,
    ]
    assert lay.slot.tolist() == [-1, -1, -1, 0, 1, -1, 0, 1, -1]


def test_n_tok_below_one_is_refused():
    with pytest.raises(ValueError, match="n_tok must be at least 1"):
        build_plan([3], 0, 1)


def test_collate_pads_without_empty_rows():
    plans = [build_plan([2], 1, 1, update="merge"), build_plan([1, 1, 1], 1, 2, update="merge")]
    batch = collate_plans(plans)
    assert batch.allowed.shape == (2, 8, 8 + 3)
    assert bool(batch.allowed.any(-1).all())  # every query row, padding included, attends somewhere
    n = plans[0].position_ids.numel()
    assert not batch.allowed[0, :n, n:8].any()  # real tokens never read padding


def _slow_windowed(allowed, order, window):
    """Spelled out: for each query, walk the keys in cache order from the last one back, keep `window` of them."""
    out = [[False] * len(row) for row in allowed]
    cache_order = sorted(range(len(order)), key=lambda k: int(order[k]))
    for q, row in enumerate(allowed):
        kept = 0
        for k in reversed(cache_order):
            if row[k] and kept < window:
                out[q][k] = True
                kept += 1
    return out


@settings(max_examples=60, deadline=None)
@given(
    chunks=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    n_tok=st.integers(1, 2),
    tail=st.integers(1, 3),
    sink=st.integers(0, 2),
    update=st.sampled_from(["concat", "merge"]),
    recurrent=st.booleans(),
    window=st.integers(1, 6),
)
def test_windowed_keeps_the_last_keys_in_cache_order(chunks, n_tok, tail, sink, update, recurrent, window):
    plan = build_plan(chunks, n_tok, tail, sink_length=sink, update=update, recurrent=recurrent)
    got = windowed(plan.allowed, plan.order, window)
    assert got.tolist() == _slow_windowed(plan.allowed.tolist(), plan.order.tolist(), window)
    assert (got.sum(-1) == plan.allowed.sum(-1).clamp(max=window)).all()
    batched = collate_plans([plan, build_plan([2], 1, 1)])
    real = got.shape[1] - plan.mix_index.numel()  # merged columns move in a batch; compare the real ones
    assert torch.equal(windowed(batched.allowed, batched.order, window)[0, : len(got), :real], got[:, :real])


def test_windowed_picture_from_docstring():
    plan = build_plan([2, 2], 1, 2)
    rows = windowed(plan.allowed, plan.order, 3).int().tolist()
    assert rows[3] == [0, 0, 1, 1, 0, 0, 0, 0]
    assert rows[5] == [0, 0, 0, 1, 1, 1, 0, 0]
    assert rows[7] == [0, 0, 0, 0, 0, 1, 1, 1]
