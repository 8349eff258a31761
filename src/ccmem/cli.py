"""The ``ccmem`` command: a thin layer that parses options and calls :mod:`ccmem.api` and the recipes."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.markup import escape
from rich.table import Table

from ccmem.chat import DEFAULT_SYSTEM_PROMPT
from ccmem.cli_sessions import RedisOpt, StoreOpt, session_store, sessions_app
from ccmem.consoles import console, err_console
from ccmem.loading import (
    ATTN_HELP,
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    HUB_SHORTCUTS,
    MODEL_DIR_ENV,
    cache_dir,
    shortcut_folder,
)
from ccmem.options import OptionError, parse_pairs
from ccmem.registry import DEFAULT_METHOD, method_classes, method_names

try:  # typer 0.2x runs on its own copy of click
    from typer._click.exceptions import ClickException
except ImportError:  # older typer on click itself
    from click.exceptions import ClickException  # type: ignore[assignment]

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ccmem.methods.base import ContextTooLongError

app = typer.Typer(
    help="Compressed Context Memory: keep a long LM interaction in a small compressed key/value memory.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["--help", "-h"]},  # -h on every command, as on train
)


def _note_when_piped(text: str) -> None:
    """A line on stderr where no progress bar shows (output to a file or a pipe): long runs in the background still
    say how far they got."""
    if not err_console.is_terminal:
        err_console.print(text, highlight=False, markup=False)


ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help=f"Built-in name ({', '.join(BUILTIN_MODELS)}), hub shortcut (llama-3.1-8b-instruct, mistral-7b, ...: "
        f"`ccmem models`; offline: ${MODEL_DIR_ENV}/NAME), local Hugging Face folder, .gguf file, or hub id "
        "(online only).",
    ),
]
Attn = Literal["sdpa", "eager", "flash_attention_2"]
AttnOpt = Annotated[Attn, typer.Option("--attn", help=ATTN_HELP)]
Quantize = Literal["float16"]
QuantizeOpt = Annotated[
    Quantize | None,
    typer.Option(
        "--quantize",
        help="Pack the linear layers' weights: float16 (held in half precision and "
        "multiplied in float32 by the CPU's fbgemm kernels: half the bytes read per token, so decoding on a CPU is "
        "about twice as fast, answers the same; README: float16 weights). Not for GPUs (load bfloat16 there) or "
        "training.",
    ),
]
MethodOpt = Annotated[
    str | None,
    typer.Option(
        "--method",
        help=f"Context method: {', '.join(method_names())} (see `ccmem methods`). Default: the method --adapter was "
        f"trained for, else {DEFAULT_METHOD}.",
        show_default=False,
    ),
]
AdapterOpt = Annotated[
    Path | None,
    typer.Option(
        "--adapter",
        help="Trained compression adapter (.safetensors). Default: the one shipped for the model.",
    ),
]
NTokOpt = Annotated[
    int | None,
    typer.Option(
        "--n-tok",
        help="Shortcut for -O n_tok=N: <COMP> tokens per step (ccm-*, gist; default: the adapter's, else 4).",
    ),
]
RecurrentOpt = Annotated[
    bool | None,
    typer.Option(
        "--recurrent/--no-recurrent",
        help="Shortcut for -O recurrent=...: ccm-* compress each chunk with the memory so far (default) or alone "
        "(as for ICL demonstrations). Default: the adapter's setting.",
    ),
]
OptionsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--option",
        "-O",
        help="Method option KEY=VALUE, repeatable (e.g. -O n_tok=2 -O ratio=0.25; a list: -O "
        "lora_targets=\\[q_proj,v_proj]). Where a command runs several methods, each option goes to the methods that "
        "have it. `ccmem methods NAME` lists a method's options.",
    ),
]
SystemOpt = Annotated[
    str,
    typer.Option("--system", help="System prompt, kept uncompressed as the attention sink ('' for none)."),
]
AdapterSystemOpt = Annotated[
    str | None,
    typer.Option(
        "--system",
        help="System prompt, kept uncompressed as the attention sink ('' for none). Default: the one the adapter "
        f"was trained with, as it records; else {DEFAULT_SYSTEM_PROMPT!r}.",
        show_default=False,
    ),
]
Stage1Opt = Annotated[
    Path | None,
    typer.Option(
        "--stage1",
        help="Stage-1 LoRA run (`ccmem train persona-full`) merged into the model first; needed by adapters "
        "trained on top of one.",
    ),
]
GSM8K_MAX_NEW_TOKENS = 256  # eval's default for worked solutions (the generated ones run ~60 tokens)
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", min=1, help="Most tokens to generate per answer.")]
MEMORY_DTYPE_HELP = (
    "float32, bfloat16, float16 (half the bytes) or int8 (a quarter, plus one float32 scale per key channel and "
    "per value slot)"
)


def _counted(n: int, noun: str) -> str:
    """``1 token``, ``2 tokens``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _options(n_tok: int | None, recurrent: bool | None, pairs: list[str] | None) -> dict[str, Any]:
    """Method options from ``-O key=value`` pairs and the shortcut flags (values parsed as YAML scalars)."""
    options = parse_pairs(pairs or [])
    if n_tok is not None:
        options["n_tok"] = n_tok
    if recurrent is not None:
        options["recurrent"] = recurrent
    return options


def _scoped_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``-O`` options split into those for every method and those scoped to one (``-O METHOD:KEY=VALUE``, a
    method or a variant such as ``ccm-concat@w150``)."""
    shared: dict[str, Any] = {}
    scoped: dict[str, dict[str, Any]] = {}
    for key, value in options.items():
        name, sep, option = key.rpartition(":")
        if (sep and not (name and option)) or name.endswith("@"):
            raise OptionError(f"-O {key}=... must look like METHOD:KEY=VALUE, e.g. -O ccm-concat@w150:recent=150")
        if sep:
            scoped.setdefault(name, {})[option] = value
        else:
            shared[key] = value
    return shared, scoped


def _method_list(methods: str | None, model: str, kinds: tuple[str, ...] = ("baseline", "learned")) -> list[str]:
    """The methods named on the command line, or the registry's default for the model."""
    from ccmem.adapter import default_methods
    from ccmem.registry import method_class

    if methods is None:
        return default_methods(model, kinds)
    names = [m.strip() for m in methods.split(",") if m.strip()]
    for name in names:
        method_class(name.partition("@")[0])  # fail fast on a typo, with the list of valid names
    if not names:
        raise OptionError("--methods names no method")
    twice = next((name for i, name in enumerate(names) if name in names[:i]), None)
    if twice is not None:  # it ran twice: demo counted each question twice, eval appended its rows twice
        raise OptionError(f"--methods names {twice!r} twice; each method runs once")
    return names


def _session(
    model: str,
    method: str | None,
    adapter: Path | None,
    options: dict[str, Any],
    system: str | None,
    stage1: Path | None,
    attn: str = "sdpa",
    quantize: str | None = None,
    from_memory: bool = False,
) -> Any:
    """A session of ``method`` on ``model``. ``system``: the system prompt ('' for none; None: the one the
    adapter was trained with, as it records, else the default, since a memory is read best under the prompt its
    adapter learned with). ``from_memory``: a saved memory will bring its own (no note on the prompt)."""
    import ccmem  # deferred: importing torch/transformers makes --help slow
    from ccmem.adapter import read_adapter
    from ccmem.registry import get_method

    if method is None:  # the adapter's own method (an icformer adapter needs no --method icformer)
        method = read_adapter(adapter).method if adapter is not None else DEFAULT_METHOD
    get_method(method, **options)  # a wrong option fails before the model loads
    with console.status(f"loading {model} with {method}..."):
        session = ccmem.load(
            model,
            method=method,
            adapter=adapter,
            stage1=stage1,
            system_prompt=DEFAULT_SYSTEM_PROMPT if system is None else system or None,
            attn_implementation=attn,
            quantize=quantize,
            **options,
        )
    if system is None and session.adapter is not None:
        trained = session.adapter.trained_system(DEFAULT_SYSTEM_PROMPT)
        if trained != session.system_prompt:
            session.system_prompt = trained
            session.reset()
            said = f"{trained!r}, the one" if trained is not None else "none, as"
            err_console.print(
                f"[dim]system prompt: {said} the adapter was trained with (--system sets another)[/]", highlight=False
            )
    elif (
        not from_memory and session.adapter is not None and (note := session.adapter.system_note(session.system_prompt))
    ):
        err_console.print(f"[yellow]note:[/] {note}", highlight=False)
    if not session.adapter_trained:
        err_console.print(
            f"[yellow]note:[/] no trained adapter for {method} on {model}: it runs untrained, "
            "so answers will not use the compressed context. Pass --adapter PATH."
        )
    return session


def _check_methods(lm: Any, names: list[str], options: dict[str, Any], *, skip: bool = False) -> list[str]:
    """Refuse, right after loading, a method that cannot run on this model (flash_attention_2 with a method that
    masks or reads attention; a family whose attention, RoPE or layers a method cannot follow), instead of failing
    after the other methods ran: each method reads a few tokens once, untrained, and the result is dropped.
    ``skip`` (a default method list, not the user's): such a method is left out with a note instead. Returns the
    names that run."""
    from ccmem.api import CompressedLM, check_attention
    from ccmem.eval.harness import options_for
    from ccmem.registry import get_method

    ids = [int(i) for i in lm.tokenizer.encode("A short text that every method reads once before the run.")][:16]
    failed = set()
    for name in dict.fromkeys(n.partition("@")[0] for n in names if n.partition("@")[0] in method_names()):
        method = get_method(name, **options_for(name, options))
        try:
            check_attention(lm, method)
            if lm.is_encoder_decoder or not ids or lm.model.config._attn_implementation not in ("sdpa", "eager"):
                continue
            CompressedLM(lm, method, system_prompt=None).add_ids(ids)
        except (ValueError, NotImplementedError) as err:
            if not skip:
                raise OptionError(f"method {name!r} cannot run on {lm.name}: {err}") from None
            failed.add(name)
            err_console.print(f"[yellow]left out {name}: it cannot run on {lm.name} ({err})[/]", highlight=False)
    return [n for n in names if n.partition("@")[0] not in failed]


@app.command()
def demo(
    model: ModelOpt = DEFAULT_MODEL,
    methods: Annotated[
        str | None,
        typer.Option(
            "--methods",
            help="Comma-separated methods to compare side by side. Default: the baselines and every learned method "
            "with an adapter for the model.",
        ),
    ] = None,
    n_tok: NTokOpt = None,
    option: OptionsOpt = None,
    max_new_tokens: MaxNewOpt = 24,
    out: Annotated[
        Path | None, typer.Option("--out", help="Also append every row as JSON to this .jsonl file.")
    ] = None,
    attn: AttnOpt = "sdpa",
    quantize: QuantizeOpt = None,
) -> None:
    """Run the pre-defined conversations with every method and print answers, memory and time side by side."""
    from ccmem.demo import run_demo
    from ccmem.eval.harness import check_adapters, check_options_apply, options_for
    from ccmem.loading import load_model
    from ccmem.registry import get_method

    names = _method_list(methods, model)
    options = _options(n_tok, None, option)
    check_options_apply(names, options)
    for name in names:
        get_method(name, **options_for(name, options))  # fail fast on a typo, with the list of valid names
    check_adapters(model, names, options)  # an option the shipped adapter contradicts, before any method runs
    if out is not None:
        if out.is_dir():
            raise OptionError(f"--out {out} is a directory; give a .jsonl file such as {out / 'demo.jsonl'}")
        check_folder(out, "--out")
        out.parent.mkdir(parents=True, exist_ok=True)
    with console.status(f"loading {model}..."):
        lm = load_model(model, attn_implementation=attn, quantize=quantize)
    names = _check_methods(lm, names, options, skip=methods is None)
    rows = []
    untrained = set()
    with console.status("running...") as status:
        for row in run_demo(lm, names, options=options, max_new_tokens=max_new_tokens, out=out):
            status.update(f"{row.method}: {row.question}")
            rows.append(row)
            if row.adapter == "untrained":
                untrained.add(row.method)
    console.print(f"[bold]ccmem demo on {model}: answers from memory[/]")
    width = max(len("method"), *(len(n) + (len(" (untrained)") if n in untrained else 0) for n in names))
    for example, question in dict.fromkeys((r.example, r.question) for r in rows):
        console.print(f"\n[bold]{escape(example)}[/]: {escape(question)}", highlight=False)
        table = Table(box=None, padding=(0, 1), show_edge=False, header_style="dim")
        table.add_column("method", no_wrap=True, min_width=width)
        numbers = (("gen", 3), ("score", 5), ("slots", 5), ("KiB", 5), ("s", 5))
        # The answer gets what the terminal has left (one space between columns), at least 12 characters.
        answer = max(12, console.width - width - sum(d for _, d in numbers) - 2 * (len(numbers) + 1) - 1)
        table.add_column("answer", no_wrap=True, overflow="ellipsis", width=answer)
        for col, digits in numbers:
            table.add_column(col, justify="right", no_wrap=True, width=digits)
        for row in (r for r in rows if (r.example, r.question) == (example, question)):
            label = row.method + (" [yellow](untrained)[/]" if row.adapter == "untrained" else "")
            table.add_row(
                label,
                escape(" ".join(row.answer.split())),
                "[green]yes[/]" if row.correct else "[red]no[/]",
                "[green]yes[/]" if row.option_correct else "[red]no[/]",
                str(row.memory_slots),
                f"{row.memory_bytes / 1024:.0f}",
                f"{row.compress_seconds + row.answer_seconds:.1f}",
            )
        console.print(table)
    console.print(
        "\ngen: the generated answer contains the fact; score: the fact is the most likely of 4 options; "
        "slots/KiB: key/value memory kept; s: seconds to compress the conversation and answer."
    )
    summary = Table(title="all questions", box=None, padding=(0, 1), show_edge=False, header_style="dim")
    for col in ("method", "slots", "KiB", "right by generation", "right by scoring"):
        summary.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    for name in dict.fromkeys(r.method for r in rows):
        mine = [r for r in rows if r.method == name]
        summary.add_row(
            name + (" [yellow](untrained)[/]" if name in untrained else ""),
            f"{sum(r.memory_slots for r in mine) / len(mine):.0f}",
            f"{sum(r.memory_bytes for r in mine) / len(mine) / 1024:.0f}",
            f"{sum(r.correct for r in mine)} / {len(mine)}",
            f"{sum(r.option_correct for r in mine)} / {len(mine)}",
        )
    console.print()
    console.print(summary)
    if untrained:
        console.print(
            f"[yellow]{', '.join(sorted(untrained))}: no trained adapter ships for {model} yet, so these rows "
            "show the method untrained (what it keeps of the context is not what it was made to keep). Train one "
            "with the method's training recipe (ccmem train --help), then evaluate it with `ccmem eval --adapter "
            "METHOD=PATH` or `ccmem compare --adapter METHOD=PATH`.[/]"
        )


@app.command()
def chat(
    model: ModelOpt = DEFAULT_MODEL,
    method: MethodOpt = None,
    adapter: AdapterOpt = None,
    n_tok: NTokOpt = None,
    recurrent: RecurrentOpt = None,
    option: OptionsOpt = None,
    system: AdapterSystemOpt = None,
    stage1: Stage1Opt = None,
    max_new_tokens: MaxNewOpt = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy; higher samples more freely.")] = 0.0,
    session_name: Annotated[
        str | None,
        typer.Option(
            "--session",
            help="Keep the chat as a named session in the session store: it is saved after every exchange and "
            "continues where it stopped next time (the same session the Python API and `ccmem serve` use). "
            "It must be resumed with the model, method and adapter that made it.",
        ),
    ] = None,
    store: StoreOpt = None,
    redis_url: RedisOpt = None,
    attn: AttnOpt = "sdpa",
    quantize: QuantizeOpt = None,
) -> None:
    """Chat interactively; each finished exchange is compressed into memory. Type /help for commands."""
    from ccmem.serve.chat import run_chat
    from ccmem.serve.sessions import SessionBinding, check_name

    sessions = None
    if session_name is not None:  # a bad name or store is said before the model loads
        check_name(session_name)
        sessions, _ = session_store(store, redis_url)
    options = _options(n_tok, recurrent, option)
    session = _session(model, method, adapter, options, system, stage1, attn, quantize)
    binding = None
    if sessions is not None and session_name is not None:
        binding = SessionBinding(sessions, session_name)
        asked = session.system_prompt
        record = binding.open(session)
        console.print(f"[dim]session {session_name}: {record.turns} earlier turns, {session.memory.num_slots} slots[/]")
        if session.system_prompt != asked:
            console.print(
                f"[yellow]session {session_name} keeps the system prompt it was made with "
                f"({session.system_prompt!r}); --system applies to new sessions[/]",
                highlight=False,
            )
    which = f", adapter {session.adapter.hash} ({session.adapter.path})" if session.adapter is not None else ""
    console.print(f"[bold]ccmem chat[/] ({model}, {session.method.name}{which}). /help for commands, /quit to leave.")
    run_chat(session, console, max_new_tokens=max_new_tokens, temperature=temperature, binding=binding)


@app.command(
    epilog="Example: ccmem serve --port 8000 --token $TOKEN, then with the openai client: "
    "OpenAI(base_url='http://127.0.0.1:8000/v1', api_key=TOKEN).chat.completions.create("
    "model='smollm2-135m:ccm-concat', messages=[...], extra_body={'session': 'alice'}). "
    "Sessions are created with POST /v1/sessions."
)
def serve(
    model: ModelOpt = DEFAULT_MODEL,
    method: MethodOpt = None,
    adapter: AdapterOpt = None,
    n_tok: NTokOpt = None,
    option: OptionsOpt = None,
    system: AdapterSystemOpt = None,
    stage1: Stage1Opt = None,
    store: StoreOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port (0: any free port).")] = 8000,
    token: Annotated[
        list[str] | None,
        typer.Option(
            "--token",
            help="Accept this bearer token (repeatable); then every request to /v1/ needs one, and a session is "
            "visible only to the token that made it. Default: $CCMEM_TOKENS (comma-separated), else an open server.",
        ),
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", min=1, help="The most tokens one request may generate (max_tokens).")
    ] = 512,
    max_input_tokens: Annotated[
        int, typer.Option("--max-input-tokens", min=1, help="The most tokens of new context one request may add.")
    ] = 4096,
    max_message_bytes: Annotated[
        int,
        typer.Option(
            "--max-message-bytes",
            min=1,
            help="The most UTF-8 bytes in one user or system message (413 beyond); an assistant message (a reply "
            "sent back) may be longer, within the request's total of 256 messages of this size.",
        ),
    ] = 32768,
    max_sessions: Annotated[
        int, typer.Option("--max-sessions", min=1, help="The most sessions the store may hold, all tokens together.")
    ] = 1000,
    max_batch: Annotated[
        int,
        typer.Option(
            "--max-batch",
            min=1,
            help="The most generation requests of different sessions decoded together (a request that comes while "
            "a batch decodes joins it up to this many).",
        ),
    ] = 8,
    log_level: Annotated[
        Literal["critical", "error", "warning", "info", "debug", "trace"],
        typer.Option("--log-level", help="uvicorn log level (checked before the model loads)."),
    ] = "info",
    redis_url: RedisOpt = None,
    memory_dtype: Annotated[
        str | None,
        typer.Option(
            "--memory-dtype",
            help=f"Precision sessions are kept at between requests, in RAM and in the store: {MEMORY_DTYPE_HELP}, "
            "or `auto`: float16 for a model computing in float32 (bfloat16 for a memory past float16's range), "
            "else the model's dtype. Half precision or int8 hold 2-4x more sessions per GiB; on the persona "
            "benchmark float16 moved no answer (README: Memory density). Give float32 to keep them as computed.",
        ),
    ] = "auto",
    attn: AttnOpt = "sdpa",
    quantize: QuantizeOpt = None,
) -> None:
    """Serve an OpenAI-compatible API that keeps each conversation as a compressed memory.

    Endpoints: /v1/chat/completions, /v1/models, /v1/sessions."""
    from ccmem.precision import AUTO, dtype_name
    from ccmem.serve.engine import Engine, Limits
    from ccmem.serve.server import bind, run

    # checked before the model loads; the engine resolves "auto" against the model's dtype
    storage = AUTO if (memory_dtype or "").strip().lower() == AUTO else _memory_dtype(memory_dtype)
    bind(host, port).close()  # a port in use fails before the model loads
    tokens = token or [t.strip() for t in os.environ.get("CCMEM_TOKENS", "").split(",") if t.strip()]
    if any(not t.strip() for t in tokens):
        raise ValueError("--token is empty: give a non-empty bearer token (an empty one would let any client in)")
    sessions, where = session_store(store, redis_url)
    options = _options(n_tok, None, option)
    base = _session(model, method, adapter, options, system, stage1, attn, quantize)
    limits = Limits(
        max_new_tokens=max_new_tokens,
        max_input_tokens=max_input_tokens,
        max_message_bytes=max_message_bytes,
        max_sessions=max_sessions,
        max_batch=max_batch,
    )
    engine = Engine(base, sessions, model_id=f"{model}:{base.method.name}", limits=limits, memory_dtype=storage)
    auth = f"{len(tokens)} bearer token(s)" if tokens else "no auth (open to anyone who can reach it)"
    held = engine.memory_dtype or dtype_name(base.lm.dtype)
    weights = f" ({base.lm.quantized} weights)" if base.lm.quantized else ""
    address = f"http://{host}:{port}/v1" if port else f"{host}, a free port (said on the next line)"
    console.print(
        f"[bold]ccmem serve[/]: {engine.model_id}{weights} on {address}, {auth}, store {where}, sessions held at {held}"
    )
    run(engine, host=host, port=port, tokens=tokens, log_level=log_level)


def check_persona_shape(k: int, small_talk: int) -> None:
    """The persona generator's limits, in the options' own names: a dialog holds one fact of each kind and its
    small talk is drawn without repeats (eval would otherwise cap them silently)."""
    from ccmem.data import persona

    if k > len(persona.FACTS):
        raise OptionError(f"--k {k}: persona dialogs hold at most {len(persona.FACTS)} facts (one of each kind)")
    if small_talk > len(persona.SMALL_TALK):
        raise OptionError(
            f"--small-talk {small_talk}: persona dialogs hold at most {len(persona.SMALL_TALK)} small-talk turns"
        )


def _whole_numbers(text: str, option: str) -> list[int]:
    """A comma-separated list of whole numbers, e.g. ``--decode-lengths 128,512``."""
    try:
        numbers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        numbers = []
    if not numbers:  # '' read as no lengths at all skipped the work the option asks for, without a word
        raise OptionError(f"{option} takes whole numbers separated by commas (e.g. 128,512), got {text!r}")
    return numbers


def check_folder(out: Path, option: str) -> None:
    """Refuse, before any work, an output path under a file: its folder could not be made when the results are
    written (for eval and compare, after the first method's work)."""
    from ccmem.fileio import file_in_the_way

    blocked = file_in_the_way(out.parent)
    if blocked is not None:
        raise OptionError(f"{option} {out}: {blocked} is a file, so no folder can be made there")


def check_output_file(out: Path, source: Path, option: str, example: str) -> None:
    """Refuse, before any work, an output path that is the input file (it would be overwritten), a directory, or
    no regular file (a device or pipe, which an atomic write would replace)."""
    if out.exists() and out.resolve() == source.resolve():
        raise OptionError(f"{option} {out} is the input file; choose another path for the output")
    if out.is_dir():
        raise OptionError(f"{option} {out} is a directory; give a file path such as {out / example}")
    if out.exists() and not out.is_file():
        raise OptionError(f"{option} {out} is not a regular file (a device, pipe or socket); give a file path")
    check_folder(out, option)


def read_text_file(path: Path) -> str:
    """A text file's contents; binary files are refused, and bytes that are not UTF-8 are replaced with a warning."""
    from ccmem.data.text import TextSourceError, not_utf8, read_text

    try:
        text, replaced = read_text(path)
    except TextSourceError as err:
        raise OptionError(f"{err}; compress plain text") from None
    if replaced:
        err_console.print(f"[yellow]warning:[/] {not_utf8(path, replaced)}", highlight=False)
    return text


@app.command()
def compress(
    text_file: Annotated[
        Path, typer.Argument(help="Plain-text (UTF-8) file to compress into memory.", exists=True, dir_okay=False)
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the memory (.safetensors).")],
    model: ModelOpt = DEFAULT_MODEL,
    method: MethodOpt = None,
    adapter: AdapterOpt = None,
    n_tok: NTokOpt = None,
    recurrent: RecurrentOpt = None,
    option: OptionsOpt = None,
    system: AdapterSystemOpt = None,
    stage1: Stage1Opt = None,
    chunk_tokens: Annotated[
        int | None,
        typer.Option(min=1, help="Shortcut for -O max_chunk_tokens=N: tokens per compressed chunk (ccm-*; 512)."),
    ] = None,
    memory_dtype: Annotated[
        str | None,
        typer.Option(
            "--memory-dtype",
            help=f"Precision the memory file stores keys/values in: {MEMORY_DTYPE_HELP}. `ccmem ask` reads any "
            "(expanded to the model's dtype). Default: the model's dtype.",
        ),
    ] = None,
    attn: AttnOpt = "sdpa",
    quantize: QuantizeOpt = None,
) -> None:
    """Compress a text file into a memory file that `ccmem ask` can answer from."""
    check_output_file(out, text_file, "--out", "memory.safetensors")
    text = read_text_file(text_file)
    if not text.strip():
        raise OptionError(f"{text_file} is empty: nothing to compress")
    options = _options(n_tok, recurrent, option)
    if chunk_tokens is not None:
        options["max_chunk_tokens"] = chunk_tokens
    storage = _memory_dtype(memory_dtype)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ccmem.methods.base import ContextTooLongError

    session = _session(model, method, adapter, options, system, stage1, attn, quantize)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    read = length = 0
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task(f"compressing {text_file.name} (tokens)", total=None)

        def progress(done: int, total: int) -> None:
            nonlocal read, length
            read, length = done, total
            bar.update(task, completed=done, total=total)

        try:
            session.add(text, progress=progress)
        except ContextTooLongError as err:
            raise OptionError(_compress_too_long(session, text_file, err, length)) from None
    from ccmem.precision import PrecisionRangeError

    try:
        path = session.save_memory(out, dtype=storage)
    except PrecisionRangeError as err:  # said after the whole compression: the work is kept, at bfloat16
        err_console.print(f"[yellow]{escape(str(err))}: stored as bfloat16 instead (float16's exponent range)[/]")
        storage = "bfloat16"
        path = session.save_memory(out, dtype=storage)
    mem = session.memory
    held = mem.compact(storage).nbytes if storage else mem.nbytes
    console.print(
        f"wrote {path}: {_counted(read, 'token')} in {_counted(mem.num_slots, 'slot')}, {held / 1024:.0f} KiB"
        + (f" (stored as {storage})" if storage else "")
    )


def _compress_too_long(session: Any, text_file: Path, err: ContextTooLongError, length: int = 0) -> str:
    """What to do when a text (of ``length`` tokens; 0: not known) does not fit the model's positions, in the
    command's own terms (the API's error names add() and reset()); a method's own limit (icformer's max_seq_len)
    keeps its message."""
    limit = session.lm.max_positions
    chunk = getattr(session.method, "max_chunk_tokens", None)
    sink = session.memory.sink
    if limit is None or err.positions is None:
        return str(err)
    if chunk is None:
        return (
            f"{text_file} is longer than the model's {limit} positions, and {session.method.name} reads the whole "
            "text at once; compress it with a method that reads it chunk by chunk (ccm-concat, ccm-merge), or "
            "compress a shorter text"
        )
    extra = session.method.positions_needed(session.memory, chunk) - chunk  # a chunk's <COMP> tokens
    if chunk + extra + sink > limit:
        return (
            f"--chunk-tokens {chunk}: a chunk and its {extra} <COMP> tokens after the {sink}-token system prompt "
            f"must fit the model's {limit} positions; give --chunk-tokens {limit - sink - extra} or less"
        )
    fixes = ["give a smaller --chunk-tokens"]  # the chunk beside the memory is what does not fit
    if getattr(session.method, "update", None) == "concat" and length:
        # each chunk leaves its <COMP> slots in the memory, so smaller chunks leave more of them (at --chunk-tokens 1
        # "give a smaller --chunk-tokens" could not be followed); the last chunk reads every earlier chunk's slots
        fitting = [c for c in range(1, limit) if -(-length // c) * extra + c + sink <= limit]
        span = f"{fitting[0]} to {fitting[-1]} fit this text" if fitting else ""
        if not fitting:
            fixes = [f"no --chunk-tokens fits its {length} tokens at {extra} <COMP> tokens a chunk: give fewer --n-tok"]
        elif chunk < fitting[0]:
            fixes = [f"give a larger --chunk-tokens ({span}: fewer chunks leave fewer slots)"]
        elif chunk > fitting[-1]:
            fixes = [f"give a smaller --chunk-tokens ({span})"]
        else:
            fixes = []  # the chunks fit: what the memory keeps beside them does not
    fixes += ["keep fewer tokens raw (-O keep=nothing)", "use ccm-merge, whose memory stays the same size"]
    return (
        f"{text_file}: the memory of {session.method.name} grew past what the model's {limit} positions hold beside "
        f"a chunk of {chunk} tokens; {', '.join(fixes[:-1])}, or {fixes[-1]}"
    )


def _memory_dtype(name: str | None) -> str | None:
    """A --memory-dtype value, checked before any model is loaded."""
    from ccmem.precision import storage_name

    return None if name is None else storage_name(name)


@app.command()
def ask(
    memory_file: Annotated[
        Path, typer.Argument(help="Memory written by `ccmem compress`.", exists=True, dir_okay=False)
    ],
    question: Annotated[str, typer.Argument(help="What to ask about the compressed context.")],
    model: ModelOpt = DEFAULT_MODEL,
    method: Annotated[
        str | None,
        typer.Option("--method", help="Context method; default: the one the memory was made with (its options too)."),
    ] = None,
    adapter: AdapterOpt = None,
    n_tok: NTokOpt = None,
    recurrent: RecurrentOpt = None,
    option: OptionsOpt = None,
    system: Annotated[
        str | None,
        typer.Option(
            "--system",
            help="Not needed: the memory holds the system prompt it was compressed with. If given, it must match.",
        ),
    ] = None,
    stage1: Stage1Opt = None,
    max_new_tokens: MaxNewOpt = 128,
    attn: AttnOpt = "sdpa",
    quantize: QuantizeOpt = None,
) -> None:
    """Answer a question from a saved memory (same model, method and adapter as the one that wrote it)."""
    options = _options(n_tok, recurrent, option)
    if method is None:  # the memory's own method, and the options it was made with where no adapter carries them
        from ccmem.adapter import adapter_path
        from ccmem.memory import memory_meta
        from ccmem.registry import method_class

        made = memory_meta(memory_file)
        method = made.get("method", DEFAULT_METHOD)
        cls = method_class(method)
        # options an adapter does not carry (all, for a method made without one) are the memory's where it records
        # them: a gist memory made untrained with --n-tok 2 was read at the default n_tok and refused
        # (untrained here too: no --adapter, and none ships for this model; a memory made untrained on another model
        # meets a shipped adapter, and is refused for its model, not for options the adapter does not have)
        untrained = not cls.trainable or (
            adapter_path(model, method, adapter) is None and made.get("adapter") == "untrained"
        )
        declared = {spec.name for spec in cls.option_specs() if untrained or spec.name in cls.runtime_options}
        kept = {k: _recorded(v) for k, v in made.items() if k in declared}
        options = kept | options
    # no system prompt of its own: the memory brings the one it was compressed with (a memory made with none
    # records none, and must not be read with the default)
    session = _session(model, method, adapter, options, "", stage1, attn, quantize, from_memory=True)
    session.load_memory(memory_file)
    if system is not None and system != (session.system_prompt or ""):
        raise OptionError(
            f"{memory_file} was compressed with the system prompt {session.system_prompt!r}, which it keeps; "
            "drop --system (a memory cannot take another system prompt)"
        )
    for piece in session.stream(question, max_new_tokens=max_new_tokens):
        console.print(piece, end="", highlight=False, markup=False)
    console.print()


def _recorded(raw: str) -> Any:
    """A method option as a memory records it (its ``str``): ``None`` parses as None, a tuple such as
    ``('q_proj', 'v_proj')`` (lora_targets) as that tuple."""
    import ast

    from ccmem.options import parse_value

    if raw.startswith("("):
        with contextlib.suppress(ValueError, SyntaxError):
            return ast.literal_eval(raw)
    return parse_value(raw)


@app.command(
    epilog="Example:\n\n  ccmem generate pwc/test.jsonl --adapter RUN/adapter.safetensors -o out.jsonl\n\n"
    "(without --method, the method the adapter was trained for)"
)
def generate(
    test_file: Annotated[
        Path,
        typer.Argument(help="Prompt-with-Context jsonl (input, prompt, answer per line).", exists=True, dir_okay=False),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="JSONL file the answers are written to.")] = Path(
        "output.jsonl"
    ),
    model: ModelOpt = DEFAULT_MODEL,
    method: MethodOpt = None,
    adapter: AdapterOpt = None,
    option: OptionsOpt = None,
    system: Annotated[
        str,
        typer.Option(
            "--system",
            help="System prompt, kept uncompressed as the attention sink. Default: none (each record is answered "
            "from its own input alone); give the one the adapter was trained with, if any.",
        ),
    ] = "",
    stage1: Stage1Opt = None,
    max_new_tokens: MaxNewOpt = 256,
    attn: AttnOpt = "sdpa",
    quantize: QuantizeOpt = None,
) -> None:
    """Answer every record of a PwC file from its compressed input, one JSON line per record.

    Each line holds the output, the answer, ROUGE-L and the memory slots."""
    from ccmem.data.pwc import read_pwc
    from ccmem.eval.generate import generate_file

    check_output_file(output, test_file, "--output", "output.jsonl")
    records = read_pwc(test_file)
    if not records:
        raise OptionError(f"{test_file} holds no record; give a PwC jsonl file (input, prompt, answer per line)")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    options = _options(None, None, option)
    session = _session(model, method, adapter, options, system, stage1, attn, quantize)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task(f"answering {test_file.name} (records)", total=len(records))
        rows = generate_file(
            session,
            records,
            output,
            max_new_tokens=max_new_tokens,
            progress=lambda done: bar.update(task, completed=done),
        )
    mean = sum(r["rouge_l"] for r in rows) / len(rows) if rows else 0.0
    console.print(f"{len(rows)} answers -> {output} (mean ROUGE-L {mean:.3f})")


@app.command(
    context_settings={"help_option_names": ["--help", "-h"]},
    epilog="Examples:\n\n  ccmem train persona-ccm-concat\n\n"
    "  ccmem train persona-ccm-merge train.max_steps=50 method.n_tok=2 run_id=try1\n\n"
    "  ccmem train persona-full  then  ccmem train persona-ccm-concat load_path=runs/persona-full\n\n"
    "  ccmem train persona-ccm-concat model=llama-3.1-8b-instruct --attn eager\n\n"
    "  accelerate launch -m ccmem.cli train persona-ccm-concat   (several processes/GPUs)",
)
def train(
    preset: Annotated[
        str | None,
        typer.Argument(help="Preset name (see --show-presets) or a YAML config file. Omit to start from defaults."),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="key=value settings that override the preset, e.g. train.lr=1e-4 data.n_train=500."),
    ] = None,
    wandb: Annotated[bool, typer.Option("--wandb", help="Also log to Weights & Biases (never required).")] = False,
    attn: Annotated[
        Attn | None,
        typer.Option(
            "--attn",
            help=ATTN_HELP
            + " Sets the config key attn; without it, the preset's kernel (sdpa unless it names another).",
        ),
    ] = None,
    show_config: Annotated[bool, typer.Option("--show-config", help="Print the resolved config and exit.")] = False,
    show_keys: Annotated[
        bool, typer.Option("--show-keys", help="List every config key with its type and meaning.")
    ] = False,
    show_presets: Annotated[
        bool, typer.Option("--show-presets", help="List the named presets, each with what it trains.")
    ] = False,
    export_checkpoint: Annotated[
        str | None,
        typer.Option(
            "--export-checkpoint",
            metavar="STEP|latest",
            help="Train nothing: write the adapter of this run's checkpoint-STEP (or its latest) to "
            "RUN/checkpoint-STEP/adapter.safetensors, to use a run stopped early. Give the run's own preset and "
            "overrides; resuming it later is not affected.",
        ),
    ] = None,
) -> None:
    """Train a method's adapter (or a stage-1 LoRA: method.name=full) on the HF Trainer; rerunning resumes.

    Everything lands in OUTPUT_DIR/RUN_ID (default runs/<preset>): config.yaml, checkpoints, log.jsonl,
    TensorBoard events, and the result: adapter.safetensors. Rerunning a finished run changes nothing.
    """
    import yaml

    from ccmem.options import type_name
    from ccmem.train.config import (
        REFERENCE_KEYS,
        VALID_KEYS,
        key_docs,
        load_config,
        method_keys,
        preset_names,
        preset_summary,
    )

    if show_presets:
        for name in preset_names():
            console.print(f"{name}  [dim]{escape(preset_summary(name))}[/]", highlight=False)
    if show_keys:
        docs = key_docs()
        for key, kind in VALID_KEYS.items():
            console.print(f"{key}  [dim]{escape(type_name(kind))}[/]  {escape(docs.get(key, ''))}", highlight=False)
        for key, (kind, owners, help_text) in method_keys().items():
            owned = f"[dim](option of {', '.join(owners)})[/]"
            console.print(f"{key}  [dim]{escape(type_name(kind))}[/]  {escape(help_text)} {owned}", highlight=False)
        for name, (target, note) in REFERENCE_KEYS.items():  # the IC-Former scripts' option names
            console.print(f"{name} -> {target or '-'}  [dim]{escape(note)}[/]", highlight=False)
    if (show_presets or show_keys) and not show_config:  # each listing asked for is shown, then the config if asked
        return
    overrides = list(overrides or [])
    if preset is not None and "=" in preset and not Path(preset).exists():  # no preset, only overrides (--help:
        overrides = [preset, *overrides]  # "omit to start from defaults"); it was "no preset 'a=b'"
        preset = None
    if attn is not None:
        overrides = [*_unless_other_attn(overrides, attn), f"attn={attn}"]
    config = load_config(preset, overrides + (["wandb=true"] if wandb else []))
    if show_config:
        console.print(yaml.safe_dump(config.to_dict(), sort_keys=False), highlight=False)
        return
    if export_checkpoint is not None:
        from ccmem.train.trainer import export_checkpoint as export

        which = export_checkpoint.strip().lower()
        if which != "latest" and not which.isdigit():
            raise OptionError(f"--export-checkpoint must be a step number or 'latest', got {export_checkpoint!r}")
        path = export(config, None if which == "latest" else int(which))
        console.print(f"wrote {path}")
        return
    from ccmem.train.trainer import train as run_training

    try:
        result = run_training(config)
    except KeyboardInterrupt:
        err_console.print(
            f"\ninterrupted: rerun the same command to resume run {config.run_id!r} from its last checkpoint "
            f"(every train.save_steps={config.train.save_steps} steps, in {config.run_dir})"
        )
        raise
    loss = "-" if result.eval_loss is None else f"{result.eval_loss:.4f}"
    if result.finished_before:
        console.print(
            f"run {config.run_id!r} already finished ({result.steps} steps, best eval loss {loss}): "
            f"nothing to do. Its adapter: {result.output}. Use a new run_id to train again."
        )
        return
    console.print(
        f"[bold]done[/]: {result.steps} steps, best eval loss {loss}, "
        f"{result.tokens_per_second:.0f} tokens/s this session -> {result.output}"
    )


def _unless_other_attn(overrides: list[str], attn: str) -> list[str]:
    """``overrides`` unchanged, or an error where an ``attn=`` among them names another kernel than ``--attn``: two
    settings on one command line that disagree are a mistake, not something to pick a winner for."""
    from ccmem.train.config import parse_override

    for text in overrides:
        key, value = parse_override(text)
        if key == "attn" and value != attn:
            raise OptionError(f"--attn {attn} and the override {text!r} disagree; give the kernel once")
    return overrides


def _adapters(specs: list[str] | None) -> dict[str, Path]:
    adapters = {}
    for spec in specs or []:
        method, sep, path = spec.partition("=")
        if not sep or not path:
            raise OptionError(
                f"--adapter {spec!r} must look like METHOD=PATH, e.g. ccm-concat=runs/x/adapter.safetensors"
            )
        if method.strip() in adapters:
            raise OptionError(f"--adapter names {method.strip()} twice; give one file per method")
        adapters[method.strip()] = Path(path)
    return adapters


TEMPLATES_HELP = (
    "dialogs: the fact wordings and kinds, a template file (syntax: ccmem.data.templates) or a packaged bank: "
    "default, or wide (adds exact strings such as e-mail addresses and booking codes, other people's facts, "
    "more corrections)."
)


def _eval_data(
    examples: list, *, path: Path | None, source: str, generator: dict[str, int | str | None]
) -> dict[str, str]:
    """What the examples are, for the rows' config hash: a digest of their content when the user's files or
    generator settings other than ``ccmem eval``'s defaults made them; the default data gives ``{}`` (older rows
    keep their hash)."""
    from ccmem.data.records import examples_digest

    defaults = inspect.signature(eval_command).parameters
    data = {"source": source} if source != "wiki" else {}
    if path is not None or any(value != defaults[name].default for name, value in generator.items()):
        data["examples"] = examples_digest(examples)
    return data


#: Datasets of ``ccmem train`` that ``ccmem eval`` cannot score, and what to run instead.
TRAINING_ONLY = {
    "wikitext": "its passages have no answer to score on any split; its perplexity under sentinel, local and "
    "scattered is `ccmem repro sentinel ppl`, and `ccmem eval text` scores continuations",
    "mixture": "its families' weights are data.mixture of `ccmem train`; evaluate each family on its own (ccmem "
    "eval dialogs, persona, icl, passages, text or pwc)",
}


@app.command("eval")
def eval_command(
    dataset: Annotated[
        str,
        typer.Argument(
            help="Dataset loader: persona, dialogs, passages, icl, text, metaicl, lamp2, dailydialog, soda, unified, "
            "pretrain, pwc (PwC jsonl, or generated without --path), pile, gsm8k (with --generate, EM is the final "
            "answer's accuracy; the fork's policy table: `ccmem repro gsm8k`), text-stream (`ccmem data --help` "
            "writes the generated ones to files)."
        ),
    ],
    path: Annotated[
        Path | None, typer.Option("--path", help="Downloaded dataset file/folder (generators need none).")
    ] = None,
    split: Annotated[str, typer.Option("--split", help="train, validation or test.")] = "test",
    n: Annotated[int, typer.Option("--n", min=1, help="Most examples (generators make exactly this many).")] = 100,
    k: Annotated[
        int, typer.Option("--k", min=1, help="Context segments per example: demonstrations, profile items, facts.")
    ] = 3,
    small_talk: Annotated[int, typer.Option("--small-talk", min=0, help="persona: fact-free turns per dialog.")] = 2,
    turns: Annotated[
        int, typer.Option("--turns", min=0, help="dialogs: turns per test dialog (0: 20); --k caps the facts.")
    ] = 0,
    templates: Annotated[
        str | None,
        typer.Option(
            "--templates", help=TEMPLATES_HELP + " Rows are labelled 'templates NAME' unless --label says otherwise."
        ),
    ] = None,
    source: Annotated[
        str,
        typer.Option(
            "--source",
            help="passages, generated pwc: the text asked about: wiki (packaged Wikipedia summaries), news "
            "(packaged news articles) or both.",
        ),
    ] = "wiki",
    seed: Annotated[int, typer.Option("--seed", help="Generator seed.")] = 0,
    model: ModelOpt = DEFAULT_MODEL,
    methods: Annotated[
        str | None,
        typer.Option(
            "--methods",
            help="Comma-separated methods, run side by side. Default: the baselines and every learned method with "
            "an adapter for the model.",
        ),
    ] = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option("--adapter", help="METHOD=PATH of a trained adapter (repeatable). Default: the shipped one."),
    ] = None,
    n_tok: NTokOpt = None,
    recurrent: RecurrentOpt = None,
    option: OptionsOpt = None,
    generate: Annotated[
        bool,
        typer.Option(
            "--generate/--no-generate",
            help="Also generate answers (EM, contains, ROUGE-L; for gsm8k, EM is the final answer's accuracy).",
        ),
    ] = False,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-new-tokens",
            min=1,
            help="Most tokens to generate per answer. Default: 24, and 256 for gsm8k (worked solutions).",
        ),
    ] = None,
    score: Annotated[
        Literal["sum", "mean"],
        typer.Option(
            "--score",
            help="How an answer option's token log-probabilities are combined: sum (MetaICL) or mean "
            "(length-normalised, less biased towards short options).",
        ),
    ] = "sum",
    system: SystemOpt = DEFAULT_SYSTEM_PROMPT,
    label: Annotated[str, typer.Option("--label", help="Free text stored in each row to tell runs apart.")] = "",
    stage1: Stage1Opt = None,
    memory_dtype: Annotated[
        str | None,
        typer.Option(
            "--memory-dtype",
            help=f"Answer from each example's memory stored at this precision and expanded again: {MEMORY_DTYPE_HELP}. "
            "Rows record it (extra.memory_dtype) and count the bytes held at it.",
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="JSONL file the rows are appended to.")] = Path(
        "results/eval.jsonl"
    ),
    attn: AttnOpt = "sdpa",
    quantize: QuantizeOpt = None,
) -> None:
    """Evaluate several methods on the same examples: accuracy (option scoring), perplexity, optional generation.

    Rows (quality, memory slots/bytes, tokens/s, method, model, adapter, training data, config hash) are appended
    to --out; `ccmem report` turns them into tables and a plot.
    """
    from ccmem.data.loaders import load_examples
    from ccmem.data.news import check_source
    from ccmem.eval.harness import EvalSettings, check_adapters, check_options_apply, compare, options_for, read_rows
    from ccmem.loading import load_model
    from ccmem.registry import get_method
    from ccmem.train.config import DataConfig

    if out.is_dir():
        raise OptionError(f"--out {out} is a folder; give the JSONL file the rows go to, e.g. {out / 'eval.jsonl'}")
    check_folder(out, "--out")
    if path is not None and path.is_file() and out.resolve() == path.resolve():
        raise OptionError(f"--out {out} is the --path data file: the rows would be appended to your examples; "
                          "give another file, e.g. --out results/eval.jsonl")  # fmt: skip
    if path is not None and path.is_dir() and out.resolve().is_relative_to(path.resolve()):
        # The folder's split file (test.jsonl) is found by its name: rows written there would join the examples.
        raise OptionError(
            f"--out {out} is inside the --path data folder {path}: the rows could be appended to "
            "your examples or read as them; give a file elsewhere, e.g. --out results/eval.jsonl"
        )
    if out.is_file() and out.stat().st_size:  # rows appended to another kind of file: no report could read it
        try:
            read_rows([out])
        except ValueError as err:
            raise OptionError(
                f"--out {out} holds something other than `ccmem eval` rows ({err}); the rows are appended to it: "
                "give another file, e.g. --out results/eval.jsonl"
            ) from None
    if dataset in TRAINING_ONLY:  # examples with nothing to score, or weights no eval option gives: said at once
        raise OptionError(f"dataset {dataset!r} is training data: {TRAINING_ONLY[dataset]}")
    if templates is not None:
        if dataset != "dialogs" or path is not None:
            raise OptionError("--templates shapes generated dialogs only (dataset dialogs, without --path)")
        from ccmem.data.dialogs import load_bank

        try:
            load_bank(templates)
        except (OSError, ValueError) as err:
            raise OptionError(f"--templates: {err}") from None
        label = label or f"templates {templates}"  # rows of another bank get a table of their own in reports
    names = _method_list(methods, model)
    options = _options(n_tok, recurrent, option)
    check_options_apply(names, options)
    for name in names:
        get_method(name, **options_for(name, options))
    check_adapters(model, names, options, _adapters(adapter))  # a conflicting adapter before the model loads
    if max_new_tokens is None:
        max_new_tokens = GSM8K_MAX_NEW_TOKENS if dataset == "gsm8k" else 24
    if dataset == "gsm8k" and not generate:
        err_console.print(
            "note: gsm8k without --generate scores the worked solutions' perplexity only; add --generate for the "
            "final answers' accuracy (EM)"
        )
    storage = _memory_dtype(memory_dtype)
    check_source(source, "--source")
    if dataset == "persona" and path is None:
        check_persona_shape(k, small_talk)
    cfg = DataConfig(
        dataset=dataset,
        path=str(path) if path else None,
        n_train=n,
        n_eval=n,
        k=k,
        small_talk=small_talk,
        turns=turns,
        templates=templates,
        source=source,
        seed=seed,
    )
    defaults = inspect.signature(eval_command).parameters  # what an option left alone holds
    if path is None:  # a generator that does not read an option would ignore it without a word
        from ccmem.data.loaders import check_source as check_source_read

        for key, value, readers in (("small_talk", small_talk, ("persona",)),
                                    ("turns", turns, ("dialogs",))):  # fmt: skip
            if value != defaults[key].default and dataset not in readers:
                flag = "--" + key.replace("_", "-")
                raise OptionError(f"{flag} shapes {readers[0]} data; dataset {dataset!r} does not read it")
        try:
            check_source_read(cfg)
        except ValueError as err:
            raise OptionError(str(err).replace("data.source=", "--source ")) from None
    examples = load_examples(cfg, split)[:n]
    if not examples:  # said before the model loads
        if path is not None and path.is_file():
            raise OptionError(f"{path} holds no {dataset} example")
        raise OptionError(f"{dataset} has no {split} example{f' at {path}' if path else ''}; try another --split")
    if path is not None and dataset in ("persona", "dialogs", "passages"):
        given = {"k": k, "small_talk": small_talk, "turns": turns, "templates": templates, "seed": seed}
        ignored = [f"--{key.replace('_', '-')}" for key, value in given.items() if value != defaults[key].default]
        if ignored:
            err_console.print(f"note: {', '.join(ignored)} shape generated dialogs; a --path file is read as written")
    from ccmem.stage1 import change_weights, check_weight_changes

    check_weight_changes(stage1, quantize, model, attn)
    with console.status(f"loading {model}..."):
        lm = load_model(model, attn_implementation=attn)
    names = _check_methods(lm, names, options, skip=methods is None)
    change_weights(lm, stage1, quantize)  # every method then reads them: full is the stage-1 reference
    settings = EvalSettings(
        generate=generate,
        max_new_tokens=max_new_tokens,
        system=system or None,
        score=score,
        method_options=options,
        memory_dtype=storage,
        data=_eval_data(
            examples,
            path=path,
            source=source,
            generator={"k": k, "small_talk": small_talk, "turns": turns, "templates": templates, "seed": seed},
        ),
        data_path=str(path.resolve()) if path else None,  # "data.jsonl" told nothing once the run was elsewhere
    )
    shown = dataset if source == "wiki" else f"{dataset} ({source})"
    table = Table(title=f"ccmem eval: {shown}/{split}, {len(examples)} examples, {model}")
    for col in (
        "method",
        "adapter",
        "accuracy",
        "EM",
        "gen contains",
        "ROUGE-L",
        "perplexity",
        "KV slots",
        "KiB",
        "tokens/s",
    ):
        table.add_column(col, justify="left" if col in ("method", "adapter") else "right")
    from rich.progress import Progress

    def fmt(x: float | None, digits: int = 3) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task("evaluating", total=len(examples) * len(names))
        done: dict[str, int] = {}

        def progress(method: str, i: int) -> None:
            done[method] = i
            bar.update(task, completed=sum(done.values()), description=method)
            if i == len(examples) or i % max(1, len(examples) // 10) == 0:  # about every tenth, for logs
                _note_when_piped(f"{method}: {i}/{len(examples)} examples")

        for row in compare(
            lm, names, examples, dataset=dataset, split=split, settings=settings,
            adapters=_adapters(adapter), label=label, out=out, progress=progress,
        ):  # fmt: skip
            table.add_row(
                row.method, row.adapter, fmt(row.accuracy), fmt(row.exact_match), fmt(row.contains), fmt(row.rouge_l),
                fmt(row.perplexity, 2), f"{row.memory_slots:.1f}", f"{row.memory_bytes / 1024:.0f}",
                fmt(row.tokens_per_second, 0),
            )  # fmt: skip
    console.print(table)
    console.print(f"rows appended to {out}")


def _fraction(text: str) -> float:
    num, sep, den = text.strip().partition("/")
    try:
        return float(num) / float(den) if sep else float(num)
    except (ValueError, ZeroDivisionError):
        raise OptionError(f"budget {text!r} must be a share of the context such as 1/8 or 0.125") from None


@app.command(
    epilog="Examples:\n\n  ccmem compare\n\n"
    "  ccmem compare --tasks persona --methods full,none,ccm-concat,snapkv,knorm --budgets 1/4,1/8 --n 50\n\n"
    "  ccmem compare --no-decode -O window_size=16   (the option goes to the methods that have it)",
)
def compare(
    methods: Annotated[
        str | None,
        typer.Option(
            "--methods",
            help="Comma-separated methods (`ccmem methods`). Default: every registered method, learned ones only "
            "where an adapter ships for the model.",
        ),
    ] = None,
    tasks: Annotated[
        str,
        typer.Option(
            "--tasks",
            help="persona (facts in a chat, accuracy), icl (in-context classification, accuracy), "
            "text (Shakespeare continuation, perplexity), text-long (the same with ~1,550 tokens of context in "
            "~260-token chunks and ~510 scored), dialogs-5 / dialogs-10 / dialogs-15 / dialogs-20 (varied "
            "fact dialogs of that many turns with held-out wordings and fact kinds, accuracy, by distance too), "
            "passages (QA over Wikipedia passages shared in a chat, accuracy), passages-news (the same over news "
            "articles), pwc (IC-Former's PwC-style prompts over 1-2 Wikipedia summaries, 4 options, accuracy), "
            "pwc-news (the same over news stories).",
        ),
    ] = "persona,icl,text",
    budgets: Annotated[
        str,
        typer.Option(
            "--budgets",
            help="Shares of the context kept by budgeted methods, each run at every budget: the training-free ones "
            "(ratio = budget) and sentinel/local/scattered (compression_ratio = 1 - budget). The others run at their "
            "own size.",
        ),
    ] = "1/2,1/4,1/8,1/16",
    n: Annotated[int, typer.Option("--n", min=1, help="Examples per task.")] = 30,
    model: ModelOpt = DEFAULT_MODEL,
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            "--adapter",
            help="METHOD=PATH replaces the shipped adapter of METHOD; METHOD@LABEL=PATH adds a variant (e.g. "
            "ccm-concat@persona=old.safetensors) run beside the others. Repeatable.",
        ),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option",
            "-O",
            help="KEY=VALUE method option, to every method that has it (e.g. -O ratio=0.25); METHOD:KEY=VALUE to "
            "one method only, and METHOD@LABEL:KEY=VALUE adds a variant with it run beside the method (e.g. -O "
            "ccm-concat@w150:recent=150). Repeatable.",
        ),
    ] = None,
    system: SystemOpt = DEFAULT_SYSTEM_PROMPT,
    decode: Annotated[
        bool, typer.Option("--decode/--no-decode", help="Also time decoding after histories of growing length.")
    ] = True,
    decode_lengths: Annotated[
        str, typer.Option("--decode-lengths", help="History lengths (tokens) before decoding is timed.")
    ] = "128,512,1024",
    decode_budget: Annotated[
        str, typer.Option("--decode-budget", help="Budget of the training-free methods in the decode timing.")
    ] = "1/8",
    out_dir: Annotated[
        Path, typer.Option("--out-dir", "-o", help="Rows (rows.jsonl, decode.jsonl), report.md/.html and plots.")
    ] = Path("results/compare"),
    stage1: Stage1Opt = None,
    attn: AttnOpt = "sdpa",
    quantize: QuantizeOpt = None,
) -> None:
    """Run methods x tasks x memory budgets side by side and write an HTML + markdown report with plots.

    Rows are cached in OUT_DIR/rows.jsonl as cells finish: run the same command again to resume an interrupted
    grid (rows made with other settings are kept in the file but never mixed into this report).
    """
    from rich.progress import Progress

    from ccmem.eval.compare import CompareSettings, check_variants, grid, read_cached, run_decode_speed, run_grid
    from ccmem.eval.compare_report import write_compare_report
    from ccmem.loading import load_model
    from ccmem.stage1 import change_weights, check_weight_changes

    adapters = {name: str(path) for name, path in _adapters(adapter).items()}
    names = _method_list(methods, model, ("baseline", "learned", "training-free"))
    names += [v for v in adapters if v not in names]
    options, own = _scoped_options(_options(None, None, option))
    names += [v for v in own if v not in names]
    settings = CompareSettings(
        methods=names,
        adapters=adapters,
        tasks=[t.strip() for t in tasks.split(",") if t.strip()],
        budgets=[_fraction(b) for b in budgets.split(",") if b.strip()],
        n=n,
        options=options,
        variant_options=own,
        system=system or None,
        decode_lengths=_whole_numbers(decode_lengths, "--decode-lengths") if decode else [],
        decode_budget=_fraction(decode_budget),
    )
    check_variants(settings, model)
    cells = grid(settings)
    if out_dir.exists() and not out_dir.is_dir():
        raise OptionError(f"--out-dir {out_dir} is a file; give a folder for rows.jsonl and the report")
    check_folder(out_dir, "--out-dir")
    try:  # the rows a rerun resumes from; another command's rows.jsonl (ccmem stream's, repro gsm8k's) before loading
        read_cached(out_dir / "rows.jsonl")
    except ValueError as err:
        raise OptionError(
            f"--out-dir {out_dir} holds rows of another command ({err}); give a folder of its own to compare"
        ) from None
    check_weight_changes(stage1, quantize, model, attn)
    with console.status(f"loading {model}..."):
        lm = load_model(model, attn_implementation=attn)
    kept = _check_methods(lm, names, settings.options, skip=methods is None)
    if kept != names:  # a default method this model cannot run was left out
        settings = dataclasses.replace(settings, methods=kept)
        cells = grid(settings)
    change_weights(lm, stage1, quantize)  # every method then reads them: full is the stage-1 reference
    rows = []
    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task("compare", total=len(cells) * n)
        finished: dict[object, int] = {}

        from_file: set[object] = set()

        def progress(cell: object, i: int, total: int) -> None:
            label = getattr(cell, "label", str(cell))
            if i == total and finished.get(cell) != total:
                what = "read from rows.jsonl" if cell in from_file else f"{total} examples done"
                _note_when_piped(f"{label}: {what} ({len(finished) + (cell not in finished)}/{len(cells)} cells)")
            finished[cell] = i
            bar.update(task, completed=sum(finished.values()), description=label)

        rows = list(run_grid(lm, settings, out_dir, progress=progress, reused=from_file.add))
        decode_rows = []
        if settings.decode_lengths:
            step = bar.add_task("decode speed", total=None)

            def decoding(text: str) -> None:
                bar.update(step, description=text)
                _note_when_piped(f"decode speed: {text}")

            decode_rows = run_decode_speed(lm, settings, out_dir, progress=decoding)
    budgeted = any(r.budget is not None for r in rows)
    header = (
        f"{lm.name}{f' with stage-1 LoRA {lm.stage1} merged in' if lm.stage1 else ''}; {n} examples per task; "
        + (f"budgets {budgets} of the context for budgeted methods; " if budgeted else "")
        + f"system prompt {settings.system!r} kept by every method."
    )
    paths = write_compare_report(rows, decode_rows, out_dir, header=header)
    console.print(paths["markdown"].read_text(encoding="utf-8"), highlight=False, markup=False, soft_wrap=True)
    console.print(f"wrote {paths['html']} and {paths['markdown']} (rows: {out_dir / 'rows.jsonl'})")


@app.command()
def report(
    results: Annotated[list[Path], typer.Argument(help="JSONL files written by `ccmem eval`.")],
    out_dir: Annotated[
        Path, typer.Option("--out-dir", "-o", help="Where report.md, report.csv and the plot go.")
    ] = Path("results/report"),
    metric: Annotated[
        str | None,
        typer.Option(
            "--metric",
            help="Quality metric to plot: accuracy, contains, rouge_l, exact_match or perplexity (default: the first "
            "of these that every row has).",
        ),
    ] = None,
) -> None:
    """Aggregate eval rows (any mix of methods, datasets, adapters) into markdown/CSV tables and a PNG plot."""
    from ccmem.eval.harness import read_rows
    from ccmem.eval.report import group_markdown, latest_rows, markdown, mismatches, write_report

    results = list({path.resolve(): path for path in results}.values())  # a file named twice is read once
    rows, repeated = latest_rows(read_rows(results))
    if repeated:
        err_console.print(f"note: {repeated} rows were measured again later (reruns); the latest of each is shown")
    if out_dir.exists() and not out_dir.is_dir():
        raise OptionError(f"--out-dir {out_dir} is a file; give a folder for report.md, report.csv and the plot")
    check_folder(out_dir, "--out-dir")
    paths = write_report(rows, out_dir, metric)
    console.print(markdown(rows) + group_markdown(rows), highlight=False, markup=False, soft_wrap=True)
    for warning in mismatches(rows):
        console.print(f"[yellow]not comparable:[/] {escape(warning)}", highlight=False)
    console.print(f"wrote {paths['markdown']}, {paths['csv']}, {paths['plot']}")


@app.command(
    epilog="Examples:\n\n  ccmem stream   (Shakespeare, 10 x an emulated 256-position context)\n\n"
    "  ccmem stream --text pg19/test --max-positions 0 --contexts 2 --window 1024 --comp-slots 128 --block 128\n\n"
    "  ccmem stream --methods ccm-concat,streaming-llm --adapter ccm-concat=runs/x/adapter.safetensors",
)
def stream(
    text: Annotated[
        Path | None,
        typer.Option(
            "--text",
            help="A text file, or a folder of .txt books read in numeric name order, a blank line between books "
            "(PG19's layout). Default: the plays of the `shakespeare` package (offline).",
        ),
    ] = None,
    model: ModelOpt = DEFAULT_MODEL,
    methods: Annotated[
        str,
        typer.Option(
            "--methods",
            help="Comma-separated, all at the same memory: ccm-concat and ccm-merge (sink + compressed blocks + "
            "window), sentinel, local and scattered (sink + the entries their sparse attention keeps of each "
            "leaving block, oldest dropped past --comp-slots + window), streaming-llm (sink + window), window "
            "(window alone), full (everything, until it would pass --max-positions or --full-cap-mib).",
        ),
    ] = "ccm-concat,streaming-llm,window,full",
    max_positions: Annotated[
        int,
        typer.Option(
            "--max-positions",
            min=0,
            help="Context limit to emulate: no stream uses a position id at or past it (0: the model's own "
            "max_position_embeddings, 8192 for SmolLM2). Small values make '10 x the context' runnable on a CPU.",
        ),
    ] = 256,
    contexts: Annotated[
        float, typer.Option("--contexts", help="Stream length in contexts (tokens = contexts x max positions).")
    ] = 10.0,
    sink: Annotated[int, typer.Option("--sink", min=0, help="First tokens kept as attention sinks.")] = 4,
    window: Annotated[
        int, typer.Option("--window", min=0, help="Recent tokens kept raw by ccm-*; the baselines get the same memory.")
    ] = 64,
    comp_slots: Annotated[
        int,
        typer.Option(
            "--comp-slots",
            min=0,
            help="Most compressed slots of ccm-concat (a multiple of the adapter's n_tok; older slots are merged); "
            "ccm-merge keeps the banks x n_tok slots its adapter was trained with and a window of the rest.",
        ),
    ] = 16,
    block: Annotated[
        int,
        typer.Option(
            "--block", min=1, help="Tokens read per step; what leaves the window is compressed a block at a time."
        ),
    ] = 32,
    bucket_tokens: Annotated[
        int, typer.Option("--bucket-tokens", min=0, help="Tokens per perplexity bucket (0: one bucket per context).")
    ] = 0,
    full_cap_mib: Annotated[
        float | None, typer.Option("--full-cap-mib", help="full stops before its cache passes this many MiB.")
    ] = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            "--adapter",
            help="METHOD=PATH of a ccm-*, sentinel, local or scattered adapter (repeatable). Default for ccm-*: the "
            "shipped streaming adapter (ccm-concat: trained on text read block by block, `ccmem train "
            "stream-ccm-concat`), else the shipped chat one; the sparse methods run untrained without one "
            "(`ccmem train sentinel-clm`).",
        ),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option",
            "-O",
            help="Option KEY=VALUE of the sparse methods (sentinel, local, scattered), repeatable, e.g. "
            "-O compression_ratio=0.75; an adapter's own settings fill in the rest.",
        ),
    ] = None,
    label: Annotated[str, typer.Option("--label", help="Free text stored in each row to tell runs apart.")] = "",
    out_dir: Annotated[
        Path, typer.Option("--out-dir", "-o", help="Where rows.jsonl (this run's), report.md and stream.png go.")
    ] = Path("results/stream"),
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace the rows and report already in --out-dir (else refused, unread)."),
    ] = False,
    attn: AttnOpt = "sdpa",
    quantize: QuantizeOpt = None,
) -> None:
    """Read a text many times the model's context at constant memory, for every method at the same memory.

    Measures perplexity per position bucket, peak KV bytes and tokens/s, with positions re-based (RoPE keys
    re-rotated) as it slides."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ccmem.cli_repro import check_out_dir
    from ccmem.eval.stream import StreamSettings, check_layouts, markdown, run_stream
    from ccmem.loading import load_model

    settings = StreamSettings(
        methods=[m.strip() for m in methods.split(",") if m.strip()],
        max_positions=max_positions,
        contexts=contexts,
        sink=sink,
        window=window,
        comp_slots=comp_slots,
        block=block,
        bucket_tokens=bucket_tokens,
        full_cap_mib=full_cap_mib,
        text=str(text) if text is not None else None,
        adapters={name: str(path) for name, path in _adapters(adapter).items()},
        options=_options(None, None, option),
        label=label,
    )
    settings.check()
    check_out_dir(out_dir, ["rows.jsonl", "report.md", "stream.png"], overwrite)
    with console.status(f"loading {model}..."):
        lm = load_model(model, attn_implementation=attn, quantize=quantize)
    settings.weights = lm.quantized
    _check_methods(lm, settings.methods, settings.options)
    check_layouts(lm, settings)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        tasks: dict[str, Any] = {}
        tenths: dict[str, int] = {}  # piped: a line at each tenth of a method's stream, not only at its end

        def progress(method: str, done: int, total: int) -> None:
            if method not in tasks:
                tasks[method] = bar.add_task(method, total=total)
            tenth = done * 10 // max(total, 1)
            if done == total:
                _note_when_piped(f"{method}: {total} tokens read")
            elif tenth > tenths.get(method, 0):
                tenths[method] = tenth
                _note_when_piped(f"{method}: {done}/{total} tokens read ({tenth * 10}%)")
            bar.update(tasks[method], completed=done)

        rows = run_stream(lm, settings, out_dir, progress=progress)
    console.print(markdown(rows), highlight=False, markup=False, soft_wrap=True)
    console.print(f"wrote {out_dir / 'rows.jsonl'}, {out_dir / 'report.md'} and {out_dir / 'stream.png'}")


@app.command(
    epilog="Examples:\n\n  ccmem data dialogs -o data/dialogs --turns 20\n\n"
    "  ccmem data dialogs -o data/mine --templates my_facts.txt   (your own wordings and fact kinds)\n\n"
    "  ccmem train persona-ccm-concat data.dataset=dialogs data.path=data/mine run_id=mine",
)
def data(
    generator: Annotated[
        str,
        typer.Argument(
            help="persona (chat facts, one wording per kind), dialogs (varied fact dialogs from a template file), "
            "passages (QA over shared Wikipedia passages), pwc (IC-Former's PwC-style records: input, prompt, answer, "
            "options) or icl (in-context classification)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write into.")],
    n_train: Annotated[
        int | None, typer.Option("--n-train", min=1, help="Training dialogs \\[default: 2400] (icl: see --k).")
    ] = None,
    n_test: Annotated[
        int | None,
        typer.Option(
            "--n-test",
            min=1,
            help="Validation and test dialogs each \\[default: 200]; icl: dev queries per task \\[default: 20] "
            "(its test queries are every held-out word).",
        ),
    ] = None,
    k: Annotated[
        int | None,
        typer.Option(
            "--k",
            min=1,
            help="persona/dialogs: most facts per dialog; passages: passages per chat; icl: demonstrations "
            "\\[default: 3].",
        ),
    ] = None,
    small_talk: Annotated[
        int | None, typer.Option("--small-talk", min=0, help="persona: most small-talk turns \\[default: 2].")
    ] = None,
    turns: Annotated[
        int | None,
        typer.Option("--turns", min=1, help="dialogs: most turns (test dialogs: exactly this many) \\[default: 20]."),
    ] = None,
    min_turns: Annotated[
        int,
        typer.Option(
            "--min-turns",
            min=0,
            help="dialogs: fewest turns of a training or validation dialog (0: 1); long dialogs only, where facts "
            "lie many turns back. Test dialogs keep exactly --turns.",
        ),
    ] = 0,
    templates: Annotated[
        Path | None,
        typer.Option("--templates", help=TEMPLATES_HELP),
    ] = None,
    source: Annotated[
        str,
        typer.Option("--source", help="passages, pwc: wiki (Wikipedia summaries), news (news articles) or both."),
    ] = "wiki",
    tasks: Annotated[int | None, typer.Option("--tasks", min=1, help="icl: number of tasks \\[default: 20].")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Generator seed (same seed, same files).")] = 0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the dataset files already in --out (else they are kept).")
    ] = False,
) -> None:
    """Write an offline dataset to files in the format its loader reads (persona-format JSONL, or MetaICL's layout).

    Test items never occur in training: test dialogs ask about held-out values (dialogs: also held-out wordings
    and fact kinds), passages come from held-out articles, icl test queries are held-out words.
    """
    from ccmem.data import persona

    generators = ["persona", "dialogs", "passages", "pwc", "icl"]
    if generator not in generators:
        close = difflib.get_close_matches(generator, generators, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise OptionError(f"unknown generator {generator!r}{hint}; use persona, dialogs, passages, pwc or icl")
    for flag, value, reader in (("--small-talk", small_talk, "persona"), ("--turns", turns, "dialogs"),
                                ("--tasks", tasks, "icl")):  # fmt: skip
        if value is not None and generator != reader:  # it was read by no generator of this one's, without a word
            raise OptionError(f"{flag} shapes {reader} data; {generator!r} does not read it")
    if k is not None and generator == "pwc":
        raise OptionError("--k counts facts, passages or demonstrations; a pwc record holds one or two articles")
    small_talk, turns, tasks, k = 2 if small_talk is None else small_talk, turns or 20, tasks or 20, k or 3
    if source != "wiki" and generator not in ("passages", "pwc"):
        raise OptionError(f"--source chooses the text of passages and pwc; {generator!r} does not read it")
    if templates is not None and generator != "dialogs":
        raise OptionError(f"--templates chooses the wordings of dialogs; {generator!r} does not read it")
    if min_turns and generator != "dialogs":
        raise OptionError(f"--min-turns sets the length of dialogs; {generator!r} does not read it")
    if min_turns > turns:
        raise OptionError(f"--min-turns ({min_turns}) must not exceed --turns ({turns})")
    if generator == "persona":
        check_persona_shape(k, small_talk)
    if generator == "icl" and n_train is not None:  # it was read by no generator of icl's, without a word
        raise OptionError("--n-train counts training dialogs; icl's training rows are its --k demonstrations")
    if out.exists() and not out.is_dir():
        raise OptionError(f"--out {out} is a file; give a folder for the dataset files")
    check_folder(out, "--out")
    held = sorted(out.glob("*.jsonl") if generator != "icl" else out.glob("*/*_train.jsonl")) if out.is_dir() else []
    if held and not overwrite:
        raise OptionError(
            f"--out {out} already holds a dataset ({', '.join(p.name for p in held[:3])}); give --overwrite to "
            "replace it, or another folder"
        )
    if generator in ("persona", "dialogs", "passages", "pwc"):
        from ccmem.data import dialogs, passages, pwc

        n_train, n_test = n_train or 2400, n_test or 200
        # every split is made before any is written: a split that cannot be made (too few held-out passages for
        # --k) left the train file alone in --out, or beside the old validation and test files with --overwrite
        splits: dict[str, list[Any]] = {}  # dialogs (persona's format), or PwC records
        for split, n in (("train", n_train), ("validation", n_test), ("test", n_test)):
            made: Iterator[Any]
            if generator == "persona":
                facts, chatter = ((1, k), (0, small_talk)) if split != "test" else (k, small_talk)
                made = persona.generate(n, split, seed=seed, facts_per_dialog=facts, small_talk=chatter)
                version = persona.GENERATOR_VERSION
            elif generator == "dialogs":
                facts, length = dialogs.split_shape(split, k, turns, min_turns)
                made = dialogs.generate(n, split, seed=seed, facts=facts, turns=length, templates=templates)
                version = dialogs.bank_version(dialogs.load_bank(templates))
            elif generator == "passages":
                made = iter(passages.generate(n, split, seed=seed, k=k, source=source))
                version = passages.VERSIONS[source]
            else:  # the records `ccmem eval pwc` and `ccmem train data.dataset=pwc` generate with this seed
                made = iter(pwc.generate(n, split, seed=seed, source=source))
                version = pwc.VERSIONS[source]
            splits[split] = list(made)
        for split in splits:
            if generator == "pwc":
                pwc.write_jsonl(splits[split], out / f"{split}.jsonl")
            else:
                persona.write_jsonl(out / f"{split}.jsonl", splits[split])
        console.print(f"wrote {out}/train.jsonl, validation.jsonl, test.jsonl ({version})")
    else:  # icl
        from ccmem.data import icl

        for task_dir in {p.parent for p in held}:  # --overwrite: else the old tasks, k and seeds are read beside
            for old in task_dir.glob(f"{task_dir.name}_*.jsonl"):
                old.unlink()
            with contextlib.suppress(OSError):
                task_dir.rmdir()  # emptied (a task folder without files is refused by the loader)
        icl.write_metaicl(out, tasks, k=k, n_test=n_test or 20, seed=seed)
        console.print(f"wrote {tasks} tasks in MetaICL layout under {out} ({icl.GENERATOR_VERSION})")


@app.command("methods")
def list_methods(
    name: Annotated[str | None, typer.Argument(help="Show one method's options in full.")] = None,
) -> None:
    """List the context methods: kind, what each keeps, options with defaults, and the paper."""
    from ccmem.registry import method_class

    classes = {name: method_class(name)} if name else method_classes()
    for method, cls in classes.items():
        flags = [flag for flag in ("trainable", "needs_adapter", "needs_attention", "budgeted") if getattr(cls, flag)]
        console.print(f"[bold]{method}[/]  [cyan]{cls.kind}[/]" + (f"  [dim]{', '.join(flags)}[/]" if flags else ""))
        console.print(f"  {escape(cls.summary())}", highlight=False)
        if cls.paper:
            console.print(f"  [dim]paper: {escape(cls.paper)}[/]", highlight=False)
        specs = cls.option_specs()
        if name:
            for spec in specs:
                console.print(
                    f"  -O {spec.name}={spec.default!r}  [dim]({escape(spec.type_name)})[/] {escape(spec.help)}",
                    highlight=False,
                )
            if cls.trainable and cls.runtime_options:  # what scripts/pack_adapter.py -O may set
                console.print(
                    "  [dim]runtime options (an adapter runs with any value; the others must be the ones it was "
                    f"trained with):[/] {', '.join(sorted(cls.runtime_options))}",
                    highlight=False,
                )
        elif specs:
            console.print("  [dim]options:[/] " + ", ".join(f"{s.name}={s.default!r}" for s in specs), highlight=False)


@app.command("models")
def list_models() -> None:
    """List the built-in (offline) models, where their dequantized copies are cached, and the hub shortcuts."""
    table = Table("name", "model", "install")
    for name, spec in BUILTIN_MODELS.items():
        table.add_row(name, spec.description, spec.install)
    console.print(table)
    console.print(f"cache: {cache_dir()} (set CCMEM_CACHE to move it)")
    hub = Table("name", "hub id", "model", "where", title="hub shortcuts: need a download")
    for name, shortcut in HUB_SHORTCUTS.items():
        local = shortcut_folder(name)
        where = f"local: {local}" if local else "hub download" + (" (gated: licence + login)" if shortcut.gated else "")
        hub.add_row(name, shortcut.hub_id, shortcut.description, escape(where))
    console.print(hub)
    console.print(
        f"offline: download a shortcut's model elsewhere and pass --model FOLDER, or put it in ${MODEL_DIR_ENV}/NAME "
        f"(or the repo's own name, e.g. ${MODEL_DIR_ENV}/Llama-3.1-8B-Instruct)",
        highlight=False,
    )


def _add_subcommands() -> None:
    from ccmem.cli_repro import repro_app

    app.add_typer(repro_app, name="repro")
    app.add_typer(sessions_app, name="sessions")


def _unwrap_docstrings(typer_app: typer.Typer) -> None:
    """One line per paragraph of each command's docstring: typer's help keeps the source's line breaks, so a
    paragraph wrapped in the code broke mid-sentence on screen; rich wraps it to the terminal instead."""
    for info in typer_app.registered_commands:
        doc = info.help or inspect.getdoc(info.callback)
        if doc:
            info.help = "\n\n".join(" ".join(paragraph.split()) for paragraph in doc.split("\n\n"))
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _unwrap_docstrings(group.typer_instance)


_add_subcommands()
_unwrap_docstrings(app)


def main() -> None:
    """Console entry point: user errors become one red line and exit code 2, never a traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ccmem.api").setLevel(logging.ERROR)  # the commands print their own note on adapters
    try:
        # not standalone: click's usage errors come here, to be said in one line like ccmem's own, not in a panel
        code = app(prog_name="ccmem", standalone_mode=False)
    except KeyboardInterrupt:
        sys.exit(130)
    except typer.Abort:
        err_console.print("[red]Aborted.[/]")
        sys.exit(1)
    except ClickException as err:
        if type(err).__name__ == "NoArgsIsHelpError":
            sys.exit(2)  # the help was printed as the error was made
        err_console.print(f"[red]error:[/] {escape(err.format_message())}", highlight=False)
        ctx = getattr(err, "ctx", None)
        if ctx is not None and ctx.command.get_help_option(ctx) is not None:
            err_console.print(f"Try '{escape(ctx.command_path)} {ctx.help_option_names[0]}' for help.", style="dim")
        sys.exit(err.exit_code)
    except Exception as err:
        if os.environ.get("CCMEM_DEBUG"):
            raise
        # escaped: a message that quotes a format ("[user, assistant] pairs") is not console markup
        err_console.print(f"[red]error:[/] {escape(str(err))}", highlight=False)
        if not isinstance(err, (ValueError, OSError)):  # not a refusal of the user's input or files: a fault
            err_console.print("[dim](set CCMEM_DEBUG=1 for the full traceback)[/]")
        sys.exit(2)
    sys.exit(code)  # a command's own exit status (typer.Exit); None is 0


if __name__ == "__main__":
    main()
