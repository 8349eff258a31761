"""One contract, every registered method (driven by ``tests/methods/cases.py``): a method is tested the day it
is added."""

from __future__ import annotations

import pytest
import torch

import ccmem
from ccmem.adapter import save_adapter
from ccmem.api import CompressedLM
from ccmem.data.samples import Sample
from ccmem.memory import Memory, MemoryMismatchError
from ccmem.registry import method_class, method_classes
from tests.conftest import tiny_model
from tests.methods.cases import CASES, CHUNKS, cases

SYSTEM = "sys"
SINK = len("System: sys\n")  # the tiny tokenizer: one token per character, plain "Role: text" format
QUERY = [40, 41]


def session(case, lm=None, **kwargs) -> CompressedLM:
    return CompressedLM(
        lm or tiny_model(), ccmem.get_method(case.method, **case.options), system_prompt=SYSTEM, **kwargs
    )


def randomize_state(method, lm, seed=0, scale=0.1) -> None:
    """Non-trivial trained state, so that a test passing with an untrained (zero-update) adapter proves nothing."""
    state = method.module_for(lm)
    if state is None:
        return
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in state.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)


def test_every_registered_method_has_a_case():
    assert {c.method for c in CASES} == set(method_classes())


@pytest.mark.parametrize("case", cases())
def test_add_changes_the_memory_as_declared_and_its_size_is_exact(case):
    lm = session(case)
    assert lm.memory.num_slots == SINK and lm.memory.segment_lengths()["sink"] == SINK
    growth = []
    for chunk in CHUNKS:
        lm.add_ids(chunk)
        growth.append(lm.memory.num_slots - SINK)
        memory = lm.memory
        assert memory.nbytes == sum(k.numel() * 4 + v.numel() * 4 for k, v in memory.layers)
        assert memory.slots_per_layer == [k.shape[-2] for k, _ in memory.layers]
        assert sum(memory.segment_lengths().values()) == memory.num_slots
        memory.check(lm.lm.kv_shape)  # positions, segments and shapes agree with the tensors
    assert tuple(growth) == case.growth


@pytest.mark.parametrize("case", cases())
def test_generation_leaves_the_memory_and_a_saved_memory_answers_the_same(case, tmp_path):
    lm = session(case)
    randomize_state(lm.method, lm.lm)
    for chunk in CHUNKS:
        lm.add_ids(chunk)
    before = lm.memory
    answer = list(lm.stream_ids(QUERY, max_new_tokens=4, stop_ids=set()))
    assert len(answer) == 4 and lm.memory is before
    path = lm.save_memory(tmp_path / "mem.safetensors")
    lm.reset()
    lm.load_memory(path)
    assert list(lm.stream_ids(QUERY, max_new_tokens=4, stop_ids=set())) == answer
    assert lm.memory.num_slots == before.num_slots and lm.memory.next_position == before.next_position


@pytest.mark.parametrize("case", cases())
def test_detaching_leaves_the_model_bit_identical(case):
    lm = tiny_model()
    ids = torch.tensor([[4, 5, 6, 7]])
    with torch.no_grad():
        before = lm.model(input_ids=ids).logits
    s = session(case, lm)
    randomize_state(s.method, lm)
    for chunk in CHUNKS:
        s.add_ids(chunk)
    list(s.stream_ids(QUERY, max_new_tokens=3, stop_ids=set()))
    s.score_ids(QUERY, [[50, 51], [52]])
    with torch.no_grad():
        after = lm.model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert lm.model.config._attn_implementation == "sdpa"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())


@pytest.mark.parametrize("case", cases())
def test_a_memory_from_another_method_or_model_is_refused(case, tmp_path):
    s = session(case)
    s.add_ids(CHUNKS[0])
    path = s.save_memory(tmp_path / "m.safetensors")
    other = next(c for c in CASES if c.method != case.method)
    with pytest.raises(MemoryMismatchError, match=f"method='{case.method}'"):
        session(other).load_memory(path)
    with pytest.raises(MemoryMismatchError, match=r"was made with model 'tiny-llama-gqa' .*not with this one"):
        session(case, tiny_model("qwen2")).load_memory(path)


@pytest.mark.parametrize("case", cases(trainable=True))
def test_trainable_methods_learn_and_their_saved_adapter_reloads_to_the_same_logits(case, tmp_path):
    lm = tiny_model()
    method = ccmem.get_method(case.method, **case.options)
    state = method.module_for(lm)
    state.requires_grad_(True)
    batch = method.make_batch([Sample(CHUNKS, [40, 41, 42, 43], [5, 6], answer_start=1)] * 2)
    optimizer = torch.optim.Adam(state.parameters(), lr=1e-2)
    losses = []
    with method.attached(lm):
        for _ in range(8):
            loss = method.training_loss(lm, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1, losses
    path = save_adapter(method, lm, tmp_path / "adapter.safetensors")

    trained = CompressedLM(lm, method, system_prompt=SYSTEM)
    reloaded = ccmem.load(tiny_model(), case.method, adapter=path, system_prompt=SYSTEM)
    for s in (trained, reloaded):
        for chunk in CHUNKS:
            s.add_ids(chunk)
    assert trained.score_ids(QUERY, [[50, 51]]) == pytest.approx(reloaded.score_ids(QUERY, [[50, 51]]), abs=1e-6)
    for (k1, v1), (k2, v2) in zip(trained.memory.layers, reloaded.memory.layers, strict=True):
        torch.testing.assert_close(k1, k2)
        torch.testing.assert_close(v1, v2)


def test_merge_memory_is_running_average_of_independent_compressions():
    """Non-recurrent merge = slot-wise mean of what non-recurrent concat stores per step."""
    lm = tiny_model()
    concat = ccmem.get_method("ccm-concat", n_tok=2, recurrent=False)
    merge = ccmem.get_method("ccm-merge", n_tok=2, recurrent=False)
    randomize_state(concat, lm)
    merge.module_for(lm).load_state_dict(concat.module_for(lm).state_dict())
    memories = []
    for method in (concat, merge):
        memory = method.new_memory(lm)
        with method.attached(lm), torch.no_grad():
            for chunk in CHUNKS:
                memory = method.add(lm, memory, torch.tensor([chunk]))
        memories.append(memory)
    mem_c, mem_m = memories
    for (kc, vc), (km, vm) in zip(mem_c.layers, mem_m.layers, strict=True):
        torch.testing.assert_close(km, kc.reshape(1, kc.shape[1], 3, 2, -1).mean(2), atol=1e-5, rtol=0)
        torch.testing.assert_close(vm, vc.reshape(1, vc.shape[1], 3, 2, -1).mean(2), atol=1e-5, rtol=0)
    assert (mem_m.positions[0] == -1).all()  # blended slots have no single position


def test_memory_save_is_atomic_and_roundtrips(tmp_path):
    k = torch.randn(1, 2, 3, 4)
    pos = torch.arange(3).expand(1, 2, 3)
    mem = Memory(layers=[(k, k + 1)], positions=[pos], next_position=7, sink=1, window=2, meta={"method": "x"})
    path = mem.save(tmp_path / "deep" / "m.safetensors")
    assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]  # no temporary left behind
    back = Memory.load(path, expect={"method": "x"})
    assert (back.next_position, back.sink, back.window, back.num_slots) == (7, 1, 2, 3)
    torch.testing.assert_close(back.layers[0][1], k + 1)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(MemoryMismatchError, match="not a readable"):
        Memory.load(tmp_path / "junk.safetensors")


def test_memory_works_as_a_transformers_cache_in_generate():
    lm = session(CASES[2])
    for chunk in CHUNKS:
        lm.add_ids(chunk)
    ours = list(lm.stream_ids(QUERY, max_new_tokens=5, stop_ids=set()))
    with lm.method.attached(lm.lm):
        out = lm.lm.model.generate(
            **lm.memory.generate_inputs(torch.tensor(QUERY)),
            max_new_tokens=5,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert out[0, -5:].tolist() == ours


@pytest.mark.parametrize("case", cases(budgeted=True))
def test_a_budget_that_keeps_everything_equals_full(case):
    lm = tiny_model()
    keep_all = method_class(case.method).budget_options(1.0)
    options = {k: v for k, v in case.options.items() if k not in ("ratio", "max_slots", *keep_all)}
    budgeted = CompressedLM(lm, ccmem.get_method(case.method, **options, **keep_all), system_prompt=SYSTEM)
    full = CompressedLM(lm, ccmem.get_method("full"), system_prompt=SYSTEM)
    for s in (budgeted, full):
        for chunk in CHUNKS:
            s.add_ids(chunk)
    for (k1, v1), (k2, v2) in zip(budgeted.memory.layers, full.memory.layers, strict=True):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    assert list(budgeted.stream_ids(QUERY, 5, stop_ids=set())) == list(full.stream_ids(QUERY, 5, stop_ids=set()))


@pytest.mark.parametrize("case", [c for c in cases(budgeted=True) if "ratio" in c.values[0].options])
def test_budget_options_are_checked(case):
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        ccmem.get_method(case.method, ratio=1.5)
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        ccmem.get_method(case.method, ratio=0)
    with pytest.raises(ValueError, match=f"max_slots=5 is below the {SINK} slots of the sink"):
        session(type(case)(case.method, {"max_slots": 5}))


@pytest.mark.parametrize("case", cases(needs_attention=True))
def test_a_method_that_reads_attention_refuses_a_model_that_cannot_give_it(case, monkeypatch):
    lm = tiny_model()
    monkeypatch.setattr(type(lm.model), "_can_set_attn_implementation", classmethod(lambda cls: False))
    with pytest.raises(ValueError, match="does not route attention through transformers' AttentionInterface"):
        session(case, lm)
    lm = tiny_model()
    lm.model.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(ValueError, match="needs 'sdpa' or 'eager' attention, but the model uses 'flex_attention'"):
        session(case, lm)


def test_attention_scores_are_read_without_switching_the_model_to_eager():
    """SnapKV's votes, read through the capture under sdpa, equal those computed from eager attention weights."""
    from ccmem.patching.attention import CAPTURE_KWARG, AttentionCapture, compression_attention

    lm = tiny_model()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    capture = AttentionCapture(queries_wanted=3)
    with torch.no_grad(), compression_attention(lm.model):
        lm.model(input_ids=ids, **{CAPTURE_KWARG: capture})
    eager = tiny_model(attn="eager")
    with torch.no_grad():
        attentions = eager.model(input_ids=ids, output_attentions=True).attentions
    for layer, weights in enumerate(attentions):
        torch.testing.assert_close(capture.weights[layer], weights[:, :, -3:].sum(dim=2), atol=1e-5, rtol=0)


def test_streaming_llm_holds_the_cache_while_generating():
    """The decode hook: each generated token evicts the oldest entry after the sinks, so memory stays constant."""
    from ccmem.generation import decode

    s = session(next(c for c in CASES if c.method == "streaming-llm"))
    for chunk in CHUNKS:
        s.add_ids(chunk)
    sizes = []
    original = s.method.decode_step

    def spy(lm, state):
        original(lm, state)
        sizes.append(int(state.cache.layers[0].keys.shape[-2]))

    s.method.decode_step = spy  # type: ignore[method-assign]
    tokens = list(decode(s.lm, s.method, s.memory, torch.tensor([QUERY]), 12))
    assert len(tokens) == 12
    assert sizes == [s.memory.num_slots + len(QUERY)] * 12  # without the hook it would grow by one per token


@pytest.mark.parametrize("options", [{"ratio": 1}, {"max_slots": 10_000}])
def test_streaming_llm_whose_budget_does_not_bind_generates_as_full(options):
    """ratio=1 keeps everything (= full) and max_slots caps the cache: neither evicts while generating below it."""
    lm = tiny_model()
    answers = []
    for name, opts in (("full", {}), ("streaming-llm", options)):
        s = ccmem.load(lm, name, system_prompt="sys", **opts)
        for chunk in CHUNKS:
            s.add_ids(chunk)
        answers.append(list(s.stream_ids(torch.tensor([QUERY]), 20, stop_ids=set())))
    assert answers[0] == answers[1]


@pytest.mark.parametrize("case", cases(batchable=True))
def test_a_batch_of_padded_contexts_equals_one_at_a_time(case):
    """Two interactions of different lengths (one with more turns) in padded forwards: the same memories."""
    lm = tiny_model()
    method = ccmem.get_method(case.method, **case.options)
    randomize_state(method, lm)
    contexts = [CHUNKS, [[60, 61], [62, 63, 64, 65, 66, 67]]]
    singles = []
    for context in contexts:
        s = CompressedLM(lm, method, system_prompt=SYSTEM if not singles else "s")
        for chunk in context:
            s.add_ids(chunk)
        singles.append(s.memory)
    batch = [CompressedLM(lm, method, system_prompt=p) for p in (SYSTEM, "s")]
    memories = [b.memory for b in batch]
    with torch.no_grad(), method.attached(lm):
        memories = add_turn_by_turn_in_batches(method, lm, memories, contexts)
    for single, batched in zip(singles, memories, strict=True):
        assert_same_memory(single, batched)


def add_turn_by_turn_in_batches(method, lm, memories, contexts):
    """``memories`` after ``method.add_batch`` of turn t of every context that has one, t = 0, 1, ..."""
    memories = list(memories)
    for step in range(max(map(len, contexts))):
        rows = [b for b, c in enumerate(contexts) if step < len(c)]
        added = method.add_batch(lm, [memories[b] for b in rows], [torch.tensor([contexts[b][step]]) for b in rows])
        for b, memory in zip(rows, added, strict=True):
            memories[b] = memory
    return memories


def assert_same_memory(single, batched):
    """The memory made in a batch holds the slots, segments, positions and keys/values made alone."""
    assert batched.num_slots == single.num_slots and batched.next_position == single.next_position
    assert batched.segment_lengths() == single.segment_lengths()
    for (k1, v1), (k2, v2), p1, p2 in zip(
        single.layers, batched.layers, single.positions, batched.positions, strict=True
    ):
        assert torch.equal(p1, p2)
        torch.testing.assert_close(k1, k2, atol=1e-5, rtol=0)
        torch.testing.assert_close(v1, v2, atol=1e-5, rtol=0)


def test_the_harness_names_no_method():
    """api, eval, demo, train and cli ask capabilities; a method's name or class appears only in its own file."""
    import ast
    from pathlib import Path

    src = Path(ccmem.__file__).parent
    harness = [
        src / "api.py",
        src / "demo.py",
        src / "cli.py",
        *(src / "eval").glob("*.py"),
        *(src / "train").glob("*.py"),
    ]
    names = set(method_classes())
    classes = {cls.__name__ for cls in method_classes().values()} | {"CCM", "CompTokens", "KVEviction"}
    found = []
    for path in harness:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{path.name}:{node.lineno} {node.value!r}")
            if (
                isinstance(node, ast.Name | ast.Attribute)
                and getattr(node, "id", getattr(node, "attr", None)) in classes
            ):
                found.append(f"{path.name}:{node.lineno} {getattr(node, 'id', getattr(node, 'attr', ''))}")
            module = getattr(node, "module", None) or ""
            if (
                isinstance(node, ast.ImportFrom)
                and module.startswith("ccmem.methods.")
                and module != "ccmem.methods.base"
            ):
                found.append(f"{path.name}:{node.lineno} imports {module}")
    assert not found, found


def test_a_memory_whose_layers_hold_different_numbers_of_entries_is_exact_and_roundtrips(tmp_path):
    """Per-layer budgets (pyramid-style presses) are representable: sizes stay exact and save/load keeps them."""
    k0, k1 = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 3, 4)
    positions = [torch.arange(5).expand(1, 2, 5), torch.tensor([0, 2, 4]).expand(1, 2, 3)]
    memory = Memory(layers=[(k0, k0 + 1), (k1, k1 + 1)], positions=positions, next_position=5, sink=1)
    assert memory.slots_per_layer == [5, 3] and memory.num_slots == 4
    assert memory.nbytes == (5 + 3) * 2 * 2 * 4 * 4
    assert memory.segment_lengths(1) == {"sink": 1, "compressed": 2, "window": 0}
    back = Memory.load(memory.save(tmp_path / "m.safetensors"))
    assert back.slots_per_layer == [5, 3] and torch.equal(back.positions[1], positions[1])
    with pytest.raises(ValueError, match="same number of cached slots in every layer"):
        back.generate_inputs(torch.tensor([1, 2]))


@pytest.mark.parametrize("case", cases())
def test_a_method_that_says_it_does_not_change_reading_reads_the_same_attached(case, monkeypatch):
    """``changes_reading() == False`` lets scoring and decoding skip attaching: it must not change a logit."""
    s = session(case)
    randomize_state(s.method, s.lm)
    for chunk in CHUNKS:
        s.add_ids(chunk)
    light = s.score_ids(QUERY, [[50, 51], [52]]), list(s.stream_ids(QUERY, 4, stop_ids=set()))
    monkeypatch.setattr(s.method, "changes_reading", lambda lm: True)
    attached = s.score_ids(QUERY, [[50, 51], [52]]), list(s.stream_ids(QUERY, 4, stop_ids=set()))
    assert light == attached


@pytest.mark.parametrize("name", list(method_classes()))
def test_a_methods_runtime_options_are_options_it_has(name):
    """ccm-reason listed ccm-concat's keep and recent as runtime options (`ccmem methods`), options it refuses."""
    cls = method_class(name)
    declared = {f.name for f in __import__("dataclasses").fields(cls)}
    assert not cls.runtime_options & cls.unsupported_options
    assert cls.runtime_options <= declared, sorted(cls.runtime_options - declared)


def test_a_recent_window_wider_than_the_budget_keeps_its_newest_entries_and_says_so(caplog):
    """h2o with recent=100 where the budget keeps 6: the six kept were an arbitrary pick among 100 tied "always
    keep" entries, with no word that the window did not fit."""
    lm = tiny_model()
    ids = torch.arange(3, 43)[None]  # 40 context tokens
    with caplog.at_level("WARNING", logger="ccmem.methods.eviction"):
        for _ in range(2):  # said once
            session = ccmem.load(lm, method="h2o", ratio=0.15, recent=100, system_prompt="")
            memory = session.add_ids(ids)
    kept = memory.positions[0][..., memory.sink :]
    newest = torch.arange(memory.next_position - 6, memory.next_position)
    assert kept.shape[-1] == 6 and torch.equal(kept, newest.expand_as(kept))
    assert caplog.text.count("h2o: the 40 entries it always keeps") == 1
    assert "more than the 6 its budget keeps here; only the newest 6 stay" in caplog.text
