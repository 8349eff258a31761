"""``ccmem compare``: the grid, resuming from cached rows, rows of other settings kept apart, the report."""

from __future__ import annotations

import json

import pytest
import torch

from ccmem.eval import compare as compare_module
from ccmem.eval.compare import CompareSettings, grid, run_decode_speed, run_grid
from ccmem.eval.compare_report import write_compare_report
from ccmem.options import OptionError
from tests.conftest import tiny_model
from tests.unit.test_cli import run_cli

SETTINGS = dict(
    methods=["full", "none", "ccm-merge", "knorm", "snapkv"],
    tasks=["persona", "icl", "text"],
    budgets=[1 / 2, 1 / 4],
    n=2,
    options={"window_size": 4},
    system="Hi.",
    decode_lengths=[16, 32],
    decode_tokens=3,
)


def test_default_methods_are_the_baselines_and_learned_methods_with_a_shipped_adapter():
    """local and scattered need no adapter to run, but none ships: untrained, they were in every default demo and
    compare grid, shown as learned methods."""
    from ccmem.adapter import default_methods
    from ccmem.api import load
    from ccmem.eval.harness import adapter_provenance

    names = default_methods("smollm2-135m")
    assert names[:2] == ["full", "none"]
    assert {"ccm-concat", "ccm-merge", "icformer"} <= set(names)
    assert not {"local", "scattered", "gist", "sentinel"} & set(names)
    assert default_methods("some/other-model") == ["full", "none"]
    assert adapter_provenance(load(tiny_model(), "local")) == ("untrained", "-")  # marked, not "-"
    assert adapter_provenance(load(tiny_model(), "snapkv")) == ("-", "-")


def test_grid_runs_budgeted_methods_at_every_budget_and_the_others_once():
    cells = grid(CompareSettings(**SETTINGS))
    per_task = [(c.method, c.budget) for c in cells if c.task == "persona"]
    assert per_task == [("full", None), ("none", None), ("ccm-merge", None), ("knorm", 0.5), ("knorm", 0.25),
                        ("snapkv", 0.5), ("snapkv", 0.25)]  # fmt: skip
    assert len(cells) == 3 * 7
    with pytest.raises(ValueError, match="method 'knorm' is given twice in --methods"):
        CompareSettings(**(SETTINGS | {"methods": ["knorm", "none", "knorm"]}))


def test_compare_runs_resumes_and_reports(tmp_path, monkeypatch):
    lm = tiny_model(positions=8192)  # one token per character: the long-text task reads ~2,500 tokens
    settings = CompareSettings(**SETTINGS)
    rows = list(run_grid(lm, settings, tmp_path))
    assert len(rows) == 21
    persona = {(r.method, r.budget): r for r in rows if r.dataset == "persona"}
    full, half, quarter = persona[("full", None)], persona[("knorm", 0.5)], persona[("knorm", 0.25)]
    assert quarter.memory_slots < half.memory_slots < full.memory_slots
    assert persona[("snapkv", 0.5)].options == {"window_size": 4} and persona[("knorm", 0.5)].options == {}
    assert all(r.perplexity is not None for r in rows if r.dataset == "text")
    assert len({r.config_hash for r in rows if r.dataset == "persona"}) == 1  # one table, one setting

    # A second run evaluates nothing: every cell comes from rows.jsonl.
    def fail(*args, **kwargs):
        raise AssertionError("a cached cell was evaluated again")

    monkeypatch.setattr(compare_module, "evaluate", fail)
    again = list(run_grid(lm, settings, tmp_path))
    assert [(r.method, r.budget, r.accuracy) for r in again] == [(r.method, r.budget, r.accuracy) for r in rows]
    monkeypatch.undo()

    # Other settings (more examples) are measured anew and never mixed with the cached rows.
    more = list(run_grid(lm, CompareSettings(**(SETTINGS | {"n": 3, "tasks": ["persona"]})), tmp_path))
    assert all(r.examples == 3 for r in more)
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 21 + 7

    decode_rows = run_decode_speed(lm, settings, tmp_path)
    assert {(r.method, r.history_tokens) for r in decode_rows} == {
        (m, n) for m in SETTINGS["methods"] for n in (16, 32)
    }
    knorm = {r.history_tokens: r for r in decode_rows if r.method == "knorm"}
    assert knorm[32].budget == pytest.approx(1 / 8) and knorm[32].memory_slots < 32
    timed = (tmp_path / "decode.jsonl").read_text().splitlines()
    assert run_decode_speed(lm, settings, tmp_path) == decode_rows  # cached: nothing timed again
    assert (tmp_path / "decode.jsonl").read_text().splitlines() == timed

    # A variant is timed with its own options (a raw window of 8 tokens holds 8 more slots); the method's rows
    # with other options are not reported with it.
    windowed = CompareSettings(**(SETTINGS | {"methods": ["ccm-merge", "ccm-merge@w8", "snapkv"],
                                              "variant_options": {"ccm-merge@w8": {"recent": 8}}}))  # fmt: skip
    merge = {(r.method, r.history_tokens): r for r in run_decode_speed(lm, windowed, tmp_path)}
    assert set(merge) == {(m, n) for m in ("ccm-merge", "ccm-merge@w8", "snapkv") for n in (16, 32)}
    assert merge[("ccm-merge@w8", 32)].options == {"recent": 8} and merge[("ccm-merge", 32)].options == {}
    assert merge[("ccm-merge@w8", 32)].memory_slots == merge[("ccm-merge", 32)].memory_slots + 8
    assert merge[("ccm-merge", 32)] in decode_rows and merge[("snapkv", 16)] in decode_rows  # reused
    paths = write_compare_report(rows, decode_rows, tmp_path, header="tiny")
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 4  # three tasks and decode speed, embedded
    assert "<table>" in page and "knorm" in page
    md = paths["markdown"].read_text()
    assert "| knorm | training-free |" in md and "1/4 of full" in md


def test_compare_command_line(monkeypatch, capsys, tmp_path, tiny_model_dir):
    args = ["compare", "--model", str(tiny_model_dir), "--methods", "full,none,knorm", "--tasks", "icl",
            "--budgets", "1/2", "--n", "2", "--no-decode", "--out-dir", str(tmp_path)]  # fmt: skip
    code, text = run_cli(monkeypatch, capsys, *args)
    assert code == 0, text
    assert (tmp_path / "report.html").is_file() and (tmp_path / "quality_vs_kv_icl.png").is_file()
    methods = [json.loads(line)["method"] for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert methods == ["full", "none", "knorm"]
    assert "icl: knorm at 1/2: 2 examples done (3/3 cells)" in text  # no bar when piped: a line per cell
    assert "budgets 1/2 of the context for budgeted methods" in text
    code, text = run_cli(monkeypatch, capsys, *args)  # a rerun reads every cell back, and says so
    assert code == 0 and "icl: knorm at 1/2: read from rows.jsonl (3/3 cells)" in text
    args = ["compare", "--model", str(tiny_model_dir), "--methods", "full,none", "--tasks", "icl", "--n", "2",
            "--no-decode", "--out-dir", str(tmp_path / "plain")]  # fmt: skip
    code, text = run_cli(monkeypatch, capsys, *args)
    assert code == 0 and "budgets" not in text.split("system prompt")[0]  # no budgeted method ran: none named
    code, text = run_cli(monkeypatch, capsys, "compare", "--tasks", "poetry", "--out-dir", str(tmp_path))
    assert code == 2 and "unknown task 'poetry'" in text
    code, text = run_cli(monkeypatch, capsys, "compare", "--budgets", "1/0", "--out-dir", str(tmp_path))
    assert code == 2 and "must be a share of the context such as 1/8" in text
    code, text = run_cli(monkeypatch, capsys, "compare", "--adapter", "ccm-concat", "--out-dir", str(tmp_path))
    assert code == 2 and "must look like METHOD=PATH" in " ".join(text.split())
    code, text = run_cli(monkeypatch, capsys, "compare", "--methods", "full", "--adapter", "knorm@x=a.safetensors",
                         "--out-dir", str(tmp_path))  # fmt: skip
    assert code == 2 and "method 'knorm' takes no adapter" in " ".join(text.split())


def test_a_rerun_keeps_cells_that_share_a_cached_row_and_remeasures_changed_weights(tmp_path, monkeypatch):
    from ccmem.adapter import save_adapter
    from ccmem.registry import get_method
    from tests.conftest import randomize_lora

    lm = tiny_model(positions=8192)
    method = get_method("ccm-concat")
    randomize_lora(method, lm)
    path = str(save_adapter(method, lm, tmp_path / "a.safetensors"))
    settings = CompareSettings(
        methods=["none", "ccm-concat", "ccm-concat@dup"], adapters={"ccm-concat": path, "ccm-concat@dup": path},
        tasks=["persona"], n=2, system="Hi.", decode_lengths=[],
    )  # fmt: skip
    names = [[r.extra.get("variant", r.method) for r in run_grid(lm, settings, tmp_path)] for _ in range(2)]
    assert names[0] == names[1] == ["none", "ccm-concat", "ccm-concat@dup"]  # one cached row, two cells

    def evaluated(*args, **kwargs):
        raise RuntimeError("evaluated")

    monkeypatch.setattr(compare_module, "evaluate", evaluated)
    list(run_grid(lm, settings, tmp_path))  # the same weights: every cell cached
    with torch.no_grad():
        lm.model.get_input_embeddings().weight.mul_(2)  # other weights under the same name: measured anew
    with pytest.raises(RuntimeError, match="evaluated"):
        list(run_grid(lm, settings, tmp_path))


def test_adapter_variants_run_side_by_side_with_the_gap_they_close(tmp_path):
    from ccmem.adapter import save_adapter
    from ccmem.registry import get_method
    from tests.conftest import randomize_lora

    lm = tiny_model(positions=8192)
    method = get_method("ccm-concat")
    randomize_lora(method, lm)
    path = save_adapter(method, lm, tmp_path / "other.safetensors")
    settings = CompareSettings(
        methods=["full", "none", "ccm-concat", "ccm-concat@other"], adapters={"ccm-concat@other": str(path)},
        tasks=["dialogs-5", "passages"], budgets=[0.5], n=3, system="Hi.", decode_lengths=[],
    )  # fmt: skip
    rows = list(run_grid(lm, settings, tmp_path))
    named = {(r.dataset, r.extra.get("variant", r.method)): r for r in rows}
    assert named[("dialogs-5", "ccm-concat@other")].adapter != named[("dialogs-5", "ccm-concat")].adapter
    assert all(r.extra["by"]["distance"] for r in rows if r.dataset == "dialogs-5")
    paths = write_compare_report(rows, [], tmp_path)
    report = paths["markdown"].read_text()
    assert "| ccm-concat@other |" in report and "gap closed" in report and "Accuracy by distance" in report
    # every table row has its header's cells, with budget columns and without (a run of learned methods only)
    own_only = write_compare_report([r for r in rows if r.budget is None], [], tmp_path / "own")
    for text in (report, own_only["markdown"].read_text()):
        tables = [block.splitlines() for block in text.split("\n\n") if block.startswith("|")]
        assert tables and all(len({line.count("|") for line in table}) == 1 for table in tables), text
    # decode speed is timed with each variant's own adapter: one with more <COMP> tokens holds more slots
    wider = get_method("ccm-concat", n_tok=get_method("ccm-concat").n_tok + 2)
    randomize_lora(wider, lm)
    settings.adapters["ccm-concat@wider"] = str(save_adapter(wider, lm, tmp_path / "wider.safetensors"))
    settings.methods = ["ccm-concat", "ccm-concat@wider"]
    settings.decode_lengths, settings.decode_tokens, settings.decode_repeats = [24], 2, 1
    slots = {r.method: r.memory_slots for r in run_decode_speed(lm, settings, tmp_path)}
    assert slots["ccm-concat@wider"] == slots["ccm-concat"] + 2
    with pytest.raises(ValueError, match="needs an adapter"):
        CompareSettings(methods=["ccm-concat@x"], tasks=["persona"])
    for options, variant in (({"ratio": 0.5}, {}), ({}, {"snapkv": {"max_slots": 40}})):
        with pytest.raises(ValueError, match=r"-O (ratio|max_slots) would fix the size of snapkv, which --budgets"):
            CompareSettings(methods=["snapkv"], tasks=["persona"], options=options, variant_options=variant)
    with pytest.raises(ValueError, match="not among the methods"):
        CompareSettings(methods=["full"], adapters={"ccm-merge@x": str(path)}, tasks=["persona"])


def test_gap_closed_is_the_share_of_the_none_to_full_distance():
    from ccmem.eval.compare_report import gap_closed
    from ccmem.eval.harness import EvalRow

    def row(method, accuracy=None, perplexity=None):
        slots = {"full": 200, "none": 10}.get(method, 40)  # the baseline holding more memory is the full context
        return EvalRow(
            method, "m", "-", "-", "t", "test", 1, accuracy, perplexity, None, None, None, slots, 1, 1, 1, 1, "h"
        )

    rows = [row("full", 0.8), row("none", 0.2), row("ccm-concat", 0.65)]
    assert gap_closed(rows, rows[2], "accuracy") == pytest.approx(0.75)
    ppl = [row("full", perplexity=20.0), row("none", perplexity=80.0), row("ccm-merge", perplexity=40.0)]
    assert gap_closed(ppl, ppl[2], "perplexity") == pytest.approx(0.5)
    assert gap_closed(rows[2:], rows[2], "accuracy") is None
    # full scoring below none (one example): the worst score would have read as 100% of the gap
    upside_down = [row("full", 0.0), row("none", 1.0), row("ccm-concat", 0.0)]
    assert gap_closed(upside_down, upside_down[2], "accuracy") is None
    worse_ppl = [row("full", perplexity=80.0), row("none", perplexity=20.0), row("ccm-merge", perplexity=80.0)]
    assert gap_closed(worse_ppl, worse_ppl[2], "perplexity") is None
    # a full-context variant (--adapter full@stage1=...) beside full: the gap is still full's, in either order
    stage1 = row("full", 0.95)
    stage1.extra["variant"] = "full@stage1"
    for both in ([stage1, *rows], [*rows, stage1]):
        assert gap_closed(both, rows[2], "accuracy") == pytest.approx(0.75)


def test_none_holding_no_memory_stays_on_the_quality_plot(tmp_path, monkeypatch):
    """With --system '' none holds 0 bytes: on a log axis its point and its label fell off the plot, leaving an
    unnamed dashed line."""
    from ccmem.eval import compare_report
    from ccmem.eval.harness import EvalRow

    def row(method, accuracy, nbytes):
        return EvalRow(method, "m", "-", "-", "icl", "test", 4, accuracy, None, None, None, None, nbytes / 256,
                       nbytes, 1, 1, 1, "h")  # fmt: skip

    seen = []
    finish = compare_report._finish
    monkeypatch.setattr(compare_report, "_finish", lambda plt, fig, ax, *args: seen.append(ax.get_xlim()) or
                        finish(plt, fig, ax, *args))  # fmt: skip
    compare_report.plot_quality([row("full", 0.5, 12288), row("none", 0.0, 0)], "icl", tmp_path / "q.png")
    assert seen[0][0] <= 0 <= seen[0][1]


def test_a_gap_of_one_or_two_examples_is_flagged_under_the_table():
    """c2's persona table printed 700% gap closed where full beat none by 1 of 12 examples, without a word."""
    from ccmem.eval.compare_report import task_table
    from ccmem.eval.harness import EvalRow

    def row(method, accuracy, n):
        slots = {"full": 200, "none": 10}.get(method, 40)
        return EvalRow(method, "m", "-", "-", "persona", "test", n, accuracy, None, None, None, None, slots, 1, 1, 1,
                       1, "h")  # fmt: skip

    thin = task_table([row("full", 5 / 12, 12), row("none", 4 / 12, 12), row("ccm-concat", 11 / 12, 12)], "persona")
    assert "700%" in thin and "beats none by 1 of 12 examples only" in thin
    wide = task_table([row("full", 0.8, 100), row("none", 0.2, 100), row("ccm-concat", 0.65, 100)], "persona")
    assert "75%" in wide and "examples only" not in wide


def test_budgeted_methods_get_their_gap_and_group_rows_and_more_slots_are_said():
    """Training-free rows had no 'gap closed', were left out of the per-group tables (which showed distance only),
    and a learned method holding more slots than the training-free one at 1/8 was said to beat it, unqualified."""
    from ccmem.eval.compare_report import learned_vs_training_free, task_table
    from ccmem.eval.harness import EvalRow

    def row(method, accuracy, slots, budget=None):
        by = {"distance": {"0-1": {"accuracy": accuracy, "n": 4}}, "corrected": {"yes": {"accuracy": 0.5, "n": 2}}}
        return EvalRow(method, "m", "-", "-", "dialogs-5", "test", 100, accuracy, None, None, None, None, slots, 1, 1,
                       1, 1, "h", extra={"by": by}, budget=budget)  # fmt: skip

    rows = [row("full", 0.8, 200), row("none", 0.2, 10), row("ccm-concat", 0.65, 40), row("snapkv", 0.5, 25, 1 / 8)]
    table = task_table(rows, "dialogs-5")
    assert "0.500 (25), 50%" in table  # (0.5 - 0.2) / (0.8 - 0.2) at the budget
    assert "| snapkv | training-free |  | at each budget | 0.500 (25), 50% |" in table  # not an empty cell
    alone = task_table([row("ccm-concat", 0.65, 40), row("snapkv", 0.5, 25, 1 / 8)], "dialogs-5")
    assert "| snapkv | training-free |  |  | 0.500 (25) |" in alone  # no baselines, no gap anywhere to point at
    assert "| snapkv at 1/8 | 0.50 (4) |" in table and "Accuracy by corrected (whether the dialog corrected" in table
    note, _more_than_any_budget = learned_vs_training_free(rows)
    assert "beats the best training-free method at 1/8 of full, snapkv" in note and "holding 1.6x its slots" in note
    windowed = row("snapkv", 0.6, 25, 1 / 8)  # a variant (-O snapkv@w8:window_size=8) is named as the table names it
    windowed.extra["variant"] = "snapkv@w8"
    note, _ = learned_vs_training_free([*rows, windowed])
    assert "at 1/8 of full, snapkv@w8 (0.600, 25 slots)" in note


def test_a_stage1_grid_keeps_its_rows_apart_from_the_plain_models(tmp_path, monkeypatch, capsys):
    """`--stage1`: every method reads the finetuned weights (full is then the stage-1 reference); a grid cached
    on the plain model is never reused for it, nor the other way round."""
    from ccmem.stage1 import merge_stage1
    from ccmem.train.config import load_config
    from ccmem.train.trainer import train
    from tests.unit.test_training import TINY

    stage1 = train(load_config("persona-full", [f"output_dir={tmp_path}", "model=tiny", *TINY,
                                                "train.max_steps=2", "train.lr=1e-2"]), lm=tiny_model())  # fmt: skip
    settings = CompareSettings(**(SETTINGS | {"methods": ["full", "none"], "tasks": ["persona"], "options": {}}))
    plain = list(run_grid(tiny_model(positions=8192), settings, tmp_path / "grid"))
    lm = tiny_model(positions=8192)
    merge_stage1(lm, stage1.run_dir)
    finetuned = list(run_grid(lm, settings, tmp_path / "grid"))
    assert len((tmp_path / "grid" / "rows.jsonl").read_text().splitlines()) == 4  # measured anew, kept apart
    assert all(r.extra.get("stage1") == lm.stage1 for r in finetuned) and not any("stage1" in r.extra for r in plain)
    assert {r.config_hash for r in plain}.isdisjoint(r.config_hash for r in finetuned)
    assert finetuned[0].perplexity != pytest.approx(plain[0].perplexity)
    args = ["--methods", "full", "--tasks", "persona", "--n", "1", "--no-decode", "--out-dir", str(tmp_path / "x")]
    code, text = run_cli(monkeypatch, capsys, "compare", "--stage1", str(tmp_path / "nothing"), *args)
    assert code != 0 and "no stage-1 LoRA at" in " ".join(text.split())


def test_the_long_text_task_is_the_issue_prose_setting_and_keeps_the_short_one_rows():
    """text-long compresses ~5,000 characters in ~850-character chunks (~1,550 and ~260 tokens on SmolLM2) and
    scores ~1,700 more; the short text task's settings (and so its cached rows) are unchanged by the new field."""
    long_task, short_task = compare_module.TASKS["text-long"], compare_module.TASKS["text"]
    examples = compare_module.task_examples(long_task, 3)
    for ex in examples:
        assert len(ex.context) in (5, 6, 7) and all(len(seg) <= 850 + 200 for seg in ex.context[:-1])
        assert 4_900 <= sum(map(len, ex.context)) <= 5_000 and 1_500 <= len(ex.answer) <= 1_700
    settings = CompareSettings(methods=["full"], tasks=["text", "text-long"])
    short = settings.eval_settings(short_task, "m").data
    assert "segment_chars" not in short and settings.eval_settings(long_task, "m").data["segment_chars"] == 850
    fingerprints = {settings.eval_settings(t, "m").fingerprint("text", 3) for t in (short_task, long_task)}
    assert len(fingerprints) == 2  # rows of the two settings never mix


def test_the_pwc_tasks_score_generated_questions_over_their_options(tmp_path):
    """IC-Former's PwC-style questions were only in `ccmem eval pwc`, not in the side-by-side grid."""
    settings = CompareSettings(methods=["full", "none"], tasks=["pwc", "pwc-news"], n=2, decode_lengths=[])
    rows = list(run_grid(tiny_model(positions=2048), settings, tmp_path))
    assert {(r.dataset, r.method) for r in rows} == {(t, m) for t in ("pwc", "pwc-news") for m in ("full", "none")}
    assert all(r.examples == 2 and r.accuracy is not None for r in rows)
    wiki, news = (compare_module.task_examples(compare_module.TASKS[t], 2) for t in ("pwc", "pwc-news"))
    assert all(len(e.options) == 4 and e.answer in e.options for e in wiki + news)
    assert {e.context[0] for e in wiki}.isdisjoint({e.context[0] for e in news})


def test_a_variant_with_options_of_its_own_runs_beside_its_method(tmp_path):
    """``-O ccm-merge@w:recent=2`` runs ccm-merge a second time with that option (its own adapter, a row of its
    own), while plain ``-O`` options still go to every method that has them; bad scopes are refused by name."""
    lm = tiny_model(positions=8192)  # one token per character
    settings = CompareSettings(
        methods=["ccm-merge", "ccm-merge@w"],
        tasks=["persona"],
        n=2,
        system="Hi.",
        decode_lengths=[],
        variant_options={"ccm-merge@w": {"recent": 2}},
    )
    rows = {r.extra.get("variant", r.method): r for r in run_grid(lm, settings, tmp_path)}
    assert rows["ccm-merge"].options == {} and rows["ccm-merge@w"].options == {"recent": 2}
    assert rows["ccm-merge@w"].memory_slots == rows["ccm-merge"].memory_slots + 2  # the last turn's 2 raw tokens
    with pytest.raises(ValueError, match=r"needs an adapter .* or options of its own"):
        CompareSettings(methods=["ccm-merge@w"])
    with pytest.raises(ValueError, match="'knorm', which is not among the methods"):
        CompareSettings(methods=["ccm-merge"], variant_options={"knorm": {"ratio": 0.5}})
    with pytest.raises(OptionError, match="no method among ccm-merge has the option 'ratio'"):
        CompareSettings(methods=["ccm-merge", "knorm"], variant_options={"ccm-merge": {"ratio": 0.5}})


def test_compare_command_splits_scoped_options():
    from ccmem.cli import _scoped_options

    shared, scoped = _scoped_options({"ratio": 0.5, "ccm-concat@w:recent": 150, "ccm-merge:recent": 8})
    assert shared == {"ratio": 0.5} and scoped == {"ccm-concat@w": {"recent": 150}, "ccm-merge": {"recent": 8}}
    with pytest.raises(OptionError, match="must look like METHOD:KEY=VALUE"):
        _scoped_options({":recent": 1})
    with pytest.raises(OptionError, match="must look like METHOD:KEY=VALUE"):
        _scoped_options({"ccm-concat@:recent": 8})  # a variant without a label


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "none,snapkv", "--budgets", ","], "no budget given for snapkv"),
        (["--methods", "snapkv", "--budgets", "1/2,0.5"], "budget 0.5 is given twice in --budgets"),
        (["--methods", "none,snapkv", "-O", "snapkv@x:window_size=abc"], "snapkv@x: window_size must be int"),
        (["--methods", "none", "--adapter", "ccm-concat@x=/no/such.safetensors"], "no adapter file at /no/such"),
        (["--methods", "none", "--decode-lengths", "abc"], "--decode-lengths takes whole numbers"),
        (["--methods", "none", "--decode-lengths", "-5"], "1 or more"),
        (["--methods", "none", "--decode-lengths", ""], "--decode-lengths takes whole numbers"),  # skipped decoding
        (["--methods", "none,local", "--budgets", "1/2,1e-7"], "local: compression_ratio must be in [0, 1)"),
        (["--methods", "full,none,full"], "--methods names 'full' twice"),  # ran, and wrote its rows, twice
        (["--methods", "none", "--tasks", "persona,icl,persona"], "task 'persona' is given twice in --tasks"),
    ],
)
def test_compare_refuses_what_would_fail_or_vanish_mid_grid_before_the_model_loads(monkeypatch, capsys, args, message):
    """`--budgets ,` dropped every budgeted method without a word; a variant's bad option value or missing adapter
    stopped the grid at its cell, minutes in; `--decode-lengths -5` timed a history of -5 tokens."""
    code, out = run_cli(monkeypatch, capsys, "compare", "--model", "/no/such/model", "--tasks", "persona", *args)
    assert code == 2 and message in " ".join(out.split()), out


def test_compare_into_another_commands_folder_is_refused_before_the_model_loads(monkeypatch, capsys, tmp_path):
    """results/stream and results/gsm8k hold a rows.jsonl too: compare loaded the model, then stopped on it."""
    (tmp_path / "rows.jsonl").write_text('{"policy": "none", "accuracy": 0.42, "peak_kv_mb": 37.45}\n')
    code, out = run_cli(monkeypatch, capsys, "compare", "--model", "/no/such/model", "--tasks", "persona",
                        "--methods", "none", "-o", str(tmp_path))  # fmt: skip
    out = " ".join(out.split())
    assert code == 2 and f"--out-dir {tmp_path} holds rows of another command" in out, out
    assert "not a ccmem eval row" in out and "unknown model" not in out


def test_a_decode_length_past_the_models_positions_is_said_not_silently_dropped(tmp_path, caplog):
    lm = tiny_model(positions=128)
    settings = CompareSettings(
        methods=["none"], tasks=["persona"], n=1, system="Hi.", decode_lengths=[16, 100], decode_tokens=2,
        decode_repeats=1,
    )  # fmt: skip
    with caplog.at_level("WARNING"):
        rows = run_decode_speed(lm, settings, tmp_path)
    assert [r.history_tokens for r in rows] == [16]
    assert "decode speed is not timed after 100 tokens" in caplog.text and "128 positions" in caplog.text


def test_decode_timings_of_weights_with_a_stage1_lora_are_not_those_of_the_plain_model(tmp_path):
    """The decode cache's key named the model but not its stage-1 LoRA: a run with --stage1 reported the timings
    made without it (as the result rows already did not)."""
    only_full = {"methods": ["full"], "tasks": ["text"], "decode_lengths": [16], "options": {}}
    settings = CompareSettings(**(SETTINGS | only_full))
    lm = tiny_model()
    plain = run_decode_speed(lm, settings, tmp_path)
    lm.stage1 = "0123456789abcdef"  # as ccmem.stage1.merge_stage1 marks merged weights
    merged = run_decode_speed(lm, settings, tmp_path)
    assert len((tmp_path / "decode.jsonl").read_text().splitlines()) == 2  # timed again, not reused
    assert merged[0].config_hash != plain[0].config_hash


def test_a_task_too_long_for_full_is_refused_before_any_cell_runs(tmp_path):
    """With 1,024 positions the persona cells ran and wrote their rows, and then full stopped on the long-text task;
    ccmem eval had said so up front since 2026-12-04."""
    from ccmem.methods.base import ContextTooLongError

    settings = CompareSettings(methods=["none", "full"], tasks=["persona", "text"], n=1, decode_lengths=[])
    with pytest.raises(ContextTooLongError, match=r"text: example .* needs \d+ positions with full"):
        next(run_grid(tiny_model(positions=1024), settings, tmp_path))
    assert not (tmp_path / "rows.jsonl").exists()
