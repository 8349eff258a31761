"""``ccmem chat``: an interactive loop; each finished exchange is folded into the session's compressed memory.

Commands: ``/memory`` (what the memory holds), ``/save PATH`` (``/save --overwrite PATH`` replaces a file that
exists), ``/load PATH``, ``/reset``, ``/quit``. A command that fails (a missing or foreign memory file) says why
and the chat goes on with its memory unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from ccmem.api import CompressedLM, ContextTooLongError

if TYPE_CHECKING:
    from ccmem.serve.sessions import SessionBinding

HELP = "/memory  /save [--overwrite] PATH  /load PATH  /reset  /quit   (//text sends a message that starts with /)"
#: What a line may start with to be a command rather than a message ("/etc/hosts is a file" is a message).
COMMANDS = frozenset({"/memory", "/save", "/load", "/reset", "/quit", "/exit", "/help"})


def run_chat(
    session: CompressedLM,
    console: Console,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    read_line: Callable[[str], str] | None = None,
    binding: SessionBinding | None = None,
) -> None:
    """Talk until ``/quit`` or end of input: stream each answer, then remember the exchange.

    With a ``binding`` the session is saved to its store after every exchange (and ``/reset`` starts it over).
    """
    read_line = read_line or console.input
    while True:
        try:
            line = read_line("[bold green]you>[/] ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if not line:
            continue
        if line.startswith("//"):  # a message that starts with "/"
            line = line[1:]
        elif line.split(maxsplit=1)[0] in COMMANDS or (line.startswith("/") and " " not in line):
            if command(session, console, line, binding):
                return
            continue
        console.print("[bold blue]bot>[/] ", end="")
        pieces = []
        try:
            for piece in session.stream(line, max_new_tokens=max_new_tokens, temperature=temperature):
                pieces.append(piece)
                console.print(piece, end="", highlight=False, markup=False)
            console.print()
            session.remember(line, "".join(pieces).strip())
        except ContextTooLongError as err:  # the chat goes on: the memory is as it was before this message
            console.print(
                f"\n[red]{escape(str(err))}[/]\n[dim](nothing was remembered; /reset starts over, a lower "
                "--max-new-tokens leaves more room)[/]"
            )
            continue
        except KeyboardInterrupt:  # Ctrl-C stops the answer, not the chat (Ctrl-C at the prompt quits)
            console.print("\n[dim](answer stopped; this exchange is not remembered)[/]")
            continue
        except ValueError as err:  # text the model cannot take: said, and the chat goes on as it was
            console.print(f"\n[red]{escape(str(err))}[/]\n[dim](nothing was remembered)[/]")
            continue
        if binding is not None and not save(session, console, binding):
            binding = None  # the session is gone from the store: the chat goes on unsaved
        console.print(f"[dim]memory: {session.memory.num_slots} slots, {session.memory.nbytes / 1024:.0f} KiB[/]")


def save(session: CompressedLM, console: Console, binding: SessionBinding) -> bool:
    """Save the exchange to the session's store; a failure is said and the chat goes on. Where another process
    saved the session meanwhile, the chat continues from that saved version (what this one added since could
    never be saved over it), so no later exchange is lost the same way. False where the session is no longer in
    the store (another process deleted it): the chat then goes on unsaved, as it says."""
    from ccmem.serve.sessions import UnknownSessionError, VersionConflictError

    try:
        binding.commit(session)
    except UnknownSessionError:
        console.print(
            f"[red]not saved: session {binding.name!r} is no longer in the store (another process deleted it)[/]\n"
            "[dim](the chat goes on unsaved; /save PATH writes its memory to a file)[/]"
        )
        return False
    except VersionConflictError as err:
        console.print(f"[red]not saved: {escape(str(err))}[/]")
        try:
            record = binding.open(session)
        except (OSError, ValueError) as reload_error:
            console.print(f"[red]could not read the saved version either: {escape(str(reload_error))}[/]")
            return True
        console.print(
            f"[yellow]continuing from the saved version {record.version} of session {binding.name!r} (another "
            "process saved it); your last exchange is not in it[/]"
        )
    except Exception as err:  # a full disk, a read-only store: the memory still holds the exchange
        console.print(
            f"[red]not saved to the session store ({escape(str(err))}); the chat goes on, and the next exchange "
            "saves this one with it once the store can be written[/]"
        )
    return True


def _overwrite(arg: str) -> tuple[bool, str]:
    """``(True, PATH)`` for ``--overwrite PATH``, else ``(False, PATH)`` (a path may hold spaces)."""
    flag, _, rest = arg.strip().partition(" ")
    return (True, rest.strip()) if flag == "--overwrite" else (False, arg.strip())


def _misused(name: str, arg: str) -> str | None:
    """Why ``name arg`` is not a command this chat runs as typed, or None. An option a command does not know
    (``/save --force m.safetensors``) was taken for part of the path and wrote a folder named ``--force m`` in
    the working directory; words after a command that takes none (``/reset all``) were dropped without a word."""
    if name in ("/save", "/load"):
        word = arg.split(maxsplit=1)[0] if arg else ""
        if word.startswith("--"):
            known = "--overwrite" if name == "/save" else "no options"
            return (
                f"{name} does not know the option {word} (it takes {known}); a path that starts with -- is "
                f"written ./{word}"
            )
        return None
    if arg and name in COMMANDS:
        return f"{name} takes no arguments, got {arg!r}; nothing was done"
    return None


def command(session: CompressedLM, console: Console, line: str, binding: SessionBinding | None = None) -> bool:
    """Handle a /command; True means quit."""
    name, _, arg = line.partition(" ")
    overwrite, arg = _overwrite(arg) if name == "/save" else (False, arg.strip())
    problem = _misused(name, arg)
    if problem is not None:
        console.print(f"[red]{escape(problem)}[/]: {HELP}")
        return False
    if name in ("/save", "/load") and arg:
        if len(arg) >= 2 and arg[0] == arg[-1] and arg[0] in "'\"":  # quoted as in a shell: the quotes are no part
            arg = arg[1:-1]  # of the path ('"my dir/m.safetensors"' made a folder named '"my')
        arg = os.path.expanduser(arg)  # no shell expanded it: "~/m.safetensors" made a folder named "~" here
    try:
        if name in ("/quit", "/exit"):
            return True
        if name == "/reset":
            session.reset()
            if binding is not None:
                binding.reset(session)
            console.print("[dim]memory cleared[/]")
        elif name == "/memory":
            mem = session.memory
            segments = ", ".join(f"{n} {kind}" for kind, n in mem.segment_lengths().items())
            console.print(f"{mem.num_slots} slots ({segments}), {mem.nbytes} bytes, next position {mem.next_position}")
        elif name == "/save" and arg:
            if Path(arg).exists() and not Path(arg).is_dir() and not overwrite:  # a typo must not replace a file
                console.print(f"[red]{escape(arg)} exists[/]; /save --overwrite {escape(arg)} replaces it")
                return False
            console.print(f"saved to {session.save_memory(arg)}")
        elif name == "/load" and arg:
            if binding is not None:
                console.print(
                    "[red]/load replaces the memory, which a stored session cannot take; chat without "
                    "--session to load a memory file[/]"
                )
                return False
            session.load_memory(arg)
            console.print("memory loaded")
        elif name in ("/save", "/load"):
            console.print(f"[red]{name} needs a PATH[/]: {HELP}")
        elif name == "/help":
            console.print(HELP)
        else:
            console.print(f"[red]unknown command {escape(name)}[/]; commands: {HELP}")
    except (OSError, ValueError) as err:  # the memory stays as it was
        console.print(f"[red]{escape(str(err))}[/]")
    return False
