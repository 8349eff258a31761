"""float16 weights (``quantize="float16"``): the model answers as with its float32 weights, ccmem's LoRA still acts
on the packed layers, and what needs the float32 layers (training, a stage-1 merge) or another machine (a GPU, half
precision) is refused with a message that says what to do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ccmem
from ccmem.loading import load_model
from ccmem.quantize import QuantizeError, check_quantize, dynamic_linear_type, quantize_weights
from ccmem.stage1 import Stage1Error
from tests.conftest import randomize_lora, tiny_model

TURNS = [(f"fact {i} is w{i}", "ok") for i in range(3)]


def _packed_layers(lm) -> int:
    return sum(isinstance(m, dynamic_linear_type()) for m in lm.model.modules())


def _float_layers(lm) -> int:
    return sum(isinstance(m, nn.Linear) for m in lm.model.modules())


def _memory_after_turns(session) -> torch.Tensor:
    for user, answer in TURNS:
        session.remember(user, answer)
    return torch.cat([k.flatten() for k, _ in session.memory.layers])


def test_packed_layers_replace_every_linear_and_keep_logits_close():
    lm = tiny_model()
    ids = torch.tensor([[5, 9, 14, 3, 22, 7]])
    with torch.no_grad():
        before = lm.model(input_ids=ids).logits
    linear = _float_layers(lm)
    quantize_weights(lm, "float16")
    with torch.no_grad():
        after = lm.model(input_ids=ids).logits
    assert lm.quantized == "float16"
    assert _float_layers(lm) == 0 and _packed_layers(lm) == linear
    assert lm.model.dtype == torch.float32  # embeddings, norms and the cache stay float
    assert (after - before).abs().max() < 1e-3 * before.abs().max()  # only the weights are rounded, to 11 bits
    assert not torch.equal(after, before)  # they are: the layers compute from float16 weights
    assert torch.equal(after.argmax(-1), before.argmax(-1))
    quantize_weights(lm, "float16")  # again: nothing to do
    assert _packed_layers(lm) == linear


def test_compression_lora_acts_on_packed_layers():
    """A ccm-concat session on float16 weights builds its LoRA on the packed layers and gates it as on float ones:
    its memory is close to the float model's, and far from the one it makes with the LoRA at zero."""
    float_lm = tiny_model()
    session = ccmem.load(float_lm, "ccm-concat", n_tok=2, system_prompt="Hi.")
    randomize_lora(session.method, float_lm, scale=0.5)
    want = _memory_after_turns(session)

    lm = tiny_model()
    quantize_weights(lm, "float16")
    quantized = ccmem.load(lm, "ccm-concat", n_tok=2, system_prompt="Hi.")  # its LoRA built on packed layers
    randomize_lora(quantized.method, lm, scale=0.5)
    got = _memory_after_turns(quantized)
    for pair in quantized.method.module_for(lm).lora.pairs.values():
        nn.init.zeros_(pair.B)
    without_lora = _memory_after_turns(ccmem.load(lm, "ccm-concat", n_tok=2, system_prompt="Hi.").fork())

    assert got.shape == want.shape
    assert (got - want).norm() < 0.01 * (without_lora - want).norm()
    answer = quantized.generate("which fact?", max_new_tokens=4)
    assert isinstance(answer, str)


def test_ccmem_load_quantizes_a_model_it_loads(tiny_model_dir):
    session = ccmem.load(str(tiny_model_dir), "full", system_prompt=None, quantize="float16")
    assert session.lm.quantized == "float16" and _packed_layers(session.lm) > 0
    session.remember("w1 w2 w3", "w4")
    assert session.generate("w5", max_new_tokens=3) is not None


def test_a_loaded_model_is_not_quantized_behind_other_sessions():
    lm = tiny_model()
    with pytest.raises(QuantizeError, match=r"loaded already with its float32 weights.*quantize_weights"):
        ccmem.load(lm, "full", system_prompt=None, quantize="float16")
    assert lm.quantized is None and _packed_layers(lm) == 0
    quantize_weights(lm, "float16")
    assert ccmem.load(lm, "full", system_prompt=None, quantize="float16").lm is lm  # as loaded: shared


@pytest.mark.parametrize("value", ["int8", "int4", "fp8", 8])
def test_unknown_quantization_is_refused_naming_the_choices(value):
    with pytest.raises(QuantizeError, match=r"float16"):
        check_quantize(value)


@pytest.mark.parametrize("value", [None, "", "none", " None "])
def test_no_quantization_spelled_several_ways(value):
    assert check_quantize(value) is None


def test_half_precision_and_gpu_are_refused_before_the_weights_load(tiny_model_dir):
    with pytest.raises(QuantizeError, match=r"float32 weights.*bfloat16"):
        load_model(str(tiny_model_dir), dtype=torch.bfloat16, quantize="float16")
    with pytest.raises(QuantizeError, match=r"float32 weights"):
        ccmem.load(str(tiny_model_dir), "full", dtype=torch.bfloat16, quantize="float16")
    with pytest.raises(QuantizeError, match=r"for decoding on a CPU.*bfloat16"):
        load_model(str(tiny_model_dir), device="cuda", quantize="float16")


def test_a_lora_merge_into_packed_layers_is_refused(tmp_path):
    lm = tiny_model()
    full = ccmem.load(lm, "full", system_prompt=None)
    state = full.method.module_for(lm)
    with torch.no_grad():
        for pair in state.pairs.values():
            pair.B.normal_()
    quantize_weights(lm, "float16")
    with pytest.raises(QuantizeError, match=r"merge first, then quantize"):
        state.merge_into(lm.model.base_model)


def test_stage1_then_quantize_is_refused_the_other_way_round(monkeypatch):
    from ccmem import stage1 as stage1_module

    lm = tiny_model()
    quantize_weights(lm, "float16")
    monkeypatch.setattr(stage1_module, "read_stage1", lambda path: ("f", {}, None))
    monkeypatch.setattr(stage1_module, "stage1_hash", lambda file: "abc")
    with pytest.raises(Stage1Error, match=r"merge first, then quantize.*stage1=.*quantize='float16'"):
        stage1_module.merge_stage1(lm, "run")


def test_training_on_packed_layers_is_refused(tmp_path):
    from ccmem.train.config import ConfigError, load_config
    from ccmem.train.trainer import train

    lm = tiny_model()
    quantize_weights(lm, "float16")
    config = load_config("persona-ccm-concat", [f"output_dir={tmp_path}", "run_id=q", "train.max_steps=1"])
    with pytest.raises(ConfigError, match=r"training needs the model's float32 linear layers.*packed \(float16"):
        train(config, lm=lm)


# ---------------------------------------------------------------------------- --quantize on the commands


def spy_quantized(monkeypatch) -> list[str]:
    """Record the scheme of every model ccmem quantizes (through ccmem.load or eval)."""
    from ccmem import loading, quantize, stage1

    seen: list[str] = []
    real = quantize.quantize_weights

    def spy(lm, scheme):
        real(lm, scheme)
        seen.append(lm.quantized)

    monkeypatch.setattr(stage1, "quantize_weights", spy)
    monkeypatch.setattr(quantize, "quantize_weights", spy)
    monkeypatch.setattr(loading, "quantize_weights", spy)
    return seen


def test_quantize_option_reaches_a_session_command(monkeypatch, capsys, tmp_path, tiny_model_dir):
    from tests.unit.test_cli import run_cli

    seen = spy_quantized(monkeypatch)
    text = tmp_path / "notes.txt"
    text.write_text("w1 w2 w3 w4 w5")
    memory = tmp_path / "m.safetensors"
    common = ["--model", str(tiny_model_dir), "--method", "full", "--system", ""]
    code, out = run_cli(monkeypatch, capsys, "compress", str(text), "-o", str(memory), *common, "--quantize", "float16")
    assert code == 0, out
    assert seen == ["float16"]
    # a memory made on float16 weights is read by float32 ones as any other (the same layout and dtype)
    code, out = run_cli(monkeypatch, capsys, "ask", str(memory), "w1?", "--model", str(tiny_model_dir))
    assert code == 0, out
    assert seen == ["float16"]


def test_eval_rows_say_their_weights_were_float16(monkeypatch, capsys, tmp_path, tiny_model_dir):
    import json

    from tests.unit.test_cli import run_cli

    rows = tmp_path / "rows.jsonl"
    common = ["eval", "persona", "--n", "1", "--model", str(tiny_model_dir), "--methods", "full", "--system", ""]
    code, out = run_cli(monkeypatch, capsys, *common, "-o", str(rows))
    assert code == 0, out
    code, out = run_cli(monkeypatch, capsys, *common, "-o", str(rows), "--quantize", "float16")
    assert code == 0, out
    plain, packed = (json.loads(line) for line in rows.read_text().splitlines())
    assert "weights" not in plain["extra"] and packed["extra"]["weights"] == "float16"
    assert plain["config_hash"] != packed["config_hash"]  # a report does not pool them


@pytest.mark.parametrize("command", [["eval", "persona", "--methods", "full"], ["chat", "--method", "full"]])
def test_quantize_with_flash_attention_is_refused_before_loading(monkeypatch, capsys, tiny_model_dir, command):
    from tests.unit.test_cli import run_cli

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded before the refusal")

    monkeypatch.setattr("ccmem.loading._load", no_load)
    code, out = run_cli(
        monkeypatch, capsys, *command, "--model", str(tiny_model_dir), "--attn", "flash_attention_2",
        "--quantize", "float16",
    )  # fmt: skip
    assert code != 0 and "for decoding on a CPU" in out and "Traceback" not in out


def test_unknown_quantize_value_is_a_usage_error(monkeypatch, capsys):
    from tests.unit.test_cli import run_cli

    code, out = run_cli(monkeypatch, capsys, "chat", "--quantize", "int8")
    assert code == 2 and "'int8' is not one of 'float16'" in out


def test_a_machine_without_the_kernels_is_told_before_anything_changes(monkeypatch):
    from ccmem import quantize

    monkeypatch.setattr(quantize, "_kernels_run", lambda: False)
    lm = tiny_model()
    with pytest.raises(QuantizeError, match=r"needs PyTorch's fbgemm kernels.*drop quantize"):
        quantize_weights(lm, "float16")
    assert lm.quantized is None and _packed_layers(lm) == 0


def test_serve_says_its_weights_are_float16(monkeypatch, capsys, tmp_path, tiny_model_dir):
    import ccmem.serve.server as server
    from tests.unit.test_cli import run_cli

    served = []
    monkeypatch.setattr(server, "run", lambda engine, **kw: served.append(engine.base.lm.quantized) or engine.close())
    args = ["serve", "--model", str(tiny_model_dir), "--method", "full", "--store", str(tmp_path / "s")]
    code, out = run_cli(monkeypatch, capsys, *args, "--quantize", "float16")
    assert code == 0, out
    assert served == ["float16"] and "(float16 weights)" in " ".join(out.split())


def _method_names():
    from ccmem.registry import method_classes

    return sorted(method_classes())


@pytest.mark.parametrize("method", _method_names())
def test_every_method_runs_on_packed_layers_as_on_float_ones(method):
    """Each method's session on float16 weights remembers and answers, and its memory has the float32 model's shape
    (methods that read q/k/v, hook layers or capture attention all go through the packed layers)."""
    from ccmem.registry import method_class

    takes = {spec.name for spec in method_class(method).option_specs()}
    options = {"n_tok": 2} if "n_tok" in takes else {}
    shapes = []
    for packed in (False, True):
        model = tiny_model(positions=1024)
        if packed:
            quantize_weights(model, "float16")
        session = ccmem.load(model, method, system_prompt="Hi.", **options)
        for user, answer in TURNS:
            session.remember(user, answer)
        assert isinstance(session.generate("which fact?", max_new_tokens=3), str)
        shapes.append(session.memory.num_slots)
    assert shapes[0] == shapes[1]


def test_compare_with_float16_weights_measures_its_own_rows(monkeypatch, capsys, tmp_path, tiny_model_dir):
    """A compare rerun with --quantize reads no float32 row back (they decode at another speed), and a rerun with
    it reads its own back."""
    import json

    from tests.unit.test_cli import run_cli

    args = ["compare", "--model", str(tiny_model_dir), "--methods", "full,none", "--tasks", "icl", "--n", "2",
            "--no-decode", "--out-dir", str(tmp_path)]  # fmt: skip
    code, text = run_cli(monkeypatch, capsys, *args)
    assert code == 0, text
    code, text = run_cli(monkeypatch, capsys, *args, "--quantize", "float16")
    assert code == 0 and "read from rows.jsonl" not in text, text
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["extra"].get("weights") for r in rows] == [None, None, "float16", "float16"]
    assert len({r["config_hash"] for r in rows}) == 2
    code, text = run_cli(monkeypatch, capsys, *args, "--quantize", "float16")
    assert code == 0 and "read from rows.jsonl (2/2 cells)" in text, text


def test_stream_rows_say_their_weights(monkeypatch, capsys, tmp_path, tiny_model_dir):
    import json

    from tests.unit.test_cli import run_cli

    text = tmp_path / "book.txt"
    text.write_text(" ".join(f"w{i % 50}" for i in range(200)))
    args = ["stream", "--model", str(tiny_model_dir), "--text", str(text), "--max-positions", "48", "--contexts", "2",
            "--sink", "2", "--window", "8", "--block", "8", "--methods", "streaming-llm,window"]  # fmt: skip
    code, out = run_cli(monkeypatch, capsys, *args, "--out-dir", str(tmp_path / "a"))
    assert code == 0, out
    code, out = run_cli(monkeypatch, capsys, *args, "--out-dir", str(tmp_path / "b"), "--quantize", "float16")
    assert code == 0, out
    plain, packed = ([json.loads(x) for x in (tmp_path / d / "rows.jsonl").read_text().splitlines()] for d in "ab")
    assert {r["weights"] for r in plain} == {None} and {r["weights"] for r in packed} == {"float16"}
    assert plain[0]["config_hash"] != packed[0]["config_hash"]
    assert abs(plain[0]["perplexity"] - packed[0]["perplexity"]) < 1e-2 * plain[0]["perplexity"]


def test_demo_takes_quantize(monkeypatch, capsys, tiny_model_dir):
    from tests.unit.test_cli import run_cli

    seen = spy_quantized(monkeypatch)
    code, out = run_cli(monkeypatch, capsys, "demo", "--model", str(tiny_model_dir), "--methods", "full", "--quantize",
                        "float16", "--max-new-tokens", "2")  # fmt: skip
    assert code == 0, out
    assert seen == ["float16"]
