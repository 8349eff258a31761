"""``ccmem stream``: RoPE re-basing equals computing at the new positions, memory stays constant over streams many
times the model's positions, baselines hold the same memory, and bad input is one clear error."""

from __future__ import annotations

import json
import math
import re
import sys

import pytest
import torch
from transformers import DynamicCache
from typer.testing import CliRunner

from ccmem import cli
from ccmem.data.text import TextSourceError
from ccmem.eval.stream import StreamSettings, check_layouts, run_method, run_stream, score_stream, stream_text
from ccmem.memory import Memory
from ccmem.methods.base import logits_for
from ccmem.rope import RopeError, layer_frequencies, rotate_keys
from ccmem.stream import KVStream, StreamLayout, StreamOptionError, layouts_at_same_memory
from tests.conftest import VOCAB, TinyTokenizer, tiny_model

ROPE_FAMILIES = ["llama-gqa", "mistral", "qwen2", "gemma3", "gpt-neox"]


def cached_layers(lm, ids: torch.Tensor, position_ids: torch.Tensor):
    cache = DynamicCache()
    with torch.no_grad():
        lm.model.base_model(input_ids=ids, position_ids=position_ids, cache=cache, use_cache=True)
    return Memory.layers_of(cache)


@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_keys_moved_to_new_positions_equal_keys_computed_there(family):
    lm = tiny_model(family)
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(1))
    at_p = cached_layers(lm, ids, torch.arange(5, 15)[None])
    at_q = cached_layers(lm, ids, torch.arange(45, 55)[None])  # the same text 40 positions later
    for (kp, vp), (kq, vq), freqs in zip(at_p, at_q, layer_frequencies(lm), strict=True):
        torch.testing.assert_close(rotate_keys(kp, 40, freqs), kq, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(vp, vq, atol=2e-5, rtol=1e-4)  # values carry no position


@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_each_slot_moves_by_its_own_delta(family):
    lm = tiny_model(family)
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    p, q = torch.tensor([0, 3, 9, 10, 40, 2]), torch.tensor([7, 1, 60, 10, 0, 33])
    # layer 0's keys depend on nothing but their own token and position, whatever the others' positions
    kp, kq = cached_layers(lm, ids, p[None])[0][0], cached_layers(lm, ids, q[None])[0][0]
    torch.testing.assert_close(rotate_keys(kp, q - p, layer_frequencies(lm)[0]), kq, atol=2e-5, rtol=1e-4)


def test_rotations_compose_and_invert_and_leave_the_unrotated_part():
    keys = torch.randn(1, 2, 5, 8)
    freqs = torch.tensor([1.0, 0.1])  # partial rotary: 4 of 8 dimensions turn
    there = rotate_keys(keys, 1000, freqs)
    torch.testing.assert_close(rotate_keys(there, -1000, freqs), keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rotate_keys(rotate_keys(keys, 3, freqs), 4, freqs), rotate_keys(keys, 7, freqs))
    assert torch.equal(there[..., 4:], keys[..., 4:])


def test_length_dependent_rope_is_refused():
    lm = tiny_model("llama-gqa")
    lm.model.base_model.rotary_emb.rope_type = "dynamic"
    with pytest.raises(RopeError, match="dynamic RoPE"):
        layer_frequencies(lm)


def test_a_model_whose_keys_cannot_be_re_based_is_refused_before_full_reads_the_stream(monkeypatch):
    """`--methods full,window` on a model without movable RoPE keys ran full over the whole stream, then failed at
    window (KVStream's frequencies), and full's row was lost with it."""
    import ccmem.eval.stream as stream_eval

    lm = tiny_model("llama-gqa", positions=64)
    lm.model.base_model.rotary_emb.rope_type = "dynamic"
    ran = []
    monkeypatch.setattr(stream_eval, "run_method", lambda lm, name, *a, **k: ran.append(name))
    settings = StreamSettings(methods=["full", "window"], max_positions=64, sink=2, window=8, comp_slots=4, block=8)
    with pytest.raises(RopeError, match="dynamic RoPE"):
        run_stream(lm, settings)
    assert ran == []
    check_layouts(lm, StreamSettings(methods=["full"], max_positions=64))  # full alone moves no key: it runs


def test_an_adapter_of_another_model_is_refused_before_any_method_streams(tmp_path):
    """An adapter trained on other weights (or for another method) passed the up-front checks (only its options were
    read) and was refused when its method loaded it, after full had read the whole stream."""
    import ccmem
    from ccmem.adapter import AdapterMismatchError, save_adapter

    trained_on, used_with = tiny_model("llama-gqa", positions=64, seed=0), tiny_model("llama-gqa", positions=64, seed=1)
    method = ccmem.get_method("ccm-concat", n_tok=2)
    method.module_for(trained_on)
    path = str(save_adapter(method, trained_on, tmp_path / "other.safetensors"))
    for name, why in [("ccm-concat", "other weights"), ("sentinel", "trained for method 'ccm-concat'")]:
        settings = StreamSettings(methods=["full", name], max_positions=64, sink=2, window=8, comp_slots=4, block=8)
        settings.adapters = {name: path}
        with pytest.raises(AdapterMismatchError, match=why):
            check_layouts(used_with, settings)


def reference_window_nll(lm, ids: torch.Tensor, window: int, block: int) -> torch.Tensor:
    """A sliding window the slow way: keys stay at their text positions, nothing is re-rotated."""
    nll = torch.full((ids.shape[1],), math.nan)
    kept = None
    for a in range(0, ids.shape[1] - 1, block):
        b = min(a + block, ids.shape[1])
        cache = DynamicCache(ddp_cache_data=kept) if kept else DynamicCache()
        with torch.no_grad():
            hidden = lm.model.base_model(
                input_ids=ids[:, a:b], position_ids=torch.arange(a, b)[None], cache=cache, use_cache=True
            ).last_hidden_state
        targets = ids[0, a + 1 : b + 1]
        logprobs = torch.log_softmax(logits_for(lm, hidden[0, : targets.numel()]), -1)
        nll[a : a + targets.numel()] = -logprobs.gather(1, targets[:, None])[:, 0]
        kept = [(k[:, :, -window:], v[:, :, -window:]) for k, v in Memory.layers_of(cache)]
    return nll


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2"])
def test_rebased_window_equals_a_window_at_text_positions(family):
    # A window alone keeps every distance between keys and queries, so re-basing must change nothing; the
    # re-based stream stays below 64 positions while the reference goes to 200.
    lm = tiny_model(family, positions=64)
    ids = torch.randint(3, VOCAB, (1, 200), generator=torch.Generator().manual_seed(3))
    stream = KVStream(lm, StreamLayout(sink=0, window=24, block=8), limit=64)
    with torch.no_grad():
        got, stopped = score_stream(lm, stream, ids)
    assert stopped is None and stream.max_position < 64
    torch.testing.assert_close(got[:-1], reference_window_nll(lm, ids, 24, 8)[:-1], atol=1e-4, rtol=1e-4)


def test_a_memory_cap_stops_full_before_the_block_that_would_pass_it_the_first_one_too():
    lm = tiny_model(positions=256)
    ids = torch.randint(3, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))
    grow = StreamLayout(sink=0, window=0, block=8, grow=True)
    one = KVStream(lm, grow).slot_bytes
    with torch.no_grad():
        score_stream(lm, probe := KVStream(lm, grow), ids[:, :8])
    assert probe.memory.nbytes == 8 * one  # the size known before any read is what a read's slots take
    for cap_slots, stop in [(20, 16), (5, 0)]:  # the first block alone passes a 5-slot cap: it was read anyway
        with torch.no_grad():
            nll, stopped = score_stream(lm, KVStream(lm, grow), ids, cap_bytes=cap_slots * one)
        assert stopped is not None and stopped.startswith(f"stopped at token {stop}:")
        assert not nll[:stop].isnan().any() and nll[stop:].isnan().all()


def fake_compressor(n_tok: int):
    """Group number g (from 1) written as keys and values all equal to g, so merges can be read off the values."""
    count = [0]

    def compress(seen, ids, start):
        count[0] += 1
        kv = torch.full((1, 2, n_tok, 8), float(count[0]))
        return [(kv.clone(), kv.clone()), (kv.clone(), kv.clone())]

    return compress


def test_oldest_groups_merge_into_a_running_average():
    lm = tiny_model("llama-gqa", positions=64)
    ids = torch.randint(3, VOCAB, (1, 4 + 8 + 6 * 4), generator=torch.Generator().manual_seed(4))
    stream = KVStream(lm, StreamLayout(4, 8, comp_slots=4, block=4, n_tok=2), compressor=fake_compressor(2), limit=64)
    with torch.no_grad():
        for a in range(0, ids.shape[1], 4):
            stream.read(ids[:, a : a + 4])
    values = stream.memory.layers[0][1][0, 0, 4:8, 0]  # 6 groups: the oldest five averaged, then the newest
    assert values.tolist() == pytest.approx([3.0, 3.0, 6.0, 6.0])
    assert stream.memory.positions[0][0, 0].tolist() == [0, 1, 2, 3, -1, -1, 6, 7, *range(8, 16)]
    assert stream.memory.segment_lengths() == {"sink": 4, "compressed": 4, "window": 8}
    stream.memory.check(lm.kv_shape)  # a sound Memory: blends at -1, every other slot below next_position


def read_blocks(stream: KVStream, n_tokens: int) -> None:
    """Read ``n_tokens`` random tokens 4 at a time (past a sink of 4 and a window of 8, a group per block)."""
    ids = torch.randint(3, VOCAB, (1, n_tokens), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for a in range(0, n_tokens, 4):
            stream.read(ids[:, a : a + 4])


def test_a_banked_merge_folds_block_t_into_bank_t_minus_1_mod_banks():
    """ccm-merge with banks=2: groups 1, 3, 5 average into one bank and 2, 4, 6 into the other (CCM-merge's
    fold: the new group joins the oldest bank, which moves last), not the two oldest groups into one."""
    lm = tiny_model("llama-gqa", positions=64)
    stream = KVStream(lm, StreamLayout(4, 8, comp_slots=4, block=4, n_tok=2, banks=2), compressor=fake_compressor(2))
    read_blocks(stream, 4 + 8 + 5 * 4)
    values = stream.memory.layers[0][1][0, 0, 4:8, 0]  # after 5 groups: bank 2 holds 2, 4; bank 1 holds 1, 3, 5
    assert values.tolist() == pytest.approx([3.0, 3.0, 3.0, 3.0])
    read_blocks(stream, 4)  # one more group
    values = stream.memory.layers[0][1][0, 0, 4:8, 0]
    assert values.tolist() == pytest.approx([3.0, 3.0, 4.0, 4.0])  # banks (1, 3, 5) then (2, 4, 6)
    assert stream.weights == [3, 3]
    assert stream.memory.positions[0][0, 0, :8].tolist() == [0, 1, 2, 3, -1, -1, -1, -1]
    assert stream.memory.segment_lengths() == {"sink": 4, "compressed": 4, "window": 8}
    stream.memory.check(lm.kv_shape)


def test_a_banked_learned_merge_blends_each_bank_by_its_scores():
    """With a scorer each bank is the softmax blend of its own groups: (1+9+25)/9 and (4+16+36)/12."""
    lm = tiny_model("llama-gqa", positions=64)

    def scorer(group):
        return torch.stack([v[..., 0].log() for _, v in group])

    layout = StreamLayout(4, 8, comp_slots=4, block=4, n_tok=2, banks=2)
    stream = KVStream(lm, layout, compressor=fake_compressor(2), scorer=scorer)
    read_blocks(stream, 4 + 8 + 6 * 4)
    values = stream.memory.layers[0][1][0, 0, 4:8, 0]
    assert values.tolist() == pytest.approx([35 / 9, 35 / 9, 56 / 12, 56 / 12])


def test_a_banked_merge_adapter_streams_with_its_banks(tmp_path):
    """``ccmem stream`` lays out ccm-merge as its adapter was trained: banks x n_tok compressed slots and a
    window of the rest of the memory every method gets; too many banks for that memory is refused by name."""
    import ccmem
    from ccmem.adapter import save_adapter
    from tests.methods.test_contract import randomize_state

    lm = tiny_model("llama-gqa", positions=64)
    method = ccmem.get_method("ccm-merge", n_tok=2, banks=3)
    randomize_state(method, lm, scale=0.05)
    adapter = str(save_adapter(method, lm, tmp_path / "banks.safetensors"))
    ids = torch.randint(3, VOCAB, (160,), generator=torch.Generator().manual_seed(2)).tolist()
    settings = StreamSettings(
        methods=["ccm-merge", "streaming-llm"], max_positions=0, sink=2, window=8, comp_slots=4, block=8
    )
    settings.adapters = {"ccm-merge": adapter}
    row = run_method(lm, "ccm-merge", ids, settings, text="random")
    assert (row.layout["banks"], row.layout["comp_slots"], row.layout["window"]) == (3, 6, 6)
    assert row.memory_slots == run_method(lm, "streaming-llm", ids, settings, text="random").memory_slots == 14
    assert row.tokens_read == 160 and math.isfinite(row.perplexity)
    settings.window = 1
    with pytest.raises(StreamOptionError, match="3 banks of 2 slots need 6 slots, more than the 5"):
        check_layouts(lm, settings)  # before any method runs (what `ccmem stream` calls first)
    with pytest.raises(StreamOptionError, match="3 banks of 2 slots need 6 slots, more than the 5"):
        run_method(lm, "ccm-merge", ids, settings, text="random")
    concat = ccmem.get_method("ccm-concat", n_tok=3)
    randomize_state(concat, lm, scale=0.05)
    settings.methods, settings.window = ["ccm-concat"], 8
    settings.adapters = {"ccm-concat": str(save_adapter(concat, lm, tmp_path / "concat3.safetensors"))}
    with pytest.raises(StreamOptionError, match="comp_slots=4 must be a positive multiple of the 3 slots"):
        check_layouts(lm, settings)  # the adapter's n_tok, read from its file


def test_memory_is_constant_over_a_stream_ten_times_the_model_positions():
    lm = tiny_model("llama-gqa", positions=64)
    settings = StreamSettings(
        methods=["ccm-concat", "ccm-merge", "streaming-llm", "window", "full"],
        max_positions=0,  # the tiny model's own 64
        contexts=10,
        sink=2,
        window=8,
        comp_slots=8,
        block=16,
    )
    ids = torch.randint(3, VOCAB, (640,), generator=torch.Generator().manual_seed(5)).tolist()
    rows = {name: run_method(lm, name, ids, settings, text="random") for name in settings.methods}
    for name in ("ccm-concat", "ccm-merge", "streaming-llm", "window"):
        r = rows[name]
        assert r.tokens_read == 640 and r.stopped is None
        assert r.peak_ratio == 1.0, name  # the first context already reaches the peak
        assert r.max_position < 64
        assert r.memory_slots == 2 + 8 + 8  # the same memory for every method
        assert math.isfinite(r.perplexity) and r.buckets[-1]["tokens"] == 63  # the last token predicts nothing
    assert len({rows[n].peak_kv_bytes for n in ("ccm-concat", "ccm-merge", "streaming-llm", "window")}) == 1
    assert len({rows[n].memory_bytes for n in ("ccm-concat", "ccm-merge", "streaming-llm", "window")}) == 1
    full = rows["full"]
    assert full.tokens_read == 64 and "would pass position 64" in full.stopped
    assert full.perplexity_after_1x is None and full.perplexity_1x is not None
    assert full.peak_ratio is None  # it never read the whole stream: no 10x peak to compare (JSON null, not NaN)


@pytest.mark.parametrize("family", ["mistral", "gemma3", "gpt-neox"])
def test_other_rope_families_stream_past_their_positions(family):
    lm = tiny_model(family, positions=64)
    settings = StreamSettings(max_positions=0, sink=2, window=8, comp_slots=8, block=16)
    ids = torch.randint(3, VOCAB, (256,), generator=torch.Generator().manual_seed(6)).tolist()
    for name in ("ccm-concat", "streaming-llm"):
        row = run_method(lm, name, ids, settings)
        assert row.tokens_read == 256 and row.max_position < 64 and row.peak_ratio == 1.0
        assert math.isfinite(row.perplexity)


def test_layouts_share_one_memory_budget():
    layouts = layouts_at_same_memory(sink=4, window=128, comp_slots=32, block=32, n_tok=4)
    kept = {name: lay.kept_slots for name, lay in layouts.items() if not lay.grow}
    assert set(kept.values()) == {164}
    assert layouts["ccm-merge"].comp_slots == 4 and layouts["window"].sink == 0


@pytest.mark.parametrize(
    ("layout", "limit", "message"),
    [
        (StreamLayout(4, 100, 8, 16, 4), 64, "112 slots kept .* need 128 positions, more than the 64 allowed"),
        (StreamLayout(4, 16, 6, 8, 4), 64, "comp_slots=6 must be a positive multiple"),
        (StreamLayout(-1, 16), 64, "sink must not be negative"),
        (StreamLayout(4, 16, 0, 0), 64, "block must be at least 1"),
        (StreamLayout(0, 0), 64, "keep nothing"),
    ],
)
def test_layouts_that_do_not_fit_are_refused_by_name(layout, limit, message):
    with pytest.raises(StreamOptionError, match=message):
        layout.check(limit)


def test_bad_text_sources_are_named(tmp_path):
    tok = TinyTokenizer()
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(TextSourceError, match=r"empty\.txt is empty"):
        stream_text(tok, tmp_path / "empty.txt", 100)
    (tmp_path / "one.txt").write_text("word")  # a text of one token was called empty

    class Words(TinyTokenizer):  # a word-level tokenizer drops the blank line after the text
        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return [3 + len(w) for w in text.split()]

    with pytest.raises(TextSourceError, match=r"one\.txt is a single token"):
        stream_text(Words(), tmp_path / "one.txt", 100)
    with pytest.raises(TextSourceError, match=r"no file or folder at .*missing"):
        stream_text(tok, tmp_path / "missing", 100)
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "notes.md").write_text("not a book")
    with pytest.raises(TextSourceError, match=r"no \.txt file"):
        stream_text(tok, tmp_path / "books", 100)
    (tmp_path / "books" / "9.txt").write_text("abc " * 10)
    (tmp_path / "books" / "10.txt").write_text("xyz " * 100)
    ids, _ = stream_text(tok, tmp_path / "books", 100)  # PG19 layout: books in numeric order
    # a blank line between books (the first one's trailing space dropped)
    assert len(ids) == 100 and ids[:44] == tok.encode("abc " * 9 + "abc\n\n" + "xyz")
    (tmp_path / "books" / "11.txt").write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.raises(TextSourceError, match=r"11\.txt looks like a binary file"):
        stream_text(tok, tmp_path / "books", 10_000)


def test_text_that_is_not_utf8_is_streamed_with_a_warning(tmp_path, caplog):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 5)
    ids, _ = stream_text(TinyTokenizer(), tmp_path / "latin1.txt", 12)
    assert len(ids) == 12 and "latin1.txt is not valid UTF-8: 5 characters were replaced" in caplog.text


def test_settings_that_cannot_work_are_refused():
    lm = tiny_model("llama-gqa", positions=64)
    for settings, message in [
        (StreamSettings(methods=["h2o"]), "'h2o' is not a stream method: a stream keeps constant memory"),
        (StreamSettings(methods=["nonsense"]), "unknown stream method 'nonsense'"),
        (StreamSettings(max_positions=128), "more than the model's own 64"),
        (StreamSettings(max_positions=64, window=60), "more than the 64 allowed"),
        (StreamSettings(contexts=0), "contexts"),
        (StreamSettings(contexts=float("inf")), "contexts"),
        (StreamSettings(methods=["window", "ccm-concat", "window"]), "methods lists 'window' more than once"),
        (  # an adapter that would not be used was ignored without a word
            StreamSettings(methods=["window"], adapters={"ccm-merge": "x.safetensors"}),
            "adapter is given for ccm-merge, which is not among the methods streamed",
        ),
    ]:
        with pytest.raises(StreamOptionError, match=message):
            run_stream(lm, settings)


# ---------------------------------------------------------------------------- command line


def words(n: int) -> str:
    return " ".join(f"w{(i * 7) % 50}" for i in range(n))


def test_stream_command_writes_rows_report_and_plot(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from tests.unit.test_cli import run_cli

    text = tmp_path / "book.txt"
    text.write_text(words(400))
    out = tmp_path / "out"
    args = ["stream", "--model", str(tiny_model_dir), "--text", str(text), "--max-positions", "48", "--contexts", "4"]
    args += ["--sink", "2", "--window", "8", "--comp-slots", "8", "--block", "8", "--out-dir", str(out)]
    args += ["--methods", "ccm-concat,streaming-llm,window,full"]
    import matplotlib.axes

    scales: list[str] = []  # a window's perplexity spikes flattened the other lines on a linear axis
    set_yscale = matplotlib.axes.Axes.set_yscale
    monkeypatch.setattr(
        matplotlib.axes.Axes, "set_yscale", lambda ax, v, **kw: (scales.append(v), set_yscale(ax, v, **kw))
    )
    result = CliRunner().invoke(cli.app, args)
    assert scales == ["log"]
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["ccm-concat", "streaming-llm", "window", "full"]
    assert all(r["tokens"] == 192 and r["max_position"] < 48 for r in rows)
    assert (out / "stream.png").stat().st_size > 0 and "streaming-llm" in (out / "report.md").read_text()
    written = (out / "rows.jsonl").read_bytes()
    code, again = run_cli(monkeypatch, capsys, *args)  # the table is there: replaced only with --overwrite
    assert code == 2 and "--overwrite" in again and (out / "rows.jsonl").read_bytes() == written
    printed = " ".join(result.output.split())
    assert "streaming-llm: 192 tokens read" in printed  # no bar when piped: a line per method
    assert re.search(r"streaming-llm: \d+/192 tokens read \(50%\)", printed)  # and at each tenth of it
    assert "| full |" in printed and "stopped at token 48: reading on would pass position 48" in printed


def test_stream_help_explains_every_option():
    result = CliRunner().invoke(cli.app, ["stream", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for flag in ("--text", "--max-positions", "--contexts", "--sink", "--window", "--comp-slots", "--block"):
        assert flag in text
    assert text.count("--") >= 14


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--text", "/nonexistent/book.txt"], "no file or folder at /nonexistent/book.txt (--text)"),
        (["--window", "100"], "more than the 48 allowed"),
        (["--methods", "full,h2o"], "'h2o' is not a stream method"),
        (["-O", "compression_ratio=0.5"], "are for the sparse stream methods"),
        (["--methods", "local", "-O", "ratio=0.5"], "method 'local' has no option 'ratio'"),
    ],
)
def test_stream_bad_input_is_one_line(monkeypatch, capsys, tiny_model_dir, tmp_path, extra, message):
    monkeypatch.chdir(tmp_path)  # the default --out-dir: a checkout's results/stream is refused (no --overwrite)
    args = ["ccmem", "stream", "--model", str(tiny_model_dir), "--max-positions", "48", "--window", "8", *extra]
    monkeypatch.setattr(sys, "argv", args)
    monkeypatch.delenv("CCMEM_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out = capsys.readouterr()
    text = " ".join((out.out + out.err).split())
    assert exit_info.value.code == 2 and message in text and "Traceback" not in text


# ---------------------------------------------------------------------------- sparse methods in a stream


@pytest.mark.parametrize("name", ["local", "scattered"])
def test_a_sparse_compressor_keeps_what_add_keeps_re_based_onto_consecutive_positions(name):
    from ccmem.eval.stream import sparse_compressor

    lm = tiny_model("llama-gqa", positions=64)
    compress, method = sparse_compressor(lm, name, None, {"compression_ratio": 0.5})
    ids = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(8))
    seen = Memory(layers=cached_layers(lm, ids[:, :6], torch.arange(6)[None]), next_position=6, sink=6)
    seen.positions = [torch.arange(6)[None, None].expand(1, k.shape[1], 6) for k, _ in seen.layers]
    block = ids[:, 6:]
    with torch.no_grad():
        group = compress(seen, block, 6)
        held = Memory(layers=seen.layers, positions=seen.positions, next_position=6, sink=6)
        with method.attached(lm):
            kept = method.add(lm, held, block).state["index"]  # which block tokens the method keeps
    assert group[0][0].shape[-2] == len(kept) == 14 - 7  # (1 - r) of the block
    # Layer 0's keys depend only on their token and position: the group's equal those of the kept tokens
    # computed at the positions after the block (the compressor contract), whatever the mask.
    fresh = cached_layers(lm, block[:, kept], (6 + 14 + torch.arange(len(kept)))[None])
    torch.testing.assert_close(group[0][0], fresh[0][0], atol=2e-5, rtol=1e-4)


def test_sparse_methods_stream_ten_contexts_at_the_memory_of_the_others():
    lm = tiny_model("llama-gqa", positions=64)
    settings = StreamSettings(
        methods=["sentinel", "local", "scattered", "streaming-llm"],
        max_positions=0,
        contexts=10,
        sink=2,
        window=8,
        comp_slots=8,
        block=16,
        options={"compression_ratio": 0.75},
    )
    ids = torch.randint(3, VOCAB, (640,), generator=torch.Generator().manual_seed(9)).tolist()
    rows = {name: run_method(lm, name, ids, settings, text="random") for name in settings.methods}
    for name in ("sentinel", "local", "scattered"):
        r = rows[name]
        assert r.tokens_read == 640 and r.stopped is None and r.max_position < 64
        assert r.memory_slots == 2 + 8 + 8 and r.memory_bytes == rows["streaming-llm"].memory_bytes
        assert math.isfinite(r.perplexity) and r.adapter == "untrained"
        assert r.layout["drop_oldest"] and r.rerotated


def test_sparse_stream_layouts_and_options_are_checked():
    layouts = layouts_at_same_memory(sink=4, window=16, comp_slots=8, block=8, n_tok=2)
    assert layouts["sentinel"].kept_slots == layouts["streaming-llm"].kept_slots == 28
    with pytest.raises(StreamOptionError, match="comp_slots at least 1"):
        StreamLayout(4, 16, 0, 8, drop_oldest=True).check(64)
    lm = tiny_model("llama-gqa", positions=64)
    for settings, message in [
        (StreamSettings(methods=["local"], options={"n_tok": 2}), "local: method 'local' has no option 'n_tok'"),
        (StreamSettings(options={"compression_ratio": 0.5}), "are for the sparse stream methods"),
        (StreamSettings(methods=["local"], options={"compression_ratio": 1.5}), "local: .*ratio"),
    ]:
        with pytest.raises(StreamOptionError, match=message):
            run_stream(lm, settings)


def test_stream_command_runs_the_sparse_methods_with_their_options(tiny_model_dir, tmp_path):
    text = tmp_path / "book.txt"
    text.write_text(words(300))
    out = tmp_path / "out"
    args = ["stream", "--model", str(tiny_model_dir), "--text", str(text), "--max-positions", "48", "--contexts", "3"]
    args += ["--sink", "2", "--window", "8", "--comp-slots", "8", "--block", "8", "--out-dir", str(out)]
    args += ["--methods", "sentinel,local,scattered,window", "-O", "compression_ratio=0.5"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["sentinel", "local", "scattered", "window"]
    assert all(r["tokens_read"] == 144 and r["memory_slots"] == 18 for r in rows)
    assert "| sentinel |" in " ".join(result.output.split())


def test_ccm_streams_with_the_shipped_streaming_adapter_unless_given_one(monkeypatch, tmp_path):
    """``ccmem stream`` reads ccm-concat through ``ccm-concat-stream.safetensors`` where one ships for the model
    (trained on text read block by block); an --adapter given by the user wins."""
    import ccmem
    from ccmem import adapter as adapters
    from ccmem.adapter import save_adapter
    from tests.methods.test_contract import randomize_state

    lm = tiny_model("llama-gqa", positions=64)
    files = {}
    for label, seed in (("stream", 0), ("mine", 1)):
        method = ccmem.get_method("ccm-concat", n_tok=2)
        randomize_state(method, lm, seed=seed, scale=0.05)
        files[label] = save_adapter(method, lm, tmp_path / f"{label}.safetensors")
    hashes = {k: ccmem.load(lm, method="ccm-concat", adapter=str(p)).method.adapter_hash for k, p in files.items()}
    asked = []

    def shipped(model_name, method):
        asked.append(method)
        return files["stream"] if method == "ccm-concat-stream" else None

    monkeypatch.setattr(adapters, "shipped_adapter", shipped)
    ids = torch.randint(3, VOCAB, (96,), generator=torch.Generator().manual_seed(2)).tolist()
    settings = StreamSettings(
        methods=["ccm-concat"], max_positions=0, contexts=1.5, sink=2, window=8, comp_slots=4, block=16
    )
    assert run_method(lm, "ccm-concat", ids, settings, text="random").adapter == hashes["stream"]
    assert "ccm-concat-stream" in asked
    settings.adapters = {"ccm-concat": str(files["mine"])}
    assert run_method(lm, "ccm-concat", ids, settings, text="random").adapter == hashes["mine"]


def test_a_learned_merge_blends_groups_by_its_scores():
    """With a scorer (a merge trained with weighting=learned) the oldest groups blend by the softmax of their
    slots' scores, per layer and head, as the chat memory does: here group g scores log g, so the five oldest
    groups become sum g*g / sum g = 55/15."""
    lm = tiny_model("llama-gqa", positions=64)
    ids = torch.randint(3, VOCAB, (1, 4 + 8 + 6 * 4), generator=torch.Generator().manual_seed(4))

    def scorer(group):
        return torch.stack([v[..., 0].log() for _, v in group])  # the fake group's value is its number

    layout = StreamLayout(4, 8, comp_slots=4, block=4, n_tok=2)
    stream = KVStream(lm, layout, compressor=fake_compressor(2), scorer=scorer, limit=64)
    with torch.no_grad():
        for a in range(0, ids.shape[1], 4):
            stream.read(ids[:, a : a + 4])
    values = stream.memory.layers[0][1][0, 0, 4:8, 0]
    assert values.tolist() == pytest.approx([55 / 15, 55 / 15, 6.0, 6.0])
    stream.memory.check(lm.kv_shape)


def test_a_learned_merge_adapter_streams_with_its_gate(tmp_path):
    """``ccmem stream`` reads a learned-merge adapter's gate: its stream differs from the same adapter's with
    the gate at zero (block-count weights), which streams exactly like a mean merge."""
    import ccmem
    from ccmem.adapter import save_adapter
    from tests.methods.test_contract import randomize_state

    lm = tiny_model("llama-gqa", positions=64)
    ids = torch.randint(3, VOCAB, (96,), generator=torch.Generator().manual_seed(2)).tolist()
    settings = StreamSettings(
        methods=["ccm-merge"], max_positions=0, contexts=1.5, sink=2, window=8, comp_slots=4, block=16
    )
    nll = {}
    method = ccmem.get_method("ccm-merge", n_tok=2, weighting="learned")
    randomize_state(method, lm, scale=0.05)
    for label, gate in (("learned", 1.0), ("zero", 0.0)):
        with torch.no_grad():
            method.state(lm).merge_gate.mul_(gate)
        settings.adapters = {"ccm-merge": str(save_adapter(method, lm, tmp_path / f"{label}.safetensors"))}
        nll[label] = run_method(lm, "ccm-merge", ids, settings, text="random").perplexity
    mean = ccmem.get_method("ccm-merge", n_tok=2)
    mean.state(lm).load_state_dict(method.state(lm).state_dict(), strict=False)  # the same <COMP> and LoRA
    settings.adapters = {"ccm-merge": str(save_adapter(mean, lm, tmp_path / "mean.safetensors"))}
    assert run_method(lm, "ccm-merge", ids, settings, text="random").perplexity == pytest.approx(nll["zero"])
    assert nll["learned"] != pytest.approx(nll["zero"])


def test_a_concat_adapter_that_keeps_raw_tokens_is_refused_before_any_work(tmp_path):
    """An adapter trained with ``keep`` grows by its kept tokens: a stream's fixed layout says so, by the option."""
    import ccmem
    from ccmem.adapter import save_adapter

    lm = tiny_model("llama-gqa", positions=64)
    method = ccmem.get_method("ccm-concat", n_tok=2, keep="digits")
    method.module_for(lm)
    settings = StreamSettings(methods=["ccm-concat"], max_positions=0, sink=2, window=8, comp_slots=4, block=8)
    settings.adapters = {"ccm-concat": str(save_adapter(method, lm, tmp_path / "keep.safetensors"))}
    with pytest.raises(StreamOptionError, match="keep='digits'"):
        check_layouts(lm, settings)
    with pytest.raises(StreamOptionError, match="keep='digits'"):
        run_method(lm, "ccm-concat", list(range(3, 40)), settings, text="random")


def test_a_text_shorter_than_one_context_is_said_and_gives_no_peak_ratio(tmp_path, caplog):
    """6 tokens read as "2 contexts" printed a met target (peak ratio 1.00) with no word that the text ran out."""
    from ccmem.eval.stream import StreamSettings, markdown, run_stream

    lm = tiny_model(positions=48)
    text = tmp_path / "short.txt"
    text.write_text(words(10))
    settings = StreamSettings(
        methods=["streaming-llm"], max_positions=48, contexts=2, sink=2, window=8, comp_slots=8, block=8, text=str(text)
    )
    with caplog.at_level("WARNING"):
        (row,) = run_stream(lm, settings)
    assert row.tokens < 48 and row.peak_ratio is None
    assert "fewer than the 2 contexts asked (--contexts); past no context, so no peak ratio" in caplog.text
    share = f"{row.tokens / 48:.3g}x"  # a share of a context, not rounded to "0.0 x"
    assert f"{row.tokens} tokens, {share} a context of 48" in caplog.text
    assert f"{row.tokens} tokens = {share} a context of 48 positions" in markdown([row])


def test_a_stream_whose_last_token_is_left_unread_still_has_a_peak_ratio():
    """With (tokens - 1) a multiple of the block, the last token (which predicts nothing) is not read: the peak ratio
    read None, as for a method that stopped early, though every token was scored."""
    lm = tiny_model(positions=48)
    settings = StreamSettings(max_positions=48, sink=2, window=8, comp_slots=8, block=1)
    ids = torch.randint(3, VOCAB, (96,), generator=torch.Generator().manual_seed(7)).tolist()
    row = run_method(lm, "streaming-llm", ids, settings)
    assert row.stopped is None and row.tokens_read == 95 and row.buckets[-1]["tokens"] == 47
    assert row.peak_ratio == 1.0
