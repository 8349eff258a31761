"""Ren et al.'s sentinel, local and scattered attention: inference evicts exactly what the training mask hides."""

from __future__ import annotations

import random

import pytest
import torch

import ccmem
from ccmem.data.samples import Sample
from ccmem.methods.base import logits_for
from ccmem.sparse_masks import budget
from tests.conftest import tiny_model
from tests.methods.test_contract import randomize_state

SPARSE = ["sentinel", "local", "scattered"]
RATIOS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def trained(name: str, lm, **options):
    """The method with a non-trivial LoRA (and sentinel embeddings), as if loaded from an adapter."""
    method = ccmem.get_method(name, **options)
    randomize_state(method, lm, seed=3, scale=0.05)
    method.adapter_hash = "test"
    return method


def ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(5, 90, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama-gqa", "gpt-neox", "qwen2"])
@pytest.mark.parametrize("name", SPARSE)
def test_evicting_at_inference_gives_the_logits_of_the_masked_training_forward(family, name):
    lm = tiny_model(family)
    method = trained(name, lm, compression_ratio=0.4)
    sink, context, tail = ids(3, 0), ids(40, 1), ids(6, 2)
    with method.attached(lm):
        memory = method.add(lm, method.add_sink(lm, method.new_memory(lm), sink), context)
        start = memory.next_position
        out = lm.model.base_model(
            input_ids=tail,
            cache=memory.to_cache(),
            position_ids=torch.arange(start, start + 6)[None],
            use_cache=True,
        )
        recurrent = logits_for(lm, out.last_hidden_state[0])
        method._rng = random.Random(f"{method.seed}-0-40")  # the spans/subset ``add`` drew for this context
        batch = method.make_batch([Sample([context[0].tolist()], tail[0].tolist(), sink[0].tolist())])
        parallel = logits_for(lm, method.parallel_hidden(lm, batch)[0, -6:])
    assert memory.num_slots == 3 + budget(40, 0.4)  # really evicted: the memory holds the kept entries only
    torch.testing.assert_close(recurrent, parallel, atol=1e-5, rtol=1e-5)


def test_local_attention_read_in_pieces_equals_one_masked_forward():
    lm = tiny_model()
    method = trained("local", lm, compression_ratio=0.3)
    context, tail = ids(37, 4), ids(5, 5)
    with method.attached(lm):
        memory = method.new_memory(lm)
        for piece in (context[:, :9], context[:, 9:10], context[:, 10:30], context[:, 30:]):
            memory = method.add(lm, memory, piece)
        out = lm.model.base_model(
            input_ids=tail, cache=memory.to_cache(), position_ids=torch.arange(37, 42)[None], use_cache=True
        )
        batch = method.make_batch([Sample([context[0].tolist()], tail[0].tolist())])
        parallel = method.parallel_hidden(lm, batch)[0, -5:]
    assert memory.num_slots == budget(37, 0.3)
    torch.testing.assert_close(out.last_hidden_state[0], parallel, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", SPARSE)
def test_at_ratio_zero_the_training_forward_is_full_attention(name):
    lm = tiny_model("gpt-neox")
    method = ccmem.get_method(name, compression_ratio=0.0)
    method.module_for(lm)
    sample = Sample([ids(30, 6)[0].tolist()], ids(4, 7)[0].tolist())
    batch = method.make_batch([sample])
    assert not bool(batch.sentinel.any())
    with method.attached(lm):
        sparse = method.parallel_hidden(lm, batch)
    plain = lm.model.base_model(input_ids=torch.tensor([sample.tokens])).last_hidden_state
    torch.testing.assert_close(sparse, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ratio", RATIOS)
def test_every_method_keeps_one_minus_r_of_full_in_bytes(ratio):
    lm = tiny_model()
    context = ids(120, 8)
    sessions = {name: ccmem.load(lm, name, compression_ratio=ratio) for name in SPARSE}
    sessions["full"] = ccmem.load(lm, "full")
    context_bytes = {}
    for name, session in sessions.items():
        session.add_ids(context[0].tolist())
        per_slot = session.memory.nbytes / session.memory.num_slots
        context_bytes[name] = session.memory.nbytes - per_slot * session.memory.sink  # the system prompt aside
    per_entry = context_bytes["full"] / 120
    kept = per_entry * budget(120, ratio)
    assert context_bytes["sentinel"] == context_bytes["local"] == context_bytes["scattered"] == kept
    assert abs(kept / context_bytes["full"] - (1 - ratio)) <= 1 / 120


def test_sentence_spans_keep_the_ratio_within_one_sentence(monkeypatch):
    from ccmem.methods.sentinel import Sentinel

    lm = tiny_model()
    text = " ".join(f"It is {'so ' * i}here." for i in range(7))
    # The tiny tokenizer has one token per character, but cannot decode them back: give the splitter the text.
    monkeypatch.setattr(Sentinel, "_token_texts", lambda self, lm, ids: list(text))
    session = ccmem.load(lm, "sentinel", compression_ratio=0.5, spans="sentence")
    session.add_ids(lm.tokenizer.encode(text))
    n = len(text)
    shortest = min(len(s) + 1 for s in text.split(".") if s)
    kept = session.memory.num_slots - session.memory.sink
    assert budget(n, 0.5) - shortest < kept <= budget(n, 0.5)


def test_training_reaches_the_sentinel_embeddings_and_the_lora():
    lm = tiny_model()
    method = ccmem.get_method("sentinel", compression_ratio=0.5)
    state = method.module_for(lm)
    state.requires_grad_(True)
    batch = method.make_batch([Sample([ids(40, 9)[0].tolist()], [])] * 2)
    with method.attached(lm):
        method.training_loss(lm, batch).backward()
    assert float(state.sentinels.grad.abs().sum()) > 0
    assert any(float(p.grad.abs().sum()) > 0 for p in state.lora.parameters())


@pytest.mark.parametrize("name", SPARSE)
@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_a_ratio_outside_zero_one_is_refused(name, ratio):
    with pytest.raises(ValueError, match=r"compression_ratio must be in \[0, 1\)"):
        ccmem.get_method(name, compression_ratio=ratio)


def test_text_shorter_than_one_span_is_refused_in_training():
    method = ccmem.get_method("sentinel", compression_ratio=0.5, min_span=3)
    with pytest.raises(ValueError, match="shorter than one span"):
        method.make_batch([Sample([[5, 6]], [])])


def test_a_model_without_input_embeddings_cannot_take_sentinels(monkeypatch):
    lm = tiny_model()
    monkeypatch.setattr(type(lm.model), "get_input_embeddings", lambda self: None)
    with pytest.raises(ValueError, match="no input embedding matrix"):
        ccmem.get_method("sentinel").module_for(lm)


def test_compare_budgets_become_compression_ratios():
    from ccmem.registry import method_class

    assert method_class("sentinel").budget_options(0.25) == {"compression_ratio": 0.75}
    assert method_class("snapkv").budget_options(0.25) == {"ratio": 0.25}


def test_compare_runs_the_sparse_methods_at_each_budget_beside_the_others(tmp_path):
    from ccmem.eval.compare import CompareSettings, run_grid

    settings = CompareSettings(
        methods=["full", "local", "sentinel", "scattered"], tasks=["persona"], budgets=[1 / 2, 1 / 4], n=2, system="Hi."
    )
    rows = list(run_grid(tiny_model(positions=8192), settings, tmp_path))
    slots = {(r.method, r.budget): r.memory_slots for r in rows}
    assert slots["local", 0.25] < slots["local", 0.5] < slots["full", None]
    for share in (0.5, 0.25):  # the three keep the same number of entries at the same share
        assert slots["sentinel", share] == pytest.approx(slots["local", share], abs=2)
        assert slots["scattered", share] == slots["local", share]
