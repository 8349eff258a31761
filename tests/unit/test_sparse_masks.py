"""The sparse methods' span choice and masks (:mod:`ccmem.sparse_masks`) against slow loops and their pictures."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ccmem.sparse_masks import (
    Kind,
    budget,
    choose_sentences,
    choose_spans,
    evicted_target,
    layout_local,
    layout_scattered,
    layout_sentinel,
    reference_allowed,
    sentence_spans,
)

ratios = st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 300), ratio=ratios, seed=st.integers(0, 10_000), max_span=st.integers(2, 30))
def test_random_spans_evict_exactly_the_ratio_and_never_overlap(n, ratio, seed, max_span):
    need = evicted_target(n, ratio)
    spans = choose_spans(n, need, random.Random(seed), max_span=max_span)
    assert sum(end - start - 1 for start, end in spans) == min(need, max(n - 1, 0))
    previous = 0
    for start, end in spans:  # sorted, disjoint, inside the text, at least two tokens (a pair of sentinels
        assert previous <= start < end <= n  # always wraps whole tokens: spans are token ranges)
        assert end - start >= 2
        previous = end


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 200), ratio=ratios, seed=st.integers(0, 10_000))
def test_a_sentinel_layout_keeps_what_local_keeps(n, ratio, seed):
    spans = choose_spans(n, evicted_target(n, ratio), random.Random(seed))
    sentinel = layout_sentinel(0, n, 0, spans)
    local = layout_local(0, n, 0, ratio)
    assert int(sentinel.kept_after().sum()) == int(local.kept_after().sum()) == budget(n, ratio)


@settings(max_examples=150, deadline=None)
@given(
    sink=st.integers(0, 3),
    n=st.integers(0, 40),
    tail=st.integers(0, 4),
    ratio=ratios,
    seed=st.integers(0, 1000),
    kind=st.sampled_from(["sentinel", "local", "scattered"]),
)
def test_masks_match_the_slow_reference(sink, n, tail, ratio, seed, kind):
    rng = random.Random(seed)
    if kind == "sentinel":
        layout = layout_sentinel(sink, n, tail, choose_spans(n, evicted_target(n, ratio), rng, max_span=6))
    elif kind == "local":
        layout = layout_local(sink, n, tail, ratio)
    else:
        keep = [rng.random() > ratio for _ in range(n)]
        layout = layout_scattered(sink, n, tail, keep)
    assert layout.allowed().tolist() == reference_allowed(layout)


def test_sentinel_picture_from_the_module_docstring():
    layout = layout_sentinel(0, 4, 0, [(1, 3)])  # a [s s] b
    picture = ["x.....", ".x....", "x.x...", "x.xx..", ".xxxx.", "x...xx"]
    assert ["".join("x" if v else "." for v in row) for row in layout.allowed().tolist()] == picture
    assert layout.kind.tolist() == [Kind.TEXT, Kind.OPEN, Kind.SPAN, Kind.SPAN, Kind.CLOSE, Kind.TEXT]
    assert layout.position_ids.tolist() == [0, 0, 1, 2, 2, 3]  # sentinels copy the position before them
    assert layout.kept_after().tolist() == [True, False, False, False, True, True]


def test_local_picture_from_its_docstring():
    rows = layout_local(0, 6, 1, 0.5).allowed().tolist()
    picture = ["x......", "xx.....", ".xx....", ".xxx...", "..xxx..", "..xxxx.", "...xxxx"]
    assert ["".join("x" if v else "." for v in row) for row in rows] == picture


def test_every_real_token_is_predicted_once_and_no_sentinel_is_a_target():
    ids = [10, 11, 12, 13, 14, 15]
    layout = layout_sentinel(0, 6, 0, [(1, 3), (3, 5)])  # adjacent spans: <CR><CL> in a row
    labels = layout.labels(ids, torch.ones(6, dtype=torch.bool))
    targets = [t for t in labels.tolist() if t != -100]
    assert targets == ids[1:]
    sentinel_rows = (layout.source < 0).nonzero().flatten().tolist()
    assert sentinel_rows == [1, 4, 5, 8]
    for i in sentinel_rows:  # nothing is predicted from a sentinel (labels[i + 1] belongs to row i)
        assert labels[i + 1] == -100


def test_sentences_split_on_token_boundaries_and_cover_every_token():
    pieces = ["It", " rained", ".", " We", " stayed", " in", "!", "\n", "Then", " sun", "."]
    spans = sentence_spans(pieces)
    assert spans == [(0, 3), (3, 7), (7, 8), (8, 11)]
    chosen = choose_sentences(spans, 3, random.Random(0))
    evicted = sum(b - a - 1 for a, b in chosen)
    assert 3 <= evicted < 3 + max(b - a for a, b in spans)  # overshoot below one sentence
    assert all(b - a >= 2 for a, b in chosen)


@pytest.mark.parametrize(
    "spans",
    [[(0, 1)], [(2, 5), (4, 6)], [(3, 5), (0, 2)], [(4, 9)]],
    ids=["one-token", "overlapping", "unsorted", "outside"],
)
def test_bad_spans_are_refused(spans):
    with pytest.raises(ValueError, match="spans must be sorted"):
        layout_sentinel(0, 8, 0, spans)
