"""Memory storage precisions (float32, bfloat16, float16, int8 with per-channel scales): error bounds, sizes,
answers from a stored memory, old files, exact state, and damaged files refused with what is wrong."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ccmem
from ccmem.api import CompressedLM
from ccmem.data import icl
from ccmem.eval.harness import EvalSettings, evaluate
from ccmem.memory import CompactMemory, KVShape, Memory, MemoryMismatchError, positions_for
from ccmem.precision import pack_keys, pack_values, storage_name
from tests.conftest import tiny_model
from tests.methods.cases import CHUNKS

QUERY = [40, 41]


def random_memory(layers: int = 2, heads: int = 2, slots: int = 64, dim: int = 16, seed: int = 0) -> Memory:
    """Keys with two outlier channels (20x the others), values with one large slot, and exact-looking state."""
    generator = torch.Generator().manual_seed(seed)
    kv = []
    for _ in range(layers):
        k = torch.randn(1, heads, slots, dim, generator=generator)
        k[..., :2] *= 20
        v = torch.randn(1, heads, slots, dim, generator=generator)
        v[:, :, 0] *= 30
        kv.append((k, v))
    positions = [positions_for(0, slots, k) for k, _ in kv]
    state = {"merge_steps": torch.tensor(7), "attention_sum": torch.rand(1, heads, slots, generator=generator) * 1e-3}
    return Memory(layers=kv, positions=positions, next_position=slots, sink=3, meta={"method": "x"}, state=state)


def session(method: str = "ccm-concat", **options) -> CompressedLM:
    lm = CompressedLM(tiny_model(), ccmem.get_method(method, **options), system_prompt="sys")
    state = lm.method.module_for(lm.lm)
    if state is not None:  # a non-trivial "trained" state, so <COMP> slots carry the context
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in state.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    for chunk in CHUNKS:
        lm.add_ids(chunk)
    return lm


@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 0.0), ("float16", 1e-3), ("bfloat16", 8e-3)])
def test_float_storage_round_trips_within_the_dtype_precision(dtype, tolerance):
    memory = random_memory()
    back = memory.compact(dtype).expanded()
    assert back.dtype == torch.float32
    for (k, v), (k2, v2) in zip(memory.layers, back.layers, strict=True):
        for a, b in ((k, k2), (v, v2)):
            assert float(((a - b).abs() / a.abs().clamp_min(1e-3)).max()) <= tolerance


def test_int8_storage_is_within_half_a_scale_per_element_with_key_channel_and_value_slot_scales():
    memory = random_memory()
    compact = memory.compact("int8")
    back = compact.expanded()
    for (k, v), (pk, pv), (k2, v2) in zip(memory.layers, compact.layers, back.layers, strict=True):
        assert pk.data.dtype == torch.int8 and pk.scale is not None and pv.scale is not None
        assert tuple(pk.scale.shape) == (1, 2, 1, 16) and tuple(pv.scale.shape) == (1, 2, 64, 1)
        assert ((k - k2).abs() <= pk.scale / 2 + 1e-6).all()
        assert ((v - v2).abs() <= pv.scale / 2 + 1e-6).all()
        # a scale per key channel: the small channels keep their own resolution next to the outliers
        small = (k[..., 2:] - k2[..., 2:]).abs().max() / k[..., 2:].abs().max()
        assert float(small) < 0.01


def test_an_all_zero_channel_packs_to_zeros_not_nan():
    packed = pack_keys(torch.zeros(1, 1, 4, 8), "int8")
    assert torch.equal(packed.unpack(torch.float32), torch.zeros(1, 1, 4, 8))
    assert torch.equal(pack_values(torch.zeros(1, 1, 4, 8), "int8").unpack(torch.float32), torch.zeros(1, 1, 4, 8))


def test_held_bytes_and_file_sizes_shrink_by_the_expected_factor(tmp_path):
    memory = random_memory(slots=256, dim=64)
    kv = memory.nbytes
    expected = {
        "float32": kv,
        "bfloat16": kv // 2,
        "float16": kv // 2,
        # int8 data, plus float32 scales: per key channel (2 layers x 2 heads x 64) and per value slot (x 256)
        "int8": kv // 4 + 4 * 2 * 2 * (64 + 256),
    }
    sizes = {}
    for dtype, held in expected.items():
        compact = memory.compact(dtype)
        assert compact.nbytes == held
        sizes[dtype] = memory.save(tmp_path / f"{dtype}.safetensors", dtype=dtype).stat().st_size
    exact = sizes["float32"] - kv  # positions, state and the header, the same at every precision (within bytes)
    for dtype, held in expected.items():
        assert sizes[dtype] == pytest.approx(exact + held, abs=512)
    assert sizes["int8"] / sizes["float32"] < 0.3 and sizes["bfloat16"] / sizes["float32"] < 0.55


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int8"])
def test_state_and_positions_stay_exact_in_ram_and_in_files(dtype, tmp_path):
    memory = random_memory()
    for back in (memory.compact(dtype).expanded(), Memory.load(memory.save(tmp_path / "m.safetensors", dtype=dtype))):
        assert set(back.state) == set(memory.state)
        for name, t in memory.state.items():
            assert back.state[name].dtype == t.dtype and torch.equal(back.state[name], t)
        assert all(torch.equal(a, b) for a, b in zip(back.positions, memory.positions, strict=True))
        assert (back.next_position, back.sink, back.window, back.meta) == (64, 3, 0, {"method": "x"})


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "int8"])
def test_a_file_holds_exactly_the_compact_memory(dtype, tmp_path):
    memory = random_memory()
    compact = memory.compact(dtype)
    path = compact.save(tmp_path / "m.safetensors")
    for (k, v), (k2, v2) in zip(compact.expanded().layers, Memory.load(path).layers, strict=True):
        assert torch.equal(k, k2) and torch.equal(v, v2)
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
        assert f.get_tensor("layers.0.keys").dtype == {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            dtype, torch.int8
        )
    assert header["storage"] == dtype and header["computed_dtype"] == "float32"
    assert header["format_version"] == ("3" if dtype == "int8" else "2")  # float files stay readable by version 2


def test_a_loaded_memory_is_in_the_models_dtype_whatever_the_file_holds(tmp_path):
    memory = random_memory()
    path = memory.save(tmp_path / "m.safetensors", dtype="int8")
    for model_dtype in (torch.float32, torch.bfloat16):
        back = Memory.load(path, shape=KVShape(2, 2, 16, model_dtype))
        assert back.dtype == model_dtype
    assert Memory.load(memory.save(tmp_path / "h.safetensors", dtype="float16")).dtype == torch.float32
    assert Memory.load(path, dtype=torch.float16).dtype == torch.float16


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "int8"])
@pytest.mark.parametrize(
    ("method", "options"), [("full", {}), ("ccm-concat", {"n_tok": 3}), ("ccm-merge", {"n_tok": 3})]
)
def test_a_memory_saved_at_lower_precision_answers_like_float32(method, options, dtype, tmp_path):
    """The float32 greedy answer stays (nearly) as likely; random tiny models have near-ties, so the first token
    is pinned and the rest bounded by their log-likelihood (ccm-merge's 2nd token flips at a 5e-4 key error)."""
    lm = session(method, **options)
    answer = list(lm.stream_ids(QUERY, max_new_tokens=4, stop_ids=set()))
    options_ = [answer, [50, 51, 52], [60]]
    scores = lm.score_ids(QUERY, options_)
    lm.load_memory(lm.save_memory(tmp_path / "m.safetensors", dtype=dtype))
    assert lm.memory.dtype == torch.float32
    assert list(lm.stream_ids(QUERY, max_new_tokens=1, stop_ids=set())) == answer[:1]
    assert lm.score_ids(QUERY, options_) == pytest.approx(scores, abs=0.05)


def test_a_memory_file_of_the_previous_format_still_loads(tmp_path):
    """Version 2 files (no storage record) hold keys/values as computed; they load as before."""
    memory = random_memory()
    tensors = {}
    for i, ((k, v), pos) in enumerate(zip(memory.layers, memory.positions, strict=True)):
        tensors |= {f"layers.{i}.keys": k, f"layers.{i}.values": v, f"layers.{i}.positions": pos.contiguous()}
    tensors |= {f"state.{name}": t for name, t in memory.state.items()}
    header = {"format": "ccmem.memory", "format_version": "2", "next_position": "64", "sink": "3", "window": "0"}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=header | {"meta": '{"method": "x"}'})
    back = Memory.load(tmp_path / "old.safetensors", expect={"method": "x"}, shape=KVShape(2, 2, 16, torch.float32))
    for (k, v), (k2, v2) in zip(memory.layers, back.layers, strict=True):
        assert torch.equal(k, k2) and torch.equal(v, v2)
    assert torch.equal(back.state["merge_steps"], torch.tensor(7))


def test_an_unknown_storage_dtype_names_the_allowed_ones(tmp_path):
    memory = random_memory()
    for call in (lambda: memory.compact("int4"), lambda: memory.save(tmp_path / "m.safetensors", dtype="float64")):
        with pytest.raises(ValueError, match="use one of float32, bfloat16, float16, int8"):
            call()
    assert storage_name("BF16") == "bfloat16" and storage_name("fp16") == "float16"
    with pytest.raises(ValueError, match="store this memory as bfloat16 or int8"):
        Memory(layers=[(torch.full((1, 1, 1, 2), 1e6),) * 2], positions=[torch.zeros(1, 1, 1)]).compact("float16")


def _edit_int8_file(path, edit):
    with safe_open(str(path), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    edit(meta, tensors)
    save_file(tensors, str(path), metadata=meta)


def test_a_hand_edit_that_passes_every_other_check_is_refused_by_the_digest(tmp_path):
    """A window count or a merge step count changed by hand is still a well-formed memory: it loaded and read its
    slots wrongly. The digest of what was saved refuses it; a file written before ccmem recorded one loads."""
    made = session("ccm-merge", n_tok=2)
    path = made.save_memory(tmp_path / "m.safetensors")
    fresh = CompressedLM(made.lm, made.method, system_prompt="sys")
    fresh.load_memory(path)  # as saved: intact

    def more_merge_steps(meta, tensors):
        name = next(k for k in tensors if k.startswith("state.") and "step" in k)
        tensors[name] = tensors[name] + 1

    _edit_int8_file(path, more_merge_steps)
    with pytest.raises(MemoryMismatchError, match=r"damaged or hand-edited: its contents differ from what was saved"):
        fresh.load_memory(path)
    with pytest.raises(MemoryMismatchError, match=r"the digest in its header no longer matches"):
        Memory.load(path)
    _edit_int8_file(path, lambda meta, tensors: meta.pop("digest"))  # as an older ccmem wrote it
    fresh.load_memory(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda meta, t: t.pop("layers.1.keys_scale"), r"layers\.1\.keys_scale is missing"),
        (
            lambda meta, t: t.update({"layers.0.values_scale": t["layers.0.values_scale"][:, :, :5].clone()}),
            "has shape",
        ),
        (lambda meta, t: t.update({"layers.0.keys_scale": -t["layers.0.keys_scale"]}), "not finite and positive"),
        (lambda meta, t: t.update({"layers.0.keys_scale": t["layers.0.keys_scale"].half()}), "scales are float32"),
        (lambda meta, t: t.update({"layers.0.keys": t["layers.0.keys"].float()}), "stored as float32, but the file"),
        (
            lambda meta, t: t.update({"layers.0.keys": t["layers.0.keys"][:, :1].clone()}),
            "must have the same 4-D shape",
        ),
        (lambda meta, t: meta.update(storage="int4"), "records storage 'int4'"),
        (lambda meta, t: meta.update(computed_dtype="int8"), "not a floating point dtype"),
        (lambda meta, t: meta.update(format_version="4"), "format version '4'"),
    ],
)
def test_a_damaged_int8_file_is_refused_with_what_is_wrong(tmp_path, edit, message):
    path = random_memory().save(tmp_path / "m.safetensors", dtype="int8")
    _edit_int8_file(path, edit)
    with pytest.raises(MemoryMismatchError, match=message):
        Memory.load(path)


def _two_sequences(meta, t):
    for name in [n for n in t if n.startswith("layers.")]:
        t[name] = torch.cat([t[name], t[name]])


def test_a_file_of_several_sequences_is_refused_at_load(tmp_path):
    """Such a cache loaded, then failed inside the attention at the first question."""
    path = random_memory().save(tmp_path / "m.safetensors")
    _edit_int8_file(path, _two_sequences)
    with pytest.raises(MemoryMismatchError, match=r"layers hold \[2\] sequences; a ccmem memory holds one"):
        Memory.load(path)


def test_compact_memory_counts_what_it_holds_and_expands_to_a_usable_memory():
    lm = session("ccm-concat", n_tok=3)
    compact = lm.memory.compact("int8", device="cpu")
    assert isinstance(compact, CompactMemory) and compact.slots_per_layer == lm.memory.slots_per_layer
    assert lm.memory.compact("float32").nbytes == lm.memory.nbytes
    slots = sum(lm.memory.slots_per_layer)
    # int8 keys/values, a float32 scale per key channel (2 heads x head_dim 8) and per value slot (2 heads)
    assert compact.nbytes == lm.memory.nbytes // 4 + 4 * (2 * 2 * 8 + 2 * slots)
    compact.expanded().check(lm.lm.kv_shape)


def test_eval_can_answer_from_memories_stored_at_a_precision():
    lm = tiny_model()
    examples = icl.examples(4, "test", k=2, seed=1)
    rows = {}
    for dtype in (None, "int8"):
        session = ccmem.load(lm, "full", system_prompt="Hi.")
        rows[dtype] = evaluate(
            session, examples, dataset="icl", settings=EvalSettings(system="Hi.", memory_dtype=dtype)
        )
    assert rows["int8"].extra["memory_dtype"] == "int8" and "memory_dtype" not in rows[None].extra
    assert rows["int8"].memory_bytes < rows[None].memory_bytes / 3
    assert rows["int8"].accuracy == rows[None].accuracy
    assert rows["int8"].perplexity == pytest.approx(rows[None].perplexity, rel=0.05)
    assert rows["int8"].config_hash != rows[None].config_hash
    assert EvalSettings().fingerprint("icl", 4) == EvalSettings(memory_dtype=None).fingerprint("icl", 4)


def test_compress_stores_the_memory_at_the_precision_asked_and_ask_reads_it(
    monkeypatch, capsys, tiny_model_dir, tmp_path
):
    from tests.unit.test_cli import run_cli

    text = tmp_path / "notes.txt"
    text.write_text("w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12")
    common = ["--model", str(tiny_model_dir), "--method", "full", "--system", ""]
    memory = tmp_path / "notes.safetensors"
    code, out = run_cli(
        monkeypatch, capsys, "compress", str(text), "-o", str(memory), "--memory-dtype", "int8", *common
    )
    assert code == 0, out
    assert "stored as int8" in out
    with safe_open(str(memory), "pt") as f:
        assert f.metadata()["storage"] == "int8"
    code, out = run_cli(monkeypatch, capsys, "ask", str(memory), "w3 w4", "--max-new-tokens", "2", *common)
    assert code == 0, out
    code, out = run_cli(monkeypatch, capsys, "compress", str(text), "-o", str(memory), "--memory-dtype", "int4")
    assert code == 2 and "use one of float32, bfloat16, float16, int8" in " ".join(out.split())
    assert "Traceback" not in out


def test_compress_keeps_its_work_at_bfloat16_where_float16_cannot_hold_the_memory(
    monkeypatch, capsys, tiny_model_dir, tmp_path
):
    """--memory-dtype float16 failed after the whole compression where a value passed float16's range, and
    nothing was saved (serve's auto falls back to bfloat16 there; compress now does too, and says so)."""
    from ccmem.api import CompressedLM
    from ccmem.precision import PrecisionRangeError
    from tests.unit.test_cli import run_cli

    real = CompressedLM.save_memory

    def beyond_float16(self, path, *, dtype=None):
        if dtype == "float16":
            raise PrecisionRangeError("keys reach 7.1e+04, beyond float16's range (65504)")
        return real(self, path, dtype=dtype)

    monkeypatch.setattr(CompressedLM, "save_memory", beyond_float16)
    text = tmp_path / "notes.txt"
    text.write_text("w1 w2 w3 w4 w5 w6")
    memory = tmp_path / "notes.safetensors"
    code, out = run_cli(
        monkeypatch, capsys, "compress", str(text), "-o", str(memory), "--memory-dtype", "float16",
        "--model", str(tiny_model_dir), "--method", "full", "--system", "",
    )  # fmt: skip
    said = " ".join(out.split())
    assert code == 0, out
    assert "beyond float16's range (65504): stored as bfloat16 instead" in said and "stored as bfloat16)" in said
    with safe_open(str(memory), "pt") as f:
        assert f.metadata()["storage"] == "bfloat16"


def _set_state(name, value):
    def edit(meta, t):
        if value is None:
            t.pop(f"state.{name}")
        else:
            t[f"state.{name}"] = value(t[f"state.{name}"])

    return edit


@pytest.mark.parametrize(
    ("method", "options", "edit", "message"),
    [
        ("h2o", {}, _set_state("attention_sum", lambda t: torch.zeros(3)), "attention_sum must be finite, of shape"),
        ("h2o", {}, _set_state("attention_sum", lambda t: t * float("nan")), "state attention_sum must be finite"),
        ("h2o", {}, _set_state("context_tokens", lambda t: -t), "context_tokens\\) must be a whole number >= 0"),
        ("ccm-merge", {}, _set_state("merge_steps", None), "merged slots have no step count"),
        ("ccm-merge", {}, _set_state("merge_steps", lambda t: t.float()), "must be a whole number >= 1"),
        ("ccm-merge", {"weighting": "learned"}, _set_state("merge_log_norm", None), "needs finite state merge_log"),
        (
            "ccm-merge",
            {"weighting": "learned"},
            _set_state("merge_log_norm", lambda t: t[..., :1].clone()),
            "merge_log_norm of shape",
        ),
        ("gist", {}, _set_state("context_ids", None), "slots after the sink have no context to extend"),
        ("gist", {}, _set_state("context_ids", lambda t: t.float()), "must be token ids of shape \\(1, n\\)"),
        ("gist", {}, _set_state("context_ids", lambda t: -t), "holds negative token ids"),
        ("gist", {}, _set_state("context_ids", lambda t: t + 10_000), "outside this model's vocabulary"),
        ("icformer", {}, _set_state("context_ids", lambda t: t[:, :0].clone()), "must be token ids of shape"),
        (
            "icformer",
            {"num_query_tokens": 4, "use_chunk": True, "max_chunk_len": 8},
            _set_state("context_ids", lambda t: t.repeat(1, 9)),
            "context .* gives",
        ),
        ("local", {}, _set_state("index", lambda t: t[1:].clone()), "one whole number per entry after the sink"),
        ("scattered", {}, _set_state("index", lambda t: t + 1000), "must lie in -1\\.\\."),
        ("sentinel", {}, _set_state("context_tokens", None), "context count \\(state context_tokens\\)"),
        ("local", {}, _set_state("index", None), "carry no context index"),
    ],
)
def test_a_memory_file_with_hand_edited_method_state_is_refused_at_load(tmp_path, method, options, edit, message):
    """Such files loaded, then crashed deep inside the method at the next add, or silently changed what it keeps."""
    made = session(method, **options)
    path = made.save_memory(tmp_path / "m.safetensors")
    _edit_int8_file(path, edit)
    fresh = CompressedLM(made.lm, made.method, system_prompt="sys")
    with pytest.raises(MemoryMismatchError, match=f"is damaged or hand-edited: .*{message}"):
        fresh.load_memory(path)
    fresh.load_memory(made.save_memory(tmp_path / "ok.safetensors"))  # the unedited file loads


@pytest.mark.parametrize("shift", [-2, 3])
def test_a_memory_whose_sink_is_not_its_system_prompt_is_refused_at_load_and_restore(tmp_path, shift):
    """A hand-edited sink count loaded silently: part of the prompt became compressible context, or context
    tokens were kept as if they were the prompt."""
    made = session("ccm-concat")
    path = made.save_memory(tmp_path / "m.safetensors")
    _edit_int8_file(path, lambda meta, t: meta.update(sink=str(int(meta["sink"]) + shift)))
    fresh = CompressedLM(made.lm, made.method, system_prompt="sys")
    with pytest.raises(MemoryMismatchError, match=r"its sink holds \d+ slots, but its system prompt is"):
        fresh.load_memory(path)
    edited = dataclasses.replace(made.memory, sink=made.memory.sink + shift)
    with pytest.raises(MemoryMismatchError, match="the restored memory is damaged or hand-edited: its sink"):
        fresh.restore(edited, made.history)
    fresh.load_memory(made.save_memory(tmp_path / "ok.safetensors"))  # the unedited file loads
    fresh.restore(made.memory, made.history)


def test_a_memory_of_another_adapter_names_the_adapter_not_an_option_it_set(tmp_path):
    """`ccmem ask` without the --adapter that made the memory blamed n_tok (which the adapter sets)."""
    made = session("ccm-concat")
    path = made.save_memory(tmp_path / "m.safetensors")

    def other_adapter(meta, tensors):
        edited = meta["meta"].replace('"n_tok": "2"', '"n_tok": "4"')
        meta["meta"] = edited.replace('"adapter": "untrained"', '"adapter": "0123abcd"')

    _edit_int8_file(path, other_adapter)
    fresh = CompressedLM(made.lm, made.method, system_prompt="sys")
    with pytest.raises(MemoryMismatchError, match="was made with adapter 0123abcd, but this session runs adapter"):
        fresh.load_memory(path)


def test_a_setting_an_older_memory_did_not_record_is_named_as_missing_not_as_empty():
    """A memory saved before ccmem recorded an option (icformer's marker) read as "made with marker=''"."""
    from ccmem.memory import check_meta

    expect = {"model": "m", "method": "icformer", "marker": "ft"}
    with pytest.raises(MemoryMismatchError, match=r"saved by an older ccmem that did not record marker .*compress"):
        check_meta({"model": "m", "method": "icformer"}, expect, "memory x")
    with pytest.raises(MemoryMismatchError, match="made with marker='lm', but this session has marker='ft'"):
        check_meta({"model": "m", "method": "icformer", "marker": "lm"}, expect, "memory x")
    check_meta({"model": "m", "method": "icformer", "marker": "ft"}, expect, "memory x")


def test_a_channel_of_subnormal_values_packs_to_int8_and_its_file_loads_again(tmp_path):
    """A peak under 127 times the smallest float32 gave a scale of 0: held, it expanded to zeros, but saved, the
    file was refused as damaged ("scales that are not finite and positive")."""
    keys = torch.zeros(1, 2, 3, 4)
    keys[0, 0, 0, 0] = 1e-44
    values = keys.clone()
    memory = Memory(layers=[(keys, values)], positions=[positions_for(0, 3, keys)], next_position=3)
    compact = memory.compact("int8")
    assert all(bool((p.scale > 0).all()) for p in compact.layers[0] if p.scale is not None)
    back = Memory.load(memory.save(tmp_path / "tiny.safetensors", dtype="int8"))
    assert torch.allclose(back.layers[0][0], keys, atol=1e-30) and torch.allclose(back.layers[0][1], values, atol=1e-30)


def test_a_memory_made_with_other_numeric_options_names_them_as_the_command_line_takes_them(tmp_path):
    """ "made with ratio='0.25', but this session has ratio='0.5'" read as if the options were text."""
    from tests.conftest import tiny_model

    lm = tiny_model()
    made = ccmem.load(lm, method="snapkv", ratio=0.25, system_prompt="")
    made.add("hello there, this is a context to compress")
    path = made.save_memory(tmp_path / "m.safetensors")
    with pytest.raises(MemoryMismatchError, match=r"made with ratio=0\.25, but this session has ratio=0\.5;"):
        ccmem.load(lm, method="snapkv", ratio=0.5, system_prompt="").load_memory(path)
