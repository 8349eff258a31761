"""``ccmem report``: aggregate ``ccmem eval`` rows into markdown and CSV tables and a quality-vs-memory plot."""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ccmem.eval.harness import EvalRow
from ccmem.fileio import atomic_path

COLUMNS = (
    ("method", "method"),
    ("model", "model"),  # shown where the rows hold several models
    ("adapter", "adapter"),
    ("train_dataset", "trained on"),
    ("dataset", "dataset"),
    ("split", "split"),  # shown where the rows hold several splits
    ("label", "label"),
    ("examples", "n"),
    ("accuracy", "accuracy"),
    ("contains", "gen contains"),
    ("exact_match", "EM"),
    ("rouge_l", "ROUGE-L"),
    ("perplexity", "perplexity"),
    ("memory_slots", "KV slots"),
    ("memory_bytes", "memory KiB"),
    ("context_tokens", "context tokens"),
    ("tokens_per_second", "tokens/s"),
)
QUALITY = ("accuracy", "contains", "rouge_l", "exact_match", "perplexity")


def display_method(row: EvalRow) -> str:
    """The method as reports name it: ``full (stage 1)`` when a stage-1 LoRA was merged in, ``(mean score)``
    when options were scored by length-normalised log-likelihood, ``(int8 memory)`` when the memory was held at
    another precision (``--memory-dtype``)."""
    name = str(row.extra.get("variant") or row.method) + (" (stage 1)" if row.extra.get("stage1") else "")
    name += " (mean score)" if row.extra.get("score") == "mean" else ""
    return name + (f" ({row.extra['memory_dtype']} memory)" if row.extra.get("memory_dtype") else "")


def _cell(key: str, value: object) -> str:
    if value is None:
        return "-"
    if key == "memory_bytes":
        return f"{float(value) / 1024:.0f}"  # type: ignore[arg-type]
    if key in ("accuracy", "contains", "exact_match", "rouge_l"):
        return f"{float(value):.3f}"  # type: ignore[arg-type]
    if isinstance(value, float):
        return f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    return str(value)


def markdown(rows: Sequence[EvalRow]) -> str:
    """One line per row, grouped by dataset and label, with only the columns some row fills."""
    several = {"model": _several_models(rows), "split": _several_splits(rows)}
    keys = [
        (k, title)
        for k, title in COLUMNS
        if several.get(k, True) and any(getattr(r, k) not in (None, "") for r in rows)
    ]
    ordered = sorted(rows, key=lambda r: (r.dataset, r.split, r.label, r.model, r.memory_slots))
    lines = ["| " + " | ".join(t for _, t in keys) + " |", "|" + "---|" * len(keys)]
    for r in ordered:
        cells = [method_label(r) if k == "method" else _cell(k, getattr(r, k)) for k, _ in keys]
        if "accuracy_examples" in r.extra and r.accuracy is not None:  # over fewer examples than the row holds
            at = [k for k, _ in keys].index("accuracy")
            cells[at] += f" (of {r.extra['accuracy_examples']})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _several_models(rows: Sequence[EvalRow]) -> bool:
    """Whether ``rows`` come from more than one model: then each line says its model (``ccmem eval`` hashes no
    model into its rows, so two models' rows of a dataset share a table and a config hash)."""
    return len({r.model for r in rows}) > 1


def _several_splits(rows: Sequence[EvalRow]) -> bool:
    """Whether ``rows`` were measured on more than one split: then each says its split (the config hash of default
    data does not hold the split, so a validation row and a test row of a method looked the same)."""
    return len({r.split for r in rows}) > 1


def method_label(row: EvalRow) -> str:
    """The method with the options it ran with (two snapkv rows of other ratios looked the same) and, for a
    ``ccmem compare`` row, the budget it kept."""
    pairs = sorted(row.options.items()) + ([("budget", f"{row.budget:g}")] if row.budget is not None else [])
    given = ", ".join(f"{k}={v}" for k, v in pairs)
    return display_method(row) + (f" ({given})" if given else "")


def _natural(text: str) -> list[Any]:
    """Sort key in which numbers compare as numbers ("2-4" before "10+")."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text) if part]


def latest_rows(rows: Sequence[EvalRow]) -> tuple[list[EvalRow], int]:
    """``rows`` with each measurement once: a row measured again with everything the same (a rerun of
    ``ccmem eval`` appends to the same file) replaces the earlier one in place. Returns the rows and how many
    were replaced."""
    kept: dict[str, EvalRow] = {}
    for r in rows:
        key = json.dumps(
            [r.dataset, r.split, r.label, display_method(r), r.model, r.adapter, r.config_hash, r.options, r.budget],
            sort_keys=True,
            default=str,
        )
        kept[key] = r  # a later row of the same measurement wins; its place is the first one's
    return list(kept.values()), len(rows) - len(kept)


def group_markdown(rows: Sequence[EvalRow]) -> str:
    """Accuracy within each group of examples (``extra.by``: how far back the fact was, whether it was corrected,
    ...), one table per dataset, label and grouping, a line per method; empty when no row has groups."""
    tables: dict[tuple[str, str, str, str], list[EvalRow]] = defaultdict(list)
    for r in rows:
        for name in r.extra.get("by", {}):
            tables[(r.dataset, r.split, r.label, name)].append(r)
    splits = _several_splits(rows)
    parts = []
    for (dataset, split, label, name), members in sorted(tables.items()):
        values = sorted({v for r in members for v in r.extra["by"][name]}, key=_natural)
        title = f"{dataset}{f'/{split}' if splits else ''}{f' ({label})' if label else ''}: accuracy by {name}"
        lines = [f"\n**{title}**\n", "| method | " + " | ".join(values) + " |", "|---|" + "---|" * len(values)]
        several = _several_models(members)
        for r in sorted(members, key=lambda r: (r.model, r.memory_slots)):
            cells = []
            for v in values:
                got = r.extra["by"][name].get(v)
                cells.append("-" if got is None else f"{got['accuracy']:.3f} ({got['n']})")
            lines.append(f"| {method_label(r)}{f' [{r.model}]' if several else ''} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
    return "".join(parts)


def mismatches(rows: Sequence[EvalRow]) -> list[str]:
    """One warning per table group (dataset and label) whose rows were not measured on the same examples
    with the same settings (their config hashes differ), so that their numbers do not compare."""
    groups: dict[tuple[str, str], dict[str, list[EvalRow]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[(r.dataset, r.label)][r.config_hash].append(r)
    warnings = []
    for (dataset, label), by_hash in sorted(groups.items()):
        if len(by_hash) < 2:
            continue
        parts = "; ".join(
            f"{h}: {', '.join(method_label(r) for r in group)} ({', '.join(sorted({str(r.examples) for r in group}))}"
            " examples)"
            for h, group in sorted(by_hash.items())
        )
        warnings.append(
            f"rows of {dataset} labelled {label!r} were measured with different settings or examples "
            f"(config hash {parts}): rerun them with the same `ccmem eval` options before comparing them"
        )
    return warnings


def write_csv(rows: Sequence[EvalRow], path: Path) -> Path:
    fields = list(asdict(rows[0]))
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:  # nested fields (extra, options) as JSON, which other tools parse, not Python's repr
            writer.writerow({k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in asdict(r).items()})
    return path


def pick_metric(rows: Sequence[EvalRow]) -> str:
    """The first quality metric every row has."""
    for metric in QUALITY:
        if all(getattr(r, metric) is not None for r in rows):
            return metric
    raise ValueError(
        "these rows share no quality metric to plot (accuracy, contains, rouge_l, exact_match, perplexity)"
    )


def check_metric(rows: Sequence[EvalRow], metric: str | None) -> str:
    """The metric to plot: ``metric``, which some row must have, or the first every row has."""
    if metric is not None and metric not in QUALITY:
        raise ValueError(f"unknown metric {metric!r}; the quality metrics are {', '.join(QUALITY)}")
    if metric is None:
        return pick_metric(rows)
    if not any(getattr(r, metric) is not None for r in rows):
        have = [m for m in QUALITY if any(getattr(r, m) is not None for r in rows)]
        hint = f"the rows have {', '.join(have)} (--metric {have[0]})" if have else "the rows have no quality metric"
        raise ValueError(f"no row has {metric}; {hint}")
    return metric


def plot(rows: Sequence[EvalRow], path: Path, metric: str | None = None) -> Path:
    """Quality against memory (KV slots, log scale), one line per method through its rows."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("the plot needs matplotlib: pip install 'ccmem[eval]'") from None
    metric = check_metric(rows, metric)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    splits = _several_splits(rows)
    tables = {(r.dataset, r.split, r.label) for r in rows}
    # one line per method within each table (dataset, split and label); its rows at other options are points on it
    several = _several_models(rows)
    # a table whose rows were measured with other settings (report.md says "Not comparable"): one line per setting
    hashes: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for r in rows:
        hashes[(r.dataset, r.split, r.label)].add(r.config_hash)
    lines: dict[str, list[EvalRow]] = {}
    for r in rows:
        table = r.dataset + (f"/{r.split}" if splits else "") + (f", {r.label}" if r.label else "")
        name = display_method(r) + (f" [{table}]" if len(tables) > 1 else "")
        name += f" ({r.model})" if several else ""  # one line per model: never joined across two
        name += f" {{{r.config_hash[:8]}}}" if len(hashes[(r.dataset, r.split, r.label)]) > 1 else ""
        lines.setdefault(name, []).append(r)
    for name, members in sorted(lines.items()):
        # a row without the metric (--metric contains beside rows run without --generate) is no point
        points = sorted((r.memory_slots, getattr(r, metric)) for r in members if getattr(r, metric) is not None)
        if not points:
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    # symlog, not log: a method holding no slot (none without a system prompt, --system '') is a point at 0, where
    # a log axis left it out of the plot without a word
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("memory (key/value slots, log scale past 1)")
    ax.set_ylabel(metric)
    datasets = ", ".join(sorted({r.dataset for r in rows}))
    models = ", ".join(sorted({r.model for r in rows}))
    ax.set_title(f"{metric} vs memory: {datasets} ({models})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def write_report(rows: Sequence[EvalRow], out_dir: Path, metric: str | None = None) -> dict[str, Path]:
    """``report.md``, ``report.csv`` and ``quality_vs_memory.png`` in ``out_dir``."""
    if not rows:
        raise ValueError("no result rows to report")
    metric = check_metric(rows, metric)  # before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "report.md"
    notes = "".join(f"\n> **Not comparable**: {w}\n" for w in mismatches(rows))
    with atomic_path(md) as tmp:  # a report rewritten over an earlier one is whole, or the earlier one stays
        tmp.write_text(markdown(rows) + group_markdown(rows) + notes, encoding="utf-8")
    return {
        "markdown": md,
        "csv": write_csv(rows, out_dir / "report.csv"),
        "plot": plot(rows, out_dir / "quality_vs_memory.png", metric),
    }
