"""Every command explains itself, and bad input is one red line with exit code 2, never a traceback."""

from __future__ import annotations

import sys

import pytest

from ccmem import cli

COMMANDS = ["demo", "chat", "compress", "ask", "methods", "models"]


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["ccmem", *args])
    monkeypatch.delenv("CCMEM_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out = capsys.readouterr()
    return int(exit_info.value.code or 0), out.out + out.err


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(monkeypatch, capsys, command):
    code, text = run_cli(monkeypatch, capsys, command, "--help")
    assert code == 0
    assert "Usage: ccmem " + command in text


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
        (["chat", "--model", "/nonexistent/folder/x.gguf"], "no GGUF file"),
        (
            ["chat", "--method", "ccm-concat", "--n-tok", "0", "--model", "none-model"],
            "n_tok must be at least 1",
        ),
    ],
)
def test_bad_input_is_one_line(monkeypatch, capsys, args, message):
    code, text = run_cli(monkeypatch, capsys, *args)
    assert code == 2
    assert message in " ".join(text.split())
    assert "Traceback" not in text


def test_missing_file_argument_is_reported(monkeypatch, capsys, tmp_path):
    code, text = run_cli(monkeypatch, capsys, "ask", str(tmp_path / "missing.safetensors"), "hi")
    assert code == 2
    assert "does not exist" in text
    assert "Traceback" not in text
