"""`full` is plain transformers; adapters and bad input are refused with clear errors."""

from __future__ import annotations

import pytest
import torch

import ccmem
from ccmem.api import CompressedLM, ContextTooLongError
from ccmem.methods.ccm import AdapterMismatchError
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


def test_adapter_roundtrip_and_mismatch(tmp_path):
    lm = tiny_model()
    method = get_method("ccm-concat", n_tok=2)
    method.prepare(lm)
    randomize_lora(method)
    path = method.save_adapter(lm, tmp_path / "a.safetensors", extra={"steps": 3})
    state = {k: v.clone() for k, v in method.adapter_state().items()}

    fresh = tiny_model()
    loaded = get_method("ccm-concat", n_tok=2)
    loaded.load_adapter(fresh, path)
    for key, value in loaded.adapter_state().items():
        torch.testing.assert_close(value, state[key])
    assert loaded.adapter_hash != "untrained"

    with pytest.raises(AdapterMismatchError, match="method='ccm-concat'"):
        get_method("ccm-merge", n_tok=2).load_adapter(tiny_model(), path)
    with pytest.raises(AdapterMismatchError, match="n_tok='2'"):
        get_method("ccm-concat", n_tok=4).load_adapter(tiny_model(), path)
    with pytest.raises(AdapterMismatchError, match="trained for 'tiny-llama-gqa'"):
        get_method("ccm-concat", n_tok=2).load_adapter(tiny_model("qwen2"), path)
    with pytest.raises(AdapterMismatchError, match="does not fit this model's layers"):
        get_method("ccm-concat", n_tok=2, lora_targets=("q_proj",)).load_adapter(tiny_model(), path)
    with pytest.raises(AdapterMismatchError, match=r"lora_alpha='16\.0'"):
        get_method("ccm-concat", n_tok=2, lora_alpha=32.0).load_adapter(tiny_model(), path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 16)
    with pytest.raises(AdapterMismatchError, match="not a readable safetensors adapter"):
        get_method("ccm-concat", n_tok=2).load_adapter(tiny_model(), junk)


def test_adapter_trained_on_other_layers_loads_without_naming_them(tmp_path):
    """An adapter trained with ``method.lora_targets=[...]`` (here MLP too) carries them: load() adapts those."""
    lm = tiny_model()
    method = get_method("ccm-concat", n_tok=2, lora_targets=("q_proj", "v_proj", "up_proj", "down_proj"))
    method.prepare(lm)
    randomize_lora(method)
    path = method.save_adapter(lm, tmp_path / "mlp.safetensors")
    session = ccmem.load(tiny_model(), method="ccm-concat", n_tok=2, adapter=path, system_prompt=None)
    loaded = session.method.adapter_state()  # type: ignore[attr-defined]
    assert loaded.keys() == method.adapter_state().keys()
    assert any(".mlp.down_proj." in k for k in loaded)
    for key, value in method.adapter_state().items():
        torch.testing.assert_close(loaded[key], value)


def test_load_with_adapter_marks_session_trained(tmp_path):
    lm = tiny_model()
    method = get_method("ccm-merge", n_tok=2)
    method.prepare(lm)
    path = method.save_adapter(lm, tmp_path / "m.safetensors")
    method.release(lm)
    session = ccmem.load(lm, method="ccm-merge", n_tok=2, adapter=path, system_prompt=None)
    assert session.adapter_trained
    untrained = ccmem.load(tiny_model(), method="ccm-merge", n_tok=2, system_prompt=None)
    assert not untrained.adapter_trained


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: get_method("ccm-foo"), UnknownMethodError, "valid methods: full, none, ccm-concat"),
        (lambda: get_method("ccm-concat", n_tok=0), ValueError, "n_tok must be at least 1"),
        (lambda: get_method("ccm-concat", ntok=2), ValueError, "its options are: n_tok"),
        (lambda: ccmem.load("no-such-model"), ValueError, "Built-in models: smollm2-135m"),
        (
            lambda: ccmem.load(tiny_model(), method="full", adapter="x.safetensors"),
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
    session = CompressedLM(tiny_model(), get_method("ccm-concat", n_tok=2), system_prompt="sys", max_chunk_tokens=50)
    session.add([{"role": "user", "content": "hello"}])
    before_memory, before_history = session.memory, list(session.history)
    with pytest.raises(ContextTooLongError):
        session.add([{"role": "user", "content": "x" * 400}])  # 8 chunks: the last ones pass the limit
    assert session.memory is before_memory
    assert session.history == before_history


def test_none_takes_any_length_of_context():
    session = CompressedLM(tiny_model(), get_method("none"), system_prompt=None)
    session.add_ids(list(range(3, 90)) * 4)  # longer than the model's 256 positions: dropped anyway
    assert session.memory.num_slots == 0


def test_long_input_is_chunked_for_ccm():
    session = CompressedLM(tiny_model(), get_method("ccm-concat", n_tok=2), system_prompt=None, max_chunk_tokens=10)
    session.add_ids(list(range(3, 28)))  # 25 tokens -> 3 chunks
    assert session.memory.steps == 3
    assert session.memory.num_slots == 6


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
