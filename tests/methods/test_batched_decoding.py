"""Several sessions decoded in one padded forward per step give the tokens each gives alone (``decode_batch``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

import ccmem
from ccmem.api import CompressedLM, generate_batch
from ccmem.generation import DecodingBatch, Sampling, decode, decode_batch
from ccmem.methods.base import Method
from ccmem.registry import method_classes
from tests.conftest import randomize_lora, tiny_model
from tests.methods.cases import cases
from tests.methods.test_contract import randomize_state

# Sessions of different lengths and positions: a long history, no memory at all, one short turn, a long turn.
SYSTEMS = ["sys", None, "longer", "s"]
HISTORIES = [[list(range(10, 30))] * 3, [], [[5, 6, 7]], [list(range(40, 90)), list(range(20, 60))]]
QUERIES = [[40, 41], [42], [43, 44, 45, 46], [47, 48, 49]]
LIMITS = [6, 3, 8, 5]  # rows finish at different steps, the longest memory before the others


def sessions(lm, method) -> list[CompressedLM]:
    out = []
    for system, history in zip(SYSTEMS, HISTORIES, strict=True):
        s = CompressedLM(lm, method, system_prompt=system)
        for turn in history:
            s.add_ids(turn)
        out.append(s)
    return out


def one_at_a_time(lm, method, memories, sampling=None, stop_ids=frozenset(), limits=LIMITS) -> list[list[int]]:
    sampling = sampling or [Sampling()] * len(memories)
    return [
        list(decode(lm, method, m, torch.tensor([q]), k, sampling=s, stop_ids=stop_ids))
        for m, q, k, s in zip(memories, QUERIES, limits, sampling, strict=True)
    ]


def batched(lm, method, memories, sampling=None, stop_ids=frozenset(), limits=LIMITS) -> list[list[int]]:
    steps = list(
        decode_batch(
            lm,
            method,
            memories,
            [torch.tensor([q]) for q in QUERIES],
            limits,
            sampling=sampling or Sampling(),
            stop_ids=stop_ids,
        )
    )
    rows = [[step[b] for step in steps] for b in range(len(memories))]
    # A row's tokens, then None to the end: never a token after it finished. A method that feeds tokens of its
    # own (ccm-reason's <COMP>) leaves a row without a token in the steps it spends on them.
    feeds = type(method).decode_logits_batch is not Method.decode_logits_batch
    for row in rows:
        n = sum(t is not None for t in row)
        last = max((i for i, t in enumerate(row) if t is not None), default=-1)
        assert all(t is None for t in row[last + 1 :]) and (feeds or last == n - 1)
    assert any(t is not None for t in steps[-1])  # no step in which every row had already finished
    return [[t for t in row if t is not None] for row in rows]


@dataclass(frozen=True)
class Recording(Sampling):
    """Greedy (or sampled) picking that keeps the logits it was given, to compare them and not only tokens."""

    seen: list[torch.Tensor] = field(default_factory=list, compare=False)

    def pick(self, logits: torch.Tensor, generator: torch.Generator) -> int:
        self.seen.append(logits.detach().clone())
        return super().pick(logits, generator)


def assert_same_logits(alone: list[Recording], together: list[Recording]) -> None:
    for a, b in zip(alone, together, strict=True):
        torch.testing.assert_close(torch.stack(b.seen), torch.stack(a.seen), atol=1e-5, rtol=0)


def method_for(name: str, lm, **options) -> Method:
    method = ccmem.get_method(name, **options)
    if name.startswith("ccm"):
        randomize_lora(method, lm)
    return method


@pytest.mark.parametrize("family", ["llama-gqa", "mistral", "qwen2", "gpt-neox", "gemma3", "mistral-window"])
@pytest.mark.parametrize(
    ("name", "options"),
    [("full", {}), ("none", {}), ("ccm-concat", {"n_tok": 3}), ("ccm-merge", {"n_tok": 3}), ("h2o", {"ratio": 0.5})],
)
def test_greedy_batched_decoding_equals_one_session_at_a_time(family, name, options):
    """mistral-window slides a window of 5 over the cache: the padding between a short row's memory and its query
    would count against it, so such rows decode alone (they gave other tokens in one padded batch)."""
    lm = tiny_model(family)
    method = method_for(name, lm, **options)
    memories = [s.memory for s in sessions(lm, method)]
    assert len({m.num_slots for m in memories}) == len(memories)
    alone, together = [Recording() for _ in memories], [Recording() for _ in memories]
    single = one_at_a_time(lm, method, memories, alone)
    assert [len(t) for t in single] == LIMITS
    assert batched(lm, method, memories, together) == single
    assert_same_logits(alone, together)  # positions and masks right, not only the same argmax


@pytest.mark.parametrize("case", cases())
def test_every_method_decodes_a_batch_as_one_at_a_time(case):
    """The contract: with trained state, greedy, and with a stop token that ends some rows early."""
    lm = tiny_model()
    method = ccmem.get_method(case.method, **case.options)
    randomize_state(method, lm)
    memories = [s.memory for s in sessions(lm, method)]
    single = one_at_a_time(lm, method, memories)
    stop = {single[2][1]}  # ends row 2 at its second token, and any other row that meets it
    alone, together = [Recording() for _ in memories], [Recording() for _ in memories]
    expected = one_at_a_time(lm, method, memories, alone, stop_ids=stop)
    assert batched(lm, method, memories, together, stop_ids=stop) == expected
    assert_same_logits(alone, together)


@pytest.mark.parametrize("name", ["full", "ccm-concat", "streaming-llm"])
def test_sampling_with_a_seed_per_row_equals_sampling_one_at_a_time(name):
    lm = tiny_model("qwen2")
    method = method_for(name, lm, **({"ratio": 0.5} if name == "streaming-llm" else {}))
    memories = [s.memory for s in sessions(lm, method)]
    sampling = [Sampling(temperature=1.5, top_p=0.9, seed=seed) for seed in (3, 4, 5, 3)]
    single = one_at_a_time(lm, method, memories, sampling)
    assert batched(lm, method, memories, sampling) == single
    assert single != one_at_a_time(lm, method, memories)  # it really sampled


@pytest.mark.parametrize("temperature", [1e-300, 1e-39, 1e-6])
def test_a_tiny_temperature_samples_the_greedy_token_instead_of_failing(temperature):
    logits = torch.tensor([3.0, 7.5, -2.0, 7.25, float("-inf")])
    generator = torch.Generator().manual_seed(0)
    assert {Sampling(temperature=temperature).pick(logits, generator) for _ in range(20)} == {1}


def test_a_seed_that_is_not_an_integer_is_refused():
    with pytest.raises(ValueError, match="seed must be an integer, got '12'"):
        Sampling(temperature=1.0, seed="12")  # type: ignore[arg-type]


def test_score_refuses_options_given_as_one_string():
    s = ccmem.load(tiny_model(), "full", system_prompt=None)
    with pytest.raises(ValueError, match="options as a list of non-empty strings"):
        s.score("Q?", "yes")  # type: ignore[arg-type]  # would score the letters y, e, s


@pytest.mark.parametrize("temperature", [-0.1, float("inf"), float("nan")])
def test_a_temperature_that_is_negative_or_not_finite_is_refused(temperature):
    with pytest.raises(ValueError, match=r"temperature must be 0 \(greedy\) or a finite positive number"):
        Sampling(temperature=temperature)


def test_streaming_llm_evicts_in_one_padded_batch_what_each_row_evicts_alone():
    """streaming-llm's decode_step evicts from each session's own cache, so its rows were decoded one by one: now
    the batch masks out the entries each row evicts, in one forward per step, with each row's own peak KV."""
    lm = tiny_model()
    method = ccmem.get_method("streaming-llm", ratio=0.5)
    memories = [s.memory for s in sessions(lm, method)]
    limits = [12, 3, 9, 7]  # long enough that every row evicts while it decodes
    alone_stats, together_stats = [{} for _ in memories], [{} for _ in memories]
    single = [
        list(decode(lm, method, m, torch.tensor([q]), k, stats=st))
        for m, q, k, st in zip(memories, QUERIES, limits, alone_stats, strict=True)
    ]
    forwards = []
    original = lm.model.base_model.forward
    lm.model.base_model.forward = lambda *a, **k: forwards.append(k["attention_mask"].shape[0]) or original(*a, **k)
    try:
        steps = list(decode_batch(lm, method, memories, [torch.tensor([q]) for q in QUERIES], limits,
                                  stats=together_stats))  # fmt: skip
    finally:
        del lm.model.base_model.forward
    assert [[t for t in (step[b] for step in steps) if t is not None] for b in range(4)] == single
    assert len(forwards) == max(limits) and forwards[0] == 4  # one forward per step, all rows in the first
    assert [st["peak_kv_bytes"] for st in together_stats] == [st["peak_kv_bytes"] for st in alone_stats]
    size = [m.num_slots + len(q) for m, q in zip(memories, QUERIES, strict=True)]
    entry = alone_stats[0]["peak_kv_bytes"] // size[0]
    held = [0, 2, 3]  # held at their size after the query: they evicted (row 1, 1 token read, is all sinks)
    assert [alone_stats[b]["peak_kv_bytes"] for b in held] == [size[b] * entry for b in held]


def test_every_method_that_hooks_decoding_either_batches_its_hook_or_declares_it_cannot():
    """A method overriding decode_step, or decode_logits, without decode_logits_batch, with decode_batchable left
    True would get wrong tokens in a batch."""
    classes = method_classes()
    unbatched = {
        n
        for n, cls in classes.items()
        if (cls.decode_step is not Method.decode_step or cls.decode_logits is not Method.decode_logits)
        and cls.decode_logits_batch is Method.decode_logits_batch
    }
    assert unbatched == {n for n, cls in classes.items() if not cls.decode_batchable}
    assert classes["ccm-reason"].decode_batchable and classes["streaming-llm"].decode_batchable


def test_rows_with_nothing_to_generate_and_bad_arguments():
    lm = tiny_model()
    method = ccmem.get_method("full")
    memories = [s.memory for s in sessions(lm, method)]
    queries = [torch.tensor([q]) for q in QUERIES]
    steps = list(decode_batch(lm, method, memories, queries, [0, 2, 0, 1]))
    assert [[t is None for t in step] for step in steps] == [[True, False, True, False], [True, False, True, True]]
    assert list(decode_batch(lm, method, memories, queries, 0)) == []
    with pytest.raises(ValueError, match="4 memories but 3 queries"):
        decode_batch(lm, method, memories, queries[:3], 2)
    with pytest.raises(ValueError, match="max_new_tokens has 2 values for 4 rows"):
        decode_batch(lm, method, memories, queries, [1, 2])
    with pytest.raises(ValueError, match="query 1 must be one non-empty sequence"):
        decode_batch(lm, method, memories, [queries[0], torch.tensor([[]]).long(), *queries[2:]], 2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_new_tokens": 2.5}, "max_new_tokens must be a whole number of tokens, got 2.5"),  # decoded 3 tokens
        ({"max_new_tokens": None}, "max_new_tokens must be a whole number"),  # a TypeError from inside the loop
        ({"max_new_tokens": -1}, "max_new_tokens must be at least 0"),
        ({"query": [40, 41]}, "query 0 must be one non-empty sequence of ids, shape \\[1, n\\]; got list"),
        ({"query": torch.tensor([[40.0, 41.0]])}, "query 0 must hold token ids \\(ints\\), got torch.float32"),
        ({"query": torch.tensor([[40, 500]])}, "query 0 holds token id 500, outside this model"),
        ({"sampling": {"temperature": 1.0}}, "sampling 0 is a dict; give Sampling"),
        ({"memory": None}, "memory 0 is a NoneType, not a ccmem.Memory"),
    ],
)
def test_decode_batch_refuses_bad_arguments_by_name_before_the_first_step(change, message):
    """Each of these failed inside torch (an IndexError from the embedding, a TypeError comparing None) or, for a
    fractional max_new_tokens, decoded one token more than asked; README documents decode_batch as public."""
    lm = tiny_model()
    method = ccmem.get_method("full")
    memory = CompressedLM(lm, method, system_prompt="sys").memory
    args = {"memory": memory, "query": torch.tensor([QUERIES[0]]), "max_new_tokens": 2, "sampling": Sampling()}
    args |= change
    with pytest.raises(ValueError, match=message):
        decode_batch(lm, method, [args["memory"]], [args["query"]], args["max_new_tokens"], sampling=args["sampling"])


def test_decode_batch_refuses_a_memory_another_method_made():
    """score_batch refused another method's memory; decode_batch decoded it without a word (a snapkv memory read by
    ccm-concat: tokens from a memory the method never made)."""
    from ccmem.memory import MemoryMismatchError

    lm = tiny_model()
    other = ccmem.load(lm, "snapkv", system_prompt="sys", ratio=0.5)
    other.add("w1 w2 w3 w4 w5 w6")
    method = ccmem.get_method("full")
    query = torch.tensor([QUERIES[0]])
    with pytest.raises(MemoryMismatchError, match="memory 0 was made with method='snapkv'"):
        next(decode_batch(lm, method, [other.memory], [query], 2))
    own = CompressedLM(lm, method, system_prompt="sys").memory
    assert next(decode_batch(lm, method, [own], [query], 2))  # its own method's memory decodes


def test_generate_batch_answers_as_each_session_alone_and_refuses_mixed_sessions():
    lm = tiny_model()
    method = method_for("ccm-concat", lm, n_tok=2)
    chats = sessions(lm, method)
    prompts = ["hello", "what is it?", "tell me more please", "x"]
    alone = [s.generate(p, max_new_tokens=5) for s, p in zip(chats, prompts, strict=True)]
    assert generate_batch(chats, prompts, max_new_tokens=5) == alone
    sampled = [s.generate(p, 5, temperature=1.0, seed=i) for i, (s, p) in enumerate(zip(chats, prompts, strict=True))]
    assert generate_batch(chats, prompts, 5, temperature=1.0, seed=[0, 1, 2, 3]) == sampled
    with pytest.raises(ValueError, match="session 1 has its own copy of the model"):
        generate_batch([chats[0], CompressedLM(tiny_model(), method)], ["a", "b"])
    with pytest.raises(ValueError, match="session 1 uses method 'full'"):
        generate_batch([chats[0], CompressedLM(lm, ccmem.get_method("full"))], ["a", "b"])
    with pytest.raises(ValueError, match="session 1 uses method 'ccm-concat' with other options"):
        generate_batch([chats[0], CompressedLM(lm, ccmem.get_method("ccm-concat", n_tok=3))], ["a", "b"])
    with pytest.raises(ValueError, match="one prompt per session"):
        generate_batch(chats, prompts[:2])


def test_generate_batch_refuses_sessions_whose_runtime_options_differ():
    """Options that change only how a method runs (ccm-reason's threshold, policy) are not in a memory's meaning,
    so sessions differing in them passed as one method, and every row was decoded with session 0's."""
    lm = tiny_model()
    low, high = (CompressedLM(lm, ccmem.get_method("ccm-reason", n_tok=1, threshold=t)) for t in (0.1, 0.9))
    with pytest.raises(ValueError, match=r"session 1 runs ccm-reason with threshold=0.9, session 0 with threshold=0.1"):
        generate_batch([low, high], ["a", "b"])
    assert len(generate_batch([low, low], ["a", "b"], max_new_tokens=2)) == 2


@pytest.mark.parametrize(
    ("name", "options"),
    [("h2o", {"ratio": 0.5}), ("expected-attention", {"ratio": 0.5, "n_future_positions": 16}), ("full", {})],
)
def test_a_sliding_window_model_compresses_and_scores_a_batch_as_one_at_a_time(name, options):
    """add_batch and option scoring on a model whose window (5) is shorter than the padded rows: H2O and Expected
    Attention kept other entries for the padded row, and scores read other keys."""
    from ccmem.api import add_batch, score_batch

    lm = tiny_model("mistral-window")
    contexts = [[{"role": "user", "content": "abc defgh ijk"}], [{"role": "user", "content": "zz"}]]
    together = [ccmem.load(lm, name, system_prompt="sys", **options) for _ in contexts]
    add_batch(together, [[{"role": "user", "content": "q"}], [{"role": "user", "content": "a longer first turn"}]])
    add_batch(together, contexts)
    for b, context in enumerate(contexts):
        alone = ccmem.load(lm, name, system_prompt="sys", **options)
        alone.add([{"role": "user", "content": ["q", "a longer first turn"][b]}])
        alone.add(context)
        for mine, theirs in zip(together[b].memory.positions, alone.memory.positions, strict=True):
            assert torch.equal(mine, theirs)
    items = [(s.memory, [40, 41], [[5], [6, 7, 8], [9, 10]]) for s in together]
    scores = score_batch(lm, together[0].method, items)
    for (memory, query, options_ids), got in zip(items, scores, strict=True):
        alone_scores = [score_batch(lm, together[0].method, [(memory, query, [o])])[0][0] for o in options_ids]
        assert got == pytest.approx(alone_scores, abs=1e-5)


def test_rows_batch_while_they_fit_in_the_window():
    from ccmem.methods.base import padding_is_exact

    assert padding_is_exact(tiny_model("llama-gqa"), [3, 200], [90, 1])  # no window: always one padded forward
    windowed = tiny_model("mistral-window")  # a window of 5 cache columns
    assert padding_is_exact(windowed, [2, 1], [3, 1]) and not padding_is_exact(windowed, [3, 1], [3, 1])


@pytest.mark.parametrize("family", ["llama-gqa", "mistral-window"])  # one padded batch, and rows in step
def test_a_row_whose_reader_stopped_leaves_the_batch_and_the_others_decode_as_before(family):
    """A server's client gone (or an answer cut at a stop string) kept its row in the batch to max_new_tokens."""
    lm = tiny_model(family)
    method = ccmem.get_method("full")
    memories = [s.memory for s in sessions(lm, method)]
    queries = [torch.tensor([q]) for q in QUERIES]
    expected = list(decode_batch(lm, method, memories, queries, 6))
    gone = set()

    def stopped(row):
        return row in gone

    steps = []
    for step in decode_batch(lm, method, memories, queries, 6, stopped=stopped):
        steps.append(step)
        if len(steps) == 2:
            gone.add(1)  # row 1's reader leaves after its second token
    assert [s[1] for s in steps] == [expected[0][1], expected[1][1]] + [None] * (len(steps) - 2)
    assert [[t for i, t in enumerate(s) if i != 1] for s in steps] == [
        [t for i, t in enumerate(s) if i != 1] for s in expected
    ]


def test_seeds_that_differ_above_32_bits_sample_differently_and_a_small_seed_samples_as_before():
    """torch's CPU generator keeps a seed's low 32 bits: seeds 1 and 2**32 + 1 (an OpenAI client's 64-bit seed)
    gave the same 'random' answer."""
    logits = torch.zeros(1000)

    def draws(seed: int) -> list[int]:
        sampling = Sampling(temperature=1.0, seed=seed)
        generator = sampling.generator(torch.device("cpu"))
        return [sampling.pick(logits, generator) for _ in range(8)]

    assert draws(1) != draws(2**32 + 1) != draws(2**63 + 1)
    assert draws(-1) != draws(2**32 - 1)
    assert draws(2**40) == draws(2**40)  # still a seed: it repeats
    legacy = torch.Generator().manual_seed(7)  # seeds below 2**32 keep the answers they gave before
    assert draws(7) == [Sampling(temperature=1.0).pick(logits, legacy) for _ in range(8)]


# ---------------------------------------------------------------- rows joining a running batch


def joined(lm, method, memories, starts, sampling=None, stop_ids=frozenset(), limits=LIMITS, stats=None):
    """Each row decoded by one DecodingBatch that row b joins before step ``starts[b]``: the rows' tokens, and the
    most rows one step decoded."""
    batch = DecodingBatch(lm, method, stop_ids=stop_ids)
    sampling = sampling or [Sampling()] * len(memories)
    rows: dict[int, int] = {}  # batch id -> row
    tokens: list[list[int]] = [[] for _ in memories]
    widest, step = 0, 0
    while len(rows) < len(memories) or batch.active:
        for b, start in enumerate(starts):
            if start == step:
                s = stats[b] if stats else None
                rows[batch.add(memories[b], torch.tensor([QUERIES[b]]), limits[b], sampling[b], s)] = b
        if batch.active:
            got = batch.step()
            widest = max(widest, len(got))
            for key, token in got.items():
                if token is not None:
                    tokens[rows[key]].append(token)
        step += 1
    return tokens, widest


@pytest.mark.parametrize("family", ["llama-gqa", "gemma3", "gpt-neox"])
@pytest.mark.parametrize(
    ("name", "options"),
    [("full", {}), ("ccm-concat", {"n_tok": 3}), ("ccm-merge", {"n_tok": 3}), ("streaming-llm", {"ratio": 0.5})],
)
def test_rows_that_join_a_running_batch_get_the_tokens_and_logits_they_get_alone(family, name, options):
    """A server's request that comes while others decode joins their batch at the next step (continuous batching):
    its query is read in a padded forward of its own, then its cache is laid beside theirs."""
    lm = tiny_model(family)
    method = method_for(name, lm, **options)
    memories = [s.memory for s in sessions(lm, method)]
    limits = [9, 3, 8, 12]  # row 1 finishes before row 3 joins; streaming-llm evicts while joined
    alone, together = [Recording() for _ in memories], [Recording() for _ in memories]
    alone_stats, together_stats = [{} for _ in memories], [{} for _ in memories]
    single = [
        list(decode(lm, method, m, torch.tensor([q]), k, sampling=s, stats=st))
        for m, q, k, s, st in zip(memories, QUERIES, limits, alone, alone_stats, strict=True)
    ]
    tokens, widest = joined(lm, method, memories, [0, 2, 2, 5], together, limits=limits, stats=together_stats)
    assert tokens == single and widest == 3  # rows 0, 2 and 3 decoded together once 3 joined
    assert_same_logits(alone, together)
    assert [st["peak_kv_bytes"] for st in together_stats] == [st["peak_kv_bytes"] for st in alone_stats]


@pytest.mark.parametrize("case", cases(decode_batchable=True))
def test_every_batchable_method_decodes_rows_that_join_as_one_at_a_time(case):
    """The contract, with trained state and a stop token that ends some rows early; a row joining at step 1 meets
    rows that already feed tokens of their method's own (ccm-reason)."""
    lm = tiny_model()
    method = ccmem.get_method(case.method, **case.options)
    randomize_state(method, lm)
    memories = [s.memory for s in sessions(lm, method)]
    single = one_at_a_time(lm, method, memories)
    stop = {single[2][1]}
    expected = one_at_a_time(lm, method, memories, stop_ids=stop)
    assert joined(lm, method, memories, [1, 0, 3, 1], stop_ids=stop)[0] == expected


def test_sampled_rows_that_join_sample_as_they_do_alone():
    lm = tiny_model("qwen2")
    method = method_for("ccm-concat", lm, n_tok=2)
    memories = [s.memory for s in sessions(lm, method)]
    sampling = [Sampling(temperature=1.5, top_p=0.9, seed=seed) for seed in (3, 4, 5, 3)]
    assert joined(lm, method, memories, [0, 1, 1, 4], sampling)[0] == one_at_a_time(lm, method, memories, sampling)


def test_a_row_joins_a_sliding_window_batch_only_while_the_padding_fits_the_window():
    lm = tiny_model("mistral-window")  # a window of 5 cache columns
    method = ccmem.get_method("full")
    empty = CompressedLM(lm, method, system_prompt=None).memory
    batch = DecodingBatch(lm, method)
    assert batch.fits(empty, torch.tensor([[3]]), 2)  # alone, any row fits
    batch.add(empty, torch.tensor([[3]]), 2)
    assert batch.fits(empty, torch.tensor([[4]]), 2)  # 1 + 2 and 1 + 2 columns: within the window
    assert not batch.fits(empty, torch.tensor([[4, 5, 6]]), 3)  # padded to 1 + 6 columns: past it
    batch.step()  # running: 2 columns, 1 more token to come
    assert batch.fits(empty, torch.tensor([[4]]), 1) and not batch.fits(empty, torch.tensor([[4]]), 4)


def test_a_decoding_batch_refuses_a_method_that_hooks_every_step_and_bad_rows_by_name():
    lm = tiny_model()
    full = type(ccmem.get_method("full"))
    hooking = type("Hooking", (full,), {"decode_batchable": False})  # as a method whose decode_step is per row
    with pytest.raises(ValueError, match=r"full \(it hooks every step\) cannot decode rows in one padded batch"):
        DecodingBatch(lm, hooking())
    method = ccmem.get_method("full")
    batch = DecodingBatch(lm, method)
    memory = CompressedLM(lm, method).memory
    batch.add(memory, torch.tensor([[3]]), 2)
    with pytest.raises(ValueError, match="query 1 holds token id 999"):
        batch.add(memory, torch.tensor([[999]]), 2)
    with pytest.raises(ValueError, match="max_new_tokens must be a whole number"):
        batch.add(memory, torch.tensor([[3]]), 2.5)
    assert batch.add(memory, torch.tensor([[3]]), 0) == 1 and batch.running == [0]  # 0 tokens: finished at once


@pytest.mark.parametrize("name", ["ccm-concat", "streaming-llm"])
def test_many_rows_joining_and_leaving_at_random_steps_decode_as_alone(name):
    """Rows come at random steps (into a running batch, or after every row has left), with random lengths and a
    stop token; each gets its own tokens."""
    import random

    rng = random.Random(7)
    lm = tiny_model()
    method = method_for(name, lm, **({"ratio": 0.5} if name == "streaming-llm" else {"n_tok": 2}))
    base = sessions(lm, method)
    picks = [rng.randrange(len(base)) for _ in range(8)]
    memories = [base[p].memory for p in picks]
    queries = [QUERIES[p] for p in picks]
    limits = [rng.randint(1, 10) for _ in picks]
    starts = sorted(rng.randint(0, 14) for _ in picks)
    single = [
        list(decode(lm, method, m, torch.tensor([q]), k)) for m, q, k in zip(memories, queries, limits, strict=True)
    ]
    stop = {single[0][0]}  # some rows meet it early
    expected = [
        list(decode(lm, method, m, torch.tensor([q]), k, stop_ids=stop))
        for m, q, k in zip(memories, queries, limits, strict=True)
    ]
    batch = DecodingBatch(lm, method, stop_ids=stop)
    rows, tokens, step = {}, [[] for _ in picks], 0
    while len(rows) < len(picks) or batch.active:
        for b, start in enumerate(starts):
            if start == step:
                rows[batch.add(memories[b], torch.tensor([queries[b]]), limits[b])] = b
        for key, token in (batch.step() if batch.active else {}).items():
            if token is not None:
                tokens[rows[key]].append(token)
        step += 1
    assert tokens == expected
