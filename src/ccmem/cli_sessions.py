"""``ccmem sessions``: list, show and delete the stored sessions that ``ccmem chat --session``, the Python API and
``ccmem serve`` share, without a model or a running server (a sub-command of ``ccmem``).

Also the two options every command that reaches the store takes (``--store``, ``--redis``) and the function that
opens the store they name.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ccmem.consoles import console

if TYPE_CHECKING:
    from ccmem.serve.sessions import BaseSessionStore, SessionRecord

StoreOpt = Annotated[
    Path | None,
    typer.Option(
        "--store",
        help="Session store folder (SQLite index + memory files). Default: $CCMEM_SESSIONS or "
        "~/.local/share/ccmem/sessions.",
    ),
]

RedisOpt = Annotated[
    str | None,
    typer.Option(
        "--redis",
        envvar="CCMEM_REDIS",
        show_envvar=False,
        help="Keep sessions in the Redis at this URL (redis://HOST:PORT/DB) instead of the SQLite --store, so that "
        "several `ccmem serve` workers (behind one load balancer) and `ccmem chat --session` share them: any worker "
        "answers any session, and requests for one session wait for each other (a lock per session in Redis). "
        "Default: $CCMEM_REDIS.",
    ),
]

TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="CCMEM_TOKEN",
        show_envvar=False,
        help="The bearer token whose sessions these are (a server started with --token keeps each token's "
        "sessions apart; tokens are stored only as hashes). Default: $CCMEM_TOKEN, else the sessions of no token: "
        "those of `ccmem chat --session`, the Python API and a server without --token.",
    ),
]


def session_store(store: Path | None, redis_url: str | None) -> tuple[BaseSessionStore, str]:
    """The session store that ``--store`` or ``--redis`` names (else the default SQLite one), and where it is."""
    from ccmem.serve.sessions import SessionStore, default_store_root

    if redis_url:
        if store is not None:
            raise ValueError("give --store (SQLite) or --redis (or $CCMEM_REDIS), not both: sessions live in one place")
        from ccmem.serve.redis_store import RedisSessionStore, redacted

        return RedisSessionStore(redis_url), f"Redis {redacted(redis_url)}"
    sessions = SessionStore(store or default_store_root())
    return sessions, str(sessions.root)


def _existing_store(store: Path | None, redis_url: str | None) -> tuple[BaseSessionStore, str]:
    """:func:`session_store`, refused where no SQLite store is yet: listing a mistyped ``--store`` said "no
    sessions" and left a new empty store there."""
    from ccmem.serve.sessions import default_store_root

    if not redis_url:
        root = (store or default_store_root()).expanduser()
        if not (root / "sessions.db").is_file():
            raise ValueError(
                f"no session store at {root} (it has no sessions.db); give the --store that `ccmem chat --session` "
                "or `ccmem serve` used (their default: $CCMEM_SESSIONS or ~/.local/share/ccmem/sessions)"
            )
    return session_store(store, redis_url)


sessions_app = typer.Typer(
    no_args_is_help=True,
    help="List, show and delete the stored sessions of `ccmem chat --session`, the API and `ccmem serve`.\n\n"
    "No model is loaded, and no server needs to run.",
)


def _when(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M")


def _made_with(record: SessionRecord) -> str:
    settings = record.settings
    adapter = settings.get("adapter")
    return f"{settings.get('model', '?')}, {settings.get('method', '?')}" + (f", adapter {adapter}" if adapter else "")


@sessions_app.command("list", epilog="Example: ccmem sessions list --store ./sessions")
def list_sessions(store: StoreOpt = None, redis_url: RedisOpt = None, token: TokenOpt = None) -> None:
    """The sessions of one token (or of none), most recently used first: turns, memory, what made them."""
    from ccmem.serve.sessions import owner_of

    sessions, where = _existing_store(store, redis_url)
    with sessions:
        records = sessions.list(owner_of(token))
    if not records:
        whose = "this token" if token else "no token"
        console.print(f"no sessions of {whose} in {escape(where)}", highlight=False)
        return
    table = Table("session", "turns", "memory slots", "memory", "updated", "made with", title=escape(where))
    for r in records:
        table.add_row(
            escape(r.name),
            str(r.turns),
            str(r.memory_slots),
            f"{r.memory_bytes / 2**20:.2f} MiB",
            _when(r.updated),
            escape(_made_with(r)),
        )
    console.print(table)


@sessions_app.command("show", epilog="Example: ccmem sessions show alice --messages 0")
def show_session(
    name: Annotated[str, typer.Argument(help="The session's name.")],
    messages: Annotated[
        int, typer.Option("--messages", min=0, help="How many of the last messages to print (0: none).")
    ] = 10,
    store: StoreOpt = None,
    redis_url: RedisOpt = None,
    token: TokenOpt = None,
) -> None:
    """One session: what made it, its memory and version, and the end of its transcript."""
    from ccmem.serve.sessions import check_name, owner_of

    check_name(name)
    sessions, _ = _existing_store(store, redis_url)
    with sessions:
        record = sessions.get(name, owner_of(token))
    settings = record.settings
    console.print(f"[bold]{escape(record.name)}[/] (version {record.version})", highlight=False)
    lines = {
        "made with": _made_with(record),
        "options": ", ".join(f"{k}={v}" for k, v in (settings.get("options") or {}).items()) or "-",
        "system prompt": repr(settings.get("system_prompt")),
        "turns": f"{record.turns} ({len(record.transcript)} messages)",
        "memory": f"{record.memory_slots} slots, {record.memory_bytes} bytes",
        "created": _when(record.created),
        "updated": _when(record.updated),
    }
    for key, value in lines.items():
        console.print(f"  {key}: {escape(value)}", highlight=False)
    shown = record.transcript[-messages:] if messages else []
    if shown:
        skipped = len(record.transcript) - len(shown)
        console.print(f"last {len(shown)} messages" + (f" ({skipped} before them):" if skipped else ":"))
        for message in shown:
            console.print(f"  [bold]{message['role']}[/]: {escape(message['content'])}", highlight=False)


@sessions_app.command("delete", epilog="Example: ccmem sessions delete alice bob --yes")
def delete_sessions(
    names: Annotated[list[str], typer.Argument(help="The sessions to delete.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")] = False,
    store: StoreOpt = None,
    redis_url: RedisOpt = None,
    token: TokenOpt = None,
) -> None:
    """Delete sessions: their transcripts and memories (a damaged one too, which no chat can open)."""
    from ccmem.serve.sessions import check_name, owner_of

    for name in names:
        check_name(name)
    owner = owner_of(token)
    sessions, where = _existing_store(store, redis_url)
    with sessions:
        for name in names:
            sessions.get(name, owner)  # every name is known before any is deleted
        if not yes and not typer.confirm(f"delete {len(names)} session(s) from {where}: {', '.join(names)}?"):
            raise typer.Abort()
        for name in names:
            sessions.delete(name, owner)
            console.print(f"deleted {escape(name)}", highlight=False)
