"""``ccmem repro``: commands that reproduce a paper's claims, one table per claim (a sub-command of ``ccmem``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Literal

import typer

from ccmem.consoles import console, err_console
from ccmem.fileio import file_in_the_way
from ccmem.loading import ATTN_HELP, BUILTIN_MODELS, DEFAULT_MODEL
from ccmem.options import OptionError

repro_app = typer.Typer(
    help="Reproduce a paper's claims with ccmem's methods, one command per claim.", no_args_is_help=True
)
sentinel_app = typer.Typer(
    no_args_is_help=True,
    help="Ren et al., EMNLP 2023: sentinel-token KV compression against local and scattered attention.\n\n"
    "Seed 004, at compression ratios 0.1 ... 0.9. Each (method, ratio) is LoRA-finetuned once through `ccmem train` "
    "(runs/repro-METHOD-rR; rerunning reuses finished runs and resumes interrupted ones).",
)
repro_app.add_typer(sentinel_app, name="sentinel")

Model = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help=f"The LM finetuned and measured ({', '.join(BUILTIN_MODELS)}, a hub shortcut of `ccmem models`, "
        "a folder).",
    ),
]
Ratios = Annotated[
    str, typer.Option("--ratios", help="Comma-separated compression ratios r (share of the KV entries evicted).")
]
Steps = Annotated[int, typer.Option("--train-steps", min=1, help="LoRA finetuning steps per (method, ratio).")]
Batch = Annotated[int, typer.Option("--batch-size", min=1, help="Finetuning batch size.")]


def _positive(value: float) -> float:
    if not value > 0:  # nan too
        raise typer.BadParameter(f"must be positive, got {value}")
    return value


Lr = Annotated[float, typer.Option("--lr", help="Finetuning learning rate (positive).", callback=_positive)]
Wikitext = Annotated[
    Path | None,
    typer.Option(
        "--wikitext",
        help="WikiText-2 raw as downloaded (wikitext-2-raw/ with wiki.*.raw, or the HF wikitext-2-raw-v1 folder); "
        "trains on its train split. Default: the packaged Wikipedia summaries (offline stand-in).",
    ),
]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the sampling and of the document draw.")]
Attn = Annotated[
    Literal["sdpa", "eager", "flash_attention_2"],
    typer.Option(
        "--attn",
        help="Attention kernel of the model (and judge): sdpa (default) or eager. sentinel, local and scattered "
        "mask attention, so flash_attention_2 is refused for them.",
    ),
]
# The GSM8K table words --attn as every other command (ccm-reason masks attention: flash_attention_2 is refused).
ReasonAttn = Annotated[Literal["sdpa", "eager", "flash_attention_2"], typer.Option("--attn", help=ATTN_HELP)]
RunsDir = Annotated[Path, typer.Option("--runs-dir", help="Where the finetuning runs go (one per method and ratio).")]
OutDir = Annotated[Path, typer.Option("--out-dir", "-o", help="Where the JSONL rows, report.md and PNGs go.")]
Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace the rows and report already in --out-dir (without it an existing table is never overwritten: "
        "the shipped results/ are measurements).",
    ),
]
Adapter = Annotated[
    list[str] | None,
    typer.Option("--adapter", help="METHOD@RATIO=PATH: use this adapter instead of finetuning one (repeatable)."),
]


def _ratios(text: str) -> list[float]:
    try:
        ratios = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise OptionError(f"--ratios takes numbers separated by commas, got {text!r}") from None
    if len(set(ratios)) < len(ratios):
        raise OptionError(f"--ratios names a ratio twice ({text}); each is measured once")
    return ratios


def _adapters(specs: list[str] | None) -> dict[str, str]:
    out = {}
    for spec in specs or []:
        key, sep, path = spec.partition("=")
        if not sep or "@" not in key:
            raise OptionError(f"--adapter takes METHOD@RATIO=PATH, got {spec!r}")
        method, _, ratio = key.partition("@")
        try:
            out[f"{method}@{float(ratio):g}"] = path
        except ValueError:
            raise OptionError(f"--adapter takes METHOD@RATIO=PATH, RATIO a number; got {spec!r}") from None
    return out


def check_out_dir(out_dir: Path, names: list[str], overwrite: bool) -> None:
    """Refuse, before any work, an ``out_dir`` that is a file, or to replace a table already in it unless
    ``--overwrite`` says so."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OptionError(f"-o {out_dir} is a file, not a folder; give a folder for the results")
    blocked = file_in_the_way(out_dir.parent)
    if blocked is not None:
        raise OptionError(f"-o {out_dir}: {blocked} is a file, so no folder can be made there")
    there = [name for name in names if (out_dir / name).exists()]
    if there and not overwrite:
        raise OptionError(
            f"{out_dir / there[0]} exists (measured earlier); pass --overwrite to replace it, or "
            "-o DIR to write elsewhere"
        )


def _finish(claim: str, rows: list, out_dir: Path, seconds: float) -> None:
    from ccmem.fileio import atomic_path
    from ccmem.repro.sentinel import write_rows
    from ccmem.repro.sentinel_report import markdown, plot

    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = write_rows(rows, out_dir / f"{claim}.jsonl")
    report = markdown(claim, rows, seconds)
    with atomic_path(out_dir / f"{claim}.md") as tmp:
        tmp.write_text(report)
    pngs = plot(claim, rows, out_dir)
    console.print(report, markup=False, highlight=False)
    console.print(f"wrote {jsonl}, {out_dir / f'{claim}.md'}, " + ", ".join(str(p) for p in pngs))


def _run(claim: str, settings: object, out_dir: Path, overwrite: bool) -> None:
    from rich.status import Status

    from ccmem.api import check_attention
    from ccmem.loading import load_model
    from ccmem.registry import get_method
    from ccmem.repro.sentinel import ReproSettings, run_generate, run_ppl

    assert isinstance(settings, ReproSettings)
    try:
        settings.check()
    except ValueError as err:
        raise OptionError(str(err)) from None
    from ccmem.repro.sentinel_report import METRICS

    plots = [f"{claim}-{key}.png" for key, _, _ in METRICS[claim]]  # as sentinel_report.plot names them
    check_out_dir(out_dir, [f"{claim}.jsonl", f"{claim}.md", *plots], overwrite)
    started = time.perf_counter()
    with Status(f"loading {settings.model}...", console=err_console) as status:
        lm = load_model(settings.model, attn_implementation=settings.attn)
        for name in dict.fromkeys(["local", *settings.methods]):  # local at ratio 0 is the reference
            check_attention(lm, get_method(name))

        def progress(what: str) -> None:
            status.update(f"[{(time.perf_counter() - started) / 60:.1f} min] {what}")
            err_console.log(what)

        rows = (run_ppl if claim == "ppl" else run_generate)(lm, settings, progress)
    _finish(claim, rows, out_dir, time.perf_counter() - started)


@sentinel_app.command(
    epilog="Examples:\n\n  ccmem repro sentinel ppl   (offline: packaged text, 12 finetuning steps per cell)\n\n"
    "  ccmem repro sentinel ppl --wikitext data/wikitext-2-raw --train-steps 600 --block-size 256 --test-blocks 1000"
)
def ppl(
    model: Model = DEFAULT_MODEL,
    ratios: Ratios = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9",
    methods: Annotated[
        str, typer.Option("--methods", help="Comma-separated methods to compare: sentinel, local, scattered.")
    ] = "sentinel,local,scattered",
    wikitext: Wikitext = None,
    block_size: Annotated[int, typer.Option("--block-size", min=2, help="Tokens per test block (paper: 256).")] = 128,
    test_blocks: Annotated[
        int, typer.Option("--test-blocks", min=1, help="Test blocks whose perplexity is measured.")
    ] = 16,
    train_steps: Steps = 12,
    batch_size: Batch = 4,
    lr: Lr = 3e-4,
    adapter: Adapter = None,
    seed: Seed = 0,
    runs_dir: RunsDir = Path("runs"),
    out_dir: OutDir = Path("results/sentinel"),
    overwrite: Overwrite = False,
    attn: Attn = "sdpa",
) -> None:
    """Claim 1: WikiText-2 test perplexity of sentinel, local and scattered attention at each compression ratio.

    Each is LoRA-finetuned at each ratio; one table in the seed's shape (method x ratio), ppl.jsonl, ppl.md and
    ppl-perplexity.png."""
    from ccmem.repro.sentinel import ReproSettings

    settings = ReproSettings(
        model=model,
        attn=attn,
        methods=[m.strip() for m in methods.split(",") if m.strip()],
        ratios=_ratios(ratios),
        wikitext=str(wikitext) if wikitext else None,
        block_size=block_size,
        test_blocks=test_blocks,
        train_steps=train_steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        runs_dir=str(runs_dir),
        adapters=_adapters(adapter),
    )
    _run("ppl", settings, out_dir, overwrite)


@sentinel_app.command(
    epilog="Examples:\n\n  ccmem repro sentinel generate   (offline: packaged news, 12 documents)\n\n"
    "  ccmem repro sentinel generate --c4 'c4/en/c4-validation.*.json.gz' --docs 200 --judge PATH/pythia-1b"
)
def generate(
    model: Model = DEFAULT_MODEL,
    ratios: Ratios = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9",
    c4: Annotated[
        str | None,
        typer.Option(
            "--c4",
            help="C4 documents as downloaded (c4-*.json.gz: a file, a folder or a glob). Default: gensim's packaged "
            "Lee news corpus (offline stand-in).",
        ),
    ] = None,
    docs: Annotated[
        int, typer.Option("--docs", min=1, help="Documents whose prefix is compressed and continued (paper: 200).")
    ] = 12,
    prefix_tokens: Annotated[
        int, typer.Option("--prefix-tokens", min=2, help="Tokens of each document's prefix compressed into memory.")
    ] = 96,
    continuation_tokens: Annotated[
        int, typer.Option("--continuation-tokens", min=1, help="Tokens sampled and compared with the real ones.")
    ] = 24,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling threshold.")] = 0.9,
    judge: Annotated[
        str,
        typer.Option("--judge", help="The second LM whose perplexity measures naturalness (paper: Pythia-1B)."),
    ] = "gemma3-270m",
    encoder: Annotated[
        str | None,
        typer.Option("--encoder", help="BERTScore encoder (a folder or hub name). Default: packaged all-MiniLM-L6-v2."),
    ] = None,
    wikitext: Wikitext = None,
    train_steps: Steps = 12,
    batch_size: Batch = 4,
    lr: Lr = 3e-4,
    adapter: Adapter = None,
    seed: Seed = 0,
    runs_dir: RunsDir = Path("runs"),
    out_dir: OutDir = Path("results/sentinel"),
    overwrite: Overwrite = False,
    attn: Attn = "sdpa",
) -> None:
    """Claim 2: continuations of document prefixes with sentinel vs local attention at each ratio.

    Scored against the real continuation (ROUGE-L, BERTScore) and for naturalness (a judge LM's perplexity);
    generate.jsonl, generate.md and one PNG per metric. Reuses claim 1's finetuned adapters when they exist."""
    from ccmem.repro.sentinel import CLAIM2_METHODS, ReproSettings

    settings = ReproSettings(
        model=model,
        attn=attn,
        methods=CLAIM2_METHODS,
        ratios=_ratios(ratios),
        wikitext=str(wikitext) if wikitext else None,
        c4=c4,
        n_docs=docs,
        prefix_tokens=prefix_tokens,
        continuation_tokens=continuation_tokens,
        top_p=top_p,
        judge=judge,
        encoder=encoder,
        train_steps=train_steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        runs_dir=str(runs_dir),
        adapters=_adapters(adapter),
    )
    _run("generate", settings, out_dir, overwrite)


@repro_app.command(
    "gsm8k",
    epilog="Examples:\n\n  ccmem repro gsm8k --stage1 results/gsm8k/gsm8k-full.safetensors --adapter "
    "results/gsm8k/ccm-reason.safetensors --n 48 -o runs/gsm8k-table   (the shipped adapters, from a checkout)\n\n"
    "  ccmem train gsm8k-full; ccmem train gsm8k-ccm-reason-keep load_path=runs/gsm8k-full; "
    "ccmem repro gsm8k --stage1 runs/gsm8k-full   (offline: generated problems)\n\n"
    "  ccmem repro gsm8k --data grade_school_math/data --n 1319 --adapter runs/gsm8k-real/adapter.safetensors",
)
def gsm8k_table(
    model: Model = DEFAULT_MODEL,
    adapter: Annotated[
        Path | None,
        typer.Option(
            "--adapter",
            help="A ccm-reason adapter (default: runs/gsm8k-ccm-reason-keep/adapter.safetensors, else "
            "runs/gsm8k-ccm-reason/adapter.safetensors).",
        ),
    ] = None,
    stage1: Annotated[
        Path | None,
        typer.Option(
            "--stage1",
            help="The stage-1 LoRA run the adapter was trained on top of (`ccmem train gsm8k-full`), merged into "
            "the model first.",
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="GSM8K as downloaded (test.jsonl, or the grade_school_math folder). Default: arithmetic word "
            "problems generated offline in GSM8K's format (test split).",
        ),
    ] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Problems solved by every policy.")] = 50,
    policies: Annotated[
        str,
        typer.Option(
            "--policies",
            help="Comma-separated: none, interval:N (every N tokens), newline, classifier:TAU (the learned placement).",
        ),
    ] = "none,interval:32,newline,classifier:0.5,classifier:0.7,classifier:0.9",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Longest solution generated.")] = 256,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the generated problems.")] = 0,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            min=1,
            help="Problems decoded together in one padded forward per step (each row compresses its own steps; "
            "same answers as one at a time). Time per problem is a batch's time over its size.",
        ),
    ] = 8,
    system: Annotated[
        str | None,
        typer.Option(
            "--system",
            help="System prompt of every problem (default: the one the adapter was trained with, recorded in it; "
            '--system "" for none).',
        ),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option",
            "-O",
            help="KEY=VALUE option of ccm-reason (repeatable; `ccmem methods ccm-reason`), e.g. -O min_segment=8; "
            "the placement itself is --policies.",
        ),
    ] = None,
    attn: ReasonAttn = "sdpa",
    out_dir: OutDir = Path("results/gsm8k"),
    overwrite: Overwrite = False,
) -> None:
    """The GSM8K fork's table: accuracy and cost of each <COMP> placement policy of ccm-reason.

    Per policy: accuracy, insertions per problem, peak KV MB, wall time per problem and the classifier's share of
    it; rows.jsonl, report.md, accuracy-vs-kv.png."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ccmem.loading import load_model, local_config
    from ccmem.options import parse_pairs
    from ccmem.repro.gsm8k import GSM8KSettings, markdown, problems, resolve_adapter, run, write

    settings = GSM8KSettings(
        system=system,
        options=parse_pairs(option or []),
        adapter=str(adapter) if adapter else None,
        stage1=str(stage1) if stage1 else None,
        data=str(data) if data else None,
        n=n,
        policies=[p.strip() for p in policies.split(",") if p.strip()],
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
    )
    config = local_config(model)  # a T5 folder is refused for what it is, not for the adapter it lacks
    if config is not None and config.get("is_encoder_decoder"):
        raise OptionError(
            f"--model: ccm-reason compresses a decoder's own reasoning while it writes, but {model} is an "
            f"encoder-decoder model ({config.get('model_type', '?')}); give a decoder-only model (LLaMA, Mistral, "
            "Qwen2 ...). On T5, ccm-concat, ccm-merge and gist run (ccmem eval)"
        )
    try:
        settings.check()
        resolve_adapter(settings.adapter)  # before the model loads
    except ValueError as err:
        raise OptionError(str(err)) from None
    held = len(problems(settings)) if settings.data else n
    if held < n:  # the table said "N problems" below, but nothing told the user the file ran out first
        err_console.print(f"note: --n {n}, but {settings.data} holds {held} test problems: every policy solves those")
    check_out_dir(out_dir, ["rows.jsonl", "report.md", "accuracy-vs-kv.png"], overwrite)
    lm = load_model(model, attn_implementation=attn)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        tasks: dict[str, object] = {}

        def progress(policy: str, done: int, total: int) -> None:
            if policy not in tasks:
                tasks[policy] = bar.add_task(policy, total=total)
            bar.update(tasks[policy], completed=done)  # type: ignore[arg-type]

        rows = run(lm, settings, progress)
    paths = write(rows, out_dir)
    console.print(markdown(rows), markup=False, highlight=False, soft_wrap=True)
    console.print("wrote " + ", ".join(str(p) for p in paths))
