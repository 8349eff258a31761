"""The GSM8K fork's model shortcuts resolve to hub ids (or a local copy), and --attn reaches the model.

No test touches the network: the hub is switched off and its loaders are replaced where a test needs them.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import ccmem
from ccmem import loading
from ccmem.api import check_attention
from ccmem.loading import ATTN_HELP, HUB_SHORTCUTS, AttentionError, ModelNotFoundError, load_model
from ccmem.registry import get_method
from tests.conftest import tiny_model
from tests.unit.test_cli import run_cli

FORK_MODELS = {
    "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-2-7b-chat": "meta-llama/Llama-2-7b-chat-hf",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-7b": "huggyllama/llama-7b",
    "llama-13b": "huggyllama/llama-13b",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "mistral-7b-inst": "mistralai/Mistral-7B-Instruct-v0.2",
}


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """Never wait on the network, and no shortcut folder unless a test sets one."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("CCMEM_MODEL_DIR", raising=False)


def fake_hub(monkeypatch, folder, asked: list[str]) -> None:
    """The hub's loaders answer every id with ``folder`` (a tiny model) and record the ids asked for."""
    real_tokenizer, real_model = AutoTokenizer.from_pretrained, AutoModelForCausalLM.from_pretrained

    def tokenizer(name, **kwargs):
        asked.append(str(name))
        return real_tokenizer(folder)

    def model(name, **kwargs):
        kwargs.pop("local_files_only", None)
        return real_model(folder, **kwargs)

    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", tokenizer)
    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", model)


def hub_down(monkeypatch) -> None:
    def fail(name, **kwargs):
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {name}")

    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", fail)
    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", fail)


def no_flash(monkeypatch, *, package: bool = False, gpu: bool = False) -> None:
    monkeypatch.setattr(loading, "_has_flash_attn", lambda: package)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)


# ---------------------------------------------------------------------------- shortcuts


def test_every_fork_model_is_a_shortcut_for_its_usual_hub_id():
    assert {name: s.hub_id for name, s in HUB_SHORTCUTS.items()} == FORK_MODELS


def test_a_shortcut_loads_its_hub_id_and_keeps_its_short_name(monkeypatch, tiny_model_dir):
    asked: list[str] = []
    fake_hub(monkeypatch, tiny_model_dir, asked)
    lm = load_model("mistral-7b-inst")
    assert asked == ["mistralai/Mistral-7B-Instruct-v0.2"]
    assert lm.name == "mistral-7b-inst"


def test_offline_a_shortcut_says_how_to_point_at_a_local_folder(monkeypatch):
    hub_down(monkeypatch)
    with pytest.raises(ModelNotFoundError) as err:
        load_model("llama-3.1-8b-instruct")
    message = str(err.value)
    assert "meta-llama/Llama-3.1-8B-Instruct" in message
    assert "--model DIR/Llama-3.1-8B-Instruct" in message
    assert "CCMEM_MODEL_DIR=DIR" in message
    assert "gated" in message  # the meta-llama repos need a licence and a login


def test_offline_a_shortcut_not_under_the_model_dir_says_where_it_looked(monkeypatch, tmp_path):
    """With $CCMEM_MODEL_DIR set, a shortcut whose folder is not there was told only to set it."""
    (tmp_path / "Mistral-7B").mkdir()  # a near miss: not the shortcut's name nor the repo's
    monkeypatch.setenv("CCMEM_MODEL_DIR", str(tmp_path))
    hub_down(monkeypatch)
    with pytest.raises(ModelNotFoundError) as err:
        load_model("mistral-7b")
    assert f"$CCMEM_MODEL_DIR is {tmp_path}, which holds no mistral-7b/ or Mistral-7B-v0.1/ folder" in str(err.value)


@pytest.mark.parametrize(
    ("name", "folder"),
    [("llama-7b", "llama-7b"), ("mistral-7b", "Mistral-7B-v0.1")],  # the shortcut's name, or the repo's own
)
def test_a_shortcut_finds_its_copy_under_the_model_dir_without_the_hub(
    monkeypatch, tmp_path, tiny_model_dir, name, folder
):
    (tmp_path / folder).symlink_to(tiny_model_dir, target_is_directory=True)
    monkeypatch.setenv("CCMEM_MODEL_DIR", str(tmp_path))
    assert loading.shortcut_folder(name) == tmp_path / folder
    assert loading.shortcut_folder("mistral-7b-inst") is None
    monkeypatch.setattr(loading, "_from_hub", lambda *a, **k: pytest.fail("the hub was asked"))
    lm = load_model(name)
    assert lm.name == name and lm.model.config.model_type == "llama"


def test_an_unreachable_hub_reads_only_the_local_cache_and_says_so(monkeypatch):
    """Without a network, huggingface_hub retries each file five times (~50 s per model): ccmem asks the local cache
    only, and its message says that the hub could not be reached."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(loading, "hub_offline", lambda: False)
    monkeypatch.setattr(loading, "hub_reachable", lambda: False)
    flags: list[bool] = []

    def cache_only(name, **kwargs):
        flags.append(kwargs.get("local_files_only", False))
        raise OSError(f"{name} is not in the cache")

    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", cache_only)
    with pytest.raises(ModelNotFoundError, match="cannot be reached and it is not in the local cache"):
        load_model("someone/some-model")
    assert flags == [True]


def test_hub_reachable_tries_a_connection_unless_a_proxy_is_set(monkeypatch):
    import socket

    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    tried: list[tuple] = []

    def refuse(address, timeout=None):
        tried.append(address)
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", refuse)
    assert loading.hub_reachable() is False
    assert tried == [("huggingface.co", 443)]
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # the proxy reaches the hub, not this machine
    assert loading.hub_reachable() is True
    assert len(tried) == 1


def test_an_unknown_name_lists_the_shortcuts():
    with pytest.raises(ModelNotFoundError, match=r"hub shortcuts: llama-3\.1-8b-instruct"):
        load_model("llama-4")


def test_models_command_lists_shortcuts_as_hub_downloads(monkeypatch, capsys):
    from ccmem import cli

    monkeypatch.setattr(cli.console, "width", 200)
    code, text = run_cli(monkeypatch, capsys, "models")
    assert code == 0
    assert "need a download" in text and "CCMEM_MODEL_DIR" in text
    for name, hub_id in FORK_MODELS.items():
        assert name in text and hub_id in text


# ---------------------------------------------------------------------------- --attn


def test_attn_reaches_the_model_through_ccmem_load(tiny_model_dir):
    session = ccmem.load(str(tiny_model_dir), method="full", system_prompt=None, attn_implementation="eager")
    assert session.lm.model.config._attn_implementation == "eager"


def spy_loads(monkeypatch) -> list[str]:
    """Record the attn_implementation of every model ccmem loads."""
    seen: list[str] = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        seen.append(model.config._attn_implementation)
        return model

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", spy)
    return seen


def test_attn_option_reaches_a_session_command(monkeypatch, capsys, tmp_path, tiny_model_dir):
    seen = spy_loads(monkeypatch)
    text = tmp_path / "notes.txt"
    text.write_text("w1 w2 w3 w4 w5")
    code, out = run_cli(
        monkeypatch, capsys, "compress", str(text), "-o", str(tmp_path / "m.safetensors"),
        "--model", str(tiny_model_dir), "--method", "ccm-concat", "--n-tok", "2", "--system", "", "--attn", "eager",
    )  # fmt: skip
    assert code == 0, out
    assert seen == ["eager"]


def test_attn_option_reaches_a_harness_command(monkeypatch, capsys, tmp_path, tiny_model_dir):
    seen = spy_loads(monkeypatch)
    code, out = run_cli(
        monkeypatch, capsys, "eval", "persona", "--n", "1", "--model", str(tiny_model_dir), "--methods", "full",
        "--system", "", "--attn", "eager", "-o", str(tmp_path / "rows.jsonl"),
    )  # fmt: skip
    assert code == 0, out
    assert seen == ["eager"]


def attn_help(command: list[str]) -> str:
    """The help of ``ccmem COMMAND``'s ``--attn`` option, as typer built it."""
    import typer.main

    from ccmem.cli import app

    found = typer.main.get_command(app)
    for name in command:
        found = found.commands[name]
    return next(p for p in found.params if "--attn" in p.opts).help


@pytest.mark.parametrize(
    "command",
    [
        ["demo"], ["chat"], ["serve"], ["compress"], ["ask"], ["generate"], ["eval"], ["compare"], ["stream"],
        ["train"], ["repro", "sentinel", "ppl"], ["repro", "sentinel", "generate"], ["repro", "gsm8k"],
    ],
)  # fmt: skip
def test_every_command_that_loads_a_model_takes_attn(monkeypatch, capsys, command):
    code, text = run_cli(monkeypatch, capsys, *command, "--help")
    assert code == 0
    assert "--attn" in text
    if command[:2] != ["repro", "sentinel"]:  # sentinel, local and scattered refuse flash: their help says so
        assert attn_help(command).startswith(ATTN_HELP)  # the same choices and words everywhere


def test_train_attn_option_sets_the_config_and_loads_with_it(monkeypatch, capsys, tmp_path):
    from ccmem.train import trainer

    run = ["train", "persona-ccm-concat", f"output_dir={tmp_path}", "run_id=attn"]
    code, text = run_cli(monkeypatch, capsys, *run, "--attn", "eager", "--show-config")
    assert code == 0 and "attn: eager" in text
    code, text = run_cli(monkeypatch, capsys, *run, "--show-config")
    assert code == 0 and "attn: sdpa" in text  # without --attn: the preset's kernel
    code, text = run_cli(monkeypatch, capsys, *run, "attn=eager", "--attn", "eager", "--show-config")
    assert code == 0 and "attn: eager" in text  # the same kernel twice is no conflict
    asked = {}

    def stop(spec, **kwargs):
        asked.update(kwargs)
        raise RuntimeError("stop before training")

    monkeypatch.setattr(trainer, "load_model", stop)
    code, text = run_cli(monkeypatch, capsys, *run, "--attn", "eager")
    assert code == 2 and "stop before training" in text
    assert asked["attn_implementation"] == "eager"


def test_train_refuses_an_attn_override_that_disagrees_with_the_attn_option(monkeypatch, capsys, tmp_path):
    code, text = run_cli(
        monkeypatch, capsys, "train", "persona-ccm-concat", f"output_dir={tmp_path}", "attn=sdpa", "--attn", "eager",
        "--show-config",
    )  # fmt: skip
    assert code == 2
    assert "--attn eager and the override 'attn=sdpa' disagree" in " ".join(text.replace("│", " ").split())


def test_train_takes_attn_as_a_config_key_and_loads_with_it(monkeypatch, tmp_path):
    from ccmem.train import trainer
    from ccmem.train.config import ConfigError, load_config

    config = load_config("persona-ccm-concat", ["attn=eager", f"output_dir={tmp_path}", "run_id=attn"])
    assert config.attn == "eager"
    with pytest.raises(ConfigError, match="attn must be one of sdpa, eager, flash_attention_2"):
        load_config("persona-ccm-concat", ["attn=flash"])
    asked = {}

    def stop(spec, **kwargs):
        asked.update(kwargs)
        raise RuntimeError("stop before training")

    monkeypatch.setattr(trainer, "load_model", stop)
    with pytest.raises(RuntimeError, match="stop before training"):
        trainer.train(config)
    assert asked["attn_implementation"] == "eager"


def test_default_attn_keeps_an_older_run_hash(tmp_path):
    from ccmem.train.config import load_config

    overrides = [f"output_dir={tmp_path}", "run_id=attn"]
    assert (
        load_config("persona-ccm-concat", overrides).fingerprint()
        == load_config("persona-ccm-concat", [*overrides, "attn=sdpa"]).fingerprint()
    )
    assert (
        load_config("persona-ccm-concat", [*overrides, "attn=eager"]).fingerprint()
        != load_config("persona-ccm-concat", overrides).fingerprint()
    )


def test_repro_passes_attn_to_the_model(monkeypatch, capsys, tmp_path):
    asked = {}

    def stop(spec, **kwargs):
        asked.update(kwargs)
        raise RuntimeError("stop before loading")

    monkeypatch.setattr(loading, "load_model", stop)
    code, text = run_cli(monkeypatch, capsys, "repro", "sentinel", "ppl", "--attn", "eager", "-o", str(tmp_path))
    assert code == 2 and "stop before loading" in text
    assert asked["attn_implementation"] == "eager"


def test_a_bad_attn_value_is_refused_by_the_cli(monkeypatch, capsys, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("w1 w2")
    code, out = run_cli(monkeypatch, capsys, "compress", str(text), "-o", str(tmp_path / "m"), "--attn", "flash")
    assert code == 2
    assert "--attn" in out and "flash_attention_2" in out


def test_an_unknown_attn_is_refused_by_load_model():
    with pytest.raises(AttentionError, match="use one of sdpa, eager, flash_attention_2"):
        load_model("smollm2-135m", attn_implementation="flash")


# ---------------------------------------------------------------------------- flash_attention_2


@pytest.mark.parametrize(
    ("package", "gpu", "missing"),
    [(False, False, "flash_attn package.*and a CUDA GPU"), (False, True, "flash_attn package"), (True, False, "CUDA")],
)
def test_flash_attention_without_its_package_or_a_gpu_names_what_is_missing(
    monkeypatch, tiny_model_dir, package, gpu, missing
):
    no_flash(monkeypatch, package=package, gpu=gpu)
    with pytest.raises(AttentionError, match=missing) as err:
        load_model(str(tiny_model_dir), attn_implementation="flash_attention_2")
    assert "--attn sdpa" in str(err.value)
    if package != gpu:
        assert ("flash_attn" in str(err.value)) != package and ("CUDA GPU (torch" in str(err.value)) != gpu


def test_flash_attention_from_the_cli_is_one_clear_line(monkeypatch, capsys, tmp_path, tiny_model_dir):
    no_flash(monkeypatch)
    text = tmp_path / "notes.txt"
    text.write_text("w1 w2")
    code, out = run_cli(
        monkeypatch, capsys, "compress", str(text), "-o", str(tmp_path / "m.safetensors"),
        "--model", str(tiny_model_dir), "--method", "full", "--attn", "flash_attention_2",
    )  # fmt: skip
    assert code == 2
    assert "flash_attention_2 needs the flash_attn package" in out and "Traceback" not in out


def test_flash_attention_refuses_the_cpu_and_float32(monkeypatch, tiny_model_dir):
    no_flash(monkeypatch, package=True, gpu=True)  # both present: the device and dtype still have to fit
    with pytest.raises(AttentionError, match="runs on a CUDA GPU, not on cpu"):
        load_model(str(tiny_model_dir), attn_implementation="flash_attention_2", device="cpu")
    with pytest.raises(AttentionError, match="bfloat16 or float16"):
        load_model(str(tiny_model_dir), attn_implementation="flash_attention_2", dtype=torch.float32)


@pytest.mark.parametrize("method", ["ccm-concat", "gist", "sentinel", "snapkv"])
def test_methods_that_mask_or_read_attention_refuse_flash_attention_up_front(method):
    lm = tiny_model()
    lm.model.config._attn_implementation = "flash_attention_2"  # as loaded with it (no kernel runs here)
    with pytest.raises(AttentionError, match=f"method '{method}' cannot run on flash_attention_2.*--attn sdpa"):
        check_attention(lm, get_method(method))
    with pytest.raises(AttentionError, match="cannot run on flash_attention_2"):
        ccmem.load(lm, method, system_prompt=None)


@pytest.mark.parametrize("method", ["full", "none", "knorm", "streaming-llm"])
def test_methods_that_read_plainly_accept_flash_attention(method):
    lm = tiny_model()
    lm.model.config._attn_implementation = "flash_attention_2"
    check_attention(lm, get_method(method))  # no error
    assert lm.model.config._attn_implementation == "flash_attention_2"
