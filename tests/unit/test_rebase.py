"""Chats and sessions past the model's positions: the memory is re-based (slots moved to the positions of their
indices, keys re-rotated) instead of refused, while what it holds and the new tokens fit."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from ccmem.api import CompressedLM, ContextTooLongError, make_room
from ccmem.memory import Memory
from ccmem.methods.base import logits_for
from ccmem.registry import get_method
from ccmem.rope import compact_positions, layer_frequencies
from tests.conftest import VOCAB, randomize_lora, tiny_model

TURN = "the weather is fine"


def keys_at(lm, ids: torch.Tensor, positions: torch.Tensor) -> list:
    cache = DynamicCache()
    with torch.no_grad():
        lm.model.base_model(input_ids=ids, position_ids=positions[None], cache=cache, use_cache=True)
    return Memory.layers_of(cache)


@pytest.mark.parametrize("family", ["llama-gqa", "gemma3", "gpt-neox"])
def test_compacting_moves_each_slot_to_its_index_and_blends_with_the_next_position(family):
    lm = tiny_model(family)
    ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))
    written = torch.tensor([0, 1, 40, 90, 91])
    layers = keys_at(lm, ids, written)
    heads = layers[0][0].shape[1]
    positions = [written.clone()[None, None].expand(1, heads, 5).clone() for _ in layers]
    for p in positions:
        p[..., 2] = -1  # slot 2 stands for a blend of groups written at several positions
    memory = Memory(layers=layers, positions=positions, next_position=100)
    compact = compact_positions(memory, layer_frequencies(lm))
    assert compact.next_position == 5 and compact.positions[0][0, 0].tolist() == [0, 1, -1, 3, 4]
    compact.check(lm.kv_shape)
    # Layer 0's keys depend only on their token and position: a moved slot equals the key computed there.
    there = keys_at(lm, ids, torch.tensor([0, 1, 40 - 95, 3, 4]))  # the blend moves as next_position: by -95
    torch.testing.assert_close(compact.layers[0][0], there[0][0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(compact.layers[0][1], layers[0][1])  # values carry no position


def test_compacting_leaves_the_keys_of_layers_without_rope_as_they_are():
    """SmolLM3 gives every fourth layer no RoPE (NoPE): re-basing rotated those keys too, which were
    never rotated, so a chat past the model's positions read corrupted keys there."""
    from transformers import AutoModelForCausalLM, SmolLM3Config

    from ccmem.loading import LoadedModel
    from tests.conftest import COMMON, TinyTokenizer

    config = SmolLM3Config(
        **{**COMMON, "num_hidden_layers": 4}, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0
    )
    assert config.no_rope_layers == [1, 1, 1, 0]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()
    lm = LoadedModel(model=model, tokenizer=TinyTokenizer(), name="tiny-smollm3")
    # One token reads only itself, so in every layer its key depends on its position alone.
    ids = torch.tensor([[17]])
    layers = keys_at(lm, ids, torch.tensor([90]))
    positions = [torch.full((1, k.shape[1], 1), 90) for k, _ in layers]
    compact = compact_positions(Memory(layers=layers, positions=positions, next_position=91), layer_frequencies(lm))
    for (moved, _), (there, _) in zip(compact.layers, keys_at(lm, ids, torch.tensor([0])), strict=True):
        torch.testing.assert_close(moved, there, atol=2e-5, rtol=1e-4)


def test_a_merged_memory_read_after_compacting_gives_the_same_logits():
    # ccm-merge without a sink holds only blends: they all move as the next position does, so every distance
    # the next tokens see is kept, and re-basing changes nothing but position ids.
    lm = tiny_model(positions=512)
    session = CompressedLM(lm, get_method("ccm-merge", n_tok=2), system_prompt=None)
    randomize_lora(session.method, lm)
    for _ in range(4):
        session.add_ids(list(range(3, 60)))
    query = torch.tensor([list(range(5, 15))])

    def last_logits(memory: Memory) -> torch.Tensor:
        cache = memory.to_cache()
        with torch.no_grad(), session.method.attached(lm, reading=True):
            out = lm.model.base_model(
                input_ids=query,
                position_ids=torch.arange(memory.next_position, memory.next_position + 10)[None],
                cache=cache,
            )
        return logits_for(lm, out.last_hidden_state[0])

    compact = compact_positions(session.memory, layer_frequencies(lm))
    assert session.memory.next_position > 200 and compact.next_position == session.memory.num_slots == 2
    torch.testing.assert_close(last_logits(compact), last_logits(session.memory), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["ccm-concat", "ccm-merge"])
def test_a_chat_goes_on_past_the_models_positions(method):
    lm = tiny_model(positions=128)
    session = CompressedLM(lm, get_method(method, n_tok=2), system_prompt="be brief")
    randomize_lora(session.method, lm)
    rebased, last = 0, 0
    for turn in range(12):  # about 1,000 positions of turns, questions and answers against 128
        session.add([{"role": "user", "content": f"{TURN} {turn}"}])
        answer = session.generate("and now?", max_new_tokens=8)
        session.remember("and now?", answer)
        assert session.memory.next_position <= 128
        rebased += session.memory.next_position < last
        last = session.memory.next_position
    assert rebased >= 3
    session.memory.check(lm.kv_shape)
    assert session.memory.num_slots < 128
    sink = session.memory.sink
    assert session.memory.positions[0][0, 0, :sink].tolist() == list(range(sink))  # the sink never moves


def test_memory_that_leaves_no_room_is_still_refused():
    lm = tiny_model(positions=64)
    session = CompressedLM(lm, get_method("full"), system_prompt=None)
    session.add_ids(list(range(3, 50)))
    with pytest.raises(ContextTooLongError, match="need 67 positions, but the model allows 64"):
        session.add_ids(list(range(3, 23)))
    assert session.memory.num_slots == 47  # unchanged


@pytest.mark.parametrize(("method", "sink"), [("full", True), ("ccm-concat", True), ("ccm-concat", False)])
def test_a_system_prompt_past_the_positions_is_refused_when_the_session_is_made(method, sink):
    """It was accepted: the session then refused every add and question, each blaming its own text."""
    lm = tiny_model(positions=64)
    with pytest.raises(ContextTooLongError, match=r"the system prompt is \d+ tokens .* at most 64 positions") as err:
        CompressedLM(lm, get_method(method), system_prompt="rule " * 80, sink=sink)
    assert err.value.positions == 64 and "add the text in parts" not in str(err.value)
    CompressedLM(lm, get_method(method), system_prompt="rule " * 8, sink=sink)  # one that fits is kept


def test_make_room_leaves_a_memory_that_fits_as_it_is_and_refuses_models_it_cannot_rebase(monkeypatch):
    lm = tiny_model(positions=64)
    session = CompressedLM(lm, get_method("ccm-concat", n_tok=2), system_prompt=None)
    session.add_ids(list(range(3, 40)))
    assert make_room(lm, session.memory, 10) is session.memory
    from ccmem import rope

    def no_rope(_lm):
        raise rope.RopeError("this model has no rotary embedding")

    monkeypatch.setattr(rope, "layer_frequencies", no_rope)
    with pytest.raises(ContextTooLongError, match=r"cannot be re-based .*no rotary embedding"):
        make_room(lm, session.memory, 40)


@pytest.mark.parametrize("method", ["ccm-concat", "ccm-merge"])
def test_one_add_of_a_text_longer_than_the_models_positions_is_compressed_chunk_by_chunk(method):
    # `ccmem compress` adds a whole book at once: a chunked method re-bases between its chunks, as a chat does
    # between turns, instead of refusing the text for the positions it would need at once.
    lm = tiny_model(positions=64)
    session = CompressedLM(lm, get_method(method, n_tok=2, max_chunk_tokens=16), system_prompt=None)
    randomize_lora(session.method, lm)
    ids = torch.randint(3, VOCAB, (1, 300), generator=torch.Generator().manual_seed(1))
    calls: list[tuple[int, int]] = []
    session.add_ids(ids, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(min(300, 16 * i), 300) for i in range(1, 20)]  # one call per chunk: a progress bar's ticks
    session.memory.check(lm.kv_shape)
    assert session.memory.next_position <= 64
    # Re-basing moves slots but changes no key's content relative to the others: the same memory as the parts
    # added one at a time, each re-based where needed.
    stepwise = CompressedLM(lm, session.method, system_prompt=None)
    for part in session.method.parts(ids):
        stepwise.add_ids(part)
    for (k1, v1), (k2, v2) in zip(session.memory.layers, stepwise.memory.layers, strict=True):
        torch.testing.assert_close(k1, k2)
        torch.testing.assert_close(v1, v2)


def test_a_method_that_reads_its_context_at_once_still_refuses_a_text_past_the_positions():
    lm = tiny_model(positions=64)
    session = CompressedLM(lm, get_method("full"), system_prompt=None)
    with pytest.raises(ContextTooLongError, match="add the text in parts"):
        session.add_ids(torch.randint(3, VOCAB, (1, 100), generator=torch.Generator().manual_seed(1)))


def test_a_batch_with_one_turn_longer_than_the_positions_gives_what_one_at_a_time_gives():
    # A server folding several sessions' turns at once (add_batch), and eval reading several dialogs at once
    # (read_contexts), take a turn past the model's positions part by part, as one session's add does.
    from ccmem.api import add_batch
    from ccmem.data.samples import Sample
    from ccmem.eval.harness import read_contexts

    lm = tiny_model(positions=64)
    method = get_method("ccm-concat", n_tok=2, max_chunk_tokens=16)
    randomize_lora(method, lm)
    words = " ".join(f"w{i}" for i in range(60))
    turns = [[{"role": "user", "content": "short"}], [{"role": "user", "content": words}]]
    batched = [CompressedLM(lm, method, system_prompt=None) for _ in turns]
    add_batch(batched, turns)
    for session, turn in zip(batched, turns, strict=True):
        alone = CompressedLM(lm, method, system_prompt=None)
        alone.add(turn)
        assert session.history == alone.history
        assert session.memory.next_position <= 64
        for (k1, v1), (k2, v2) in zip(session.memory.layers, alone.memory.layers, strict=True):
            torch.testing.assert_close(k1, k2)
            torch.testing.assert_close(v1, v2)
    assert len(lm.tokenizer.encode(words)) > 64  # more than the model's positions in one turn

    ids = torch.randint(3, VOCAB, (1, 200), generator=torch.Generator().manual_seed(2)).tolist()[0]
    samples = [Sample(chunks=[ids[:10], ids[10:20]], tail=[5]), Sample(chunks=[ids[:10], ids], tail=[5])]  # 200 > 64
    reader = CompressedLM(lm, method, system_prompt=None)
    memories = read_contexts(reader, samples)
    for sample, memory in zip(samples, memories, strict=True):
        reader.reset()
        for chunk in sample.chunks:
            reader.add_ids(chunk)
        for (k1, _), (k2, _) in zip(memory.layers, reader.memory.layers, strict=True):
            torch.testing.assert_close(k1, k2)


def test_a_prompt_or_query_past_the_positions_is_refused_in_the_words_of_the_call_that_read_it():
    # generate and score do not add text: their refusals name the prompt or the query and what helps there
    lm = tiny_model(positions=64)
    session = CompressedLM(lm, get_method("full"), system_prompt=None)
    long = torch.randint(3, VOCAB, (1, 50), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ContextTooLongError, match=r"the prompt with room for its answer \(90 tokens\).*max_new_tokens"):
        list(session.stream_ids(long, max_new_tokens=40))
    with pytest.raises(ContextTooLongError, match=r"the query with its longest option \(69 tokens\).*score a short"):
        session.score_ids(long, [[5] * 20, [6]])
    session.add_ids(list(range(3, 40)))
    with pytest.raises(ContextTooLongError, match=r"after the 37 slots .* ask for fewer new tokens"):
        list(session.stream_ids(long[:, :10], max_new_tokens=20))


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("ccm-concat", "ccm-concat reads 60 tokens of its own with the 20 new ones.*n_tok"),
        ("gist", "gist would hold 80 positions after reading these 20 tokens.*smaller n_tok"),
    ],
)
def test_a_method_whose_own_tokens_pass_the_positions_says_so_not_to_add_the_text_in_parts(method, message):
    lm = tiny_model(positions=64)
    session = CompressedLM(lm, get_method(method, n_tok=60), system_prompt=None)
    with pytest.raises(ContextTooLongError, match=message) as refused:
        session.add_ids(list(range(3, 23)))
    assert "add the text in parts" not in str(refused.value)
    with pytest.raises(ContextTooLongError, match="add the text in parts"):  # the text alone is too long
        CompressedLM(lm, get_method("full"), system_prompt=None).add_ids(list(range(3, 70)))


def test_gist_given_a_text_past_the_positions_is_not_told_to_add_it_in_parts():
    """Gist reads the whole context again at every add: the advice to add the text in several calls cannot help."""
    session = CompressedLM(tiny_model(positions=64), get_method("gist"), system_prompt=None)
    with pytest.raises(ContextTooLongError, match="gist reads the whole context again at every add") as refused:
        session.add_ids(list(range(3, 73)))
    assert "add the text in parts" not in str(refused.value)


def test_a_falcon_with_alibi_is_not_re_based_with_the_rope_it_does_not_use():
    """Falcon with ALiBi (Falcon-RW) builds a rotary embedding but never rotates its keys: re-basing turned them
    anyway, so a chat past the model's positions went on silently with corrupted keys."""
    from transformers import AutoModelForCausalLM, FalconConfig

    from ccmem.loading import LoadedModel
    from ccmem.rope import RopeError
    from tests.conftest import TinyTokenizer

    config = FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()
    lm = LoadedModel(model=model, tokenizer=TinyTokenizer(), name="tiny-falcon-alibi")
    with pytest.raises(RopeError, match="falcon models have no rotary position embedding ccmem can re-base"):
        layer_frequencies(lm)
