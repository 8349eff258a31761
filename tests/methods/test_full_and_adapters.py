"""`full` is plain transformers; adapters and bad input are refused with clear errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import ccmem
from ccmem.adapter import AdapterMismatchError, read_adapter, save_adapter
from ccmem.api import CompressedLM, ContextTooLongError
from ccmem.registry import UnknownMethodError, get_method
from tests.conftest import randomize_lora, tiny_model


@pytest.mark.parametrize("family", ["llama-gqa", "gpt-neox"])
def test_full_equals_plain_transformers_generation(family):
    lm = tiny_model(family)
    session = CompressedLM(lm, get_method("full"), system_prompt=None)
    context, query = [[5, 6, 7, 8], [9, 10, 11]], [12, 13]
    for chunk in context:
        session.add_ids(chunk)
    ours = list(session.stream_ids(query, max_new_tokens=12, stop_ids=set()))
    reference = lm.model.generate(
        input_ids=torch.tensor([sum(context, []) + query]),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert ours == reference[0, -12:].tolist()


def test_none_answers_as_if_there_were_no_context():
    lm = tiny_model()
    with_context = CompressedLM(lm, get_method("none"), system_prompt=None)
    with_context.add_ids([5, 6, 7, 8])
    empty = CompressedLM(lm, get_method("none"), system_prompt=None)
    query = [12, 13]
    assert list(with_context.stream_ids(query, 6, stop_ids=set())) == list(empty.stream_ids(query, 6, stop_ids=set()))


def test_merge_banks_come_from_the_adapter_and_a_memory_keeps_them(tmp_path):
    """A merge adapter records the banks it was trained with and loads with them; asking for others is refused
    (the adapter learned to read that many), and so is a saved memory folded with other banks."""
    lm = tiny_model()
    method = get_method("ccm-merge", n_tok=2, banks=3)
    randomize_lora(method, lm)
    path = save_adapter(method, lm, tmp_path / "m.safetensors")
    session = ccmem.load(tiny_model(), "ccm-merge", adapter=path, system_prompt=None)
    assert session.method.banks == 3
    for turn in range(4):
        session.remember(f"turn {turn}", "ok")
    assert session.memory.num_slots == 2 * 3
    with pytest.raises(AdapterMismatchError, match=r"trained with banks=3, but banks=1 was asked"):
        ccmem.load(tiny_model(), "ccm-merge", adapter=path, banks=1)
    session.save_memory(tmp_path / "memory.safetensors")
    other = get_method("ccm-merge", n_tok=2, banks=2)
    randomize_lora(other, lm)
    with pytest.raises(ValueError, match="banks"):
        CompressedLM(tiny_model(), other, system_prompt=None).load_memory(tmp_path / "memory.safetensors")
    with pytest.raises(ValueError, match="banks must be at least 1"):
        get_method("ccm-merge", banks=0)


def _state(method, lm):
    return {k: v.clone() for k, v in method.module_for(lm).state_dict().items()}


def test_adapter_roundtrip_fills_in_its_options_and_refuses_conflicts(tmp_path):
    lm = tiny_model()
    method = get_method("ccm-concat", n_tok=2, recurrent=False, lora_rank=4)
    randomize_lora(method, lm)
    path = save_adapter(method, lm, tmp_path / "a.safetensors", extra={"steps": 3})
    adapter = read_adapter(path)
    assert adapter.options["n_tok"] == 2 and adapter.extra == {"steps": 3}

    # No options given: the adapter's are used (n_tok, recurrent, rank), and its weights are loaded.
    session = ccmem.load(tiny_model(), "ccm-concat", adapter=path, system_prompt=None)
    assert (session.method.n_tok, session.method.recurrent, session.method.lora_rank) == (2, False, 4)
    assert session.adapter_trained and session.method.adapter_hash == adapter.hash
    for key, value in _state(method, lm).items():
        torch.testing.assert_close(session.method.module_for(session.lm).state_dict()[key], value)
    # Options that agree, or only change how it runs, are fine; a conflicting one is refused with both values.
    ccmem.load(tiny_model(), "ccm-concat", adapter=path, n_tok=2, max_chunk_tokens=7)
    with pytest.raises(AdapterMismatchError, match=r"trained with n_tok=2, but n_tok=4 was asked"):
        ccmem.load(tiny_model(), "ccm-concat", adapter=path, n_tok=4)
    with pytest.raises(AdapterMismatchError, match=r"trained with recurrent=False"):
        ccmem.load(tiny_model(), "ccm-concat", adapter=path, recurrent=True)
    with pytest.raises(AdapterMismatchError, match="trained for method 'ccm-concat', not 'ccm-merge'"):
        ccmem.load(tiny_model(), "ccm-merge", adapter=path)
    with pytest.raises(AdapterMismatchError, match="trained for 'tiny-llama-gqa', not for 'tiny-qwen2'"):
        ccmem.load(tiny_model("qwen2"), "ccm-concat", adapter=path)
    # the same model in bfloat16 has other exact weights: said as such, not "for 'tiny-llama-gqa', not for 'tiny-..."
    half = tiny_model()
    half.model.to(torch.bfloat16)
    with pytest.raises(AdapterMismatchError, match=r"other weights of 'tiny-llama-gqa' .*\(loaded as bfloat16\)"):
        ccmem.load(half, "ccm-concat", adapter=path)
    # weights that do not match the method's (a tensor lost, one too many): both sides named, and how it was made
    from ccmem.adapter import load_adapter

    key = sorted(adapter.tensors)[0]
    tensors = {k: v for k, v in adapter.tensors.items() if k != key} | {"x.w": adapter.tensors[key]}
    stray = dataclasses.replace(adapter, tensors=tensors)
    with pytest.raises(AdapterMismatchError, match=rf"ccm-concat needs \['{key}'\]; it holds \['x.w'\].*n_tok=2"):
        load_adapter(get_method("ccm-concat", **adapter.options), lm, stray)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 16)
    with pytest.raises(AdapterMismatchError, match="not a readable safetensors adapter"):
        ccmem.load(tiny_model(), "ccm-concat", adapter=junk)


def test_the_shipped_adapters_in_the_old_format_still_load(tmp_path):
    """Adapters written before the generic format (format version 1) are read through the method's converter."""
    from safetensors.torch import save_file

    lm = tiny_model()
    method = get_method("ccm-merge", n_tok=2)
    randomize_lora(method, lm)
    state = method.module_for(lm).state_dict()
    old = {"comp_embeddings": state["comp.weight"]}
    for key, value in state.items():
        if key.startswith("lora.pairs."):
            path, part = key[len("lora.pairs.") :].rsplit(".", 1)
            old[f"lora.{path.replace('/', '.')}.{part}"] = value
    meta = {"format": "ccmem.adapter", "model": lm.fingerprint, "model_name": lm.name, "method": "ccm-merge",
            "n_tok": "2", "recurrent": "True", "lora_rank": "8", "lora_alpha": "16.0", "stage1": ""}  # fmt: skip
    save_file(old, str(tmp_path / "old.safetensors"), metadata=meta)
    session = ccmem.load(tiny_model(), "ccm-merge", adapter=tmp_path / "old.safetensors")
    assert session.method.n_tok == 2 and session.adapter_trained
    for key, value in state.items():
        torch.testing.assert_close(session.method.module_for(session.lm).state_dict()[key], value)


def test_adapter_trained_on_other_layers_loads_without_naming_them(tmp_path):
    """An adapter trained with ``method.lora_targets=[...]`` (here MLP too) carries them: load() adapts those."""
    lm = tiny_model()
    method = get_method("ccm-concat", n_tok=2, lora_targets=("q_proj", "v_proj", "up_proj", "down_proj"))
    randomize_lora(method, lm)
    path = save_adapter(method, lm, tmp_path / "mlp.safetensors")
    session = ccmem.load(tiny_model(), method="ccm-concat", adapter=path, system_prompt=None)
    loaded = session.method.module_for(session.lm).state_dict()
    assert loaded.keys() == method.module_for(lm).state_dict().keys()
    assert any("mlp/down_proj" in k for k in loaded)
    with pytest.raises(AdapterMismatchError, match="lora_targets"):
        ccmem.load(tiny_model(), method="ccm-concat", adapter=path, lora_targets=["q_proj"])


def test_one_loaded_model_serves_several_methods_in_turn():
    lm = tiny_model()
    ids = torch.tensor([[4, 5, 6]])
    with torch.no_grad():
        before = lm.model(input_ids=ids).logits
    concat = ccmem.load(lm, method="ccm-concat", n_tok=2, system_prompt="s")
    randomize_lora(concat.method, lm, 0.5)
    merge = ccmem.load(concat.lm, method="ccm-merge", n_tok=2, system_prompt="s")  # was refused before
    for session in (concat, merge, concat):
        session.add_ids([7, 8, 9])
        list(session.stream_ids([10], 2, stop_ids=set()))
    sink = len("System: s\n")  # the tiny tokenizer has one token per character
    assert concat.memory.num_slots == sink + 2 * 2 and merge.memory.num_slots == sink + 2  # concat added twice
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=ids).logits, before)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: get_method("ccm-foo"), UnknownMethodError, "valid methods: full, none, ccm-concat"),
        (lambda: get_method("ccm-concat", n_tok=0), ValueError, "n_tok must be at least 1"),
        (lambda: get_method("gist", lora_alpha=float("nan")), ValueError, r"lora_alpha must be positive and finite"),
        (lambda: get_method("ccm-concat", lora_alpha=float("inf")), ValueError, "lora_alpha must be positive and"),
        (lambda: get_method("ccm-merge", gate_scale=float("inf")), ValueError, "gate_scale must be positive and"),
        (lambda: get_method("ccm-concat", ntok=2), ValueError, r"no option 'ntok' \(did you mean 'n_tok'\?\)"),
        (lambda: get_method("CCM-CONCAT"), UnknownMethodError, r"did you mean 'ccm-concat'\?"),  # case alone
        (lambda: ccmem.load("no-such-model"), ValueError, "Built-in models: smollm2-135m"),
        (lambda: ccmem.load(""), ValueError, r"no model given \(''\): pass a built-in name"),  # was '.', a folder
        (lambda: ccmem.load(None), ValueError, "no model given"),
        (lambda: ccmem.load(tiny_model(), method=None), UnknownMethodError, "given by its name, not None"),
        (lambda: ccmem.load(tiny_model(), method="ccm-concat", adapter=""), ValueError, "adapter= is empty"),
        (
            lambda: ccmem.load(tiny_model(), method="none", adapter="x.safetensors"),
            ValueError,
            "takes no adapter",
        ),
    ],
)
def test_bad_input_gets_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_empty_input_and_too_long_context():
    session = CompressedLM(tiny_model(), get_method("full"), system_prompt=None)
    with pytest.raises(ValueError, match="nothing to add"):
        session.add("   ")
    with pytest.raises(ValueError, match="nothing to add"):
        session.add_ids([])
    with pytest.raises(ValueError, match="prompt is empty"):
        session.query_ids("")
    with pytest.raises(ContextTooLongError, match="model allows 256"):
        session.add_ids(list(range(3, 90)) * 3)
    with pytest.raises(ValueError, match="message 0 has role 'bot'"):
        session.add([{"role": "bot", "content": "hi"}])


def test_a_failed_add_leaves_memory_and_history_untouched():
    # 20 slots per 50-token chunk: the memory outgrows the 256 positions after several chunks were already folded
    session = CompressedLM(tiny_model(), get_method("ccm-concat", n_tok=20, max_chunk_tokens=50), system_prompt="sys")
    session.add([{"role": "user", "content": "hello"}])
    before_memory, before_history = session.memory, list(session.history)
    done: list[int] = []
    with pytest.raises(ContextTooLongError):
        session.add([{"role": "user", "content": "x" * 1000}], progress=lambda read, total: done.append(read))
    assert len(done) > 2  # it failed part-way, not on the first chunk
    assert session.memory is before_memory
    assert session.history == before_history


def test_none_takes_any_length_of_context():
    session = CompressedLM(tiny_model(), get_method("none"), system_prompt=None)
    session.add_ids(list(range(3, 90)) * 4)  # longer than the model's 256 positions: dropped anyway
    assert session.memory.num_slots == 0


def test_long_input_is_chunked_for_ccm():
    session = CompressedLM(tiny_model(), get_method("ccm-concat", n_tok=2, max_chunk_tokens=10), system_prompt=None)
    session.add_ids(list(range(3, 28)))  # 25 tokens -> 3 chunks
    assert session.memory.num_slots == 6
    assert session.memory.next_position == 25 + 3 * 2


def test_option_scores_are_the_log_likelihood_under_full_context():
    lm = tiny_model()
    session = CompressedLM(lm, get_method("full"), system_prompt=None)
    context, query, options = [5, 6, 7, 8], [12, 13], [[20, 21, 22], [30]]
    session.add_ids(context)
    scores = session.score_ids(query, options)
    for option, score in zip(options, scores, strict=True):
        seq = torch.tensor([context + query + option])
        with torch.no_grad():
            logprobs = torch.log_softmax(lm.model(seq).logits[0], -1)
        start = len(context) + len(query)
        expected = sum(float(logprobs[start - 1 + i, t]) for i, t in enumerate(option))
        assert score == pytest.approx(expected, abs=1e-4)
    assert session.memory.num_slots == len(context)  # scoring leaves the memory as it was
    with pytest.raises(ValueError, match="no empty option"):
        session.score_ids(query, [[1], []])
    mean = session.score_ids(query, options, reduce="mean")  # length-normalised: per-token average
    assert mean == pytest.approx([s / len(o) for s, o in zip(scores, options, strict=True)], abs=1e-5)
    with pytest.raises(ValueError, match="reduce must be one of"):
        session.score_ids(query, options, reduce="max")


def test_api_refuses_bad_input_with_clear_errors():
    session = CompressedLM(tiny_model(), get_method("full"), system_prompt=None)
    for bad, message in [(None, "got NoneType"), (123, "got int"), (b"bytes", "got bytes")]:
        with pytest.raises(ValueError, match=message):
            session.add(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"token id 500 in the context is outside this model's vocabulary \(0..96\)"):
        session.add_ids([5, 500])
    with pytest.raises(ValueError, match="token id -1"):
        session.add_ids([-1])
    with pytest.raises(ValueError, match="must be token ids"):
        session.add_ids([1.5, 2.0])
    session.add_ids([5, 6])
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        list(session.stream_ids([7], 3, temperature=1.0, top_p=0))
    with pytest.raises(ValueError, match="temperature must be 0"):
        list(session.stream_ids([7], 3, temperature=-1))
    with pytest.raises(ValueError, match="options as a list of non-empty strings"):
        session.score("question", ["yes", 3])  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda meta, t: meta.update(next_position="-50"), "negative next_position"),
        (lambda meta, t: meta.update(sink="999"), r"sink \(999\) \+ window"),
        (lambda meta, t: meta.update(next_position="many"), "next_position='many' is not a whole number"),
        (lambda meta, t: meta.update(meta="{not json"), "metadata is not valid JSON"),
        (lambda meta, t: t.update({"layers.0.keys": t["layers.0.keys"].to(torch.int32)}), "int32"),
        (lambda meta, t: t["layers.1.values"].view(-1).__setitem__(0, float("nan")), "NaN or infinite"),
        (lambda meta, t: t.update({k: v[:, :1] for k, v in t.items() if k.startswith("layers.0.")}), "1 heads of"),
        (lambda meta, t: t.update({"layers.0.keys": t["layers.0.keys"][:, :1]}), "must have the same 4-D shape"),
        (lambda meta, t: t.pop("layers.1.positions"), "layers.1.positions is missing"),
        (lambda meta, t: [t.pop(k) for k in list(t) if k.startswith("layers.1.")], "1 layers, but the model has 2"),
        (
            lambda meta, t: t["layers.0.positions"][..., 1].copy_(t["layers.0.positions"][..., 0]),
            "layer 0 holds two slots of one head at position 0",
        ),
        (lambda meta, t: t.clear(), r"holds no key/value layers, but counts 10 sink and 3 window slots"),
        (
            lambda meta, t: t.update({"layers.0.positions": t["layers.0.positions"].float() + 0.5}),
            "layers.0.positions holds float32 values; positions are whole numbers",
        ),
        # layer 1 one slot short (and no window, which would count it): generating failed deep inside the attention
        (
            lambda meta, t: (
                meta.update(window="0"),
                t.update({k: v[:, :, :-1].clone() for k, v in t.items() if "s.1." in k}),
            ),
            r"its layers hold different numbers of slots \(12 to 13\)",
        ),
    ],
)
def test_a_memory_file_edited_by_hand_is_refused_with_what_is_wrong(tmp_path, edit, message):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ccmem.memory import MemoryMismatchError

    session = CompressedLM(tiny_model(), get_method("full"), system_prompt="s")
    session.add_ids([5, 6, 7])
    path = session.save_memory(tmp_path / "m.safetensors")
    with safe_open(str(path), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    edit(meta, tensors)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(MemoryMismatchError, match=message):
        session.load_memory(path)


def test_an_option_newer_than_the_adapter_counts_as_trained_at_its_default(tmp_path):
    """An adapter made before an option existed (``weighting`` on ccm-merge) was trained at its default: asking
    another value is refused with the option named, not with a confusing missing-tensor error."""
    import dataclasses

    from ccmem.adapter import options_with_adapter

    lm = tiny_model()
    path = save_adapter(get_method("ccm-merge", n_tok=2), lm, tmp_path / "merge.safetensors")
    adapter = read_adapter(path)
    older = dataclasses.replace(adapter, options={k: v for k, v in adapter.options.items() if k != "weighting"})
    assert options_with_adapter("ccm-merge", older, {"weighting": "mean"})["weighting"] == "mean"
    with pytest.raises(AdapterMismatchError, match="trained with weighting='mean', but weighting='learned'"):
        options_with_adapter("ccm-merge", older, {"weighting": "learned"})


def test_a_model_given_as_a_path_has_no_shipped_adapter_even_beside_its_own_weights(tmp_path):
    """A model folder is not ccmem's adapters folder: a ``ccm-concat.safetensors`` inside it is never "shipped"."""
    from ccmem.adapter import shipped_adapter, shipped_adapter_names

    (tmp_path / "ccm-concat.safetensors").write_bytes(b"not an adapter")
    assert shipped_adapter(str(tmp_path), "ccm-concat") is None and shipped_adapter_names(str(tmp_path)) == []
    assert shipped_adapter("smollm2-135m", "ccm-concat") is not None  # the built-in model's still are


def test_gist_refuses_a_context_past_the_models_positions_and_keeps_its_memory():
    """Gist re-reads the whole context at every add, so re-basing cannot make room as it does for the others."""
    s = ccmem.load(tiny_model(positions=256), "gist", system_prompt="sys")
    with pytest.raises(ContextTooLongError, match=r"the model allows 256; gist reads the whole context again"):
        for i in range(40):
            s.remember(f"turn {i} says {i * 7}", "ok")
    held = s.memory
    assert held.next_position <= 256
    with pytest.raises(ContextTooLongError):
        s.remember(f"turn {i} says {i * 7}", "ok")  # the same turn again
    assert s.memory is held  # the refused turn left the memory as it was


def test_a_memory_of_another_model_names_that_model(tmp_path):
    """It named two weight fingerprints ('056e5211b6a64e71' against '0da06685e6a1a980'): now the model it was
    made with, as --model takes it."""
    from ccmem.memory import MemoryMismatchError

    path = CompressedLM(tiny_model(), get_method("full"), system_prompt="s").save_memory(tmp_path / "m.safetensors")
    other = CompressedLM(tiny_model("qwen2"), get_method("full"), system_prompt="s")
    with pytest.raises(MemoryMismatchError, match=r"made with model 'tiny-llama-gqa' .*--model tiny-llama-gqa"):
        other.load_memory(path)


def test_an_adapter_refused_for_its_stage1_leaves_a_shared_model_unmerged(tmp_path):
    """ccmem.load(lm, ..., stage1=RUN) merged the stage-1 LoRA into the shared weights before it read the adapter:
    refused, it left them merged, and every other session of that model was broken."""
    lm = tiny_model()
    stage1 = get_method("full")
    randomize_lora(stage1, lm)
    stage1_path = save_adapter(stage1, lm, tmp_path / "stage1.safetensors")
    plain = save_adapter(get_method("ccm-concat", n_tok=2), lm, tmp_path / "plain.safetensors")
    shared = tiny_model()
    before = shared.model.model.layers[0].self_attn.q_proj.weight.clone()
    other = ccmem.load(shared, "full", system_prompt=None)
    scores = other.score("ab", ["c", "d"])
    with pytest.raises(AdapterMismatchError, match="trained on top of stage-1 LoRA none"):
        ccmem.load(shared, "ccm-concat", adapter=plain, stage1=stage1_path, system_prompt=None)
    assert shared.stage1 is None and torch.equal(shared.model.model.layers[0].self_attn.q_proj.weight, before)
    assert other.score("ab", ["c", "d"]) == scores


def test_a_stage1_merge_into_a_model_other_sessions_read_is_refused_before_it_changes_them(tmp_path):
    """ccmem.load(lm, ..., stage1=RUN) on a model a session already read merged into its weights: that session
    then failed at its next call ("the memory was made with stage1=''"). The merge is refused while another session
    reads the model, and allowed once none does."""
    import gc

    from ccmem.stage1 import Stage1Error

    lm = tiny_model()
    stage1 = get_method("full")
    randomize_lora(stage1, lm)
    stage1_path = save_adapter(stage1, lm, tmp_path / "stage1.safetensors")
    shared = tiny_model()
    other = ccmem.load(shared, "ccm-concat", n_tok=2, system_prompt=None)
    other.add_ids([5, 6, 7])
    scores = other.score_ids([8], [[9], [10]])
    twin = other.fork()
    with pytest.raises(Stage1Error, match=r"2 sessions already read tiny-llama-gqa; merging stage-1 LoRA"):
        ccmem.load(shared, "ccm-concat", n_tok=2, stage1=stage1_path, system_prompt=None)
    assert shared.stage1 is None and other.score_ids([8], [[9], [10]]) == scores  # nothing changed under them
    del other, twin
    gc.collect()
    merged = ccmem.load(shared, "ccm-concat", n_tok=2, stage1=stage1_path, system_prompt=None)
    assert shared.stage1 is not None and merged.lm is shared
    ccmem.load(shared, "full", stage1=stage1_path, system_prompt=None)  # the same stage 1 again: nothing to merge


@pytest.mark.parametrize("options", ["[2]", "null", '"n_tok=2"'])
def test_an_adapter_whose_options_are_no_json_object_is_refused_as_damaged(tmp_path, options):
    """Hand-edited options that are a list or null failed with "'list' object has no attribute 'items'"."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = save_adapter(get_method("ccm-concat", n_tok=2), tiny_model(), tmp_path / "a.safetensors")
    with safe_open(str(path), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(tensors, str(path), metadata=meta | {"options": options})
    with pytest.raises(AdapterMismatchError, match=rf"{path} has damaged or unknown metadata: its options are"):
        read_adapter(path)


def test_lora_targets_given_in_another_order_agree_with_the_adapter(tmp_path):
    """lora_targets names a set of layers: ["v_proj", "q_proj"] was refused as a conflict with an adapter trained
    on ("q_proj", "v_proj"); the adapter's order is kept, so memories made either way match."""
    lm = tiny_model()
    path = save_adapter(get_method("ccm-concat", n_tok=2, lora_targets=("q_proj", "v_proj")), lm, tmp_path / "a.st")
    session = ccmem.load(lm, "ccm-concat", adapter=path, system_prompt=None, lora_targets=["v_proj", "q_proj"])
    assert session.method.lora_targets == ("q_proj", "v_proj")
    with pytest.raises(AdapterMismatchError, match=r"trained with lora_targets=\('q_proj', 'v_proj'\)"):
        ccmem.load(lm, "ccm-concat", adapter=path, lora_targets=["v_proj", "k_proj"])


@pytest.mark.parametrize("made", [{"system_prompt": None}, {"sink": False}])
def test_a_memory_without_a_sink_saved_again_by_a_session_with_one_loads_again(made, tmp_path):
    """Such a memory (no system prompt, or one compressed with the context) loaded into a session whose system
    prompt is a sink was saved stamped with that prompt while holding no sink, so its next load refused it as
    damaged or hand-edited."""
    lm = tiny_model()
    first = ccmem.load(lm, "full", **made)
    first.add_ids([5, 6, 7])
    first.save_memory(tmp_path / "first.safetensors")
    second = ccmem.load(lm, "full", system_prompt="sys")
    second.load_memory(tmp_path / "first.safetensors")
    second.save_memory(tmp_path / "second.safetensors")
    third = ccmem.load(lm, "full", system_prompt="sys")
    assert third.load_memory(tmp_path / "second.safetensors").sink == 0
    assert list(third.stream_ids([8, 9], 4, stop_ids=set())) == list(first.stream_ids([8, 9], 4, stop_ids=set()))
