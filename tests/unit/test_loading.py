"""Model specs resolve offline, and everything else fails with a message that says what to do."""

from __future__ import annotations

import pytest

from ccmem.loading import ModelNotFoundError, load_model


def test_unknown_name_lists_builtins():
    with pytest.raises(ModelNotFoundError, match="Built-in models: smollm2-135m"):
        load_model("smollm-9000")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"has no config\.json"):
        load_model(str(tmp_path))


def test_missing_gguf(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"no GGUF file"):
        load_model(str(tmp_path / "x.gguf"))


def test_hub_id_offline_says_how_to_use_a_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="pass its local folder"):
        load_model("no-such-org/no-such-model")


def test_local_folder_loads_and_runs(tiny_model_dir):
    import ccmem

    session = ccmem.load(str(tiny_model_dir), method="ccm-merge", n_tok=2, system_prompt=None)
    session.add("w1 w2 w3 w4")
    assert session.memory.num_slots == 2
    assert isinstance(session.generate("w5 w6", max_new_tokens=3), str)


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    from ccmem.loading import cache_dir

    monkeypatch.setenv("CCMEM_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"


def test_session_memory_carries_no_autograd_graph():
    from ccmem.api import CompressedLM
    from ccmem.registry import get_method
    from tests.conftest import tiny_model

    session = CompressedLM(tiny_model(), get_method("ccm-merge", n_tok=2), system_prompt="sys")
    session.add_ids([5, 6, 7])
    assert all(not k.requires_grad and not v.requires_grad for k, v in session.memory.layers)
