"""The rich consoles every command prints through: stdout for results, stderr for progress and errors."""

from __future__ import annotations

import os

from rich.console import Console

console = Console()
err_console = Console(stderr=True)
for _console in (console, err_console):
    if not _console.is_terminal and not os.environ.get("COLUMNS"):
        _console.width = 200  # a log or a pipe: tables keep their names and ids whole (rich assumes 80 columns)
