"""One contract, every registered method: a new method is tested the day it is added."""

from __future__ import annotations

import pytest
import torch

from ccmem.api import CompressedLM
from ccmem.memory import Memory, MemoryMismatchError
from ccmem.registry import METHODS, get_method
from tests.conftest import tiny_model

CONTEXT = [[10, 11, 12, 13, 14], [20, 21, 22, 23], [30, 31, 32]]


def session(name: str, **options) -> CompressedLM:
    lm = tiny_model()
    return CompressedLM(lm, get_method(name, **options), system_prompt="sys")


@pytest.mark.parametrize("name", list(METHODS))
def test_method_contract(name, tmp_path):
    lm = session(name)
    sink = lm.memory.num_slots
    assert sink == len("sys\n") + len("System: ")  # the system prompt is the attention sink
    slots = []
    for chunk in CONTEXT:
        lm.add_ids(chunk)
        slots.append(lm.memory.num_slots)
    assert lm.memory.nbytes == sum(k.numel() * 4 + v.numel() * 4 for k, v in lm.memory.layers)
    answer = list(lm.stream_ids([40, 41], max_new_tokens=4, stop_ids=set()))
    assert len(answer) == 4
    # generating does not change memory
    assert lm.memory.num_slots == slots[-1]

    path = lm.save_memory(tmp_path / "mem.safetensors")
    again = list(lm.stream_ids([40, 41], max_new_tokens=4, stop_ids=set()))
    lm.reset()
    lm.load_memory(path)
    assert list(lm.stream_ids([40, 41], max_new_tokens=4, stop_ids=set())) == again == answer


def test_slot_growth_per_method():
    n_tok = 3
    growth = {}
    for name in METHODS:
        lm = session(name, **({"n_tok": n_tok} if name.startswith(("ccm", "gist")) else {}))
        start = lm.memory.num_slots
        counts = []
        for chunk in CONTEXT:
            lm.add_ids(chunk)
            counts.append(lm.memory.num_slots - start)
        growth[name] = counts
    assert growth["full"] == [5, 9, 12]
    assert growth["none"] == [0, 0, 0]
    assert growth["ccm-concat"] == [3, 6, 9]
    assert growth["ccm-merge"] == [3, 3, 3]  # constant as turns grow
    assert growth["gist"] == [3, 3, 3]


def test_merge_memory_is_running_average_of_independent_compressions():
    """Non-recurrent merge = slot-wise mean of what non-recurrent concat stores per step."""
    lm = tiny_model()
    concat = get_method("ccm-concat", n_tok=2, recurrent=False)
    concat.prepare(lm)
    mem_c = concat.new_memory(lm)
    for chunk in CONTEXT:
        mem_c = concat.add(lm, mem_c, torch.tensor([chunk]))
    concat.release(lm)
    merge = get_method("ccm-merge", n_tok=2, recurrent=False)
    merge.prepare(lm)
    merge.comp_embeddings.weight.data.copy_(concat.comp_embeddings.weight.data) if concat.comp_embeddings else None
    mem_m = merge.new_memory(lm)
    for chunk in CONTEXT:
        mem_m = merge.add(lm, mem_m, torch.tensor([chunk]))
    for (kc, vc), (km, vm) in zip(mem_c.layers, mem_m.layers, strict=True):
        torch.testing.assert_close(km, kc.reshape(1, kc.shape[1], 3, 2, -1).mean(2), atol=1e-5, rtol=0)
        torch.testing.assert_close(vm, vc.reshape(1, vc.shape[1], 3, 2, -1).mean(2), atol=1e-5, rtol=0)


def test_memory_from_other_method_or_model_is_refused(tmp_path):
    lm = session("ccm-concat")
    lm.add_ids(CONTEXT[0])
    path = lm.save_memory(tmp_path / "m.safetensors")
    other = session("ccm-merge")
    with pytest.raises(MemoryMismatchError, match="method='ccm-concat'"):
        other.load_memory(path)
    other_model = CompressedLM(tiny_model("qwen2"), get_method("ccm-concat"), system_prompt="sys")
    with pytest.raises(MemoryMismatchError, match="model="):
        other_model.load_memory(path)


def test_memory_save_is_atomic_and_roundtrips(tmp_path):
    k = torch.randn(1, 2, 3, 4)
    mem = Memory(layers=[(k, k + 1)], next_position=7, steps=2, sink=1, meta={"method": "x"})
    path = mem.save(tmp_path / "deep" / "m.safetensors")
    assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]  # no temporary left behind
    back = Memory.load(path, expect={"method": "x"})
    assert (back.next_position, back.steps, back.sink, back.num_slots) == (7, 2, 1, 3)
    torch.testing.assert_close(back.layers[0][1], k + 1)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(MemoryMismatchError, match="not a readable"):
        Memory.load(tmp_path / "junk.safetensors")


def test_memory_works_as_a_transformers_cache_in_generate():
    lm = session("ccm-concat")
    for chunk in CONTEXT:
        lm.add_ids(chunk)
    ours = list(lm.stream_ids([40, 41], max_new_tokens=5, stop_ids=set()))
    out = lm.lm.model.generate(
        **lm.memory.generate_inputs(torch.tensor([40, 41])),
        max_new_tokens=5,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert out[0, -5:].tolist() == ours
