"""``ccmem eval`` and ``ccmem report``: metrics, the cost columns, provenance, and the files users read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ccmem.api import load
from ccmem.data import icl
from ccmem.data.records import to_sample
from ccmem.eval.harness import EvalRow, EvalSettings, compare, contains_answer, evaluate, read_rows, rouge_l
from ccmem.eval.report import markdown, mismatches, write_report
from tests.conftest import randomize_lora, tiny_model
from tests.unit.test_cli import run_cli


def test_rouge_l_and_normalisation():
    assert rouge_l("The cat sat.", "cat sat on the mat") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert rouge_l("Biscuit", "biscuit!") == 1.0
    assert rouge_l("dog", "cat") == 0.0
    # Chinese and Japanese are written without spaces: each character counts as a word (was 0.0 unless exact)
    assert rouge_l("高さは333メートル", "333メートル") == pytest.approx(2 * 5 / 8 * 1 / (5 / 8 + 1))
    assert rouge_l("我住在北京", "北京") == pytest.approx(2 * 0.4 / 1.4)


def _manual_choice(lm, example, system, reduce="sum"):
    """The option a plain causal forward over the whole text prefers (no memory code involved)."""
    sample = to_sample(lm.tokenizer, example, system=system)
    prefix = sample.sink + [t for c in sample.chunks for t in c] + sample.tail[: sample.answer_start]
    scores = []
    for option in example.options:
        ids = lm.tokenizer.encode(option)
        seq = torch.tensor([prefix + ids])
        logprobs = torch.log_softmax(lm.model(input_ids=seq).logits[0, :-1].float(), -1)
        picked = logprobs[len(prefix) - 1 :].gather(1, torch.tensor(ids)[:, None])
        scores.append(float(picked.sum() if reduce == "sum" else picked.mean()))
    return example.options[max(range(len(scores)), key=scores.__getitem__)]


def test_full_context_accuracy_equals_a_plain_forward_and_memory_columns_are_exact():
    lm = tiny_model()
    examples = icl.examples(6, "test", k=3, seed=1)
    settings = EvalSettings(system="Hi.")
    session = load(lm, "full", system_prompt="Hi.")
    row = evaluate(session, examples, dataset="icl", settings=settings)
    with torch.no_grad():
        expected = sum(_manual_choice(lm, e, "Hi.") == e.answer for e in examples) / len(examples)
    assert row.accuracy == pytest.approx(expected)
    sink = len(to_sample(lm.tokenizer, examples[0], system="Hi.").sink)
    context = [sum(len(c) for c in to_sample(lm.tokenizer, e, system="Hi.").chunks) for e in examples]
    assert row.context_tokens == pytest.approx(sum(context) / len(context))
    assert row.memory_slots == pytest.approx(sink + row.context_tokens)
    assert row.perplexity is not None and row.perplexity > 1
    rows = {
        r.method: r
        for r in compare(lm, ["none", "ccm-concat", "ccm-merge"], examples, dataset="icl", settings=settings)
    }
    assert rows["none"].memory_slots == sink
    assert rows["ccm-concat"].memory_slots == sink + 4 * 3  # n_tok slots per demonstration
    assert rows["ccm-merge"].memory_slots == sink + 4  # constant
    assert rows["ccm-concat"].adapter == "untrained" and rows["none"].adapter == "-"
    # `none` reads no context: a compression speed of millions of tokens/s was shown for it
    assert rows["none"].tokens_per_second is None and rows["ccm-concat"].tokens_per_second > 0
    none_line = next(line for line in markdown(list(rows.values())).splitlines() if line.startswith("| none"))
    assert none_line.rstrip(" |").endswith("-")


def test_a_method_run_under_another_system_prompt_than_its_adapter_learned_is_warned_about(tmp_path, caplog):
    """Every method of a run keeps the run's system prompt (comparable rows), but an adapter trained under another
    one reads its memory less well: the run says so, and how to give it its own."""
    from ccmem.adapter import save_adapter
    from ccmem.registry import get_method

    lm = tiny_model()
    examples = icl.examples(2, "test", k=1, seed=1)
    extra = {"config": {"data": {"system": "Be brief."}}}
    adapter = save_adapter(get_method("ccm-concat"), lm, tmp_path / "a.safetensors", extra=extra)

    def notes(system: str) -> list[str]:
        caplog.clear()
        settings = EvalSettings(system=system)
        list(compare(lm, ["ccm-concat"], examples, dataset="icl", settings=settings, adapters={"ccm-concat": adapter}))
        return [r.getMessage() for r in caplog.records if "was trained with the system prompt" in r.getMessage()]

    warned = notes("Hi.")
    assert len(warned) == 1 and "ccm-concat: the adapter" in warned[0] and "(--system 'Be brief.'" in warned[0]
    assert notes("Be brief.") == []


def test_length_normalised_scoring_changes_only_the_choice_and_is_recorded():
    lm = tiny_model()
    examples = icl.examples(8, "test", k=2, seed=3)
    for e in examples:  # options of clearly different lengths, so sum and mean can disagree
        e.options = [o * (i + 1) if o != e.answer else o for i, o in enumerate(e.options)]
    summed = evaluate(load(lm, "full"), examples, dataset="icl", settings=EvalSettings())
    mean = evaluate(load(lm, "full"), examples, dataset="icl", settings=EvalSettings(score="mean"))
    with torch.no_grad():
        expected = [_manual_choice(lm, e, EvalSettings().system, "mean") == e.answer for e in examples]
    assert mean.accuracy == pytest.approx(sum(expected) / len(examples))
    assert mean.perplexity == pytest.approx(summed.perplexity)  # of the answer, however options are scored
    assert mean.extra == {"score": "mean"} and summed.extra == {}
    assert mean.config_hash != summed.config_hash
    assert "full (mean score)" in markdown([mean, summed])
    # rows written before the option existed (results/persona/eval.jsonl) keep their hash
    assert EvalSettings(generate=True, max_new_tokens=16).fingerprint("persona", 100) == "a7361a40d080"
    with pytest.raises(ValueError, match="score must be one of"):
        EvalSettings(score="max")


@pytest.mark.parametrize("batch_size", [1, 4])
def test_an_option_that_is_a_prefix_of_another_is_scored_with_the_end_of_the_answer(batch_size):
    """'63' among the options of '6305' always won a sum of log-probabilities (digits are one token each), whatever
    the memory held: options that overlap so are scored with the end-of-answer token after them."""
    from ccmem.data.records import MemoryExample

    lm = tiny_model()
    chat = MemoryExample("a", [("My locker is 6305.", "Noted.")], "Locker?", "6305", options=["63", "6305", "71"])
    plain = MemoryExample("b", ["Locker 6305."], "Locker:", "6305", options=["63", "6305"], chat=False)
    other = MemoryExample("c", ["Locker 6305."], "Locker:", "6305", options=["6305", "7105"], chat=False)
    seen = []
    import ccmem.eval.harness as harness

    real = harness.score_batch

    def spy(lm_, method, items, reduce="sum", check=True):
        seen.extend(opts for _, _, opts in items)
        return real(lm_, method, items, reduce=reduce, check=check)

    session = load(lm, "full", system_prompt="Hi.")
    session.score_ids = lambda query, options, reduce="sum": seen.append(options) or [0.0] * len(options)
    harness.score_batch, restore = spy, harness.score_batch
    try:
        evaluate(session, [chat, plain, other], dataset="persona", settings=EvalSettings(batch_size=batch_size))
    finally:
        harness.score_batch = restore
    sample = to_sample(lm.tokenizer, chat, system="Hi.")
    answer = session.format.answer_ids  # in a chat, options are read as the answer follows the generation prompt
    turn_end = sample.tail[sample.answer_start + len(answer("6305"))]  # what the format puts after the answer
    enc = lm.tokenizer.encode
    assert seen[0] == [[*answer("63"), turn_end], [*answer("6305"), turn_end], [*answer("71"), turn_end]]
    assert seen[1] == [enc("63") + enc("\n"), enc("6305") + enc("\n")]
    assert seen[2] == [enc("6305"), enc("7105")]  # options that do not overlap are scored as they are


def test_generation_metrics_are_filled_when_asked():
    lm = tiny_model()
    examples = icl.examples(2, "test", k=2)
    row = evaluate(load(lm, "full"), examples, dataset="icl", settings=EvalSettings(generate=True, max_new_tokens=3))
    assert row.exact_match is not None and row.contains is not None and 0 <= row.rouge_l <= 1


def test_gsm8k_exact_match_is_the_final_answers_accuracy(monkeypatch):
    """GSM8K is scored by its final number, as lm-eval does: a right solution worded otherwise than the reference
    counted 0 (the whole solution was compared), a wrong one containing the right number elsewhere must count 0."""
    from ccmem.data import gsm8k
    from ccmem.eval import harness

    problems = gsm8k.generate(2, "test", seed=0)
    examples = gsm8k.examples(problems)
    said = {problems[0].question: f"My own steps.\n#### {problems[0].answer}", problems[1].question: "#### -1"}
    monkeypatch.setattr(harness, "generate_answer", lambda session, example, query, n: said[example.query])
    lm = tiny_model(positions=1024)  # a character-level tokenizer: worked solutions run long
    row = evaluate(load(lm, "none"), examples, dataset="gsm8k", settings=EvalSettings(generate=True))
    assert row.exact_match == 0.5
    assert row.contains == 0.0  # contains and ROUGE-L still read the whole worked solution
    # a question with no context compresses nothing: no compression rate (it read 0.0 tokens/s)
    assert evaluate(load(lm, "ccm-concat"), examples, dataset="gsm8k").tokens_per_second is None


def test_eval_then_report_from_the_command_line(monkeypatch, capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "eval.jsonl"
    code, text = run_cli(
        monkeypatch, capsys, "eval", "icl", "--model", str(tiny_model_dir), "--n", "3", "--k", "2",
        "--methods", "full,none,ccm-merge", "--out", str(out), "--label", "k=2",
    )  # fmt: skip
    assert code == 0, text
    assert "ccm-merge: 3/3 examples" in text  # where no progress bar shows (a log), progress lines do
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["full", "none", "ccm-merge"]
    assert all(r["examples"] == 3 and r["config_hash"] and r["label"] == "k=2" for r in rows)
    code, text = run_cli(
        monkeypatch, capsys, "eval", "icl", "--model", str(tiny_model_dir), "--n", "3", "--k", "2",
        "--methods", "full", "--score", "mean", "--out", str(tmp_path / "mean.jsonl"),
    )  # fmt: skip
    assert code == 0, text
    assert json.loads((tmp_path / "mean.jsonl").read_text())["extra"] == {"score": "mean"}
    code, text = run_cli(monkeypatch, capsys, "report", str(out), "--out-dir", str(tmp_path / "rep"))
    assert code == 0, text
    assert (tmp_path / "rep" / "quality_vs_memory.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "rep" / "report.csv").read_text().count("\n") == 4
    assert markdown(read_rows([out])).count("\n") == 5
    refused = [("bleu", "unknown metric 'bleu'; the quality metrics are accuracy"),
               ("label", "unknown metric 'label'"), ("exact_match", "no row has exact_match")]  # fmt: skip
    for metric, message in refused:
        code, text = run_cli(
            monkeypatch, capsys, "report", str(out), "--out-dir", str(tmp_path / "m"), "--metric", metric
        )
        assert code == 2 and message in " ".join(text.split()), text
    (tmp_path / "bad.jsonl").write_text('{"method": "full"}\n')
    code, text = run_cli(monkeypatch, capsys, "report", str(tmp_path / "bad.jsonl"))
    assert code == 2 and "bad.jsonl:1: not a ccmem eval row (missing field model" in " ".join(text.split())


def test_contains_asks_for_the_answers_words_whole_not_a_substring():
    assert contains_answer("She has 4 cats.", "4") and not contains_answer("She has 14 cats.", "4")
    assert not contains_answer("I am tired.", "red") and contains_answer("It is RED, she said", "red")
    assert contains_answer("They moved to New York City last year", "new york")
    assert not contains_answer("New Yorkers", "new york") and not contains_answer("anything", "the")
    assert contains_answer("我住在东京。", "东京")  # scripts without spaces: each character is a word


def test_an_answer_that_normalisation_empties_is_compared_with_what_it_keeps():
    """Answers such as "A", "The" or "?!" lost every word to SQuAD's normalisation: an empty generation (or "The",
    or "!?") then matched them exactly with ROUGE-L 1, and the right one was never "contained"."""
    from ccmem.eval.harness import exact_match

    assert exact_match("a.", "A") and not exact_match("", "A") and not exact_match("The", "A")
    assert contains_answer("The answer is A.", "A") and not contains_answer("The answer is B.", "A")
    assert rouge_l("A", "A") == 1.0 and rouge_l("", "A") == 0.0 and rouge_l("The", "A") == 0.0
    assert exact_match("?!", "?!") and not exact_match("", "?!") and not exact_match("!?", "?!")
    assert contains_answer("I say ?!", "?!") and rouge_l("!?", "?!") == 0.0
    assert exact_match("The Cat!", "cat") and not contains_answer("anything", "the")  # the usual normalisation


def test_report_refuses_rows_without_a_shared_metric(tmp_path):
    with pytest.raises(ValueError, match="no result rows"):
        write_report([], tmp_path)


def _row(method: str, config_hash: str, examples: int, label: str = "8 demos") -> EvalRow:
    return EvalRow(
        method=method, model="m", adapter="-", train_dataset="-", dataset="icl", split="test", examples=examples,
        accuracy=0.5, perplexity=None, exact_match=None, contains=None, rouge_l=None, memory_slots=10.0,
        memory_bytes=100.0, context_tokens=8.0, tokens_per_second=1.0, seconds=1.0, config_hash=config_hash,
        label=label,
    )  # fmt: skip


def test_a_ratio_sweep_is_one_comparable_table():
    """-O options are each row's own (row.options): two runs of a sweep (`-O ratio=0.5`, then `-O ratio=0.25`) share
    the config hash, so their full and none rows are not called "measured with different settings"."""
    sweep = [EvalSettings(method_options={"ratio": r}).fingerprint("icl", 40) for r in (0.5, 0.25)]
    assert sweep[0] == sweep[1] == EvalSettings().fingerprint("icl", 40)
    assert EvalSettings(score="mean").fingerprint("icl", 40) != sweep[0]  # what changes the measure still counts
    rows = [_row(m, h, 40) for h in sweep for m in ("full", "none", "snapkv")]
    assert mismatches(rows) == []


def test_report_flags_a_table_whose_rows_were_measured_on_different_examples(tmp_path):
    same = [_row("full", "aaa", 100), _row("none", "aaa", 100), _row("full", "ccc", 30, label="other")]
    assert mismatches(same) == []
    mixed = [_row("full", "aaa", 60), _row("none", "aaa", 60), _row("ccm-concat", "bbb", 100)]
    (warning,) = mismatches(mixed)
    assert "'8 demos'" in warning and "aaa: full, none (60 examples)" in warning
    assert "bbb: ccm-concat (100 examples)" in warning
    write_report(mixed, tmp_path)
    assert "**Not comparable**" in (tmp_path / "report.md").read_text()
    write_report(same, tmp_path)
    assert "Not comparable" not in (tmp_path / "report.md").read_text()


def test_a_plotted_metric_that_some_rows_lack_leaves_them_out_of_the_plot(tmp_path):
    """`ccmem report --metric contains` over a method's rows with and without --generate, at the same memory,
    stopped on comparing None with a number after report.md was written."""
    import dataclasses

    asked = dataclasses.replace(_row("none", "gen", 4), contains=0.25)
    written = write_report([asked, _row("none", "plain", 4), _row("full", "plain", 4)], tmp_path, "contains")
    assert written["plot"].stat().st_size > 0


def test_rows_of_two_models_say_their_model_in_the_report():
    """`ccmem eval` rows of two models on one dataset share its table and config hash: the report showed two
    "full" lines that nothing told apart, and no warning."""
    import dataclasses

    from ccmem.eval.report import group_markdown

    by = {"distance": {"0-1": {"accuracy": 0.5, "n": 2}}}
    rows = [dataclasses.replace(_row(m, "h", 4), model=model, extra={"by": by}) for model in ("small", "big")
            for m in ("full", "none")]  # fmt: skip
    assert mismatches(rows) == []
    table = markdown(rows)
    assert "| method | model |" in table and "| full | big |" in table and "| full | small |" in table
    assert "| full [big] |" in group_markdown(rows) and "| none [small] |" in group_markdown(rows)
    assert "model" not in markdown(rows[:2]) and "[small]" not in group_markdown(rows[:2])  # one model: as before


def test_rows_of_two_splits_say_their_split_in_the_report(tmp_path, monkeypatch):
    """`ccmem eval persona --split validation` and `--split test` rows share the config hash of the default data:
    the report showed two "full" lines that nothing told apart, no warning, and one plot line through both."""
    import dataclasses

    from ccmem.eval.report import group_markdown, plot

    by = {"distance": {"0-1": {"accuracy": 0.5, "n": 2}}}
    rows = [dataclasses.replace(_row(m, "h", 4), split=split, extra={"by": by}) for split in ("validation", "test")
            for m in ("full", "none")]  # fmt: skip
    table = markdown(rows)
    assert "| method | adapter | trained on | dataset | split |" in table
    assert "| full | - | - | icl | test |" in table and "| full | - | - | icl | validation |" in table
    groups = group_markdown(rows)
    assert "icl/test (8 demos): accuracy by distance" in groups and "icl/validation (8 demos)" in groups
    assert "split" not in markdown(rows[:2]) and "icl/" not in group_markdown(rows[:2])  # one split: as before
    from matplotlib.axes import Axes

    shown, legend = [], Axes.legend
    monkeypatch.setattr(Axes, "legend", lambda ax, **kw: shown.extend(ax.get_legend_handles_labels()[1]) or legend(ax))
    plot(rows, tmp_path / "plot.png")
    assert sorted(shown) == ["full [icl/test, 8 demos]", "full [icl/validation, 8 demos]",
                             "none [icl/test, 8 demos]", "none [icl/validation, 8 demos]"]  # fmt: skip


def test_rows_of_other_settings_are_other_lines_in_the_plot(tmp_path, monkeypatch):
    """report.md flags rows of one table measured with other settings ("Not comparable"), but the plot joined a
    method's rows of both settings (--n 2 and --n 3) into one line."""
    import dataclasses

    from matplotlib.axes import Axes

    from ccmem.eval.report import plot

    rows = [_row("full", "aaaaaaaaaaaa", 4), dataclasses.replace(_row("full", "bbbbbbbbbbbb", 4), memory_slots=9.0)]
    assert mismatches(rows)
    shown, legend = [], Axes.legend
    monkeypatch.setattr(Axes, "legend", lambda ax, **kw: shown.extend(ax.get_legend_handles_labels()[1]) or legend(ax))
    plot(rows, tmp_path / "plot.png")
    assert sorted(shown) == ["full {aaaaaaaa}", "full {bbbbbbbb}"]
    shown.clear()
    plot(rows[:1], tmp_path / "one.png")
    assert shown == ["full"]  # one setting: as before


def test_eval_refuses_a_method_named_twice_before_the_model_loads(monkeypatch, capsys, tmp_path):
    """`--methods full,none,full` evaluated full twice and appended its row twice."""
    out = tmp_path / "rows.jsonl"
    code, text = run_cli(monkeypatch, capsys, "eval", "persona", "--model", "/no/such/model", "--methods",
                         "full,none,full", "-o", str(out))  # fmt: skip
    assert code == 2 and "--methods names 'full' twice" in " ".join(text.split()) and not out.exists()


def test_a_report_that_fails_while_being_rewritten_leaves_the_earlier_one_whole(tmp_path, monkeypatch):
    import csv

    rows = [_row("full", "aaa", 100), _row("none", "aaa", 100)]
    written = write_report(rows, tmp_path)
    before = {name: path.read_bytes() for name, path in written.items()}

    def fail(self, row):
        raise OSError("disk full")

    monkeypatch.setattr(csv.DictWriter, "writerow", fail)  # after the header: report.csv was left half written
    with pytest.raises(OSError, match="disk full"):
        write_report(rows, tmp_path)
    assert {name: path.read_bytes() for name, path in written.items()} == before


@pytest.mark.parametrize("task", ["icl", "text"])
@pytest.mark.parametrize("method", ["full", "ccm-merge", "snapkv"])
def test_batched_evaluation_gives_the_rows_of_one_at_a_time(method, task, tmp_path):
    """Contexts compressed and answers scored in padded batches (the default for batchable methods) give the
    numbers of one example at a time: accuracy from options (icl), perplexity of a continuation (text)."""
    from ccmem.data import text

    lm = tiny_model(positions=1024)
    if task == "icl":
        examples = icl.examples(5, "test", k=3, seed=2)
    else:
        (tmp_path / "doc.txt").write_text("".join(f"line {i} of a long text about the sea\n" for i in range(400)))
        examples = text.examples(5, "test", path=tmp_path, context_chars=300, answer_chars=80, segment_chars=90)
    rows = []
    for batch_size in (1, 3):
        session = load(lm, method, system_prompt="Hi.", **({"window_size": 4} if method == "snapkv" else {}))
        rows.append(
            evaluate(session, examples, dataset="icl", settings=EvalSettings(system="Hi.", batch_size=batch_size))
        )
    one, batched = rows
    assert batched.accuracy == one.accuracy and batched.memory_slots == one.memory_slots
    assert batched.perplexity == pytest.approx(one.perplexity, rel=1e-4)
    assert batched.config_hash == one.config_hash  # the batch size changes the speed, not what is measured


def test_rows_of_other_data_never_share_a_config_hash(monkeypatch, capsys, tmp_path, tiny_model_dir):
    """The config hash covers what the examples hold: a user's edited file, or another --k, is another
    measurement, and `ccmem report` says so instead of tabling the rows as comparable."""
    fixtures = Path(__file__).resolve().parent.parent / "fixtures" / "metaicl"
    edited = tmp_path / "edited"
    shutil.copytree(fixtures, edited)
    test_file = next(edited.rglob("*_test.jsonl"))
    lines = test_file.read_text().splitlines()
    record = json.loads(lines[0])
    record["input"] = record["input"] + " (reworded)"
    test_file.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    out = tmp_path / "eval.jsonl"
    runs = (["metaicl", "--path", str(fixtures)], ["metaicl", "--path", str(edited)], ["icl"], ["icl", "--k", "2"])
    for args in runs:
        code, text = run_cli(
            monkeypatch, capsys, "eval", *args, "--model", str(tiny_model_dir), "--n", "2", "--methods", "none",
            "--out", str(out),
        )  # fmt: skip
        assert code == 0, text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["config_hash"] != rows[1]["config_hash"]  # one reworded question
    assert rows[2]["config_hash"] != rows[3]["config_hash"]  # another --k
    assert [r["extra"].get("data_path") for r in rows] == [str(fixtures), str(edited), None, None]
    warnings = mismatches(read_rows([out]))
    assert len(warnings) == 2 and "rows of icl" in warnings[0] and "rows of metaicl" in warnings[1]


@pytest.mark.parametrize("batch_size", [1, 8])
@pytest.mark.parametrize("where", ["context", "answer"])
def test_an_example_too_long_for_the_model_is_named(batch_size, where):
    """It said 'start a new conversation (Python: reset())' without saying which example of the file was at fault;
    then, batched, it named every example of the batch ('example short-1, long-2, short-3 does not fit'); a context
    too long for any memory told a `ccmem eval` user to make 'several add() calls'."""
    from ccmem.api import ContextTooLongError
    from ccmem.data.records import MemoryExample

    long = (["x" * 50, "y" * 50], "a") if where == "context" else (["abc"], "z" * 70)
    examples = [
        MemoryExample("short-1", ["abc"], "q", "a", chat=False),
        MemoryExample("long-2", long[0], "q", long[1], chat=False),
        MemoryExample("short-3", ["abc"], "q", "a", chat=False),
    ]
    session = load(tiny_model(positions=64), "full", system_prompt=None)
    settings = EvalSettings(batch_size=batch_size, system=None)
    with pytest.raises(ContextTooLongError, match=r"example long-2 does not fit .*model allows 64") as err:
        evaluate(session, examples, dataset="mine", settings=settings)
    assert "reset()" not in str(err.value) and "add()" not in str(err.value)  # advice for Python callers
    assert str(err.value).endswith("shorten or drop it, or evaluate with a method that keeps fewer positions")


def test_a_dialog_longer_than_the_model_is_evaluated_by_a_compressing_method_batched_or_not():
    """The batched path refused it at the model's last position where a chat re-bases its memory and
    goes on: ccm-concat could not be evaluated on dialogs longer than the model's context."""
    from ccmem.data.records import MemoryExample

    turns = [(f"t{i}", "ok") for i in range(30)]  # far past 128 positions, 1 slot per turn
    examples = [MemoryExample(f"long-{k}", turns[k:], "what?", "yes", ["yes", "no"], chat=True) for k in range(3)]
    rows = []
    for batch_size in (1, 8):
        session = load(tiny_model(positions=128), "ccm-concat", n_tok=1, system_prompt="Hi.")
        randomize_lora(session.method, session.lm)
        rows.append(evaluate(session, examples, dataset="mine", settings=EvalSettings(batch_size=batch_size)))
    assert rows[0].examples == rows[1].examples == 3 and rows[0].memory_slots == rows[1].memory_slots
    assert rows[0].perplexity == pytest.approx(rows[1].perplexity, rel=1e-4)  # batched re-bases as add does
    full = load(tiny_model(positions=128), "full", system_prompt="Hi.")
    with pytest.raises(ValueError, match=r"example long-0 does not fit .*model allows 128"):
        evaluate(full, examples, dataset="mine", settings=EvalSettings(batch_size=8))


def test_eval_gsm8k_generates_whole_solutions_by_default_and_says_without_generate(
    monkeypatch, capsys, tmp_path, tiny_model_dir
):
    """24 new tokens (eval's default for short answers) never reach a worked solution's '#### N' line."""
    from ccmem.eval import harness

    asked = []
    monkeypatch.setattr(harness, "generate_answer", lambda session, example, query, n: asked.append(n) or "#### 1")
    common = ("eval", "gsm8k", "--model", str(tiny_model_dir), "--n", "2", "--methods", "none")
    code, text = run_cli(monkeypatch, capsys, *common, "--generate", "--out", str(tmp_path / "a.jsonl"))
    assert code == 0, text
    assert asked == [256, 256] and "EM" in text
    code, text = run_cli(monkeypatch, capsys, *common, "--out", str(tmp_path / "b.jsonl"))
    assert code == 0 and "add --generate for the final answers' accuracy" in text
    code, text = run_cli(
        monkeypatch, capsys, "eval", "icl", "--model", str(tiny_model_dir), "--n", "2", "--k", "2", "--methods",
        "none", "--generate", "--out", str(tmp_path / "c.jsonl"),
    )  # fmt: skip
    assert code == 0 and asked[2:] == [24, 24]


def test_eval_on_a_file_says_which_generator_options_it_ignores_and_names_an_empty_file(
    monkeypatch, capsys, tmp_path, tiny_model_dir
):
    from ccmem.data import persona

    path = persona.write_jsonl(tmp_path / "mine.jsonl", list(persona.generate(2, "test")))
    common = ("eval", "persona", "--path", str(path), "--model", str(tiny_model_dir), "--methods", "none")
    code, text = run_cli(monkeypatch, capsys, *common, "--k", "5", "--out", str(tmp_path / "a.jsonl"))
    assert code == 0 and "--k shape generated dialogs; a --path file is read as written" in text
    path.write_text("\n")
    code, text = run_cli(monkeypatch, capsys, *common, "--out", str(tmp_path / "b.jsonl"))
    assert code == 2 and f"{path} holds no persona example" in " ".join(text.split()).replace("\n", "")


def test_eval_refuses_an_out_file_of_other_records_before_any_work(monkeypatch, capsys, tmp_path):
    """Rows appended to a stream's rows.jsonl or a dataset file could never be reported, and changed that file."""
    other = tmp_path / "rows.jsonl"
    other.write_text('{"method": "window", "tokens": 2560, "perplexity_1x": 41.2}\n')
    code, text = run_cli(monkeypatch, capsys, "eval", "persona", "--model", "no-such-model", "--methods", "none",
                         "--n", "1", "--out", str(other))  # fmt: skip
    text = " ".join(text.split())
    assert code == 2 and f"--out {other} holds something other than `ccmem eval` rows" in text, text
    assert "missing field" in text and "Traceback" not in text
    assert other.read_text() == '{"method": "window", "tokens": 2560, "perplexity_1x": 41.2}\n'


@pytest.mark.parametrize(
    ("dataset", "instead"), [("wikitext", "ccmem repro sentinel ppl"), ("mixture", "evaluate each family on its own")]
)
def test_eval_refuses_training_only_data_and_says_what_to_run(monkeypatch, capsys, tmp_path, dataset, instead):
    """`eval --help` listed both, but wikitext's passages have nothing to score (the error then said to pass the
    --split test it had), and no eval option gives a mixture its weights (the error named data.mixture)."""
    code, text = run_cli(monkeypatch, capsys, "eval", dataset, "--model", "no-such-model", "--methods", "none",
                         "--out", str(tmp_path / "rows.jsonl"))  # fmt: skip
    text = " ".join(text.split())
    assert code == 2 and f"dataset {dataset!r} is training data" in text and instead in text, text
    assert not (tmp_path / "rows.jsonl").exists()


def test_reports_give_accuracy_per_group_in_numeric_order(tmp_path):
    """README promised accuracy per group (how far back the fact was, ...), but only the JSONL rows held it."""
    from ccmem.data import dialogs
    from ccmem.data.loaders import persona_example
    from ccmem.eval.report import group_markdown

    examples = [persona_example(d, "dialogs") for d in dialogs.generate(6, "test", facts=(1, 2), turns=(4, 6))]
    row = evaluate(load(tiny_model(positions=2048), "full"), examples, dataset="dialogs", settings=EvalSettings())
    distances = row.extra["by"]["distance"]
    text = group_markdown([row])
    header = next(line for line in text.splitlines() if line.startswith("| method") and "-" in line)
    shown = [cell.strip() for cell in header.split("|")[2:-1]]
    assert set(shown) == set(distances)
    assert shown == sorted(shown, key=lambda v: int(v.split("-")[0].rstrip("+")))
    assert "**dialogs: accuracy by distance**" in text
    assert sum(g["n"] for g in distances.values()) == 6
    write_report([row], tmp_path)
    assert "accuracy by distance" in (tmp_path / "report.md").read_text()


def test_a_row_cut_by_a_crash_or_a_full_disk_never_blocks_reading_or_the_next_rows(tmp_path, monkeypatch, caplog):
    """A full disk left half a row in rows.jsonl, and every rerun then failed on it ('not pretty-printed JSON')."""
    import pathlib

    from ccmem.eval.harness import append_row

    path = tmp_path / "rows.jsonl"
    append_row(path, _row("full", "h", 1))
    with path.open("a") as f:
        f.write('{"method": "no')  # a crash mid-row
    assert [r.method for r in read_rows([path])] == ["full"] and "cut short" in caplog.text
    append_row(path, _row("none", "h", 1))  # the cut row is dropped before the next one
    assert [r.method for r in read_rows([path])] == ["full", "none"]

    real_open = pathlib.Path.open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(28, "No space left on device")

    def opener(self, mode="r", *args, **kwargs):
        f = real_open(self, mode, *args, **kwargs)
        return FullDisk(f) if self == path and "a" in mode else f

    monkeypatch.setattr(pathlib.Path, "open", opener)
    before = path.read_bytes()
    with pytest.raises(OSError, match=r"could not add a row to .*rows\.jsonl \(No space left on device\); the file"):
        append_row(path, _row("ccm-concat", "h", 1))
    assert path.read_bytes() == before


def test_report_shows_a_rerun_measurement_once(monkeypatch, capsys, tmp_path):
    """A rerun of `ccmem eval` appends to the same file: reports showed both rows side by side."""
    from ccmem.eval.harness import append_row

    path = tmp_path / "eval.jsonl"
    first, other, again = _row("full", "aaa", 10), _row("none", "aaa", 10), _row("full", "aaa", 10)
    again.accuracy = 0.25
    for row in (first, other, again):
        append_row(path, row)
    code, out = run_cli(monkeypatch, capsys, "report", str(path), "-o", str(tmp_path / "report"))
    assert code == 0 and "1 rows were measured again later (reruns)" in out
    lines = [line for line in (tmp_path / "report" / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in lines[1:]] == ["full", "none"] and "0.250" in lines[1]
    # the same file named twice is no rerun
    code, out = run_cli(monkeypatch, capsys, "report", str(path), str(path), "-o", str(tmp_path / "twice"))
    assert code == 0 and "1 rows were measured again later (reruns)" in out


def test_report_names_the_budget_of_compare_rows():
    """compare's four snapkv rows (one per budget) were all labelled `snapkv` in `ccmem report`."""
    from ccmem.eval.report import method_label

    row = _row("snapkv", "aaa", 10)
    row.budget = 0.125
    assert method_label(row) == "snapkv (budget=0.125)"


def test_reports_name_each_rows_options_and_write_plain_json(tmp_path):
    """Two snapkv rows of other ratios read the same in report.md; report.csv held Python reprs; a NaN made the
    rows file invalid JSON for strict parsers."""
    from ccmem.eval.harness import append_row

    low, high = _row("snapkv", "aaa", 10), _row("snapkv", "aaa", 10)
    low.options, high.options = {"ratio": 0.25}, {"ratio": 0.5}
    high.perplexity = float("nan")
    text = markdown([low, high])
    assert "| snapkv (ratio=0.25) |" in text and "| snapkv (ratio=0.5) |" in text
    write_report([low, high], tmp_path, metric="accuracy")
    assert '"{""ratio"": 0.25}"' in (tmp_path / "report.csv").read_text()  # JSON inside a CSV cell
    append_row(tmp_path / "rows.jsonl", high)
    assert json.loads((tmp_path / "rows.jsonl").read_text())["perplexity"] is None
    assert "NaN" not in (tmp_path / "rows.jsonl").read_text()


def test_reports_name_the_memory_precision_and_options_wherever_a_method_is_named():
    """A full row held at int8 read `full` like the float one, in the main table, the group tables and the
    not-comparable note; the group tables dropped snapkv's ratio too."""
    from ccmem.eval.report import group_markdown, mismatches

    plain, packed, low, high = (
        _row("full", "aaa", 4),
        _row("full", "bbb", 4),
        _row("snapkv", "aaa", 4),
        _row("snapkv", "aaa", 4),
    )
    packed.extra["memory_dtype"] = "int8"
    low.options, high.options = {"ratio": 0.25}, {"ratio": 0.5}
    for r in (plain, packed, low, high):
        r.extra["by"] = {"kind": {"pet": {"accuracy": 1.0, "n": 4}}}
    rows = [plain, packed, low, high]
    assert "| full (int8 memory) |" in markdown(rows) and "| full |" in markdown(rows)
    groups = group_markdown(rows)
    assert "| full (int8 memory) |" in groups and "| snapkv (ratio=0.25) |" in groups
    note = " ".join(mismatches(rows))
    assert "full (int8 memory)" in note and "snapkv (ratio=0.5)" in note


def test_own_files_folders_of_json_lists_ids_and_a_trailing_comma(tmp_path, monkeypatch, capsys):
    from ccmem.data.loaders import load_examples
    from ccmem.fileio import DatasetFormatError
    from ccmem.train.config import DataConfig

    record = {"turns": [["I live in Lisbon.", "ok"]], "question": "Where do I live?", "answer": "Lisbon",
              "options": ["Paris", "Lisbon"]}  # fmt: skip
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "test.json").write_text(json.dumps([record, record]))  # was: no test file (test with .jsonl)
    examples = load_examples(DataConfig(dataset="dialogs", path=str(folder)), "test")
    assert [e.id for e in examples] == ["item-1", "item-2"]  # were 'line- item 1', 'line- item 2'
    lines = tmp_path / "commas.jsonl"
    lines.write_text(json.dumps(record) + ",\n" + json.dumps(record) + "\n")
    with pytest.raises(DatasetFormatError, match=r"commas.jsonl:1: .*drop the comma after the object"):
        load_examples(DataConfig(dataset="dialogs", path=str(lines)), "test")
    own = tmp_path / "own.jsonl"
    own.write_text(json.dumps(record) + "\n")
    code, text = run_cli(monkeypatch, capsys, "eval", "dialogs", "--path", str(own), "-o", str(own), "--model", "x")
    assert code == 2 and "is the --path data file" in " ".join(text.split())
    assert own.read_text() == json.dumps(record) + "\n"
    data = tmp_path / "data"
    data.mkdir()
    (data / "test.jsonl").write_text(json.dumps(record) + "\n")  # the file --path data reads; rows were appended
    code, text = run_cli(monkeypatch, capsys, "eval", "dialogs", "--path", str(data), "-o", str(data / "test.jsonl"),
                         "--model", "x")  # fmt: skip
    assert code == 2 and "is inside the --path data folder" in " ".join(text.split())
    assert (data / "test.jsonl").read_text() == json.dumps(record) + "\n"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"memory_slots": None}, "field 'memory_slots' must be a number"),
        ({"label": None}, "field 'label' must be text"),
        ({"dataset": 5}, "field 'dataset' must be text"),
        ({"accuracy": "high"}, "field 'accuracy' must be a number or null"),
        ({"examples": "two"}, "field 'examples' must be a whole number"),
        ({"extra": [1, 2]}, "field 'extra' must be an object"),
        ({"options": [1]}, "field 'options' must be an object"),
        ({"extra": {"by": "x"}}, "extra.by must map"),
        ({"extra": {"by": {"turns": {"5": {"n": 3}}}}}, "extra.by.turns.5 must hold a numeric 'accuracy'"),
    ],
)
def test_report_names_the_file_line_and_field_of_a_row_with_a_wrong_type(
    monkeypatch, capsys, tmp_path, change, message
):
    """Such rows stopped `ccmem report` with "'<' not supported between instances of 'NoneType' and 'float'"."""
    from dataclasses import asdict

    from tests.unit.test_cli import run_cli

    rows = tmp_path / "rows.jsonl"
    good = asdict(_row("full", "aaa", 10))
    rows.write_text(json.dumps(good) + "\n" + json.dumps(good | change) + "\n")
    code, out = run_cli(monkeypatch, capsys, "report", str(rows), "-o", str(tmp_path / "report"))
    assert code == 2 and f"{rows}:2: not a ccmem eval row ({message}" in " ".join(out.split()), out


def test_report_checks_the_metric_before_writing_anything(tmp_path):
    """`--metric bogus` was refused after report.md and report.csv were written."""
    rows = [_row("full", "aaa", 10), _row("none", "aaa", 10)]
    for metric, message in (
        ("bogus", "unknown metric 'bogus'"),
        ("rouge_l", "no row has rouge_l; the rows have accuracy"),
    ):
        with pytest.raises(ValueError, match=message):
            write_report(rows, tmp_path / metric, metric)
        assert not (tmp_path / metric).exists()


def test_the_report_plot_shows_a_method_that_holds_no_slot(tmp_path, monkeypatch):
    """none without a system prompt holds 0 slots: a log axis left its point out of quality_vs_memory.png."""
    import dataclasses

    import matplotlib.pyplot as plt

    from ccmem.eval.report import plot

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    rows = [dataclasses.replace(_row("none", "h", 4), memory_slots=0.0, accuracy=0.25), _row("full", "h", 4)]
    plot(rows, tmp_path / "plot.png")
    ax = figures[0].axes[0]
    x, _ = ax.transData.transform((0.0, 0.25))
    left, right = ax.transAxes.transform((0, 0))[0], ax.transAxes.transform((1, 0))[0]
    assert left <= x <= right  # inside the axes, not at -inf


@pytest.mark.parametrize("generate", [False, True])
def test_an_example_too_long_for_full_is_refused_before_the_methods_ahead_of_it_run(tmp_path, generate):
    """eval --methods none,full wrote none's rows, then failed at full; refused up front exactly where full fails."""
    from ccmem.api import ContextTooLongError
    from ccmem.data.records import MemoryExample
    from ccmem.eval.harness import check_whole_context_fits

    example = MemoryExample("long", [("My locker is 6305.", "Noted."), ("I like tea.", "Nice.")], "Locker?", "6305",
                            options=["63", "6305", "7105"])  # fmt: skip
    settings = EvalSettings(system="Hi.", generate=generate, max_new_tokens=4)
    sample = to_sample(tiny_model().tokenizer, example, system="Hi.")
    total = len(sample.sink) + sum(len(c) for c in sample.chunks) + len(sample.tail)
    verdicts = []
    for positions in range(total - 4, total + 6):  # around the edge: the check says what full then does
        lm = tiny_model(positions=positions)
        try:
            evaluate(load(lm, "full", system_prompt="Hi."), [example], dataset="persona", settings=settings)
            fits = True
        except ContextTooLongError:
            fits = False
        try:
            check_whole_context_fits(lm, "full", [example], dataset="persona", settings=settings)
            said = True
        except ContextTooLongError:
            said = False
        verdicts.append((positions, fits, said))
    assert all(fits == said for _, fits, said in verdicts), verdicts
    assert any(not fits for _, fits, _ in verdicts) and any(fits for _, fits, _ in verdicts)
    lm = tiny_model(positions=next(p for p, fits, _ in verdicts if not fits))
    out = tmp_path / "rows.jsonl"
    with pytest.raises(ContextTooLongError, match=r"example long needs .* positions with full"):
        list(compare(lm, ["none", "full"], [example], dataset="persona", settings=settings, out=out))
    assert not out.exists()  # none did not run first


def test_accuracy_over_only_the_examples_with_options_says_how_many_it_is_over(caplog):
    """A file where only some records have options reported accuracy over those alone, while the row said
    examples: N for all of them: 1.000 over 2 of 6 read as 1.000 over 6."""
    lm = tiny_model()
    examples = icl.examples(6, "test", k=2, seed=3)
    for e in examples[2:]:
        e.options = []
    with caplog.at_level("WARNING", logger="ccmem.eval.harness"):
        row = evaluate(load(lm, "full"), examples, dataset="icl", settings=EvalSettings())
    assert row.examples == 6 and row.extra["accuracy_examples"] == 2 and row.accuracy is not None
    assert "accuracy is over the 2 of 6 examples that have answer options" in caplog.text
    assert f"{row.accuracy:.3f} (of 2)" in markdown([row])
    caplog.clear()
    whole = evaluate(load(lm, "full"), examples[:2], dataset="icl", settings=EvalSettings())
    assert "accuracy_examples" not in whole.extra and "(of" not in markdown([whole]) and not caplog.text


def test_examples_without_a_grouping_are_counted_under_none_not_left_out():
    """A record without a given groups key was left out of that grouping's table: its groups' n summed to fewer
    examples than the row holds, with no word of the rest."""
    lm = tiny_model()
    examples = icl.examples(5, "test", k=2, seed=3)
    for e in examples[:3]:
        e.groups = {"distance": "2-4"}
    row = evaluate(load(lm, "full"), examples, dataset="icl", settings=EvalSettings())
    by = row.extra["by"]["distance"]
    assert by["2-4"]["n"] == 3 and by["(none)"]["n"] == 2
    assert by["(none)"]["accuracy"] * 2 + by["2-4"]["accuracy"] * 3 == pytest.approx(row.accuracy * 5)


def test_a_data_path_is_recorded_whole_not_as_typed(monkeypatch, capsys, tmp_path, tiny_model_dir):
    """`--path mine` was recorded as "mine": two runs in two folders looked alike in the rows."""
    shutil.copytree(Path(__file__).resolve().parent.parent / "fixtures" / "metaicl", tmp_path / "mine")
    monkeypatch.chdir(tmp_path)
    code, text = run_cli(
        monkeypatch, capsys, "eval", "metaicl", "--path", "mine", "--model", str(tiny_model_dir), "--n", "2",
        "--methods", "none", "--out", "eval.jsonl",
    )  # fmt: skip
    assert code == 0, text
    row = json.loads((tmp_path / "eval.jsonl").read_text().splitlines()[0])
    assert row["extra"]["data_path"] == str((tmp_path / "mine").resolve())
