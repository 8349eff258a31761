"""Every command explains itself, and bad input is one red line with exit code 2, never a traceback."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pytest
from rich.console import Console

import ccmem
from ccmem import cli
from ccmem.options import OptionError

COMMANDS = [
    "demo", "chat", "serve", "compress", "ask", "generate", "methods", "models", "train", "eval", "report", "data",
]  # fmt: skip


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["ccmem", *args])
    monkeypatch.delenv("CCMEM_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out = capsys.readouterr()
    return int(exit_info.value.code or 0), out.out + out.err


@pytest.mark.parametrize("group", [["repro"], ["repro", "sentinel"], ["sessions"]])
def test_a_group_given_no_command_shows_its_help(monkeypatch, capsys, group):
    """As a bare ``ccmem`` does: the commands to choose from, not only "Missing command"."""
    code, text = run_cli(monkeypatch, capsys, *group)
    assert code == 2 and "Usage: ccmem " + " ".join(group) in text and "Commands" in text


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_command_has_help(monkeypatch, capsys, command, flag):
    code, text = run_cli(monkeypatch, capsys, command, flag)
    assert code == 0
    assert "Usage: ccmem " + command in text
    if command in ("chat", "compress", "ask", "eval"):  # adapters trained on a stage-1 LoRA need it everywhere
        assert "--stage1" in text


def _groups(group=None, path=()):
    """Every command group of ccmem (the top level, repro, repro sentinel, ...) as its words after `ccmem`."""
    import typer

    group = group or typer.main.get_command(cli.app)
    yield path
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _groups(command, (*path, name))


@pytest.mark.parametrize("group", list(_groups()), ids=lambda g: " ".join(("ccmem", *g)))
def test_every_command_summary_in_a_group_help_is_one_whole_sentence(monkeypatch, capsys, group):
    """The summaries of serve, generate, stream and the repro commands broke mid-sentence in `ccmem --help`: typer
    shows the docstring's first paragraph with its line breaks, so '... that keeps each' ended a row."""
    monkeypatch.setenv("COLUMNS", "1000")  # one line per row, unless the summary itself holds a line break
    code, text = run_cli(monkeypatch, capsys, *group, "--help")
    assert code == 0
    panel = text[text.index("─ Commands ─") :]
    rows = panel[: panel.index("╰")].splitlines()[1:]
    assert rows
    for row in rows:
        name, _, summary = row.strip("│ ").partition(" ")
        assert name, f"a summary goes on over two rows: {row.strip()}"
        summary = summary.strip()
        assert summary.endswith(".") and not summary.endswith("..."), f"{name}: {summary!r}"
        assert len(summary) <= 110, f"{name}: a summary is one short sentence, not {len(summary)} characters"


def _commands(group=None, path=()):
    """Every command and group of ccmem as its words after `ccmem`."""
    import typer

    group = group or typer.main.get_command(cli.app)
    for name, command in group.commands.items():
        yield (*path, name)
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))


@pytest.mark.parametrize("command", list(_commands()), ids=" ".join)
def test_a_commands_description_breaks_lines_only_between_paragraphs(monkeypatch, capsys, command):
    """typer kept the docstring's line breaks, so `ccmem eval --help` broke '... are appended' / 'to --out;' at
    the source's wrap, whatever the terminal's width."""
    monkeypatch.setenv("COLUMNS", "1000")
    code, text = run_cli(monkeypatch, capsys, *command, "--help")
    assert code == 0
    description = text[text.index("Usage:") : text.index("╭")].splitlines()[1:]
    for line in filter(str.strip, description):
        assert line.rstrip().endswith("."), f"a paragraph broke mid-sentence: {line.strip()!r}"


def _leaf_commands():
    """(words after `ccmem`, click command) of every command that runs, in groups too."""
    import typer

    def walk(group, path):
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                yield from walk(command, (*path, name))
            else:
                yield (*path, name), command

    return list(walk(typer.main.get_command(cli.app), ()))


@pytest.mark.parametrize(
    ("words", "command"), _leaf_commands(), ids=lambda x: " ".join(x) if isinstance(x, tuple) else ""
)
def test_every_option_has_help_that_explains_it_and_names_its_own_default(words, command):
    """`ccmem repro sentinel generate --help` said of --docs only 'Documents (paper: 200).'"""
    import re

    for param in command.params:
        text = (getattr(param, "help", None) or "").strip()
        outside_parentheses = re.sub(r"\([^()]*\)", "", text).replace(".", " ").split()
        assert len(outside_parentheses) >= 2 and text.endswith((".", ")")), f"{' '.join(words)} {param.name}: {text!r}"
        if param.default not in (None, "") and getattr(param, "show_default", True) is not False:
            for named in re.findall(r"default:\s*([\w./-]+)", text, flags=re.IGNORECASE):
                assert named == str(param.default), f"{' '.join(words)} {param.name}: help says {named}"


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("chat", "-O lora_targets=[q_proj,v_proj])"),
        ("data", "Training dialogs [default: 2400] (icl"),
        ("data", "each [default: 200]; icl: dev queries per task [default: 20] (its"),
    ],
)
def test_help_shows_square_brackets(monkeypatch, capsys, command, shown):
    """Help is rich markup: '[default: 2400]' and '[q_proj,v_proj]' read as style tags and vanished from it."""
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option
    code, text = run_cli(monkeypatch, capsys, command, "--help")
    assert code == 0 and shown in " ".join(text.split()), text


def test_methods_lists_the_registry(monkeypatch, capsys):
    code, text = run_cli(monkeypatch, capsys, "methods")
    assert code == 0
    for name in ("full", "none", "ccm-concat", "ccm-merge", "gist"):
        assert name in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--methods", "full,ccm-foo"], "unknown method 'ccm-foo'; valid methods"),
        (["demo", "--model", "no-such-model"], "unknown model 'no-such-model'"),
        (
            ["chat", "--method", "full", "--model", "SmolLM2-135M"],
            "unknown model 'SmolLM2-135M' (did you mean 'smollm2-135m'?)",
        ),
        (["chat", "--method", "full", "--model", "mistral-7b-instruct"], "(did you mean 'mistral-7b-inst'?)"),
        (["chat", "--model", "/nonexistent/folder/x.gguf"], "no GGUF file"),
        (
            ["chat", "--method", "ccm-concat", "--n-tok", "0", "--model", "none-model"],
            "n_tok must be at least 1",
        ),
        (["train", "persona-ccm-concat", "train.learning_rate=1e-4"], "did you mean 'train.lr'?"),
        (["train", "persona-concat"], "did you mean 'persona-ccm-concat'?"),
        (["train", "persona-ccm-concat", "method.n_tok=four"], "method.n_tok must be int, got 'four'"),
        (
            ["chat", "--method", "ccm-concat", "-O", "lora_targets=q_proj", "--model", "none-model"],
            "got 'q_proj' (a list: lora_targets=[q_proj, ...])",
        ),
        (["eval", "persona", "--methods", "full,ccm-foo"], "unknown method 'ccm-foo'"),
        (["demo", "--methods", "full,none,full"], "--methods names 'full' twice; each method runs once"),
        (["eval", "persona", "--methods", "snapkv, snapkv"], "--methods names 'snapkv' twice"),
        (["compare", "--methods", "full,full"], "--methods names 'full' twice"),
        (["eval", "metaicl", "--methods", "full"], "give the downloaded folder (--path, or data.path in training)"),
        (["data", "nonsense", "-o", "x"], "unknown generator 'nonsense'"),
        (["data", "nonsense", "-o", "x", "--turns", "4"], "unknown generator 'nonsense'"),
        (["data", "persna", "-o", "x"], "unknown generator 'persna' (did you mean 'persona'?)"),
        (["compare", "--tasks", "persna"], "unknown task 'persna' (did you mean 'persona'?)"),
        # each was read by no generator of these, without a word
        (["data", "persona", "-o", "x", "--turns", "10"], "--turns shapes dialogs data; 'persona' does not read it"),
        (["data", "dialogs", "-o", "x", "--small-talk", "3"], "--small-talk shapes persona data; 'dialogs' does not"),
        (["data", "passages", "-o", "x", "--tasks", "3"], "--tasks shapes icl data; 'passages' does not read it"),
        (["eval", "persona", "--turns", "5", "--methods", "full"], "--turns shapes dialogs data; dataset 'persona'"),
        (["eval", "dialogs", "--small-talk", "5", "--methods", "full"], "--small-talk shapes persona data; dataset"),
        (["eval", "persona", "--source", "news", "--methods", "full"], "--source 'news' chooses the text of the"),
        (["report", "/nonexistent/eval.jsonl"], "no results file at /nonexistent/eval.jsonl"),
    ],
)
def test_bad_input_is_one_line(monkeypatch, capsys, args, message):
    code, text = run_cli(monkeypatch, capsys, *args)
    assert code == 2
    assert message in " ".join(text.split())
    assert "Traceback" not in text and "CCMEM_DEBUG" not in text  # a refusal, not a fault to debug


@pytest.mark.parametrize(
    ("args", "message", "command"),
    [
        (["eval", "persona", "--n", "abc"], "error: Invalid value for '--n': ", "ccmem eval"),
        (["compress"], "error: Missing argument 'text_file'.", "ccmem compress"),
        (["chat", "--bogus"], "error: No such option: --bogus", "ccmem chat"),
        (["eval", "persona", "--attn", "foo"], "error: Invalid value for '--attn': ", "ccmem eval"),
        (["bogus"], "error: No such command 'bogus'.", "ccmem"),
        (["repro", "--bogus"], "error: No such option: --bogus", "ccmem repro"),
        (["repro", "sentinel", "ppl", "--lr", "-1"], "error: Invalid value for '--lr': ", "ccmem repro sentinel ppl"),
    ],
)  # fmt: skip
def test_a_usage_error_is_one_line_with_the_help_hint(monkeypatch, capsys, args, message, command):
    """click's own refusals (a missing argument, a bad number, an unknown option) printed typer's boxed panel,
    unlike ccmem's own one-line errors."""
    monkeypatch.setenv("COLUMNS", "1000")
    code, text = run_cli(monkeypatch, capsys, *args)
    lines = text.splitlines()
    assert code == 2
    assert len(lines) == 2 and lines[0].startswith(message), text
    assert lines[1] == f"Try '{command} --help' for help."


def test_eval_refuses_an_option_its_adapter_contradicts_before_any_work(monkeypatch, capsys, tmp_path):
    """The shipped ccm-concat adapter is recurrent: `-O recurrent=false` was refused only after `full` had run
    and appended its row."""
    from ccmem import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "eval.jsonl"
    args = ["eval", "icl", "--methods", "full,ccm-concat", "-O", "recurrent=false", "--n", "2", "-o", str(out)]
    code, text = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and "was trained with recurrent=True, but recurrent=False was asked" in " ".join(text.split())
    assert not out.exists()


@pytest.mark.parametrize(
    "args",
    [
        ["compress", "{notes}", "-o", "{file}/memory.safetensors", "--method", "full"],
        ["generate", "{notes}", "-o", "{file}/sub/out.jsonl"],
        ["eval", "persona", "--n", "1", "--methods", "full,none", "-o", "{file}/eval.jsonl"],
        ["compare", "--methods", "full", "--tasks", "persona", "--n", "1", "--no-decode", "-o", "{file}/cmp"],
        ["demo", "--methods", "full", "--out", "{file}/demo.jsonl"],
        ["data", "persona", "-o", "{file}/data"],
    ],
)
def test_an_output_path_under_a_file_is_refused_before_any_work(monkeypatch, capsys, tmp_path, args):
    """eval and compare wrote their first rows only after the first method's (or cell's) work, and compress its
    memory after the whole text: there, a folder that could not be made ('[Errno 17] File exists') was said."""
    from ccmem import api, loading

    def no_model(*args, **kwargs):
        pytest.fail("the model was loaded")

    monkeypatch.setattr(loading, "load_model", no_model)
    monkeypatch.setattr(api, "load_model", no_model)
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"input": "w1 w2", "prompt": "w3", "answer": "w4"}\n')
    (tmp_path / "file").write_text("a file, not a folder")
    filled = [a.format(notes=notes, file=tmp_path / "file") for a in args]
    code, text = run_cli(monkeypatch, capsys, *filled)
    assert code == 2 and f"{tmp_path / 'file'} is a file, so no folder can be made there" in " ".join(text.split())


def test_compare_without_a_task_is_refused_before_the_model_loads(monkeypatch, capsys, tmp_path):
    """--tasks ',' (or '') made an empty grid: the model loaded and decoding was timed for every method, then
    'no result rows to report'."""
    from ccmem import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, text = run_cli(monkeypatch, capsys, "compare", "--tasks", ",", "--methods", "full", "-o", str(tmp_path))
    assert code == 2 and "no task to run; tasks: persona" in text


def test_missing_file_argument_is_reported(monkeypatch, capsys, tmp_path):
    code, text = run_cli(monkeypatch, capsys, "ask", str(tmp_path / "missing.safetensors"), "hi")
    assert code == 2
    assert "does not exist" in text
    assert "Traceback" not in text


def test_compress_then_ask_from_the_memory_file(monkeypatch, capsys, tiny_model_dir, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12")
    memory = tmp_path / "notes.safetensors"
    common = ["--model", str(tiny_model_dir), "--method", "ccm-concat", "--n-tok", "2", "--system", ""]
    code, out = run_cli(
        monkeypatch, capsys, "compress", str(text), "--out", str(memory), "--chunk-tokens", "5", *common
    )
    assert code == 0, out
    assert "12 tokens in 6 slots" in out  # 12 tokens -> 3 chunks of at most 5 -> 3 x 2 <COMP> slots
    assert "untrained" in " ".join(out.split())
    code, out = run_cli(monkeypatch, capsys, "ask", str(memory), "w3 w4", "--max-new-tokens", "3", *common)
    assert code == 0, out
    common[3] = "ccm-merge"
    code, out = run_cli(monkeypatch, capsys, "ask", str(memory), "w3", *common)
    assert code == 2
    assert "method='ccm-concat'" in out


@pytest.mark.parametrize(
    ("text", "made_with"),
    [
        # no --method at ask: snapkv with ratio 0.25 and window_size 4, as the file says
        (
            "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 " * 4,
            ["--method", "snapkv", "-O", "ratio=0.25", "-O", "window_size=4"],
        ),
        # a trainable method run untrained (no adapter carries its options): `ask` took only its runtime options
        # from the memory, so a gist memory made with --n-tok 2 was refused for n_tok='4'
        (
            "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12",
            ["--method", "gist", "--n-tok", "2", "-O", "lora_targets=[q_proj, v_proj]"],
        ),
    ],
    ids=["snapkv", "untrained-gist"],
)
def test_ask_reads_the_method_and_its_options_from_the_memory_file(
    monkeypatch, capsys, tiny_model_dir, tmp_path, text, made_with
):
    source = tmp_path / "notes.txt"
    source.write_text(text)
    memory = tmp_path / "snap.safetensors"
    made = ["--model", str(tiny_model_dir), "--system", ""]
    code, out = run_cli(monkeypatch, capsys, "compress", str(source), "-o", str(memory), *made_with, *made)
    assert code == 0, out
    code, out = run_cli(monkeypatch, capsys, "ask", str(memory), "w3", "--max-new-tokens", "2", *made)
    assert code == 0, out


def test_compress_takes_the_adapters_method_and_ask_the_icformer_marker_from_the_memory(
    monkeypatch, capsys, tiny_model_dir, tmp_path
):
    """The marker's keys/values are in an icformer memory: `ask -O marker=...` used to be accepted with no effect."""
    from ccmem.adapter import save_adapter
    from ccmem.loading import load_model
    from tests.methods.test_contract import randomize_state

    lm = load_model(str(tiny_model_dir))
    method = ccmem.get_method("icformer", num_query_tokens=2, num_hidden_layers=1)
    randomize_state(method, lm)
    adapter = save_adapter(method, lm, tmp_path / "former.safetensors")
    text = tmp_path / "notes.txt"
    text.write_text("w1 w2 w3 w4 w5 w6 w7 w8")
    memory = tmp_path / "notes.safetensors"
    common = ["--model", str(tiny_model_dir), "--adapter", str(adapter), "--system", ""]
    code, out = run_cli(monkeypatch, capsys, "compress", str(text), "-o", str(memory), "-O", "marker=lm", *common)
    assert code == 0, out  # no --method: the adapter's (it was ccm-concat, which refused an icformer adapter)
    code, out = run_cli(monkeypatch, capsys, "ask", str(memory), "w3", "--max-new-tokens", "2", *common)
    assert code == 0, out  # no -O: the memory's marker
    code, out = run_cli(monkeypatch, capsys, "ask", str(memory), "w3", "-O", "marker=ft", *common)
    assert code == 2 and "was made with marker='lm', but this session has marker='ft'" in " ".join(out.split())


def test_compress_prompts_as_the_adapter_was_trained_unless_system_is_given(
    monkeypatch, capsys, tiny_model_dir, tmp_path
):
    """Without --system a session takes the system prompt its adapter records (its training config's data.system),
    as `repro gsm8k` does: it took the default, under which the adapter never learned to read a memory. A
    --system that differs from the adapter's is kept, with a note."""
    from ccmem.adapter import save_adapter
    from ccmem.loading import load_model

    lm = load_model(str(tiny_model_dir))
    extra = {"config": {"data": {"dataset": "persona", "system": "w40 w41"}}}
    adapter = save_adapter(ccmem.get_method("ccm-concat", n_tok=2), lm, tmp_path / "a.safetensors", extra=extra)
    text = tmp_path / "notes.txt"
    text.write_text("w1 w2 w3 w4 w5 w6 w7 w8")
    memory = tmp_path / "notes.safetensors"
    common = ["--model", str(tiny_model_dir), "--adapter", str(adapter)]
    code, out = run_cli(monkeypatch, capsys, "compress", str(text), "-o", str(memory), *common)
    out = " ".join(out.split())
    assert code == 0 and "system prompt: 'w40 w41', the one the adapter was trained with" in out, out
    code, out = run_cli(monkeypatch, capsys, "ask", str(memory), "w3", "--system", "", *common)
    assert code == 2 and "compressed with the system prompt 'w40 w41'" in " ".join(out.split())
    code, out = run_cli(monkeypatch, capsys, "compress", str(text), "-o", str(memory), "--system", "w7", *common)
    out = " ".join(out.split())
    assert (
        code == 0 and "was trained with the system prompt 'w40 w41', and runs here with the system prompt 'w7'" in out
    ), out
    code, out = run_cli(monkeypatch, capsys, "ask", str(memory), "w3", "--system", "w7", *common)
    assert code == 0, out
    note = ccmem.load(lm, "ccm-concat", adapter=adapter).adapter.system_note
    assert note("w40 w41") is None and "and runs here with no system prompt" in str(note(None))


def test_ask_refuses_an_untrained_memory_for_what_it_is_where_an_adapter_ships(
    monkeypatch, capsys, tiny_model_dir, tmp_path
):
    """A memory made untrained (a model without a shipped adapter) was asked with the options it records, the
    adapter's lora_targets=None among them, against a model with a shipped adapter: the refusal named lora_targets
    (an option the user never gave), not the memory's model or adapter."""
    from ccmem import adapter as adapters
    from ccmem.adapter import save_adapter
    from ccmem.loading import load_model

    text = tmp_path / "notes.txt"
    text.write_text("w1 w2 w3 w4 w5 w6 w7 w8")
    memory = tmp_path / "notes.safetensors"
    common = ["--model", str(tiny_model_dir), "--system", ""]
    code, out = run_cli(monkeypatch, capsys, "compress", str(text), "-o", str(memory), "--method", "ccm-concat",
                        *common)  # fmt: skip
    assert code == 0, out
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    save_adapter(ccmem.get_method("ccm-concat", lora_targets=["q_proj"]), load_model(str(tiny_model_dir)),
                 shipped / "ccm-concat.safetensors")  # fmt: skip
    monkeypatch.setattr(adapters, "_shipped_folder", lambda name: shipped)
    code, out = run_cli(monkeypatch, capsys, "ask", str(memory), "w3", *common)
    out = " ".join(out.split())
    assert code == 2 and "lora_targets" not in out and "was made with adapter untrained" in out, out


def test_chat_answers_and_compresses_each_exchange(monkeypatch, capsys, tiny_model_dir, tmp_path):
    saved = tmp_path / "chat.safetensors"
    lines = ["w1 w2 w3", "/memory", f"/save {saved}", "/reset", "/memory", "/quit"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    code, out = run_cli(
        monkeypatch,
        capsys,
        "chat",
        "--model",
        str(tiny_model_dir),
        "--method",
        "ccm-merge",
        "--n-tok",
        "3",
        "--system",
        "",
        "--max-new-tokens",
        "4",
    )
    assert code == 0, out
    assert "bot>" in out
    assert "3 slots" in out  # one exchange compressed into the 3 <COMP> slots
    assert "0 slots" in out  # after /reset
    assert saved.is_file()


def test_compress_refuses_bad_paths_and_binary_input_before_any_work(monkeypatch, capsys, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("some notes")
    for out, message in [(text, "is the input file"), (tmp_path, "is a directory")]:
        code, output = run_cli(monkeypatch, capsys, "compress", str(text), "-o", str(out), "--model", "no-such-model")
        assert code == 2 and message in " ".join(output.split()), output  # refused before the model is looked up
    assert text.read_text() == "some notes"
    binary = tmp_path / "image.bin"
    binary.write_bytes(b"\x89PNG\x00\x00\x01")
    code, output = run_cli(monkeypatch, capsys, "compress", str(binary), "-o", str(tmp_path / "m.safetensors"))
    assert code == 2 and "looks like a binary file" in output


def test_compress_says_when_bytes_were_replaced(monkeypatch, capsys, tmp_path, tiny_model_dir):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("w1 caf\xe9 w2".encode("latin-1"))
    code, output = run_cli(
        monkeypatch, capsys, "compress", str(latin), "-o", str(tmp_path / "m.safetensors"),
        "--model", str(tiny_model_dir), "--method", "full", "--system", "",
    )  # fmt: skip
    assert code == 0, output
    assert "is not valid UTF-8: 1 characters were replaced" in " ".join(output.split())


def test_ask_explains_that_the_memory_keeps_its_system_prompt(monkeypatch, capsys, tmp_path, tiny_model_dir):
    text = tmp_path / "notes.txt"
    text.write_text("w1 w2 w3")
    memory = tmp_path / "m.safetensors"
    common = ["--model", str(tiny_model_dir), "--method", "full"]
    assert run_cli(monkeypatch, capsys, "compress", str(text), "-o", str(memory), *common, "--system", "w4")[0] == 0
    code, output = run_cli(monkeypatch, capsys, "ask", str(memory), "w1", *common, "--system", "w5")
    assert code == 2 and "was compressed with the system prompt 'w4'" in " ".join(output.split())
    code, output = run_cli(monkeypatch, capsys, "ask", str(memory), "w1", *common, "--max-new-tokens", "2")
    assert code == 0, output


def test_methods_lists_kind_options_and_paper(monkeypatch, capsys):
    code, text = run_cli(monkeypatch, capsys, "methods")
    assert code == 0
    flat = " ".join(text.split())
    assert "snapkv training-free" in flat and "window_size=64" in flat and "ratio=0.125" in flat
    assert "ccm-concat learned" in flat and "Kim et al." in flat
    code, text = run_cli(monkeypatch, capsys, "methods", "h2o")
    assert code == 0 and "-O recent=0" in text and "snapkv" not in text
    # scripts/pack_adapter.py's help sends here for the options it may set: they were listed nowhere
    code, text = run_cli(monkeypatch, capsys, "methods", "icformer")
    assert code == 0 and "runtime options (an adapter runs with any value" in " ".join(text.split())
    assert "avg_level, marker, max_chunk_len, max_seq_len, objective, pretrain_min_len, use_chunk" in " ".join(
        text.split()
    )


def test_an_option_is_given_as_methods_shows_it_or_as_a_fraction():
    from ccmem.options import parse_pairs

    # `ccmem methods` shows "-O max_slots=None"; --budgets takes 1/8, so -O ratio does too
    assert parse_pairs(["max_slots=None", "ratio=1/8", "window_size=4", "n=3/0"]) == {
        "max_slots": None, "ratio": 0.125, "window_size": 4, "n": "3/0"
    }  # fmt: skip


def test_an_option_given_twice_with_two_values_is_said_and_the_last_one_counts(caplog):
    from ccmem.options import parse_pairs
    from ccmem.train.config import load_config

    assert parse_pairs(["ratio=0.25", "n_tok=2", "ratio=0.5"]) == {"ratio": 0.5, "n_tok": 2}
    assert "-O ratio is given twice (0.25, then 0.5): the last one counts" in caplog.text
    caplog.clear()
    assert parse_pairs(["ratio=0.5", "ratio= 0.5"]) == {"ratio": 0.5} and not caplog.text  # the same value: quiet
    config = load_config("persona-ccm-concat", ["train.max_steps=10", "train.max_steps=20"])
    assert config.train.max_steps == 20
    assert "override train.max_steps is given twice (10, then 20): the last one counts" in caplog.text


def test_demo_is_readable_in_an_80_column_terminal(monkeypatch, capsys, tiny_model_dir):
    monkeypatch.setattr(cli, "console", Console(width=80, force_terminal=False))
    methods = "full,none,expected-attention,streaming-llm"
    code, text = run_cli(monkeypatch, capsys, "demo", "--model", str(tiny_model_dir), "--methods", methods,
                         "--max-new-tokens", "12")  # fmt: skip
    assert code == 0, text
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert sum("expected-attention" in line for line in lines) >= 3  # one row per question, name not cut
    answer_rows = [line for line in lines if line.lstrip().startswith("streaming-llm")]
    assert answer_rows and all(len(line) <= 80 for line in answer_rows)
    # then one summary over all questions: a row per method with how many it got right both ways
    summary = lines[next(i for i, line in enumerate(lines) if "all questions" in line) :]
    assert "right by generation" in " ".join(summary) and "right by scoring" in " ".join(summary)
    assert sum(line.lstrip().startswith(("full ", "none ", "expected-attention ")) for line in summary) == 3


def test_demo_headers_are_whole_when_every_method_name_is_short(monkeypatch, capsys, tiny_model_dir):
    """The method column was sized by the names alone: with full and none, its header ("method") was wider, the
    table passed the terminal's width and rich cut the headers to "g…" and "slo…"."""
    monkeypatch.setattr(cli, "console", Console(width=80, force_terminal=False))
    code, text = run_cli(monkeypatch, capsys, "demo", "--model", str(tiny_model_dir), "--methods", "full,none",
                         "--max-new-tokens", "2")  # fmt: skip
    assert code == 0, text
    headers = [line.split() for line in text.splitlines() if line.lstrip().startswith("method ")]
    assert headers and all(h == ["method", "answer", "gen", "score", "slots", "KiB", "s"] for h in headers[:-1]), text


def test_a_training_free_method_compresses_and_answers_from_the_command_line(
    monkeypatch, capsys, tmp_path, tiny_model_dir
):
    text = tmp_path / "notes.txt"
    text.write_text(" ".join(f"w{i % 40}" for i in range(64)))
    memory = tmp_path / "m.safetensors"
    common = ["--model", str(tiny_model_dir), "--method", "snapkv", "-O", "ratio=0.25", "-O", "window_size=4"]
    code, out = run_cli(monkeypatch, capsys, "compress", str(text), "-o", str(memory), *common, "--system", "")
    assert code == 0, out
    assert "16 slots" in " ".join(out.split())  # a quarter of the 64 tokens
    code, out = run_cli(monkeypatch, capsys, "ask", str(memory), "w3", *common, "--max-new-tokens", "2")
    assert code == 0, out
    code, out = run_cli(monkeypatch, capsys, "ask", str(memory), "w3", *common[:4], "-O", "ratio=0.5")
    assert code == 2 and "ratio" in out  # another budget: another memory
    code, out = run_cli(monkeypatch, capsys, "compress", str(text), "-o", str(memory), *common, "-O", "ratio=2")
    assert code == 2 and "ratio must be in (0, 1]" in out


def test_a_failing_chat_command_says_why_and_the_chat_goes_on(monkeypatch, capsys, tiny_model_dir, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a memory")
    lines = ["w1 w2", f"/load {junk}", f"/load {tmp_path / 'missing.safetensors'}", f"/save {tmp_path}", "/memory",
             "/quit"]  # fmt: skip
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    code, out = run_cli(monkeypatch, capsys, "chat", "--model", str(tiny_model_dir), "--method", "full",
                        "--system", "", "--max-new-tokens", "2")  # fmt: skip
    flat = " ".join(out.split())
    assert code == 0, out
    assert "is not a readable safetensors memory file" in flat and "no memory file at" in flat
    assert "`ccmem compress TEXT --out FILE` wrote (compress reads a text file into one)" in flat  # a text given
    assert f"{tmp_path} is a folder: give the memory file's name" in flat and "Errno" not in flat
    assert "slots (0 sink" in flat  # the chat went on, with its memory


def test_a_message_past_the_models_positions_is_refused_and_the_chat_goes_on(
    monkeypatch, capsys, tiny_model_dir, tmp_path
):
    lines = ["w1 w2", "/memory", "/quit"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    code, out = run_cli(monkeypatch, capsys, "chat", "--model", str(tiny_model_dir), "--method", "full",
                        "--system", "", "--max-new-tokens", "100000")  # fmt: skip
    flat = " ".join(out.split())
    assert code == 0, out
    assert "but the model allows" in flat and "nothing was remembered" in flat and "--max-new-tokens" in flat
    assert "slots (0 sink" in flat  # the chat went on


def test_chat_session_continues_where_it_stopped(monkeypatch, capsys, tiny_model_dir, tmp_path):
    common = ["chat", "--model", str(tiny_model_dir), "--method", "ccm-concat", "--n-tok", "2", "--system", ""]
    common += ["--max-new-tokens", "3", "--session", "notes", "--store", str(tmp_path / "store")]
    monkeypatch.setattr("sys.stdin", io.StringIO("w1 w2 w3\nw4 w5\n/quit\n"))
    code, out = run_cli(monkeypatch, capsys, *common)
    assert code == 0, out
    assert "session notes: 0 earlier turns" in out
    monkeypatch.setattr("sys.stdin", io.StringIO("/memory\n/quit\n"))
    code, out = run_cli(monkeypatch, capsys, *common)
    assert code == 0, out
    assert "session notes: 2 earlier turns, 4 slots" in " ".join(out.split())  # two exchanges x 2 <COMP> slots
    code, out = run_cli(monkeypatch, capsys, *[a if a != "ccm-concat" else "ccm-merge" for a in common])
    assert code == 2 and "was made with" in " ".join(out.split()) and "Traceback" not in out
    code, out = run_cli(monkeypatch, capsys, *common[:-4], "--session", "../x")
    assert code == 2 and "invalid session name" in out


def test_a_chat_session_goes_on_through_the_python_api_and_the_server(monkeypatch, capsys, tiny_model_dir, tmp_path):
    """One session, three surfaces: ``ccmem chat --session`` makes it, the Python API and then the server continue it
    from the same store, each seeing the turns before and adding to the memory."""
    from fastapi.testclient import TestClient

    import ccmem
    from ccmem.serve.engine import Engine, Limits
    from ccmem.serve.server import create_app
    from ccmem.serve.sessions import SessionStore

    store = tmp_path / "store"
    monkeypatch.setattr("sys.stdin", io.StringIO("w1 w2 w3\nw4 w5\n/quit\n"))
    code, out = run_cli(monkeypatch, capsys, "chat", "--model", str(tiny_model_dir), "--method", "ccm-concat",
                        "--n-tok", "2", "--system", "", "--max-new-tokens", "3", "--session", "notes",
                        "--store", str(store))  # fmt: skip
    assert code == 0, out

    # the Python API, as README shows it: the same model, method and options, the same store
    session = ccmem.load(str(tiny_model_dir), method="ccm-concat", n_tok=2, system_prompt=None)
    with SessionStore(store) as sessions:
        record = sessions.open("notes", session)
        chat_turns = record.transcript
        assert record.turns == 2 and [m["role"] for m in chat_turns] == ["user", "assistant"] * 2
        assert [chat_turns[0]["content"], chat_turns[2]["content"]] == ["w1 w2 w3", "w4 w5"]
        assert session.history == chat_turns and session.memory.num_slots == 4  # two exchanges x 2 <COMP> slots
        session.remember("w6 w7", "w8")
        after_api = sessions.commit("notes", session, expect_version=record.version)
    assert after_api.turns == 3 and after_api.transcript[:4] == chat_turns and after_api.memory_slots == 6

    # the server, over the same store
    base = ccmem.load(str(tiny_model_dir), method="ccm-concat", n_tok=2, system_prompt=None)
    limits = Limits(max_new_tokens=4, max_input_tokens=400, max_message_bytes=400, max_sessions=8, max_messages=20)
    engine = Engine(base, SessionStore(store), model_id="tiny:ccm-concat", limits=limits)
    try:
        with TestClient(create_app(engine)) as client:
            assert client.get("/v1/sessions/notes").json()["turns"] == 3
            body = {"model": "tiny:ccm-concat", "messages": [{"role": "user", "content": "w9"}], "max_tokens": 3}
            response = client.post("/v1/chat/completions", json=body | {"session": "notes"})
            assert response.status_code == 200, response.text
            info = client.get("/v1/sessions/notes").json()
        assert info["turns"] == 4 and info["memory_slots"] == 8
    finally:
        engine.close()
    with SessionStore(store) as sessions:
        final = sessions.get("notes")
    assert final.transcript[:6] == after_api.transcript and final.transcript[6]["content"] == "w9"


def test_a_chat_session_resumed_with_another_system_prompt_keeps_its_own_and_says_so(
    monkeypatch, capsys, tiny_model_dir, tmp_path
):
    args = ["chat", "--model", str(tiny_model_dir), "--method", "ccm-concat", "--n-tok", "2", "--max-new-tokens", "2",
            "--session", "s", "--store", str(tmp_path / "store")]  # fmt: skip
    monkeypatch.setattr("sys.stdin", io.StringIO("w1\n/quit\n"))
    assert run_cli(monkeypatch, capsys, *args, "--system", "be brief")[0] == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("/quit\n"))
    code, out = run_cli(monkeypatch, capsys, *args, "--system", "be verbose")
    assert code == 0 and "keeps the system prompt it was made with ('be brief')" in " ".join(out.split())


def test_a_chat_store_that_is_a_file_is_refused_before_the_model_loads(monkeypatch, capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    code, out = run_cli(monkeypatch, capsys, "chat", "--model", "no-such-model", "--session", "s",
                        "--store", str(tmp_path / "file"))  # fmt: skip
    assert code == 2 and "is a file; give a folder" in " ".join(out.split()) and "Traceback" not in out


def test_serve_refuses_a_port_in_use_before_loading_the_model(monkeypatch, capsys, tmp_path):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = str(taken.getsockname()[1])
    code, out = run_cli(monkeypatch, capsys, "serve", "--port", port, "--model", "no-such-model")
    taken.close()
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in " ".join(out.split()) and "Traceback" not in out


def test_serve_refuses_an_empty_token(monkeypatch, capsys):
    code, out = run_cli(monkeypatch, capsys, "serve", "--port", "0", "--token", " ", "--model", "no-such-model")
    assert code == 2 and "--token is empty" in out and "Traceback" not in out


def test_serve_refuses_an_unknown_log_level_before_loading_the_model(monkeypatch, capsys):
    code, out = run_cli(monkeypatch, capsys, "serve", "--port", "0", "--log-level", "loud", "--model", "no-such-model")
    assert code == 2 and "'loud' is not one of" in out and "no-such-model" not in out  # it printed a bare 'loud'


def test_serve_runs_as_a_user_starts_it_and_answers_the_openai_client(tiny_model_dir, tmp_path):
    import os
    import socket
    import subprocess
    import time

    from openai import OpenAI

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "ccmem.cli", "serve", "--model", str(tiny_model_dir), "--method", "ccm-merge"]
    command += ["--port", str(port), "--store", str(tmp_path / "store"), "--log-level", "warning", "--system", ""]
    env = dict(os.environ, CCMEM_TOKENS="t1,t2")
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="t1", max_retries=0)
        for _ in range(300):
            try:
                models = [m.id for m in client.models.list()]
                break
            except Exception:
                assert server.poll() is None, server.stdout.read().decode() if server.stdout else ""
                time.sleep(0.1)
        assert models == [f"{tiny_model_dir}:ccm-merge"]
        client.post("/sessions", body={"name": "chat1"}, cast_to=dict)
        for words in ("w1 w2 w3", "w4 w5"):
            reply = client.chat.completions.create(
                model=models[0],
                messages=[{"role": "user", "content": words}],
                max_tokens=3,
                extra_body={"session": "chat1"},
            )
            assert reply.choices[0].finish_reason in ("stop", "length")
        assert client.get("/sessions/chat1", cast_to=dict)["turns"] == 2
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_serve_refuses_a_store_whose_database_is_not_one(monkeypatch, capsys, tmp_path):
    (tmp_path / "sessions.db").write_bytes(b"definitely not sqlite" * 64)
    code, out = run_cli(monkeypatch, capsys, "serve", "--store", str(tmp_path), "--port", "0", "--model", "x")
    assert code == 2 and "is not a ccmem session database" in " ".join(out.split()) and "Traceback" not in out


@pytest.mark.parametrize("command", ["eval", "compare"])
def test_a_missing_stage1_run_is_refused_before_the_model_loads(monkeypatch, capsys, tmp_path, command):
    """Loading a model takes a while; a mistyped --stage1 path must not cost that wait before it is said."""
    import ccmem.loading

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --stage1 was checked")

    monkeypatch.setattr(ccmem.loading, "load_model", no_load)
    args = ["--methods", "full", "--n", "1", "--stage1", str(tmp_path / "nothing")]
    if command == "eval":
        args = ["persona", *args, "--out", str(tmp_path / "rows.jsonl")]
    else:
        args += ["--tasks", "persona", "--out-dir", str(tmp_path / "x")]
    code, text = run_cli(monkeypatch, capsys, command, *args)
    assert code != 0 and "no stage-1 LoRA at" in " ".join(text.split())


def test_export_checkpoint_takes_a_step_or_latest_and_names_a_run_without_checkpoints(monkeypatch, capsys, tmp_path):
    code, text = run_cli(monkeypatch, capsys, "train", "persona-ccm-concat", "--export-checkpoint", "banana")
    assert code != 0 and "must be a step number or 'latest'" in " ".join(text.split())
    args = ["train", "persona-ccm-concat", f"output_dir={tmp_path}", "--export-checkpoint", "latest"]
    code, text = run_cli(monkeypatch, capsys, *args)
    assert code != 0 and "has no checkpoint in" in " ".join(text.split())


def test_output_to_a_pipe_keeps_table_cells_whole():
    """Rich assumes 80 columns off a terminal: `ccmem models > file` cut the hub ids users copy (meta-llama/Llama…)
    and eval tables cut method names (ccm-c…). Piped, the consoles are 200 columns wide unless COLUMNS says."""
    import os
    import subprocess

    code = "from ccmem.consoles import console, err_console; print(console.width, err_console.width)"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    piped = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert piped.stdout.split() == ["200", "200"]
    narrow = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**env, "COLUMNS": "100"}, check=True
    )
    assert narrow.stdout.split() == ["100", "100"]


def test_eval_help_names_every_dataset_loader_it_can_score(monkeypatch, capsys):
    from ccmem.cli import TRAINING_ONLY
    from ccmem.data.loaders import LOADERS

    code, text = run_cli(monkeypatch, capsys, "eval", "--help")
    words = set(" ".join(text.split()).replace(",", " ").replace("(", " ").split())
    scored = set(LOADERS) - set(TRAINING_ONLY)
    assert code == 0 and scored <= words, scored - words
    assert not set(TRAINING_ONLY) & words  # training data is not offered for scoring


def test_show_keys_explains_every_config_key(monkeypatch, capsys):
    """--show-keys printed names and types only ('train.patience int'): every key now says what it does, from the
    comment that documents its field (config.py stays the one place) or the method option's help."""
    from ccmem.train.config import VALID_KEYS, key_docs

    docs = key_docs()
    assert set(VALID_KEYS) <= set(docs) and all(len(docs[k]) > 10 for k in VALID_KEYS)
    code, text = run_cli(monkeypatch, capsys, "train", "--show-keys")
    flat = " ".join(text.split())
    assert code == 0 and "train.patience int early stopping after this many evaluations" in flat
    assert "method.n_tok int <COMP> tokens per compression step" in flat
    # the schedules it names are the ones a config accepts (it said "any of transformers' names")
    from ccmem.train.config import ConfigError, load_config

    named = docs["train.scheduler"].split(":", 1)[1].replace(" or ", ", ").split(",")
    for name in (n.strip() for n in named):
        assert load_config(None, [f"train.scheduler={name}"]).train.scheduler == name
    with pytest.raises(ConfigError, match=r"train\.scheduler must be one of"):
        load_config(None, ["train.scheduler=inverse_sqrt"])


def test_show_presets_says_what_each_preset_trains(monkeypatch, capsys):
    from ccmem.train.config import preset_names

    code, text = run_cli(monkeypatch, capsys, "train", "--show-presets")
    lines = [line for line in text.splitlines() if line.strip()]
    assert code == 0 and len(lines) == len(preset_names())
    assert all(len(line.split(None, 1)) == 2 and len(line.split(None, 1)[1]) > 20 for line in lines)
    assert any(line.startswith("persona-full  Stage 1 of the reference recipe") for line in lines)
    code, both = run_cli(monkeypatch, capsys, "train", "--show-presets", "--show-keys")
    assert code == 0 and text.strip() in both and "train.scheduler" in both  # the keys were dropped without a word
    # and --show-config beside them was dropped too
    code, all_three = run_cli(monkeypatch, capsys, "train", "persona-full", "--show-presets", "--show-config")
    assert code == 0 and text.strip() in all_three and "run_id: persona-full" in all_three


def test_a_method_that_cannot_run_on_the_model_is_refused_before_any_method_runs(
    monkeypatch, capsys, tmp_path, tiny_model_dir
):
    """expected-attention needs RoPE over the whole head; GPT-NeoX rotates part of it. demo and eval ran every
    method before it (42 s on a real model) and then dropped their results."""
    import shutil

    from tests.conftest import tiny_model

    folder = tmp_path / "neox"
    tiny_model("gpt-neox").model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    for command in (["demo"], ["eval", "icl", "--n", "2", "-o", str(tmp_path / "rows.jsonl")]):
        code, text = run_cli(monkeypatch, capsys, *command, "--model", str(folder), "--methods",
                             "full,none,expected-attention")  # fmt: skip
        flat = " ".join(text.split())
        assert code == 2 and "method 'expected-attention' cannot run on" in flat and "rotates" in flat, text
        assert "all questions" not in flat and not (tmp_path / "rows.jsonl").exists()  # nothing ran before it
    # the default method list is ccmem's choice, not the user's: a method the model cannot run is left out, said
    args = ["compare", "--model", str(folder), "--tasks", "icl", "--n", "1", "--budgets", "1/2", "--no-decode"]
    code, text = run_cli(monkeypatch, capsys, *args, "--out-dir", str(tmp_path / "cmp"))
    rows = [json.loads(line)["method"] for line in (tmp_path / "cmp" / "rows.jsonl").read_text().splitlines()]
    assert code == 0 and "left out expected-attention: it cannot run on" in " ".join(text.split()), text
    assert "expected-attention" not in rows and {"full", "none", "snapkv"} <= set(rows)


def test_output_paths_that_cannot_be_written_are_refused_before_the_work(monkeypatch, capsys, tmp_path):
    """eval -o FOLDER evaluated everything, then failed; compare -o FILE likewise; a read-only folder was reported
    under the temporary's made-up name."""
    from ccmem.fileio import atomic_path

    code, out = run_cli(monkeypatch, capsys, "eval", "persona", "--model", "/no/such/model", "--out", str(tmp_path))
    assert code == 2 and "is a folder; give the JSONL file the rows go to" in " ".join(out.split())
    taken = tmp_path / "taken"
    taken.write_text("x")
    code, out = run_cli(monkeypatch, capsys, "compare", "--model", "/no/such/model", "--out-dir", str(taken))
    assert code == 2 and "is a file; give a folder" in " ".join(out.split())
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr("tempfile.mkstemp", lambda **kw: (_ for _ in ()).throw(PermissionError(13, "denied", "x.tmp")))
    with (
        pytest.raises(OSError, match=r"cannot write .*locked/memory\.safetensors \(denied\)"),
        atomic_path(locked / "memory.safetensors"),
    ):
        pass


def test_an_atomic_write_reaches_the_disk_before_it_replaces_the_file(monkeypatch, tmp_path):
    """Without fsync a power cut after the rename could leave an empty file where the previous one was, while a
    session store's index (SQLite, synchronous=FULL) already named its new version."""
    from ccmem.fileio import atomic_path

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd)
    )
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or real_replace(a, b))
    target = tmp_path / "memory.safetensors"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    assert events[0][1].endswith(".tmp") and events[2][1] == str(tmp_path) and target.read_text() == "new"


def test_a_device_or_pipe_is_never_replaced_by_an_output_file(monkeypatch, capsys, tmp_path):
    """As root, `compress -o /dev/null` replaced the device with a regular file (an atomic write renames a temporary
    over its target): a target that is no regular file is refused, and left as it was."""
    import stat

    from ccmem.fileio import atomic_path

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    with pytest.raises(OSError, match="not a regular file"), atomic_path(pipe):
        pass
    text = tmp_path / "notes.txt"
    text.write_text("My dog is called Biscuit.")
    code, out = run_cli(monkeypatch, capsys, "compress", str(text), "-o", str(pipe), "--model", "/no/such/model")
    assert code == 2 and "not a regular file" in " ".join(out.split())
    assert stat.S_ISFIFO(pipe.stat().st_mode)


def test_generate_refuses_to_write_over_its_input_or_into_a_folder_before_any_work(monkeypatch, capsys, tmp_path):
    """`generate pwc.jsonl -o pwc.jsonl` replaced the test file with the answers; `-o FOLDER` failed with a raw
    OSError after every record was answered."""
    pwc = tmp_path / "pwc.jsonl"
    record = json.dumps({"input": "Ada was born in 1815.", "prompt": "When was Ada born?", "answer": "1815"})
    pwc.write_text(record + "\n")
    for out, message in [(pwc, "is the input file"), (tmp_path, "is a directory")]:
        code, text = run_cli(monkeypatch, capsys, "generate", str(pwc), "-o", str(out), "--model", "/no/such/model")
        assert code == 2 and message in " ".join(text.split())
    assert pwc.read_text() == record + "\n"


def test_ctrl_c_in_train_says_how_to_resume(monkeypatch, capsys, tmp_path):
    import ccmem.train.trainer as trainer

    def interrupted(config, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupted)
    code, out = run_cli(monkeypatch, capsys, "train", "persona-ccm-concat", f"output_dir={tmp_path}")
    assert code == 130 and "rerun the same command to resume run 'persona-ccm-concat'" in " ".join(out.split())


SHIPPED_GSM8K = Path(__file__).resolve().parents[2] / "results" / "gsm8k"
GSM8K_PAIR = [
    "--stage1",
    str(SHIPPED_GSM8K / "gsm8k-full.safetensors"),
    "--adapter",
    str(SHIPPED_GSM8K / "ccm-reason.safetensors"),
]


@pytest.mark.parametrize("command", [["stream"], ["repro", "gsm8k", *GSM8K_PAIR]])
def test_an_output_folder_that_is_a_file_or_holds_a_plot_is_refused_before_the_model_loads(
    monkeypatch, capsys, tmp_path, command
):
    # `ccmem stream -o FILE` ran the whole stream, then failed with "[Errno 17] File exists"; a plot from an
    # earlier run was replaced without --overwrite.
    def flat(out: str) -> str:
        return " ".join(out.replace("│", " ").split())

    taken = tmp_path / "taken"
    taken.write_text("results of another run")
    code, out = run_cli(monkeypatch, capsys, *command, "-o", str(taken), "--model", "no/such-model")
    assert code == 2 and "is a file, not a folder" in flat(out), out
    plot = "stream.png" if command == ["stream"] else "accuracy-vs-kv.png"
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / plot).write_bytes(b"png")
    code, out = run_cli(monkeypatch, capsys, *command, "-o", str(tmp_path / "old"), "--model", "no/such-model")
    assert code == 2 and "pass --overwrite" in flat(out), out


def test_compress_says_in_its_own_options_why_a_text_does_not_fit(monkeypatch, capsys, tiny_model_dir, tmp_path):
    # The API's error named add() calls and reset(), which a `ccmem compress` user does not have.
    text = tmp_path / "long.txt"
    text.write_text(" ".join(f"w{i % 50}" for i in range(600)))  # 600 tokens; the tiny model has 256 positions
    common = [str(text), "-o", str(tmp_path / "m.safetensors"), "--model", str(tiny_model_dir), "--system", ""]
    cases = [
        (["--method", "ccm-concat", "--chunk-tokens", "1000"], "give --chunk-tokens 252 or less"),
        (["--method", "snapkv"], "snapkv reads the whole text at once; compress it with a method that reads it chunk"),
        # 250 tokens + 4 <COMP> fit once; the second chunk also sees the first one's 4 slots: 258 > 256
        (["--method", "ccm-concat", "--chunk-tokens", "250"], "the memory of ccm-concat grew past what the model's"),
        (["--method", "ccm-concat", "--chunk-tokens", "250"], "give a smaller --chunk-tokens (10 to 244 fit"),
        # each 1-token chunk left 4 <COMP> slots: "give a smaller --chunk-tokens" could not be followed
        (["--method", "ccm-concat", "--chunk-tokens", "1"], "give a larger --chunk-tokens (10 to 244 fit this text"),
        (["--method", "ccm-concat", "--chunk-tokens", "1", "--n-tok", "60"], "no --chunk-tokens fits its 600 tokens"),
    ]
    for extra, said in cases:
        code, out = run_cli(monkeypatch, capsys, "compress", *common, *extra)
        assert code == 2 and said in " ".join(out.split()) and "reset()" not in out, out
    code, out = run_cli(monkeypatch, capsys, "compress", *common, "--method", "ccm-concat", "--chunk-tokens", "100")
    assert code == 0 and "600 tokens in" in out, out  # past the 256 positions, chunk by chunk


def test_persona_limits_are_said_in_the_options_names(monkeypatch, capsys, tmp_path):
    """eval persona --k 100 silently made 7-fact dialogs; data persona refused it as "facts_per_dialog ... (1, 100)"."""
    for command in (["eval", "persona", "--model", "/no/such/model"], ["data", "persona", "-o", str(tmp_path)]):
        code, out = run_cli(monkeypatch, capsys, *command, "--k", "100")
        assert code == 2 and "--k 100: persona dialogs hold at most 7 facts" in " ".join(out.split()), out
        code, out = run_cli(monkeypatch, capsys, *command, "--small-talk", "50")
        assert code == 2 and "--small-talk 50: persona dialogs hold at most 8" in " ".join(out.split()), out
    assert not list(tmp_path.iterdir())


def test_data_keeps_a_dataset_already_in_its_folder_unless_told_to_replace_it(monkeypatch, capsys, tmp_path):
    """`ccmem data persona -o FOLDER` replaced a train.jsonl already there without a word; `-o FILE` said
    "[Errno 17]"."""
    mine = tmp_path / "train.jsonl"
    mine.write_text("my own data\n")
    args = ["data", "persona", "-o", str(tmp_path), "--n-train", "2", "--n-test", "2"]
    code, out = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and "already holds a dataset (train.jsonl)" in " ".join(out.split())
    assert mine.read_text() == "my own data\n"
    code, out = run_cli(monkeypatch, capsys, *args, "--overwrite")
    assert code == 0 and mine.read_text() != "my own data\n"
    code, out = run_cli(monkeypatch, capsys, "data", "icl", "-o", str(mine), "--tasks", "1")
    assert code == 2 and "is a file; give a folder" in " ".join(out.split())


def test_data_writes_no_split_when_one_cannot_be_made(monkeypatch, capsys, tmp_path):
    """--k larger than the validation split's held-out passages failed after train.jsonl was written: a lone train
    file was left (refused as 'already holds a dataset' next time), and with --overwrite a new train file sat beside
    the old validation and test files."""
    for split in ("train", "validation", "test"):
        (tmp_path / f"{split}.jsonl").write_text("old\n")
    args = ["data", "passages", "-o", str(tmp_path), "--k", "1000", "--n-train", "2", "--n-test", "2"]
    code, text = run_cli(monkeypatch, capsys, *args, "--overwrite")
    assert code == 2 and "too few articles in the validation split" in text
    assert all((tmp_path / f"{split}.jsonl").read_text() == "old\n" for split in ("train", "validation", "test"))


def test_data_icl_overwrite_replaces_the_old_tasks_and_demonstration_files(monkeypatch, capsys, tmp_path):
    """`ccmem data icl --overwrite` wrote the new files beside the old ones: tasks past --tasks and the files of
    another --k stayed, and the metaicl loader read them (3 tasks of 16 demonstrations, not 2 of 4)."""
    from ccmem.data.loaders import load_examples
    from ccmem.train.config import DataConfig

    out = tmp_path / "icl"
    assert run_cli(monkeypatch, capsys, "data", "icl", "-o", str(out), "--tasks", "3", "--k", "16")[0] == 0
    code, text = run_cli(monkeypatch, capsys, "data", "icl", "-o", str(out), "--tasks", "2", "--k", "4", "--overwrite")
    assert code == 0, text
    assert sorted(p.name for p in out.glob("*/*_train.jsonl")) == ["icl0_4_0_train.jsonl", "icl1_4_0_train.jsonl"]
    train = load_examples(DataConfig(dataset="metaicl", path=str(out), k=4, n_train=0), "train")
    assert {e.task for e in train} == {"icl0", "icl1"} and len(train) == 2 * 4


def test_data_icl_reads_n_test_and_refuses_n_train(monkeypatch, capsys, tmp_path):
    # both were accepted and read by nothing: dev files held 20 queries whatever --n-test said
    out = tmp_path / "icl"
    assert run_cli(monkeypatch, capsys, "data", "icl", "-o", str(out), "--tasks", "1", "--n-test", "5")[0] == 0
    assert len((out / "icl0" / "icl0_3_0_dev.jsonl").read_text().splitlines()) == 5
    code, text = run_cli(monkeypatch, capsys, "data", "icl", "-o", str(tmp_path / "b"), "--n-train", "50")
    assert code != 0 and "--k demonstrations" in text and not (tmp_path / "b").exists()


def test_outputs_that_cannot_be_written_are_refused_before_the_work(monkeypatch, capsys, tmp_path):
    """stream and repro ran to the end and then failed to make -o under a file ("Not a directory"), losing the
    results; demo --out FOLDER failed with a bare errno after loading the model; --adapter naming one method
    twice kept the last file silently."""
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    code, out = run_cli(
        monkeypatch, capsys, "stream", "--methods", "window", "-o", str(blocker / "sub"), "--model", "/x"
    )
    assert code == 2 and "is a file, so no folder can be made there" in " ".join(out.replace("│", " ").split())
    from ccmem.cli_repro import check_out_dir  # what repro gsm8k and repro sentinel check their -o with

    with pytest.raises(OptionError, match="is a file, so no folder can be made there"):
        check_out_dir(blocker / "sub" / "deeper", ["rows.jsonl"], overwrite=False)
    code, out = run_cli(monkeypatch, capsys, "demo", "--methods", "none", "--out", str(tmp_path), "--model", "/x/y")
    assert code == 2 and "is a directory; give a .jsonl file" in " ".join(out.split()), out
    twice = ["--adapter", "ccm-concat=a.safetensors", "--adapter", "ccm-concat=b.safetensors"]
    code, out = run_cli(monkeypatch, capsys, "stream", *twice, "-o", str(tmp_path / "s"), "--model", "/x/y")
    assert code == 2 and "--adapter names ccm-concat twice" in " ".join(out.replace("│", " ").split()), out


def test_demo_refuses_an_option_the_shipped_adapter_contradicts_before_any_method_runs(monkeypatch, capsys, tmp_path):
    """`demo --n-tok 2` ran full and none (their rows written) and then refused ccm-concat's 3-token adapter."""
    out = tmp_path / "demo.jsonl"
    args = ["demo", "--n-tok", "2", "--out", str(out), "--model", "smollm2-135m", "--methods", "full,ccm-concat"]
    code, text = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and "n_tok=3" in text and "n_tok=2" in text
    assert not out.exists()


def test_a_fault_that_is_no_refusal_of_the_input_says_how_to_see_its_traceback(monkeypatch, capsys):
    def broken() -> None:
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(cli, "cache_dir", broken)
    code, text = run_cli(monkeypatch, capsys, "models")
    assert code == 2 and "error: something inside broke" in text and "CCMEM_DEBUG=1" in text


def test_serve_on_any_free_port_does_not_announce_port_0(monkeypatch, capsys, tmp_path, tiny_model_dir):
    """`--port 0` lets the system pick the port: the banner said http://127.0.0.1:0/v1, an address nothing answers
    at (the port picked is said once the socket is bound)."""
    import ccmem.serve.server as server

    ran = []
    monkeypatch.setattr(server, "run", lambda engine, **kw: ran.append(kw["port"]) or engine.close())
    args = ["serve", "--port", "0", "--model", str(tiny_model_dir), "--method", "full", "--store", str(tmp_path / "s")]
    code, out = run_cli(monkeypatch, capsys, *args)
    assert code == 0 and ran == [0]
    flat = " ".join(out.split())
    assert ":0/v1" not in flat and "a free port" in flat


def test_train_given_only_overrides_starts_from_the_defaults(monkeypatch, capsys):
    """--help says the preset may be omitted; `ccmem train train.max_steps=2` was "no preset 'train.max_steps=2'"."""
    code, text = run_cli(monkeypatch, capsys, "train", "train.max_steps=2", "method.name=full", "--show-config")
    assert code == 0, text
    assert "max_steps: 2" in text and "name: full" in text


def test_compress_says_one_token_not_one_tokens(monkeypatch, capsys, tiny_model_dir, tmp_path):
    text = tmp_path / "one.txt"
    text.write_text("w1")
    common = ["--model", str(tiny_model_dir), "--method", "full", "--system", ""]
    code, out = run_cli(monkeypatch, capsys, "compress", str(text), "--out", str(tmp_path / "m.safetensors"), *common)
    assert code == 0, out
    assert "1 token in 1 slot," in out
