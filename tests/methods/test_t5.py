"""CCM on an encoder-decoder model (a tiny random T5): <COMP> tokens in the encoder, the decoder reads the memory.

The backbone, as for decoders: one masked encoder forward (training) equals compressing step by step (``add``),
in the <COMP> tokens' final hidden states and in the decoder's logits on an answer.
"""

from __future__ import annotations

import pytest
import torch

import ccmem
from ccmem.adapter import save_adapter
from ccmem.data.samples import Sample
from ccmem.generation import decode
from ccmem.masks import build_plan, reference_allowed
from ccmem.memory import Memory
from ccmem.methods import ccm_seq2seq
from ccmem.patching.seq2seq import encoder_of, relative_bias
from ccmem.registry import get_method, method_classes
from tests.conftest import lora_pairs, randomize_lora, tiny_model
from tests.methods.t5_case import ANSWER, CHUNKS, QUERY, SINK, TOL, step_by_step, trained_looking


def parallel(lm, method, samples):
    with torch.no_grad():
        return method.parallel_forward(lm, method.make_batch(samples))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["ccm-concat", "ccm-merge"])
@pytest.mark.parametrize("recurrent", [True, False])
def test_parallel_encoder_forward_equals_step_by_step_compression(attn, name, recurrent):
    lm = tiny_model("t5", attn)
    method = trained_looking(name, lm, recurrent=recurrent)
    forward = parallel(lm, method, [Sample(CHUNKS, QUERY + ANSWER, SINK, answer_start=len(QUERY))])
    memory, logits = step_by_step(lm, method)

    # The memory's encoder outputs are the parallel forward's at the sink and <COMP> positions (concat: every
    # step's; merge: the running average after the last step), in the same order.
    compressed = forward.encoder_hidden[0][forward.memory_mask[0]]
    torch.testing.assert_close(compressed, memory.state["encoder_out"][0], atol=TOL, rtol=0)
    assert forward.logits is not None
    torch.testing.assert_close(forward.logits[0], logits, atol=TOL, rtol=0)
    expected = len(SINK) + (2 * len(CHUNKS) if name == "ccm-concat" else 2)
    assert memory.num_slots == expected == memory.state["encoder_out"].shape[1]
    assert memory.slots_per_layer == [expected] * lm.model.config.num_layers  # encoder layers


def test_equivalence_needs_the_true_positions(monkeypatch):
    """Not vacuous: with T5's own bias (contiguous positions: memory slots at 0.., the chunk after them) the
    step-by-step memory differs from the parallel forward, and so does a memory without the LoRA."""
    lm = tiny_model("t5")
    method = trained_looking("ccm-concat", lm)
    forward = parallel(lm, method, [Sample(CHUNKS, QUERY + ANSWER, SINK, answer_start=len(QUERY))])
    _, right = step_by_step(lm, method)

    def contiguous(model, queries, keys):
        n_keys, n_queries = keys.shape[1], queries.shape[1]
        start = torch.full_like(queries[:, :1], n_keys - n_queries)
        return relative_bias(model, start + torch.arange(n_queries), torch.arange(n_keys)[None])

    monkeypatch.setattr(ccm_seq2seq, "relative_bias", contiguous)
    _, wrong = step_by_step(lm, method)
    monkeypatch.undo()
    for pair in lora_pairs(method, lm):
        pair.B.data.zero_()
    _, no_lora = step_by_step(lm, method)
    assert forward.logits is not None
    torch.testing.assert_close(forward.logits[0], right, atol=TOL, rtol=0)
    assert (forward.logits[0] - wrong).abs().max() > 1e-3
    assert (forward.logits[0] - no_lora).abs().max() > 1e-3


def test_relative_bias_is_t5s_own_for_contiguous_positions():
    lm = tiny_model("t5")
    attention = encoder_of(lm.model).block[0].layer[0].SelfAttention
    with torch.no_grad():
        ours = relative_bias(lm.model, torch.arange(3, 8)[None], torch.arange(0, 40)[None])
        theirs = attention.compute_bias(5, 40, past_seen_tokens=3)
    torch.testing.assert_close(ours, theirs)


def test_the_encoder_plan_is_causal_over_steps_and_bidirectional_inside_them():
    """build_plan(bidirectional=True) against the slow loop; a chunk never reads its own <COMP> tokens."""
    for update in ("concat", "merge"):
        for recurrent in (True, False):
            kwargs = dict(sink_length=2, update=update, recurrent=recurrent, bidirectional=True)
            plan = build_plan([3, 1, 2], 2, 3, **kwargs)
            assert plan.allowed.tolist() == reference_allowed([3, 1, 2], 2, 3, **kwargs)
    plan = build_plan([2], 1, 2, bidirectional=True)  # c c C t t
    assert plan.allowed.tolist() == [
        [True, True, False, False, False],
        [True, True, False, False, False],
        [True, True, True, False, False],
        [False, False, True, True, True],
        [False, False, True, True, True],
    ]


def test_batched_parallel_forward_equals_one_sample_at_a_time():
    lm = tiny_model("t5")
    method = trained_looking("ccm-merge", lm)
    samples = [
        Sample(CHUNKS, QUERY + ANSWER, SINK, answer_start=len(QUERY)),
        Sample([[60, 61], [62, 63, 64, 65]], [70, 71, 72, 73, 74], [], answer_start=2),
    ]
    batched = parallel(lm, method, samples)
    assert batched.logits is not None
    for b, sample in enumerate(samples):
        single = parallel(lm, method, [sample])
        assert single.logits is not None
        n = len(sample.tail) - sample.answer_start
        torch.testing.assert_close(batched.logits[b, :n], single.logits[0, :n], atol=TOL, rtol=0)
        mine = batched.encoder_hidden[b][batched.memory_mask[b]]
        torch.testing.assert_close(mine, single.encoder_hidden[0][single.memory_mask[0]], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["ccm-concat", "ccm-merge"])
def test_training_loss_and_gradients_equal_backprop_through_the_recurrence(name):
    lm = tiny_model("t5")
    method = trained_looking(name, lm)
    sample = Sample(CHUNKS, QUERY + ANSWER, SINK, answer_start=len(QUERY))
    params = list(method.module_for(lm).parameters())
    for p in params:
        p.requires_grad_(True)

    def grads(loss):
        got = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, got, strict=True)]

    parallel_loss = method.training_loss(lm, method.make_batch([sample]))
    parallel_grads = grads(parallel_loss)
    recurrent_loss = method.recurrent_loss(lm, sample)
    torch.testing.assert_close(parallel_loss, recurrent_loss, atol=TOL, rtol=0)
    assert all(g.abs().sum() > 0 for g in parallel_grads)  # <COMP> embeddings and every encoder LoRA pair
    for a, b in zip(parallel_grads, grads(recurrent_loss), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def answer_logits(session) -> torch.Tensor:
    """The decoder's logits on ANSWER after QUERY, read with the session's memory."""
    with torch.no_grad(), session.method.attached(session.lm):
        hidden = session.method.encoder_states(session.lm, session.memory, torch.tensor([QUERY]))
        return ccm_seq2seq.decoder_logits(session.lm, hidden, torch.tensor([ANSWER]))[0]


@pytest.mark.parametrize("name", ["ccm-concat", "ccm-merge"])
def test_add_generate_and_a_saved_memory_reads_the_same(name, tmp_path):
    lm = tiny_model("t5")
    session = ccmem.load(lm, name, n_tok=2, system_prompt="be brief")
    randomize_lora(session.method, lm, scale=0.5)
    session.add("my dog is called biscuit")
    session.add("and my cat is called pepper")
    assert session.memory.sink > 0
    assert session.memory.num_slots == session.memory.sink + (4 if name == "ccm-concat" else 2)
    answer = session.generate("what is my dog called?", max_new_tokens=6)
    assert isinstance(answer, str)
    tokens = list(session.stream_ids(torch.tensor([QUERY]), max_new_tokens=5))
    assert 1 <= len(tokens) <= 5
    stats: dict = {}
    again = list(decode(lm, session.method, session.memory, torch.tensor([QUERY]), 5, stop_ids={1}, stats=stats))
    assert again == tokens and stats["peak_kv_bytes"] > 0  # the decoder's self- and cross-attention cache

    before = answer_logits(session)
    path = session.save_memory(tmp_path / "memory.safetensors")
    other = ccmem.load(lm, name, n_tok=2, system_prompt=None)
    other.method = session.method  # the same trained state (an adapter file would carry it)
    loaded = other.load_memory(path)
    assert set(loaded.state) >= {"encoder_out"}
    torch.testing.assert_close(loaded.state["encoder_out"], session.memory.state["encoder_out"])
    torch.testing.assert_close(answer_logits(other), before, atol=0, rtol=0)
    assert list(other.stream_ids(torch.tensor([QUERY]), max_new_tokens=5)) == tokens


def test_training_lowers_the_loss_and_the_adapter_reloads_to_the_same_logits(tmp_path):
    lm = tiny_model("t5")
    method = get_method("ccm-concat", n_tok=2)
    state = method.module_for(lm)
    state.requires_grad_(True)
    samples = [
        Sample(CHUNKS, QUERY + ANSWER, SINK, answer_start=len(QUERY)),
        Sample([[60, 61], [62, 63, 64]], [70, 71, 72, 73], [5], answer_start=2),
    ]
    batch = method.make_batch(samples)
    optimizer = torch.optim.Adam(state.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = method.training_loss(lm, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1

    path = save_adapter(method, lm, tmp_path / "t5.safetensors")
    trained = ccmem.load(lm, "ccm-concat", system_prompt=None)
    trained.method = method
    reloaded = ccmem.load(lm, "ccm-concat", adapter=path, system_prompt=None)
    assert reloaded.method.n_tok == 2 and reloaded.adapter_trained
    for session in (trained, reloaded):
        for chunk in CHUNKS:
            session.add_ids(chunk)
    torch.testing.assert_close(answer_logits(reloaded), answer_logits(trained), atol=0, rtol=0)


def test_the_memory_keeps_encoder_layers_and_only_the_encoder_is_adapted():
    lm = tiny_model("t5")
    method = get_method("ccm-merge", n_tok=2)
    paths = method.module_for(lm).lora.paths
    assert paths and all(".SelfAttention." in p for p in paths)  # the encoder's (no cross-attention, no decoder)
    assert lm.kv_shape.layers == 2 and lm.kv_shape.kv_heads == 4 and lm.kv_shape.head_dim == 8


@pytest.mark.parametrize("name", sorted(n for n, c in method_classes().items() if not c.encoder_decoder))
def test_a_decoder_only_method_refuses_an_encoder_decoder_model(name, caplog):
    with pytest.raises(
        ValueError, match=rf"method {name!r} works on decoder-only models.*encoder-decoder model \(t5\)"
    ):
        ccmem.load(tiny_model("t5"), name, system_prompt=None)  # refused at load, before any context is read
    assert "no trained adapter" not in caplog.text  # no advice about adapters for a model it cannot run on
    method = get_method(name)
    with pytest.raises(ValueError, match="works on decoder-only models"), method.attached(tiny_model("t5")):
        pass


def test_option_scores_are_the_decoders_log_likelihood_given_the_memory():
    """Scoring (``ccmem eval``'s accuracy and perplexity) reads the answer with the decoder, as generation does;
    more in ``tests/unit/test_eval_t5.py``."""
    lm = tiny_model("t5")
    session = ccmem.load(lm, "ccm-concat", n_tok=2, system_prompt=None)
    randomize_lora(session.method, lm, scale=0.5)
    for chunk in CHUNKS:
        session.add_ids(chunk)
    logprobs = torch.log_softmax(answer_logits(session), -1).gather(1, torch.tensor(ANSWER)[:, None])[:, 0]
    assert session.score_ids(QUERY, [ANSWER, [50]]) == pytest.approx([float(logprobs.sum()), float(logprobs[0])])


def test_the_encoder_decoder_path_refuses_a_decoder_only_model():
    lm = tiny_model("llama-gqa")
    method = get_method("ccm-concat", n_tok=2)
    with pytest.raises(ValueError, match=r"needs an encoder-decoder model .* is decoder-only"):
        ccm_seq2seq.add_chunk(method, lm, method.new_memory(lm), torch.tensor([[5, 6]]))
    with pytest.raises(ValueError, match=r"needs an encoder-decoder model .* is decoder-only"):
        ccm_seq2seq.encoder_states(lm, Memory(), torch.tensor([[5, 6]]))


def test_a_decoder_memory_is_refused_by_an_encoder_decoder_model():
    lm = tiny_model("t5")
    method = get_method("ccm-concat", n_tok=2)
    shape = lm.kv_shape
    keys = torch.zeros(1, shape.kv_heads, 3, shape.head_dim)
    memory = Memory(layers=[(keys, keys)] * shape.layers, positions=[torch.zeros(1, 4, 3, dtype=torch.long)] * 2)
    with pytest.raises(ValueError, match="holds no encoder outputs"), method.attached(lm):
        method.encoder_states(lm, memory, torch.tensor([[5, 6]]))


def test_a_t5_folder_loads_as_a_seq2seq_model_and_answers_from_its_memory(tmp_path):
    """What ``--model google/flan-t5-base`` does with a local copy: the folder's config says encoder-decoder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ccmem.loading import load_model

    folder = tmp_path / "tiny-t5"
    tiny_model("t5").model.save_pretrained(folder)
    vocab = {"<pad>": 0, "</s>": 1, "[UNK]": 2} | {f"w{i}": i + 3 for i in range(50)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.save_pretrained(folder)
    lm = load_model(str(folder))
    assert lm.is_encoder_decoder and type(lm.model).__name__ == "T5ForConditionalGeneration"
    session = ccmem.load(lm, "ccm-merge", n_tok=2, system_prompt=None)
    session.add("w1 w2 w3 w4")
    assert session.memory.num_slots == 2
    assert isinstance(session.generate("w5 w6", max_new_tokens=3), str)


def test_the_training_recipe_trains_t5(tmp_path):
    """``ccmem train`` (HF Trainer, gradient checkpointing, accumulation) through the same contract."""
    from ccmem.train.trainer import train
    from tests.unit.test_training import _config

    overrides = ["train.gradient_checkpointing=true", "train.grad_accum=2", "train.max_steps=2", "train.eval_steps=1"]
    config = _config(tmp_path, *overrides, "train.save_steps=2", "method.lora_targets=[q,k,v,o]")
    result = train(config, lm=tiny_model("t5"))
    assert result.steps == 2 and result.eval_loss is not None
    session = ccmem.load(tiny_model("t5"), "ccm-concat", adapter=result.output, system_prompt="Hi.")
    assert session.adapter_trained
    session.add("hello there")
    assert session.memory.state["encoder_out"].shape[1] == session.memory.num_slots
