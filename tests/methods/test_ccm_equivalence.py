"""The backbone: parallel (masked) training forward == recurrent inference, for every CCM variant."""

from __future__ import annotations

import pytest
import torch

from ccmem.data.samples import Sample
from ccmem.methods.base import positions
from ccmem.registry import get_method
from tests.conftest import lora_pairs, randomize_lora, tiny_model
from tests.methods.test_contract import add_turn_by_turn_in_batches, assert_same_memory

SINK = [5, 6, 7]
CHUNKS = [[10, 11, 12, 13], [20, 21, 22], [30, 31, 32, 33, 34]]
TAIL = [40, 41, 42]
TOL = 1e-4


def recurrent_logits(lm, method, chunks, tail, sink):
    """Compress chunk by chunk, then read the tail with the memory; logits of every chunk and of the tail."""
    with method.attached(lm):
        return _recurrent_logits(lm, method, chunks, tail, sink)


def _recurrent_logits(lm, method, chunks, tail, sink):
    memory = method.add_sink(lm, method.new_memory(lm), torch.tensor([sink]))
    chunk_logits = []
    for chunk in chunks:
        if not chunk:  # nothing to read; `add` leaves memory as it is
            chunk_logits.append(None)
            memory = method.add(lm, memory, torch.tensor([chunk], dtype=torch.long))
            continue
        # a chunk is compressed without the previous chunk's raw tokens (``recent``): only the tail reads them
        seen = memory.without_window() if getattr(method, "recurrent", True) else memory.prefix(memory.sink)
        out = lm.model(
            input_ids=torch.tensor([chunk]),
            cache=seen.to_cache(),
            position_ids=positions(memory.next_position, len(chunk), lm.device),
        )
        chunk_logits.append(out.logits[0])
        memory = method.add(lm, memory, torch.tensor([chunk]))
    tail_out = lm.model(
        input_ids=torch.tensor([tail]),
        cache=memory.to_cache(),
        position_ids=positions(memory.next_position, len(tail), lm.device),
    )
    return chunk_logits, tail_out.logits[0], memory


@pytest.mark.parametrize("family", ["llama-gqa", "gpt-neox", "mistral", "qwen2", "gemma3", "mistral-window"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["ccm-concat", "ccm-merge"])
@pytest.mark.parametrize("recurrent", [True, False])
def test_parallel_forward_equals_recurrent_inference(family, attn, name, recurrent):
    lm = tiny_model(family, attn)
    method = get_method(name, n_tok=2, recurrent=recurrent)
    randomize_lora(method, lm)
    memory = assert_parallel_equals_recurrent(lm, method)
    expected_slots = len(SINK) + (2 * len(CHUNKS) if name == "ccm-concat" else 2)
    assert memory.num_slots == expected_slots


def assert_parallel_equals_recurrent(lm, method, chunks=CHUNKS):
    """The tail's logits and every chunk's (chunk t read Mem(t-1) in both computations) agree between one masked
    forward and compressing chunk by chunk; returns the recurrent memory."""
    batch = method.make_batch([Sample(chunks, TAIL, SINK)])
    with torch.no_grad():
        parallel = method.parallel_forward(lm, batch).logits[0]
        chunk_logits, tail_logits, memory = recurrent_logits(lm, method, chunks, TAIL, SINK)
    start = batch.tail_start[0]
    torch.testing.assert_close(parallel[start : start + len(TAIL)], tail_logits, atol=TOL, rtol=0)
    offset = len(SINK)
    for chunk, logits in zip(chunks, chunk_logits, strict=True):
        torch.testing.assert_close(parallel[offset : offset + len(chunk)], logits, atol=TOL, rtol=0)
        offset += len(chunk) + method.n_tok
    return memory


def test_equivalence_is_not_vacuous():
    """The tail really reads compressed memory: its logits differ from full attention and from LoRA off."""
    lm = tiny_model("llama-gqa")
    method = get_method("ccm-concat", n_tok=2)
    randomize_lora(method, lm, scale=0.5)
    batch = method.make_batch([Sample(CHUNKS, TAIL, SINK)])
    start = batch.tail_start[0]
    with torch.no_grad():
        compressed = method.parallel_forward(lm, batch).logits[0, start:]
        full = lm.model(input_ids=torch.tensor([SINK + sum(CHUNKS, []) + TAIL])).logits[0, -len(TAIL) :]
        for pair in lora_pairs(method, lm):
            pair.B.zero_()
        no_lora = method.parallel_forward(lm, batch).logits[0, start:]
    assert (compressed - full).abs().max() > 1e-3
    assert (compressed - no_lora).abs().max() > 1e-3


def test_batched_parallel_forward_equals_unbatched():
    lm = tiny_model("llama-gqa")
    method = get_method("ccm-merge", n_tok=3)
    randomize_lora(method, lm)
    samples = [Sample(CHUNKS, TAIL, SINK), Sample([[50, 51], [52, 53, 54, 55]], [60, 61, 62, 63], [])]
    with torch.no_grad():
        batched = method.parallel_forward(lm, method.make_batch(samples)).logits
        for b, sample in enumerate(samples):
            single_batch = method.make_batch([sample])
            single = method.parallel_forward(lm, single_batch).logits[0]
            n = single_batch.lengths[0]
            torch.testing.assert_close(batched[b, :n], single, atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["qwen2", "mistral-window"])
def test_gist_parallel_equals_recurrent(family):
    lm = tiny_model(family)
    method = get_method("gist", n_tok=2)
    randomize_lora(method, lm)
    batch = method.make_batch([Sample([sum(CHUNKS, [])], TAIL, SINK)])
    with torch.no_grad():
        parallel = method.parallel_forward(lm, batch).logits[0, batch.tail_start[0] :]
        _, tail_logits, memory = recurrent_logits(lm, method, CHUNKS, TAIL, SINK)
    torch.testing.assert_close(parallel, tail_logits, atol=TOL, rtol=0)
    assert memory.num_slots == len(SINK) + 2


def test_parallel_loss_uses_only_answer_tokens_and_matches_full_logits():
    lm = tiny_model("llama-gqa")
    method = get_method("ccm-concat", n_tok=2)
    randomize_lora(method, lm)
    samples = [Sample(CHUNKS, [*TAIL, 43, 44], SINK, answer_start=3), Sample([[50, 51]], [60, 61, 62], [], 1)]
    batch = method.make_batch(samples)
    labelled = (batch.labels != -100).nonzero().tolist()
    starts = [batch.tail_start[b] + s.answer_start for b, s in enumerate(samples)]
    assert all(i >= starts[b] and not batch.comp[b, i] for b, i in labelled)
    assert len(labelled) == 2 + 2  # [43, 44] and [61, 62]
    with torch.no_grad():
        loss = method.training_loss(lm, batch)
        logits = method.parallel_forward(lm, batch).logits
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("ccm-concat", {}),
        ("ccm-concat", {"keep": "digits", "recent": 2}),
        ("ccm-merge", {}),
        ("ccm-merge", {"banks": 2}),
    ],
)
def test_training_cuts_long_and_empty_chunks_as_add_does(name, options):
    """A chunk longer than ``max_chunk_tokens`` is several compression steps to ``add``, an empty one none; the
    masked forward and the step-by-step loss lay samples out the same way, so training reads what inference does."""
    lm = tiny_model("llama-gqa")
    method = get_method(name, n_tok=2, max_chunk_tokens=3, **options)
    randomize_lora(method, lm)
    chunks = [[10, 52, 11, 53, 12, 13, 14], [], [20, 21, 22], [30, 55, 31, 32, 56]]  # 7 tokens: 3 steps; none
    sample = Sample(chunks, TAIL, SINK, answer_start=1)
    fitted = method.fit_sample(sample)
    assert fitted.chunks == [[10, 52, 11], [53, 12, 13], [14], [20, 21, 22], [30, 55, 31], [32, 56]]
    assert method.fit_sample(fitted) is fitted
    batch = method.make_batch([sample])
    assert batch.lengths[0] == method.sample_length(fitted) == len(sample.tokens) + 2 * 6
    with torch.no_grad():
        parallel = method.parallel_forward(lm, batch).logits[0]
        _, tail_logits, memory = recurrent_logits(lm, method, chunks, TAIL, SINK)  # `add` each chunk whole
        loss = method.training_loss(lm, batch)
        torch.testing.assert_close(loss, method.recurrent_loss(lm, sample), atol=TOL, rtol=0)
    start = batch.tail_start[0]
    torch.testing.assert_close(parallel[start : start + len(TAIL)], tail_logits, atol=TOL, rtol=0)
    if name == "ccm-concat" and not options:
        assert memory.num_slots == len(SINK) + 2 * 6


@pytest.mark.parametrize("name", ["ccm-concat", "ccm-merge"])
def test_parallel_training_loss_and_gradients_equal_backprop_through_the_recurrence(name):
    """One masked forward trains exactly what compressing step by step would: same loss, same gradients."""
    lm = tiny_model("llama-gqa")
    method = get_method(name, n_tok=2)
    randomize_lora(method, lm)
    sample = Sample(CHUNKS, TAIL, SINK, answer_start=2)
    params = list(method.module_for(lm).parameters())
    for p in params:
        p.requires_grad_(True)

    def grads(loss):
        # The last layer's q/o projections at <COMP> positions feed nothing the loss reads: zero (or no) gradient.
        got = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, got, strict=True)]

    parallel = method.training_loss(lm, method.make_batch([sample]))
    parallel_grads = grads(parallel)
    recurrent = method.recurrent_loss(lm, sample)
    recurrent_grads = grads(recurrent)

    torch.testing.assert_close(parallel, recurrent, atol=TOL, rtol=0)
    assert any(g.abs().sum() > 0 for g in parallel_grads[1:])
    for a, b in zip(parallel_grads, recurrent_grads, strict=True):
        torch.testing.assert_close(a, b, atol=TOL, rtol=1e-3)


def _learned_merge(lm, n_tok=2, recurrent=True, gate_scale=0.3, seed=1, banks=1):
    """A ccm-merge with ``weighting=learned`` whose gate is random (zero would be the plain mean)."""
    method = get_method("ccm-merge", n_tok=n_tok, recurrent=recurrent, weighting="learned", banks=banks)
    randomize_lora(method, lm)
    gate = method.state(lm).merge_gate
    with torch.no_grad():
        gate.copy_(torch.randn(gate.shape, generator=torch.Generator().manual_seed(seed)) * gate_scale)
    return method


@pytest.mark.parametrize("family", ["llama-gqa", "gpt-neox", "qwen2", "gemma3"])
@pytest.mark.parametrize("recurrent", [True, False])
def test_learned_merge_parallel_equals_recurrent(family, recurrent):
    """Learned weighting keeps the backbone: the parallel softmax over steps equals the recurrent running
    log-normaliser, for the chunks and the tail, and memory stays n_tok slots."""
    lm = tiny_model(family)
    memory = assert_parallel_equals_recurrent(lm, _learned_merge(lm, recurrent=recurrent))
    assert memory.num_slots == len(SINK) + 2


@pytest.mark.parametrize("family", ["llama-gqa", "gpt-neox", "mistral-window", "gemma3"])
@pytest.mark.parametrize("weighting", ["mean", "learned"])
@pytest.mark.parametrize("banks", [2, 3])
def test_banked_merge_parallel_equals_recurrent(family, weighting, banks):
    """ccm-merge with banks: step t averaged into bank (t-1) mod banks only; the parallel plan (each reader sees
    the last ``banks`` merged entries) equals recurrent folding (the oldest bank merged and moved to the end), with
    the mean and the learned weighting; memory is banks x n_tok slots once every bank has a step."""
    lm = tiny_model(family)
    if weighting == "learned":
        method = _learned_merge(lm, banks=banks)  # LoRA and gate random
    else:
        method = get_method("ccm-merge", n_tok=2, banks=banks)
        randomize_lora(method, lm)
    # 7 steps of 2 or 3 tokens: every bank merges at least once
    chunks = [[10 + t, 11 + t, 12 + t][: 2 + (t // 10) % 2] for t in range(0, 70, 10)]
    memory = assert_parallel_equals_recurrent(lm, method, chunks)
    assert memory.num_slots == len(SINK) + 2 * banks


@pytest.mark.parametrize("family", ["llama-gqa", "gpt-neox", "qwen2"])
@pytest.mark.parametrize(
    "options",
    [
        {"name": "ccm-concat", "recent": 2},
        {"name": "ccm-concat", "recent": 9, "recurrent": False},  # more than the last chunk holds: all of it
        {"name": "ccm-merge", "recent": 3},
        {"name": "ccm-merge", "recent": 3, "banks": 2},
    ],
)
def test_recent_raw_tokens_parallel_equal_recurrent(family, options):
    """``recent``: the tail also reads the last chunk's last tokens raw; the masked forward (only the tail sees
    them) equals compressing chunk by chunk (each add drops the previous chunk's raw tokens), and memory holds
    the compressed slots plus at most ``recent`` raw ones, as its window."""
    lm = tiny_model(family)
    options = dict(options)  # the parameter is shared by every family
    name = options.pop("name")
    method = get_method(name, n_tok=2, **options)
    randomize_lora(method, lm)
    memory = assert_parallel_equals_recurrent(lm, method)
    raw = min(options["recent"], len(CHUNKS[-1]))
    compressed = 2 * len(CHUNKS) if name == "ccm-concat" else 2 * options.get("banks", 1)
    assert memory.segment_lengths() == {"sink": len(SINK), "compressed": compressed, "window": raw}
    comp_start = memory.next_position - 2  # the last chunk's <COMP> tokens; its raw tokens come right before them
    assert memory.positions[0][0, 0, -raw:].tolist() == list(range(comp_start - raw, comp_start))


def test_raw_tokens_change_what_the_tail_reads_and_not_the_compressed_slots():
    """Not vacuous, and a memory's window is its own: the tail's logits move with ``recent``, while a memory made
    with ``recent=3`` continued by ``recent=0`` (a runtime option: the same adapter, the same memory identity)
    drops its raw tokens and holds exactly the compressed slots a ``recent=0`` session would."""
    lm = tiny_model("llama-gqa")
    kept = get_method("ccm-concat", n_tok=2, recent=3)
    randomize_lora(kept, lm)
    plain = get_method("ccm-concat", n_tok=2)
    plain.state(lm).load_state_dict(kept.state(lm).state_dict())
    assert kept.memory_meta(lm) == plain.memory_meta(lm)
    with torch.no_grad():
        tails = [recurrent_logits(lm, m, CHUNKS, TAIL, SINK)[1] for m in (kept, plain)]
        assert (tails[0] - tails[1]).abs().max() > 1e-3
        with kept.attached(lm):
            memory = kept.add_sink(lm, kept.new_memory(lm), torch.tensor([SINK]))
            memory = kept.add(lm, memory, torch.tensor([CHUNKS[0]]))
        assert memory.window == 3
        with plain.attached(lm):
            continued = plain.add(lm, memory, torch.tensor([CHUNKS[1]]))
            fresh = plain.add_sink(lm, plain.new_memory(lm), torch.tensor([SINK]))
            for chunk in CHUNKS[:2]:
                fresh = plain.add(lm, fresh, torch.tensor([chunk]))
    assert continued.window == 0 and continued.num_slots == fresh.num_slots == len(SINK) + 4
    for (k1, v1), (k2, v2) in zip(continued.layers, fresh.layers, strict=True):
        torch.testing.assert_close(k1, k2, atol=1e-5, rtol=0)
        torch.testing.assert_close(v1, v2, atol=1e-5, rtol=0)


def test_recent_is_refused_where_it_cannot_hold():
    """Sliding-window models (the raw tokens' order in the cache is not the masked forward's) and ccm-reason."""
    method, lm = get_method("ccm-concat", recent=2), tiny_model("mistral-window")
    with pytest.raises(ValueError, match="sliding-window layers: use recent=0"):
        method.check_model(lm)
    with pytest.raises(ValueError, match="keep_last, not recent"):
        get_method("ccm-reason", recent=2)
    with pytest.raises(ValueError, match="recent must be 0 or more"):
        get_method("ccm-merge", recent=-1)


def test_banked_merge_differs_from_one_running_mean():
    """Not vacuous: with banks the tail reads other memory than the paper's single running mean."""
    lm = tiny_model("llama-gqa")
    chunks = [[10, 11], [20, 21, 22], [30, 31], [40, 41, 42]]
    tails = []
    for banks in (1, 2):
        method = get_method("ccm-merge", n_tok=2, banks=banks)
        randomize_lora(method, lm)
        with torch.no_grad():
            tails.append(recurrent_logits(lm, method, chunks, TAIL, SINK)[1])
    assert (tails[0] - tails[1]).abs().max() > 1e-3


def test_learned_merge_weights_steps_unequally_and_starts_as_the_mean():
    """With its gate at zero a learned merge is the paper's running mean exactly; a trained gate gives the
    steps other weights (the tail's logits move), and a batch still equals its rows one at a time."""
    lm = tiny_model("llama-gqa")
    mean = get_method("ccm-merge", n_tok=2)
    randomize_lora(mean, lm)
    zero = get_method("ccm-merge", n_tok=2, weighting="learned")
    zero.state(lm).load_state_dict(mean.state(lm).state_dict(), strict=False)  # the same <COMP> and LoRA
    learned = _learned_merge(lm, gate_scale=1.0)
    learned.state(lm).load_state_dict(mean.state(lm).state_dict(), strict=False)
    samples = [Sample(CHUNKS, TAIL, SINK), Sample([[50, 51], [52, 53, 54, 55]], [60, 61, 62, 63], [])]
    with torch.no_grad():
        methods = {"mean": mean, "zero": zero, "learned": learned}
        logits = {name: m.parallel_forward(lm, m.make_batch(samples[:1])).logits[0] for name, m in methods.items()}
        _, zero_tail, _ = recurrent_logits(lm, zero, CHUNKS, TAIL, SINK)
        _, mean_tail, _ = recurrent_logits(lm, mean, CHUNKS, TAIL, SINK)
        batched = learned.parallel_forward(lm, learned.make_batch(samples)).logits
        for b, sample in enumerate(samples):
            single_batch = learned.make_batch([sample])
            single = learned.parallel_forward(lm, single_batch).logits[0]
            torch.testing.assert_close(batched[b, : single_batch.lengths[0]], single, atol=TOL, rtol=0)
    torch.testing.assert_close(logits["zero"], logits["mean"], atol=1e-6, rtol=0)
    torch.testing.assert_close(zero_tail, mean_tail, atol=1e-6, rtol=0)
    assert (logits["learned"] - logits["mean"]).abs().max() > 1e-3


def test_learned_merge_gate_gets_gradients():
    """The gate is part of the trainable state: the parallel loss reaches it."""
    lm = tiny_model("llama-gqa")
    method = _learned_merge(lm)
    state = method.state(lm)
    state.requires_grad_(True)
    sample = Sample(CHUNKS, [*TAIL, 43, 44], SINK, answer_start=2)
    method.training_loss(lm, method.make_batch([sample])).backward()
    assert state.merge_gate.grad is not None and state.merge_gate.grad.abs().sum() > 0


# Ids 51-60 are the digits 0-9 to the tiny tokenizer (tests/conftest.py): 2, 1 and 2 of them in these chunks.
DIGIT_CHUNKS = [[10, 52, 11, 53], [20, 21, 22], [30, 55, 31, 32, 56]]
DIGITS_AT = [[1, 3], [], [1, 4]]


@pytest.mark.parametrize("family", ["llama-gqa", "gpt-neox", "qwen2"])
@pytest.mark.parametrize("options", [{}, {"recent": 2}, {"recurrent": False}])
def test_kept_digit_tokens_parallel_equal_recurrent(family, options):
    """``keep='digits'``: every later chunk and the tail read a chunk's digit tokens raw; the masked forward equals
    compressing chunk by chunk, and memory holds the <COMP> slots plus those tokens at their own positions."""
    lm = tiny_model(family)
    method = get_method("ccm-concat", n_tok=2, keep="digits", **options)
    randomize_lora(method, lm)
    memory = assert_parallel_equals_recurrent(lm, method, DIGIT_CHUNKS)
    kept = sum(map(len, DIGITS_AT))
    n = len(DIGIT_CHUNKS[-1])  # the window: the last chunk's last `recent` tokens, but those kept for good
    window = len(set(range(n - options.get("recent", 0), n)) - set(DIGITS_AT[-1]))
    assert memory.segment_lengths() == {"sink": len(SINK), "compressed": 2 * 3 + kept, "window": window}
    start, expected = len(SINK), list(range(len(SINK)))
    for chunk, at in zip(DIGIT_CHUNKS, DIGITS_AT, strict=True):
        expected += [start + i for i in at] + [start + len(chunk), start + len(chunk) + 1]
        start += len(chunk) + 2
    held = memory.positions[0][0, 0].tolist()
    assert held[: len(held) - window] == expected


# To the tiny tokenizer 35 is a space, 67 "@", 49 ".", 68-74 "A"-"G": "A1 BC D@E.F G" and "C D 2" as chunks.
WORD_CHUNKS = [[68, 52, 35, 69, 70, 35, 71, 67, 72, 49, 73, 35, 74], [70, 35, 71, 35, 53]]


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2"])
@pytest.mark.parametrize("options", [{}, {"recent": 3}])
def test_kept_values_are_whole_words_and_parallel_equals_recurrent(family, options):
    """``keep='values'``: every token of a word (text between spaces) with a digit or an @ ("A1", " D@E.F", " 2"), in
    the masked forward as in compressing chunk by chunk; ``digits`` keeps only the digit tokens of the same chunks."""
    lm = tiny_model(family)
    method = get_method("ccm-concat", n_tok=2, keep="values", **options)
    randomize_lora(method, lm)
    memory = assert_parallel_equals_recurrent(lm, method, WORD_CHUNKS)
    assert [method.kept_positions(lm, torch.tensor(c)).tolist() for c in WORD_CHUNKS] == [
        [0, 1, 5, 6, 7, 8, 9, 10],
        [3, 4],
    ]
    digits = get_method("ccm-concat", n_tok=2, keep="digits")
    assert [digits.kept_positions(lm, torch.tensor(c)).tolist() for c in WORD_CHUNKS] == [[1], [4]]
    window = 1 if options else 0  # recent=3: the last chunk's "D", " ", "2", of which "D" alone is not kept already
    assert memory.segment_lengths() == {"sink": len(SINK), "compressed": 2 * 2 + 8 + 2, "window": window}


def _ids(text: str) -> list[int]:
    return [ord(c) + 3 for c in text]  # the tiny tokenizer's ids for ASCII up to "Z" (one character each)


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2"])
def test_kept_names_are_capitalised_words_inside_a_sentence_and_parallel_equals_recurrent(family):
    """``keep='names'``: ``values`` and every capitalised word inside a sentence but "I" ("Biscuit" in "My dog
    is called Biscuit." came back as "Bibbi" from 3 <COMP> slots), and a sentence's first word where it is no
    common word ("Aoife works as..." but not "Totally", "The"), in the masked forward as chunk by chunk."""
    lm = tiny_model(family)
    method = get_method("ccm-concat", n_tok=2, keep="names")
    randomize_lora(method, lm)
    # The tiny tokenizer spells a character a token: a word is common when its lower-case form after a space takes
    # no more tokens than " the" (4), i.e. 3 letters or fewer; "ABCD" and "GHIJ" count as names.
    chunks = [_ids("AB CD. EF I GH"), _ids("5 XY"), _ids("ABCD EF. GHIJ KL. MN")]
    assert_parallel_equals_recurrent(lm, method, chunks)
    assert [method.kept_positions(lm, torch.tensor(c)).tolist() for c in chunks] == [
        [2, 3, 4, 5, 11, 12, 13],  # " CD." and " GH": not "AB", " EF" (first words, common), " I"
        [0, 1, 2, 3],  # "5" (a value) and " XY" (a name: no sentence ended before it)
        list(range(17)),  # "ABCD" and " GHIJ" (first words, no common words), " EF." and " KL.", not " MN"
    ]
    values = get_method("ccm-concat", n_tok=2, keep="values")
    assert [values.kept_positions(lm, torch.tensor(c)).tolist() for c in chunks] == [[], [0], []]


def test_kept_tokens_change_the_memory_and_a_batch_keeps_each_rows_own():
    """Not vacuous: the tail reads other memory with ``keep`` (a digit-free chunk adds only its <COMP> slots), and
    compressing rows with digits at different places in one padded forward gives each row's memory alone."""
    lm = tiny_model("llama-gqa")
    kept = get_method("ccm-concat", n_tok=2, keep="digits")
    randomize_lora(kept, lm)
    plain = get_method("ccm-concat", n_tok=2)
    plain.state(lm).load_state_dict(kept.state(lm).state_dict())
    with torch.no_grad():
        (_, with_keep, _), (_, without, _) = (recurrent_logits(lm, m, DIGIT_CHUNKS, TAIL, SINK) for m in (kept, plain))
    assert (with_keep - without).abs().max() > 1e-3
    contexts = [DIGIT_CHUNKS, [[57, 58, 40], [41, 42]]]  # the second: 2 digits, then none
    with torch.no_grad(), kept.attached(lm):
        singles = []
        for context in contexts:
            m = kept.add_sink(lm, kept.new_memory(lm), torch.tensor([SINK]))
            for chunk in context:
                m = kept.add(lm, m, torch.tensor([chunk]))
            singles.append(m)
        memories = [kept.add_sink(lm, kept.new_memory(lm), torch.tensor([SINK])) for _ in contexts]
        memories = add_turn_by_turn_in_batches(kept, lm, memories, contexts)
    assert singles[1].segment_lengths()["compressed"] == 2 * 2 + 2
    for single, batched in zip(singles, memories, strict=True):
        assert_same_memory(single, batched)


def test_keep_is_refused_where_it_cannot_hold():
    """An unknown class, ccm-merge (slots averaged in place: no such option), ccm-reason (keep_last), sliding-window
    models."""
    from ccmem.eval.harness import options_for
    from ccmem.options import OptionError

    with pytest.raises(ValueError, match="keep must be one of nothing, digits, values, names, got 'numbers'"):
        get_method("ccm-concat", keep="numbers")
    with pytest.raises(OptionError, match="keep"):
        get_method("ccm-merge", keep="digits")
    # so a shared `-O keep=digits` reaches ccm-concat and leaves the default eval list's ccm-merge alone
    assert options_for("ccm-merge", {"keep": "digits"}) == {}
    assert options_for("ccm-concat", {"keep": "digits"}) == {"keep": "digits"}
    with pytest.raises(ValueError, match="keep_last, not keep"):
        get_method("ccm-reason", keep="digits")
    # nor does `ccmem methods ccm-reason` (or --show-keys) offer the options it refuses
    from ccmem.registry import method_class

    assert not {"keep", "recent"} & {spec.name for spec in method_class("ccm-reason").option_specs()}
    assert options_for("ccm-reason", {"keep": "digits", "keep_last": 2}) == {"keep_last": 2}
    assert get_method("ccm-reason", keep="nothing").kept_positions(tiny_model(), torch.tensor([51])) is None
    with pytest.raises(ValueError, match="sliding-window layers: use keep=nothing"):
        get_method("ccm-concat", keep="digits").check_model(tiny_model("mistral-window"))


def test_keep_reads_what_tokens_decode_to_not_their_spelling():
    """Byte-fallback pieces (LLaMA-2, Mistral: a newline is ``<0x0A>``) and special tokens (``<|reserved_1|>``) are
    spelled with digits but hold none: only tokens whose decoded text has a digit are kept."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    from ccmem.loading import LoadedModel

    vocab = {"<unk>": 0, "<s>": 1, "<0x0A>": 2, "<0x31>": 3, "\u25815": 4, "\u2581cat": 5, "<|reserved_1|>": 6}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|reserved_1|>"]})
    lm = tiny_model("llama-gqa")
    lm = LoadedModel(model=lm.model, tokenizer=tokenizer, name=lm.name)
    method = get_method("ccm-concat", n_tok=2, keep="digits")
    kept = method.kept_positions(lm, torch.arange(7))
    assert kept.tolist() == [3, 4]  # the byte "1" and "\u25815" (" 5"); not "<0x0A>" nor "<|reserved_1|>"
