"""Gist on an encoder-decoder model (a tiny random T5; the fork's ``gist_t5``): the gist tokens follow the whole
context in the encoder, and the query and the decoder read only the sink and the gist positions.

As for CCM on T5 (``test_t5.py``): the one masked encoder forward of training equals compressing with ``add``,
in the gist tokens' final hidden states, the decoder's logits, the loss and its gradients.
"""

from __future__ import annotations

import pytest
import torch

import ccmem
from ccmem.data.samples import Sample
from ccmem.methods import ccm_seq2seq
from ccmem.registry import get_method
from tests.conftest import lora_pairs, randomize_lora, tiny_model
from tests.methods.t5_case import ANSWER, CHUNKS, QUERY, SINK, TOL, memory_after, step_by_step, trained_looking

N_TOK = 2


def sample(chunks=CHUNKS, sink=SINK) -> Sample:
    return Sample(chunks, QUERY + ANSWER, sink, answer_start=len(QUERY))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("sink", [SINK, []])
def test_parallel_encoder_forward_equals_adding_the_context(attn, sink):
    lm = tiny_model("t5", attn)
    method = trained_looking("gist", lm, n_tok=N_TOK)
    with torch.no_grad():
        forward = method.parallel_forward(lm, method.make_batch([sample(sink=sink)]))
    memory, logits = step_by_step(lm, method, sink=sink)

    # The memory holds the sink and one gist block, whatever the number of adds.
    assert memory.num_slots == len(sink) + N_TOK == memory.state["encoder_out"].shape[1]
    assert memory.slots_per_layer == [len(sink) + N_TOK] * lm.model.config.num_layers  # encoder layers
    compressed = forward.encoder_hidden[0][forward.memory_mask[0]]
    torch.testing.assert_close(compressed, memory.state["encoder_out"][0], atol=TOL, rtol=0)
    assert forward.logits is not None
    torch.testing.assert_close(forward.logits[0], logits, atol=TOL, rtol=0)


def test_the_decoder_reads_only_the_gist_positions_not_the_context():
    """The decoder's cross-attention covers the sink, the gist tokens and the query; changing a context token
    changes the answer only through the gist tokens (without the LoRA and gist embeddings it still changes, so
    the context really reaches them)."""
    lm = tiny_model("t5")
    method = trained_looking("gist", lm, n_tok=N_TOK)
    with torch.no_grad():
        forward = method.parallel_forward(lm, method.make_batch([sample()]))
    context = sum(len(c) for c in CHUNKS)
    layout = len(SINK) + context + N_TOK + len(QUERY)
    read = forward.cross_mask[0, :layout].tolist()
    assert read == [True] * len(SINK) + [False] * context + [True] * N_TOK + [True] * len(QUERY)

    _, logits = step_by_step(lm, method)
    _, other = step_by_step(lm, method, chunks=[[10, 11, 12, 13], [20, 21, 22], [30, 31, 32, 33, 35]])
    assert (logits - other).abs().max() > 1e-4


def test_adding_in_pieces_equals_adding_the_context_at_once():
    lm = tiny_model("t5")
    method = trained_looking("gist", lm, n_tok=N_TOK)
    pieces, _ = step_by_step(lm, method)
    whole, _ = step_by_step(lm, method, chunks=[[t for c in CHUNKS for t in c]])
    torch.testing.assert_close(pieces.state["encoder_out"], whole.state["encoder_out"], atol=TOL, rtol=0)
    assert pieces.next_position == whole.next_position == len(SINK) + sum(map(len, CHUNKS)) + N_TOK


def test_training_loss_and_gradients_equal_backprop_through_add():
    lm = tiny_model("t5")
    method = trained_looking("gist", lm, n_tok=N_TOK)
    params = list(method.module_for(lm).parameters())
    for p in params:
        p.requires_grad_(True)

    def grads(loss):
        got = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, got, strict=True)]

    parallel_loss = method.training_loss(lm, method.make_batch([sample()]))
    parallel_grads = grads(parallel_loss)
    with method.attached(lm):
        memory = memory_after(lm, method)
        hidden = method.encoder_states(lm, memory, torch.tensor([QUERY]))
        recurrent_loss = ccm_seq2seq.answer_loss(lm, hidden, torch.tensor([ANSWER]))
    torch.testing.assert_close(parallel_loss, recurrent_loss, atol=TOL, rtol=0)
    assert all(g.abs().sum() > 0 for g in parallel_grads)  # gist embeddings and every encoder LoRA pair
    for a, b in zip(parallel_grads, grads(recurrent_loss), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_batched_parallel_forward_equals_one_sample_at_a_time():
    lm = tiny_model("t5")
    method = trained_looking("gist", lm, n_tok=N_TOK)
    samples = [sample(), Sample([[60, 61], [62, 63, 64, 65]], [70, 71, 72, 73, 74], [], answer_start=2)]
    with torch.no_grad():
        batched = method.parallel_forward(lm, method.make_batch(samples))
        assert batched.logits is not None
        for b, one in enumerate(samples):
            single = method.parallel_forward(lm, method.make_batch([one]))
            n = len(one.tail) - one.answer_start
            torch.testing.assert_close(batched.logits[b, :n], single.logits[0, :n], atol=TOL, rtol=0)


def test_the_gist_memory_is_saved_and_generates_the_same(tmp_path):
    lm = tiny_model("t5")
    session = ccmem.load(lm, "gist", n_tok=N_TOK, system_prompt="be brief")
    randomize_lora(session.method, lm, scale=0.5)
    session.add("my dog is called biscuit")
    session.add("and my cat is called pepper")
    assert session.memory.num_slots == session.memory.sink + N_TOK
    tokens = list(session.stream_ids(torch.tensor([QUERY]), max_new_tokens=5))
    assert 1 <= len(tokens) <= 5
    assert isinstance(session.generate("what is my dog called?", max_new_tokens=4), str)

    path = session.save_memory(tmp_path / "memory.safetensors")
    other = ccmem.load(lm, "gist", n_tok=N_TOK, system_prompt=None)
    other.method = session.method  # the same trained state (an adapter file would carry it)
    loaded = other.load_memory(path)
    torch.testing.assert_close(loaded.state["encoder_out"], session.memory.state["encoder_out"])
    assert list(other.stream_ids(torch.tensor([QUERY]), max_new_tokens=5)) == tokens


def test_the_training_recipe_trains_gist_on_t5(tmp_path):
    """``ccmem train`` (HF Trainer, gradient checkpointing, accumulation) with gist on T5, then the adapter loads."""
    from ccmem.train.trainer import train
    from tests.unit.test_training import _config

    overrides = ["train.gradient_checkpointing=true", "train.grad_accum=2", "train.max_steps=2", "train.eval_steps=1"]
    gist = ["method.name=gist", "method.n_tok=2", "method.lora_targets=[q,k,v,o]"]
    config = _config(tmp_path, *overrides, "train.save_steps=2", *gist)
    result = train(config, lm=tiny_model("t5"))
    assert result.steps == 2 and result.eval_loss is not None and torch.isfinite(torch.tensor(result.eval_loss))
    session = ccmem.load(tiny_model("t5"), "gist", adapter=result.output, system_prompt="Hi.")
    assert session.adapter_trained and session.method.n_tok == 2
    session.add("hello there")
    assert session.memory.num_slots == session.memory.sink + 2 == session.memory.state["encoder_out"].shape[1]


def test_gist_adapts_only_the_encoder_of_t5():
    lm = tiny_model("t5")
    method = get_method("gist", n_tok=N_TOK)
    paths = method.module_for(lm).lora.paths
    assert paths and all(p.startswith("block.") and ".SelfAttention." in p for p in paths)
    assert len(lora_pairs(method, lm)) == len(paths)


def test_a_gist_memory_from_a_decoder_is_refused_by_t5():
    """A decoder-only memory carries no encoder outputs: the encoder-decoder path says so, not a shape error."""
    decoder = tiny_model("llama-gqa")
    memory = ccmem.load(decoder, "gist", n_tok=N_TOK, system_prompt="Hi.").add("some context")
    lm = tiny_model("t5")
    method = get_method("gist", n_tok=N_TOK)
    with pytest.raises(ValueError, match="holds no encoder outputs"), method.attached(lm):
        method.add(lm, memory, torch.tensor([[5, 6]]))
