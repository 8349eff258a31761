"""``ccmem compare``: methods x tasks x memory budgets in one run, one report.

Every cell of the grid is one method on one task's examples (:func:`ccmem.eval.harness.evaluate`), at one
budget for methods that take one (``ratio`` = the share of the context kept: 1/2 ... 1/16 of ``full``), at
their own memory size otherwise (``full``, ``none``, CCM, gist). Rows are appended to ``rows.jsonl`` as cells
finish, so an interrupted run resumes where it stopped; a row is reused only if it was made with the same
settings (its config hash), so rows of different settings never meet in one table.

A second measurement times decoding: tokens/s of greedy generation after histories of growing length, per
method (budgeted methods at ``decode_budget``), which is where a smaller cache pays off.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ccmem.api import load
from ccmem.data.loaders import data_version, load_examples
from ccmem.eval.harness import (
    EvalRow,
    EvalSettings,
    adapter_provenance,
    append_row,
    check_options_apply,
    check_whole_context_fits,
    evaluate,
    options_for,
    read_rows,
    result_records,
)
from ccmem.loading import BUILTIN_MODELS, LoadedModel
from ccmem.registry import get_method, method_class
from ccmem.train.config import DataConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    """A dataset the grid runs on, and the metric its plot shows."""

    name: str
    description: str
    dataset: str
    metric: str  # "accuracy" (higher is better) or "perplexity" (lower is better)
    k: int = 3
    small_talk: int = 0
    seed: int = 0
    context_chars: int = 0  # text tasks: characters of context, and of the continuation scored
    answer_chars: int = 0
    segment_chars: int = 500  # text tasks: characters per compressed segment (one add each)
    turns: int = 0  # dialogs: turns per test dialog
    source: str = "wiki"  # passages: the text asked about (wiki, news or both; ccmem.data.news)


TASKS: dict[str, Task] = {
    "persona": Task("persona", "persona facts: 3 facts among 5 small-talk turns", "persona", "accuracy", 3, 5),
    "icl": Task("icl", "in-context classification: 8 demonstrations", "icl", "accuracy", k=8),
    # ~360 tokens of context and ~80 scored: long enough that 1/16 keeps ~20 entries, short enough for the CPU grid
    "text": Task(
        "text",
        "continuation perplexity: Shakespeare, 1,200 characters of context",
        "text",
        "perplexity",
        context_chars=1200,
        answer_chars=300,
    ),
    # the prose setting: ~1,550 tokens compressed in ~260-token chunks, then the perplexity of ~510 more
    "text-long": Task(
        "text-long",
        "continuation perplexity: Shakespeare, 5,000 characters of context in 850-character chunks, 1,700 scored",
        "text",
        "perplexity",
        context_chars=5000,
        answer_chars=1700,
        segment_chars=850,
    ),
}
for _turns in (5, 10, 15, 20):  # 15: the "15-exchange dialogs"
    TASKS[f"dialogs-{_turns}"] = Task(
        f"dialogs-{_turns}",
        f"varied fact dialogs: 3-5 facts in {_turns} turns, unseen wordings and kinds",
        "dialogs",
        "accuracy",
        k=5,
        turns=_turns,
    )
TASKS["passages"] = Task("passages", "QA over 3 Wikipedia passages shared in a chat", "passages", "accuracy", k=3)
TASKS["passages-news"] = Task(
    "passages-news", "QA over 3 news articles shared in a chat", "passages", "accuracy", k=3, source="news"
)
# IC-Former's instruction data: a prompt about 1-2 packaged articles (or news stories), scored over 4 options
TASKS["pwc"] = Task("pwc", "PwC-style questions over 1-2 Wikipedia summaries, 4 options", "pwc", "accuracy")
TASKS["pwc-news"] = Task(
    "pwc-news", "PwC-style questions over 1-2 news stories, 4 options", "pwc", "accuracy", source="news"
)
DEFAULT_TASKS = ("persona", "icl", "text")
DEFAULT_BUDGETS = (1 / 2, 1 / 4, 1 / 8, 1 / 16)


@dataclass
class CompareSettings:
    """The grid: which methods, tasks, budgets and how many examples; what is timed for decoding."""

    methods: Sequence[str] = ()  # default: every registered method ready for the model (``default_methods``)
    tasks: Sequence[str] = DEFAULT_TASKS
    # adapter files by method or variant: {"ccm-concat": path} replaces the shipped adapter; a variant
    # "ccm-concat@persona" (listed in methods) runs the method with that adapter beside the others
    adapters: dict[str, str] = field(default_factory=dict)
    budgets: Sequence[float] = DEFAULT_BUDGETS
    n: int = 30
    options: dict[str, Any] = field(default_factory=dict)  # method options, each to the methods that have it
    # options of one method or variant only, over ``options``: {"ccm-concat@w150": {"recent": 150}} runs the
    # variant (the method's own adapter unless ``adapters`` names one) beside the method with other values
    variant_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    system: str | None = "You are a helpful assistant."
    decode_lengths: Sequence[int] = (128, 512, 1024)  # history tokens before decoding is timed
    decode_tokens: int = 32
    decode_budget: float = 1 / 8
    decode_repeats: int = 3  # the fastest of this many timings is kept (the others are disturbed by the machine)

    def __post_init__(self) -> None:
        if not self.tasks:  # else the model loaded and the decode timing ran before "no result rows to report"
            raise ValueError(f"no task to run; tasks: {', '.join(TASKS)}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(TASKS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown task {unknown[0]!r}{hint}; tasks: {', '.join(TASKS)}")
        if not self.methods:
            raise ValueError("no methods to compare")
        # a name given twice: each of its cells would run, and be written to rows.jsonl, twice
        for kind, names in (("task", self.tasks), ("method", self.methods)):
            repeated = next((name for i, name in enumerate(names) if name in names[:i]), None)
            if repeated is not None:
                raise ValueError(f"{kind} {repeated!r} is given twice in --{kind}s; give it once")
        for name in self.methods:
            cls = method_class(base_method(name))
            if "@" in name and name not in self.adapters and name not in self.variant_options:
                raise ValueError(
                    f"method variant {name!r} needs an adapter (--adapter {name}=PATH) or options of its own "
                    f"(-O {name}:KEY=VALUE)"
                )
            if name in self.adapters and not cls.trainable:
                raise ValueError(f"method {base_method(name)!r} takes no adapter")
        unused = [v for v in self.adapters if v not in self.methods]
        if unused:
            raise ValueError(f"adapter given for {unused[0]!r}, which is not among the methods compared")
        check_options_apply([base_method(m) for m in self.methods], self.options)
        for name, own in self.variant_options.items():
            if name not in self.methods:
                raise ValueError(f"options given for {name!r}, which is not among the methods compared")
            check_options_apply([base_method(name)], own)
        for name in self.methods:  # a budgeted method's size is each column's budget: an option may not fix it
            cls = method_class(base_method(name))
            if not cls.budgeted:
                continue
            own = self.options_of(name)
            sized = set(cls.budget_options(0.5)) | ({"max_slots"} & {spec.name for spec in cls.option_specs()})
            clash = sorted(sized & set(own))
            if clash:
                raise ValueError(
                    f"-O {clash[0]} would fix the size of {name}, which --budgets sets per column (the share of the "
                    "context kept); give the shares with --budgets instead"
                )
        for b in self.budgets:
            if not 0 < b <= 1:
                raise ValueError(f"budgets are shares of the context in (0, 1], got {b}")
        twice = next((b for i, b in enumerate(self.budgets) if b in self.budgets[:i]), None)
        if twice is not None:  # 1/2 and 0.5: one column, counted twice by the progress bar
            raise ValueError(f"budget {twice:g} is given twice in --budgets (1/2 and 0.5 are one share); give it once")
        budgeted = [m for m in self.methods if method_class(base_method(m)).budgeted]
        if budgeted and not self.budgets:
            raise ValueError(
                f"no budget given for {', '.join(budgeted)}: give the shares of the context they keep (--budgets "
                "1/4,1/8), or leave them out of --methods"
            )
        if any(n < 1 for n in self.decode_lengths):
            raise ValueError(f"decode lengths are history lengths in tokens, 1 or more; got {self.decode_lengths}")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if not 0 < self.decode_budget <= 1:
            raise ValueError(f"decode_budget must be in (0, 1], got {self.decode_budget}")
        if self.decode_repeats < 1 or self.decode_tokens < 1:
            raise ValueError("decode_repeats and decode_tokens must be at least 1")

    def options_of(self, name: str) -> dict[str, Any]:
        """The options method or variant ``name`` runs with: the shared ones it declares, then its own."""
        return options_for(base_method(name), self.options) | self.variant_options.get(name, {})

    def eval_settings(self, task: Task, model: str) -> EvalSettings:
        data = {"k": task.k, "small_talk": task.small_talk, "seed": task.seed, "description": task.description,
                "chars": [task.context_chars, task.answer_chars]}  # fmt: skip
        if task.source != "wiki":  # the tasks that predate sources keep their config hash
            data["source"] = task.source
        if task.segment_chars != Task.segment_chars:  # likewise the text task that predates segment sizes
            data["segment_chars"] = task.segment_chars
        return EvalSettings(system=self.system, method_options=dict(self.options), data=data, model=model)


@dataclass(frozen=True)
class Cell:
    task: str
    method: str
    budget: float | None

    @property
    def label(self) -> str:
        return f"{self.task}: {self.method}" + (f" at {budget_text(self.budget)}" if self.budget else "")


def check_variants(settings: CompareSettings, model_name: str) -> None:
    """Refuse, before any cell runs, a method or variant whose option values do not parse (``-O
    snapkv@x:window_size=abc``) or whose adapter file is missing, unreadable or made otherwise: the grid would
    otherwise stop at that cell after minutes of the others."""
    from ccmem.adapter import adapter_path, options_with_adapter, read_adapter

    for name in settings.methods:
        base = base_method(name)
        cls = method_class(base)
        options = settings.options_of(name)
        # every budget: a share a method cannot keep (1e-7 evicts all of local's context) would stop its cell
        sized = [options | cls.budget_options(b) for b in settings.budgets] if cls.budgeted else []
        options = sized[0] if sized else options
        try:
            for each in sized or [options]:
                get_method(base, **each)
            path = adapter_path(model_name, base, settings.adapters.get(name))
            found = read_adapter(path) if path is not None and cls.trainable else None
            if found is not None:
                options_with_adapter(base, found, options)
        except (ValueError, TypeError, OSError) as err:
            raise ValueError(f"{name}: {err}") from None
        if found is not None and (note := found.system_note(settings.system)):
            logger.warning("%s: %s", name, note)  # every cell keeps the run's prompt: comparable rows


def base_method(name: str) -> str:
    """``ccm-concat`` for the variant ``ccm-concat@persona`` (the same method with another adapter)."""
    return name.partition("@")[0]


def budget_text(budget: float | None) -> str:
    """``1/8`` for 0.125, ``0.3`` for 0.3, ``-`` for none."""
    if budget is None:
        return "-"
    inverse = 1 / budget
    return f"1/{round(inverse)}" if abs(inverse - round(inverse)) < 1e-6 else f"{budget:g}"


def grid(settings: CompareSettings) -> list[Cell]:
    cells = []
    for task in settings.tasks:
        for name in settings.methods:
            budgets = settings.budgets if method_class(base_method(name)).budgeted else [None]
            cells += [Cell(task, name, b) for b in budgets]
    return cells


def task_examples(task: Task, n: int) -> list[Any]:
    if task.context_chars:
        from ccmem.data import text

        return text.examples(
            n,
            "test",
            seed=task.seed,
            context_chars=task.context_chars,
            answer_chars=task.answer_chars,
            segment_chars=task.segment_chars,
        )
    config = DataConfig(
        dataset=task.dataset,
        n_train=n,
        n_eval=n,
        k=task.k,
        small_talk=task.small_talk,
        seed=task.seed,
        turns=task.turns,
        source=task.source,
    )
    return load_examples(config, "test")[:n]


def _key(task: str, method: str, budget: float | None, config_hash: str, options: dict[str, Any], adapter: str) -> str:
    """What makes a cached row reusable: the same cell, settings, options and adapter."""
    return json.dumps([task, method, budget, config_hash, options, adapter], sort_keys=True)


def _row_key(row: EvalRow) -> str:
    return _key(row.dataset, row.method, row.budget, row.config_hash, row.options, row.adapter)


def read_cached(path: Path) -> list[EvalRow]:
    return read_rows([path]) if path.is_file() else []


def run_grid(
    lm: LoadedModel,
    settings: CompareSettings,
    out_dir: Path,
    *,
    progress: Callable[[Cell, int, int], None] | None = None,
    reused: Callable[[Cell], None] | None = None,
) -> Iterator[EvalRow]:
    """Evaluate every cell not already in ``out_dir/rows.jsonl`` (with the same settings); yield every row.
    ``progress(cell, done, total)`` follows the examples; ``reused(cell)`` is told of a cell read from the file."""
    rows_file = out_dir / "rows.jsonl"
    cached = {_row_key(r): r for r in read_cached(rows_file)}
    examples_of = {name: task_examples(TASKS[name], settings.n) for name in settings.tasks}
    whole = next((m for m in settings.methods if method_class(base_method(m)).holds_every_token), None)
    if whole is not None:  # a task too long for it: said before any cell runs
        for task_name in settings.tasks:
            task = TASKS[task_name]
            eval_settings = settings.eval_settings(task, model_key(lm))
            check_whole_context_fits(lm, whole, examples_of[task_name], dataset=task.name, settings=eval_settings)
    for task_name in settings.tasks:
        task = TASKS[task_name]
        examples = examples_of[task_name]
        eval_settings = settings.eval_settings(task, model_key(lm))
        config_hash = eval_settings.fingerprint(task.name, len(examples), lm.quantized)
        for cell in (c for c in grid(settings) if c.task == task_name):
            method = base_method(cell.method)
            options = settings.options_of(cell.method)
            budget = method_class(method).budget_options(cell.budget) if cell.budget is not None else {}
            adapter = settings.adapters.get(cell.method)
            session = load(lm, method=method, adapter=adapter, system_prompt=settings.system, **options, **budget)
            key = _key(task.name, method, cell.budget, config_hash, options, adapter_provenance(session)[0])
            if key in cached:
                if reused:
                    reused(cell)
                if progress:
                    progress(cell, len(examples), len(examples))
                yield _as_variant(cached[key], cell.method)
                continue
            report = functools.partial(_report, progress, cell, len(examples)) if progress else None
            row = evaluate(session, examples, dataset=task.name, settings=eval_settings, label=task.description,
                           progress=report)  # fmt: skip
            row.budget = cell.budget
            row.options = options  # a variant's own options included (the key of the cached row)
            row.extra["data_version"] = data_version(DataConfig(dataset=task.dataset, source=task.source))
            row = _as_variant(row, cell.method)
            append_row(rows_file, row)
            yield row


def model_key(lm: LoadedModel) -> str:
    """What identifies the model in a cached row: a built-in model's name (its weights never change), else the
    name with the weights' fingerprint, so that a folder whose weights were replaced is measured anew. Weights with
    a stage-1 LoRA merged in are another model: their rows and timings never stand in for the plain one's; nor do
    packed weights' (ccmem.quantize), which answer alike but decode at another speed."""
    model = lm.name if lm.name in BUILTIN_MODELS else f"{lm.name}@{lm.fingerprint}"
    model = f"{model}+stage1:{lm.stage1}" if lm.stage1 else model
    return f"{model}+weights:{lm.quantized}" if lm.quantized else model


def _as_variant(row: EvalRow, name: str) -> EvalRow:
    """A copy of ``row`` named as the grid's method or variant (``ccm-concat@persona``): a cached row may have been
    made under another name with the same adapter, and may stand for several cells."""
    row = dataclasses.replace(row, extra=dict(row.extra))
    row.extra.pop("variant", None)
    if name != row.method:
        row.extra["variant"] = name
    return row


def _report(progress: Callable[[Cell, int, int], None], cell: Cell, total: int, done: int) -> None:
    progress(cell, done, total)


# ---------------------------------------------------------------------------- decode speed


@dataclass
class DecodeRow:
    """Greedy decoding speed after a history of ``history_tokens`` tokens, with what the memory held."""

    method: str
    budget: float | None
    history_tokens: int
    memory_slots: int
    memory_bytes: int
    new_tokens: int
    tokens_per_second: float
    model: str
    config_hash: str
    options: dict[str, Any] = field(default_factory=dict)  # the method's (or variant's) own options, budget aside
    adapter: str = "-"  # the hash of its adapter (as in eval rows; "-": none, "untrained")


def decode_history(lm: LoadedModel, length: int) -> list[int]:
    """``length`` tokens of packaged text (the long-text task's documents), the same for every method."""
    from ccmem.data.text import text_files

    ids: list[int] = []
    for path in text_files(None):  # tokenize only as many plays as the history needs
        ids += lm.tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)
        if len(ids) >= length:
            return ids[:length]
    raise ValueError(f"the packaged text holds {len(ids)} tokens, fewer than the {length} asked for")


def _decode_key(name: str, length: int, options: dict[str, Any], adapter: str) -> str:
    """What makes a cached decode row reusable (beside the run's settings): the same method or variant, history,
    options and adapter."""
    return json.dumps([name, length, options, adapter], sort_keys=True)


def run_decode_speed(
    lm: LoadedModel, settings: CompareSettings, out_dir: Path, *, progress: Callable[[str], None] | None = None
) -> list[DecodeRow]:
    """Time ``decode_tokens`` greedy tokens after each history length, per method; cached in ``decode.jsonl``."""
    path = out_dir / "decode.jsonl"
    blob = json.dumps(
        {"lengths": list(settings.decode_lengths), "tokens": settings.decode_tokens, "model": model_key(lm),
         "budget": settings.decode_budget, "options": settings.options, "system": settings.system,
         "repeats": settings.decode_repeats},
        sort_keys=True,
    )  # fmt: skip
    config_hash = hashlib.sha256(blob.encode()).hexdigest()[:12]
    cached = [DecodeRow(**rec) for _, rec in result_records(path, "decode file")] if path.is_file() else []
    mine = (r for r in cached if r.config_hash == config_hash)
    done = {_decode_key(r.method, r.history_tokens, r.options, r.adapter): r for r in mine}
    limit = lm.max_positions or max(settings.decode_lengths) + settings.decode_tokens + 64
    lengths = [n for n in settings.decode_lengths if n + settings.decode_tokens + 64 <= limit]
    skipped = [n for n in settings.decode_lengths if n not in lengths]
    if skipped:  # said, not just missing from the table and the plot
        logger.warning(
            "decode speed is not timed after %s tokens: with the %d generated and the query, that passes the "
            "model's %d positions (--decode-lengths)", ", ".join(map(str, skipped)), settings.decode_tokens, limit,
        )  # fmt: skip
    history = decode_history(lm, max(lengths)) if lengths else []  # read once, cut per length
    rows = []
    for name in settings.methods:  # a variant is timed with its own options and adapter (they may change its slots)
        method = base_method(name)
        budget = settings.decode_budget if method_class(method).budgeted else None
        options = settings.options_of(name)
        kept = method_class(method).budget_options(budget) if budget else {}
        session = load(lm, method=method, adapter=settings.adapters.get(name), system_prompt=settings.system,
                       **options, **kept)  # fmt: skip
        adapter = adapter_provenance(session)[0]
        for length in lengths:
            key = _decode_key(name, length, options, adapter)
            if key in done:
                rows.append(done[key])
                continue
            if progress:
                progress(f"decode: {name} after {length} tokens")
            session.reset()
            session.add_ids(history[:length])
            query = session.query_ids("Go on.")
            list(session.stream_ids(query, 2, stop_ids=set()))  # warm-up
            seconds = float("inf")
            for _ in range(settings.decode_repeats):
                started = time.perf_counter()
                n = sum(1 for _ in session.stream_ids(query, settings.decode_tokens, stop_ids=set()))
                seconds = min(seconds, time.perf_counter() - started)
            row = DecodeRow(
                name, budget, length, session.memory.num_slots, session.memory.nbytes, n, round(n / seconds, 2),
                lm.name, config_hash, options, adapter,
            )  # fmt: skip
            append_row(path, row)
            rows.append(row)
    return rows
