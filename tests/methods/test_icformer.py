"""IC-Former: chunking, shapes on every family, the LM never reading the context, training equal to inference,
gradient accumulation equal to one padded batch, and checkpoints that do not fit refused by name."""

from __future__ import annotations

import pytest
import torch

import ccmem
from ccmem.adapter import AdapterMismatchError, save_adapter
from ccmem.data.samples import Sample
from ccmem.methods.base import ContextTooLongError, answer_loss, run_decoder
from tests.conftest import tiny_model
from tests.methods.test_contract import randomize_state


def icformer(**options):
    return ccmem.get_method("icformer", **{"num_query_tokens": 3, "num_hidden_layers": 2, **options})


def test_chunks_are_equal_cuts_of_at_most_max_chunk_len_and_overlong_context_names_use_chunk():
    chunked = icformer(use_chunk=True, max_chunk_len=4)
    with pytest.raises(ValueError, match="max_chunk_len=16 is longer than max_seq_len=8"):  # chunks must fit it
        icformer(use_chunk=True, max_seq_len=8, max_chunk_len=16)
    assert chunked.split(4) == [4] and chunked.split(5) == [3, 2] and chunked.split(9) == [3, 3, 3]
    assert sum(chunked.split(1000)) == 1000 and max(chunked.split(1000)) <= 4
    plain = icformer(max_seq_len=8)
    assert plain.split(8) == [8]
    with pytest.raises(ValueError, match="9 tokens, more than max_seq_len=8; set use_chunk=true"):
        plain.split(9)
    with pytest.raises(ValueError, match="empty context"):
        plain.split(0)
    # max_chunk_len is 512 there, which use_chunk refuses over max_seq_len=8: the fix names both
    with pytest.raises(ValueError, match="is longer than max_seq_len"):
        icformer(max_seq_len=8, use_chunk=True)
    with pytest.raises(ValueError, match="set use_chunk=true and max_chunk_len=8 "):
        plain.split(9)
    assert icformer(max_seq_len=8, use_chunk=True, max_chunk_len=8).split(9) == [5, 4]
    with pytest.raises(ValueError, match="set use_chunk=true to compress it in chunks of at most max_chunk_len=4"):
        icformer(max_seq_len=8, max_chunk_len=4).split(9)
    for bad, message in [
        ({"num_query_tokens": 0}, "num_query_tokens must be at least 1"),
        ({"avg_level": "word"}, "avg_level must be one of token, sentence"),
        ({"objective": "chat"}, "objective must be one of finetune, pretrain"),
    ]:
        with pytest.raises(ValueError, match=message):
            icformer(**bad)


def test_an_overlong_or_empty_context_is_refused_through_the_api():
    s = ccmem.CompressedLM(tiny_model(), icformer(max_seq_len=8), system_prompt="sys")
    with pytest.raises(ValueError, match="use_chunk"):
        s.add_ids(list(range(10, 20)))
    s.add_ids(list(range(10, 15)))
    with pytest.raises(ValueError, match="use_chunk"):  # the context so far counts: 5 + 4 > 8
        s.add_ids(list(range(20, 24)))
    method, lm = s.method, s.lm
    with pytest.raises(ValueError, match="empty context"), method.attached(lm):
        method.add(lm, method.new_memory(lm), torch.zeros(1, 0, dtype=torch.long))


def test_digests_past_the_model_positions_are_refused_naming_the_options_not_adding_in_parts():
    """The digests of the whole context pass the model's positions however the text is added, but the refusal said
    "N new tokens at once ... add the text in parts" (N being the digests, not the text's tokens), and `ccmem
    compress` that the text was longer than the positions."""
    s = ccmem.CompressedLM(
        tiny_model(positions=64), icformer(num_query_tokens=16, use_chunk=True, max_chunk_len=8), system_prompt=None
    )
    with pytest.raises(ContextTooLongError) as refused:
        s.add_ids(list(range(10, 42)))  # 32 tokens: 4 chunks of 16 digests and the marker, 65 positions
    message = str(refused.value)
    assert "would hold 65 positions after reading these 32 tokens, but the model allows 64" in message
    assert "max_chunk_len" in message and "num_query_tokens" in message and "in parts" not in message
    assert refused.value.positions is None  # the method's options lift it (ccmem compress keeps this message)
    s.add_ids(list(range(10, 34)))  # 3 chunks: 49 positions fit
    with pytest.raises(ContextTooLongError, match="would hold 65 positions after reading these 8 tokens"):
        s.add_ids(list(range(34, 42)))  # the context so far counts
    assert s.memory.num_slots == 49


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2", "gpt-neox", "gemma3", "mistral-window"])
def test_memory_is_the_digests_and_fits_every_family(family):
    lm = tiny_model(family)
    method = icformer(use_chunk=True, max_chunk_len=6)
    s = ccmem.CompressedLM(lm, method, system_prompt="sys")
    sink = s.memory.num_slots
    s.add_ids(list(range(10, 23)))  # 13 tokens -> 3 chunks of <= 6
    assert s.memory.num_slots == sink + 3 * 3 + 1 and s.memory.next_position == sink + 10
    s.memory.check(lm.kv_shape)
    hidden = lm.model.get_input_embeddings().weight.shape[1]
    with torch.no_grad():
        digests = method.digests(lm, [torch.arange(10, 17), torch.arange(10, 14)])
    assert [tuple(d.shape) for d in digests] == [(3, hidden), (3, hidden)]
    assert len(list(s.stream_ids([40, 41], max_new_tokens=3, stop_ids=set()))) == 3


def test_compression_never_runs_the_lm_decoder_over_the_context():
    lm = tiny_model()
    s = ccmem.CompressedLM(lm, icformer(), system_prompt="sys")
    seen: list[int] = []

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append(hidden.shape[1])

    handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in lm.model.base_model.layers]
    try:
        s.add_ids(list(range(10, 70)))  # 60 context tokens
    finally:
        for h in handles:
            h.remove()
    assert seen == [3 + 1] * len(lm.model.base_model.layers)  # the digests and the FT marker, once per layer


@pytest.mark.parametrize("locality", [True, False])
def test_padded_contexts_give_the_digests_each_gives_alone(locality):
    lm = tiny_model()
    method = icformer(locality=locality)
    randomize_state(method, lm)
    chunks = [torch.arange(10, 17), torch.arange(30, 33), torch.arange(50, 55)]
    with torch.no_grad():
        together = method.digests(lm, chunks)
        alone = [method.digests(lm, [c])[0] for c in chunks]
    for a, b in zip(together, alone, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_training_loss_equals_reading_the_answer_after_the_compressed_memory():
    """The training layout ([sink][digests][FT][tail], one forward) is what inference computes from the memory."""
    lm = tiny_model()
    method = icformer(use_chunk=True, max_chunk_len=5)
    randomize_state(method, lm)
    sample = Sample([[10, 11, 12, 13], [14, 15, 16, 17, 18]], [40, 41, 42, 43], [5, 6], answer_start=2)
    with torch.no_grad(), method.attached(lm):
        trained = method.training_loss(lm, method.make_batch([sample]))
        memory = method.add_sink(lm, method.new_memory(lm), torch.tensor([sample.sink]))
        memory = method.add(lm, memory, torch.tensor([[t for c in sample.chunks for t in c]]))
        tail = torch.tensor([sample.tail])
        hidden = run_decoder(lm, tail, memory.to_cache(), memory.next_position).last_hidden_state
        labels = torch.full_like(tail, -100)
        labels[:, sample.answer_start :] = tail[:, sample.answer_start :]
        read = answer_loss(lm, hidden, labels)  # the answer starts after the FT marker, inside the tail
    torch.testing.assert_close(trained, read, atol=1e-5, rtol=0)


@pytest.mark.parametrize("marker", ["lm", "ft"])
def test_marker_lm_reads_a_continuation_as_pretraining_trained_it(marker):
    """With marker=lm the memory is [digests][LM]: a continuation scored after it is pretraining's LM row."""
    from ccmem.methods.icformer import Row
    from ccmem.modules.icformer import ICFormer

    lm = tiny_model()
    method = icformer(objective="pretrain", max_seq_len=6, marker=marker)
    randomize_state(method, lm)
    sample = Sample([[10, 11, 12, 13, 14, 15]], [16, 17, 18, 19], [5])
    batch = method.make_batch([sample])
    batch.rows = [Row(0, [5], ICFormer.LM, [16, 17, 18, 19], 1)]  # the LM row, scored from its second token on
    with torch.no_grad(), method.attached(lm):
        total, count = method.loss_terms(lm, batch)
        memory = method.add_sink(lm, method.new_memory(lm), torch.tensor([[5]]))
        memory = method.add(lm, memory, torch.tensor([[10, 11, 12, 13, 14, 15]]))
        tail = torch.tensor([[16, 17, 18, 19]])
        hidden = run_decoder(lm, tail, memory.to_cache(), memory.next_position).last_hidden_state
        labels = tail.clone()
        labels[:, 0] = -100
        read = answer_loss(lm, hidden, labels)
    assert count == 3
    if marker == "lm":
        torch.testing.assert_close(total / count, read, atol=1e-5, rtol=0)
    else:  # the FT marker is another input: the option is what decides which one the memory ends with
        assert abs(float(total / count - read)) > 1e-4


def test_an_unknown_marker_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="marker must be one of ft, lm, ae"):
        icformer(marker="xx")


SAMPLES = [
    Sample([[10, 11, 12, 13, 14, 15]], [40, 41, 42], [5], answer_start=1),
    Sample([[20, 21, 22]], [43, 44, 45, 46, 47, 48], [5], answer_start=2),
    Sample([[30, 31, 32, 33, 34, 35, 36, 37, 38]], [49, 50], [5], answer_start=0),
]


@pytest.mark.parametrize("objective", ["finetune", "pretrain"])
@pytest.mark.parametrize("avg_level", ["token", "sentence"])
def test_accumulating_single_samples_equals_one_padded_batch(avg_level, objective):
    lm = tiny_model()
    method = icformer(avg_level=avg_level, objective=objective, max_seq_len=8, use_chunk=objective == "finetune",
                      max_chunk_len=4)  # fmt: skip
    former = method.module_for(lm)
    randomize_state(method, lm)
    former.requires_grad_(True)
    with method.attached(lm):
        method.training_loss(lm, method.make_batch(SAMPLES)).backward()
        batched = [p.grad.clone() for p in former.parameters()]
        former.zero_grad()
        terms = [method.loss_terms(lm, method.make_batch([s])) for s in SAMPLES]
        count = sum(c for _, c in terms)
        for total, _ in terms:  # what an accumulating loop does: each micro-batch's sum over the window's count
            (total / count).backward()
        accumulated = [p.grad.clone() for p in former.parameters()]
    for a, b in zip(batched, accumulated, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    if avg_level == "sentence":
        assert count == len(SAMPLES)


def test_pretraining_autoencodes_the_context_and_models_its_continuation():
    method = icformer(objective="pretrain", max_seq_len=6)
    batch = method.make_batch([Sample([[10, 11, 12, 13], [14, 15, 16, 17]], [18, 19], [5])])
    assert batch.chunks == [[10, 11, 12, 13, 14, 15]]
    assert [(r.marker, r.tail, r.label_from) for r in batch.rows] == [
        (0, [10, 11, 12, 13, 14, 15], 0),
        (1, [16, 17, 18, 19], 0),
    ]
    short = method.make_batch([Sample([[10, 11]], [], [5])])
    assert [r.marker for r in short.rows] == [0]  # nothing to continue: autoencoding only
    lm = tiny_model()
    with method.attached(lm):
        assert torch.isfinite(method.training_loss(lm, batch))


def test_an_adapter_of_other_sizes_or_for_another_lm_is_refused_naming_the_mismatch(tmp_path):
    lm = tiny_model()
    method = icformer()
    randomize_state(method, lm)
    path = save_adapter(method, lm, tmp_path / "icformer.safetensors")
    loaded = ccmem.load(tiny_model(), "icformer", adapter=path)
    assert loaded.method.num_query_tokens == 3 and loaded.method.num_hidden_layers == 2
    with pytest.raises(AdapterMismatchError, match="trained with num_query_tokens=3, but num_query_tokens=4"):
        ccmem.load(tiny_model(), "icformer", adapter=path, num_query_tokens=4)
    with pytest.raises(AdapterMismatchError, match="trained with num_hidden_layers=2, but num_hidden_layers=3"):
        ccmem.load(tiny_model(), "icformer", adapter=path, num_hidden_layers=3)
    with pytest.raises(AdapterMismatchError, match="was trained for 'tiny-llama-gqa', not for 'tiny-qwen2'"):
        ccmem.load(tiny_model("qwen2"), "icformer", adapter=path)
    # runtime options (chunking) may differ from training
    assert ccmem.load(tiny_model(), "icformer", adapter=path, use_chunk=True).method.use_chunk


def test_a_packed_half_precision_adapter_loads_with_its_runtime_defaults_and_keeps_its_training_options(tmp_path):
    import subprocess
    import sys

    from ccmem.adapter import pack_adapter, read_adapter

    lm = tiny_model()
    method = icformer()
    randomize_state(method, lm)
    path = save_adapter(method, lm, tmp_path / "trained.safetensors")
    packed = pack_adapter(path, tmp_path / "packed.safetensors", dtype=torch.float16, runtime={"use_chunk": True})
    adapter = read_adapter(packed)
    assert {str(t.dtype) for t in adapter.tensors.values()} == {"torch.float16"}
    assert adapter.extra["packed"] == {"from": read_adapter(path).hash, "dtype": "float16", "use_chunk": True}
    session = ccmem.load(tiny_model(), "icformer", adapter=packed)
    assert session.method.use_chunk and session.method.num_query_tokens == 3
    for name, value in session.method.former(session.lm).state_dict().items():  # float32 again, rounded once
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, method.former(lm).state_dict()[name].half().float())
    assert not ccmem.load(tiny_model(), "icformer", adapter=packed, use_chunk=False).method.use_chunk
    with pytest.raises(AdapterMismatchError, match="'num_query_tokens' is not a runtime option of icformer"):
        pack_adapter(path, tmp_path / "bad.safetensors", runtime={"num_query_tokens": 8})
    # int8 was taken: every weight cut to a whole number, and the adapter loaded without a word
    with pytest.raises(ValueError, match=r"dtype=torch.int8 is not a precision .*: give one of float16, bfloat16"):
        pack_adapter(path, tmp_path / "int8.safetensors", dtype=torch.int8)
    assert not (tmp_path / "int8.safetensors").exists()
    script = subprocess.run(
        [sys.executable, "scripts/pack_adapter.py", str(path), str(tmp_path / "s.safetensors"), "-O", "use_chunk"],
        capture_output=True,
        text=True,
    )
    assert script.returncode == 2 and "-O 'use_chunk' must look like KEY=VALUE" in script.stderr
    again = pack_adapter(path, tmp_path / "again.safetensors", dtype=torch.float16, runtime={"use_chunk": True})
    assert again.read_bytes() == packed.read_bytes()  # the same source packs to the same bytes (and sha256)


def test_reconstruction_is_the_greedy_continuation_of_digests_and_the_ae_marker():
    from ccmem.methods.base import logits_for
    from ccmem.modules.icformer import ICFormer

    lm = tiny_model()
    method = ccmem.get_method("icformer", num_query_tokens=3, num_hidden_layers=1)
    method.module_for(lm)
    context = torch.tensor([[5, 9, 14, 22, 30, 41]])
    out = method.reconstruct(lm, context)
    assert len(out) == 6
    prompt = method.soft_prompt(lm, context, ICFormer.AE)
    embeds = torch.cat([prompt, lm.model.get_input_embeddings()(torch.tensor([out[:-1]]))], dim=1)
    with torch.no_grad():
        hidden = lm.model.base_model(inputs_embeds=embeds).last_hidden_state
    greedy = logits_for(lm, hidden[0, prompt.shape[1] - 1 :]).argmax(-1).tolist()
    assert greedy == out  # the cached loop writes what one teacher-forced forward predicts


def test_autoencoding_scores_compare_the_reconstruction_with_the_context(monkeypatch):
    from ccmem.eval.autoencode import autoencode
    from ccmem.methods.icformer import ICFormerMethod

    lm = tiny_model()
    method = ccmem.get_method("icformer", num_query_tokens=2, num_hidden_layers=1)
    text = "abcd"
    ids = lm.tokenizer.encode(text)
    monkeypatch.setattr(ICFormerMethod, "reconstruct", lambda self, lm, context: [*ids[:2], 0, 0])
    scores = autoencode(lm, method, [text])
    assert scores["token_accuracy"] == 0.5 and scores["exact"] == 0
    monkeypatch.setattr(ICFormerMethod, "reconstruct", lambda self, lm, context: list(ids))
    assert autoencode(lm, method, [text])["exact"] == 1.0 == autoencode(lm, method, [text])["rouge_l"]
    # teacher-forced: the cross-entropy and accuracy of each context token after [digests][AE][earlier tokens]
    with torch.no_grad():
        logits = method.reconstruction_logits(lm, torch.tensor([ids])).float()
    scores = autoencode(lm, method, [text])
    assert scores["forced_loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids))))
    assert scores["forced_accuracy"] == float((logits.argmax(-1) == torch.tensor(ids)).float().mean())

    def no_greedy(self, lm, context):
        raise AssertionError("greedy=False must not reconstruct token by token")

    monkeypatch.setattr(ICFormerMethod, "reconstruct", no_greedy)
    assert "token_accuracy" not in autoencode(lm, method, [text], greedy=False)


def test_teacher_forced_reconstruction_reads_what_greedy_reconstruction_reads():
    lm = tiny_model()
    method = ccmem.get_method("icformer", num_query_tokens=3, num_hidden_layers=1)
    randomize_state(method, lm)
    context = torch.tensor([[5, 9, 14, 22, 30, 41]])
    with torch.no_grad():
        out = method.reconstruct(lm, context)
        logits = method.reconstruction_logits(lm, torch.tensor([out]))
    assert logits.argmax(-1).tolist() == out  # fed its own reconstruction, each next token is the greedy one


def test_an_untrained_former_with_locality_starts_as_a_copy_of_its_segments():
    """``locality=True``: each digest sits on its segment and passes its embeddings through, so with a digest per
    token the untrained digests are (nearest to) the context's own tokens, in order, whatever the length; the
    paper's layout starts from digests that say nothing of the context."""
    lm = tiny_model()
    table = torch.nn.functional.normalize(lm.model.get_input_embeddings().weight.detach().float(), dim=-1)

    def nearest(method, context):
        with torch.no_grad():
            digests = method.digests(lm, [context])[0].float()
        return (torch.nn.functional.normalize(digests, dim=-1) @ table.T).argmax(-1)

    for n in (8, 5):
        context = torch.randint(3, lm.model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(n))
        copied = (nearest(icformer(num_query_tokens=n, locality=True), context) == context).float().mean()
        assert copied >= 0.9
        assert (nearest(icformer(num_query_tokens=n, locality=False), context) == context).float().mean() < 0.5
    # four distinct tokens per digest: each digest is closer to its own segment's tokens than to any other's
    context = 3 + torch.randperm(lm.model.config.vocab_size - 3, generator=torch.Generator().manual_seed(1))[:16]
    with torch.no_grad():
        digests = icformer(num_query_tokens=4, locality=True).digests(lm, [context])[0].float()
    closeness = (torch.nn.functional.normalize(digests, dim=-1) @ table[context].T).view(4, 4, 4).mean(-1)
    assert torch.equal(closeness.argmax(-1), torch.arange(4))  # [digest, segment]: the diagonal wins


def test_the_locality_penalty_trains_and_is_saved_with_the_former(tmp_path):
    lm = tiny_model()
    method = icformer(locality=True)
    former = method.module_for(lm).requires_grad_(True)  # as a training recipe turns it on
    slopes = [name for name, _ in former.named_parameters() if "log_slope" in name]
    assert len(slopes) == 2  # one per layer
    digests = method.digests(lm, [torch.arange(3, 12)])[0]
    digests.pow(2).sum().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in former.named_parameters() if n in slopes)
    path = save_adapter(method, lm, tmp_path / "icformer.safetensors")
    with pytest.raises(AdapterMismatchError, match="trained with locality=True, but locality=False"):
        ccmem.load(tiny_model(), "icformer", adapter=path, locality=False)


def test_pretrain_min_len_mixes_context_lengths_drawn_per_text_and_continues_right_after_the_cut():
    method = icformer(objective="pretrain", max_seq_len=12, pretrain_min_len=3)
    texts = [Sample([list(range(10 + 40 * i, 40 + 40 * i))], [], [5]) for i in range(12)]
    cuts = []
    for sample in texts:
        batch = method.make_batch([sample])
        text = sample.chunks[0]
        context = batch.rows[0].tail
        assert batch.rows[0].marker == 0 and 3 <= len(context) <= 12 and context == text[: len(context)]
        assert batch.rows[1].tail == text[len(context) : len(context) + 12]  # the continuation starts at the cut
        assert method.make_batch([sample]).rows[0].tail == context  # the same cut every epoch
        assert method.sample_length(sample) == len(sample.sink) + 3 + 1 + max(len(context), len(batch.rows[1].tail))
        cuts.append(len(context))
    assert len(set(cuts)) > 3  # lengths vary between texts
    assert [len(method.make_batch([s]).rows[0].tail) for s in texts] == cuts
    assert all(len(icformer(objective="pretrain", max_seq_len=12).make_batch([s]).rows[0].tail) == 12 for s in texts)
    with pytest.raises(ValueError, match="pretrain_min_len must be between 0"):
        icformer(max_seq_len=12, pretrain_min_len=13)
