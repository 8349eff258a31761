"""A finetune of a model (or the model with a LoRA merged in) keeps its architecture and embeddings, which is all
the fingerprint reads: its memories, sessions and adapters passed as the base model's. The weights digest tells
them apart, and files written before it was recorded still load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ccmem
from ccmem.adapter import AdapterMismatchError, read_adapter, save_adapter
from ccmem.loading import LoadedModel, weights_digest
from ccmem.memory import MemoryMismatchError, weights_differ
from ccmem.serve.sessions import SessionMismatchError, SessionStore
from tests.conftest import randomize_lora, tiny_model


def finetune_of(base: LoadedModel) -> LoadedModel:
    """``base``'s weights with a small low-rank change merged into every query projection (what a merged LoRA
    finetune is), under another name; the embeddings stay."""
    other = tiny_model("llama-gqa")
    other.model.load_state_dict(base.model.state_dict())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, module in other.model.base_model.named_modules():
            if name.endswith("q_proj"):
                b = torch.randn(module.weight.shape[0], 2, generator=generator) * 0.01
                a = torch.randn(2, module.weight.shape[1], generator=generator) * 0.01
                module.weight += b @ a
    return LoadedModel(model=other.model, tokenizer=other.tokenizer, name="tiny-finetune")


def rewrite_without_digest(path) -> None:
    """Drop the weights digest from an adapter's or a memory's metadata (a memory keeps its identity as JSON under
    ``meta``), as a file written by an older ccmem lacks it."""
    with safe_open(str(path), "pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "meta" in header:  # nor its content digest (which covers the header)
        header["meta"] = json.dumps({k: v for k, v in json.loads(header["meta"]).items() if k != "weights"})
        del header["digest"]
    else:
        del header["weights"]
    save_file(tensors, str(path), metadata=header)


def test_a_finetune_shares_the_fingerprint_but_not_the_weights_digest():
    base = tiny_model("llama-gqa")
    tuned = finetune_of(base)
    assert tuned.fingerprint == base.fingerprint  # what let its files pass as the base's
    assert tuned.weights_digest != base.weights_digest
    assert base.weights_digest == weights_digest(tiny_model("llama-gqa").model.base_model)  # the same weights again
    assert base.weights_digest.startswith("float32:")


def test_digests_compare_only_at_one_precision_and_an_unrecorded_one_passes():
    assert weights_differ("float32:aaaa", "float32:bbbb")
    assert not weights_differ("float32:aaaa", "float32:aaaa")
    assert not weights_differ("bfloat16:aaaa", "float32:bbbb")  # rounded weights: another precision, not a finetune
    assert not weights_differ("", "float32:bbbb") and not weights_differ("float32:aaaa", "")
    half = tiny_model("llama-gqa")
    half.model.to(torch.bfloat16)
    assert weights_digest(half.model.base_model).startswith("bfloat16:")


def test_a_memory_made_by_the_base_is_refused_by_its_finetune_and_an_older_file_still_loads(tmp_path):
    base = tiny_model("llama-gqa")
    session = ccmem.load(base, "ccm-concat", n_tok=2, system_prompt=None)
    session.add_ids([5, 6, 7, 8])
    path = session.save_memory(tmp_path / "m.safetensors")
    tuned = ccmem.load(finetune_of(base), "ccm-concat", n_tok=2, system_prompt=None)
    with pytest.raises(MemoryMismatchError, match=r"made by other weights \('tiny-llama-gqa' as it named it\)"):
        tuned.load_memory(path)
    ccmem.load(base, "ccm-concat", n_tok=2, system_prompt=None).load_memory(path)  # its own model reads it
    rewrite_without_digest(path)  # written before ccmem recorded the digest: read as before
    tuned.load_memory(path)


def test_an_adapter_trained_on_the_base_is_refused_by_its_finetune_and_an_older_one_loads(tmp_path):
    base = tiny_model("llama-gqa")
    method = ccmem.get_method("ccm-concat", n_tok=2)
    randomize_lora(method, base)
    path = save_adapter(method, base, tmp_path / "a.safetensors")
    assert read_adapter(path).weights == base.weights_digest
    tuned = finetune_of(base)
    with pytest.raises(AdapterMismatchError, match=r"trained on other weights \('tiny-llama-gqa' as it names"):
        ccmem.load(tuned, "ccm-concat", adapter=path, system_prompt=None)
    rewrite_without_digest(path)
    ccmem.load(tuned, "ccm-concat", adapter=path, system_prompt=None)  # nothing recorded: as before


def test_a_session_made_by_the_base_is_refused_by_its_finetune_and_an_older_record_opens(tmp_path):
    base = tiny_model("llama-gqa")
    store = SessionStore(tmp_path)
    first = ccmem.load(base, "ccm-concat", n_tok=2, system_prompt=None)
    store.open("talk", first)
    first.remember("my dog is rex", "nice")
    store.commit("talk", first)
    tuned = ccmem.load(finetune_of(base), "ccm-concat", n_tok=2, system_prompt=None)
    with pytest.raises(SessionMismatchError, match="made with weights="):
        store.open("talk", tuned)
    db = store._db  # a session stored before ccmem recorded the digest
    (identity,) = db.execute("SELECT identity FROM sessions WHERE name = 'talk'").fetchone()
    older = {k: v for k, v in json.loads(identity).items() if k != "weights"}
    db.execute("UPDATE sessions SET identity = ? WHERE name = 'talk'", (json.dumps(older, sort_keys=True),))
    store.close()
    SessionStore(tmp_path).open("talk", ccmem.load(base, "ccm-concat", n_tok=2, system_prompt=None))
