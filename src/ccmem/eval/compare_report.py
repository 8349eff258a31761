"""The ``ccmem compare`` report: per task a table of quality against memory budget and a plot of quality
against KV bytes; a plot of decode speed against history length; as markdown and as one self-contained HTML
page (plots embedded), all made from the result rows.
"""

from __future__ import annotations

import base64
import html
import itertools
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ccmem.eval.compare import TASKS, DecodeRow, budget_text
from ccmem.eval.harness import EvalRow
from ccmem.eval.report import display_method, mismatches
from ccmem.registry import method_class


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("the compare report's plots need matplotlib: pip install 'ccmem[eval]'") from None
    return plt


def _metric(rows: Sequence[EvalRow], task: str) -> str:
    return TASKS[task].metric if task in TASKS else ("accuracy" if rows[0].accuracy is not None else "perplexity")


def _value(row: EvalRow, metric: str) -> float | None:
    value = getattr(row, metric)
    return None if value is None else float(value)


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if metric == "accuracy" else f"{value:.2f}"


def _baselines(rows: Sequence[EvalRow]) -> list[EvalRow]:
    """The rows of kind ``baseline`` at their own size, least memory first: none, then the full context; a variant
    (``full@stage1``, as large as ``full``) before the method itself, so that ``full`` stays the reference."""
    return sorted(
        (r for r in rows if method_class(r.method).kind == "baseline" and r.budget is None),
        key=lambda r: (r.memory_slots, "variant" not in r.extra),
    )


def gap_closed(rows: Sequence[EvalRow], row: EvalRow, metric: str) -> float | None:
    """The share of the none -> full gap that ``row`` recovers (1.0: as good as full context; perplexity is
    compared in log space), or None without both baselines or a gap (full no better than none, as on a sample
    too small to tell them apart: a worst score would read as 100%). The baselines are the rows of kind
    ``baseline``: the one holding the most memory is the full context, the one holding the least none."""
    import math

    ends = _baselines(rows)
    if len(ends) < 2 or ends[0].memory_slots == ends[-1].memory_slots:
        return None
    full, none, value = _value(ends[-1], metric), _value(ends[0], metric), _value(row, metric)
    if full is None or none is None or value is None:
        return None
    if metric == "perplexity":
        full, none, value = (math.log(max(v, 1e-9)) for v in (full, none, value))
    better = none - full if metric == "perplexity" else full - none
    if better < 1e-9:  # no gap, or the context made things worse: a share of it means nothing
        return None
    return (value - none) / (full - none)


def _small_gap_note(rows: Sequence[EvalRow], metric: str) -> str:
    """A warning where full beats none by fewer than 3 examples: a share of such a gap swings by 100% or more with
    a single example (700% was printed on 12 examples)."""
    ends = _baselines(rows)
    if metric != "accuracy" or len(ends) < 2:
        return ""
    full, none = _value(ends[-1], metric), _value(ends[0], metric)
    if full is None or none is None:
        return ""
    examples = round((full - none) * ends[-1].examples)
    if not 0 < examples < 3:
        return ""
    return (
        f"Full context beats none by {examples} of {ends[-1].examples} examples only: 'gap closed' moves by "
        f"{1 / examples:.0%} with each example here; evaluate more examples (--n) before reading it.\n"
    )


def task_table(rows: Sequence[EvalRow], task: str) -> str:
    """Markdown: one line per method, the metric at each budget (budgeted methods) or at the method's own size,
    and the share of the none -> full gap each method closes at its own size."""
    metric = _metric(rows, task)
    budgets = sorted({r.budget for r in rows if r.budget is not None}, reverse=True)
    header = ["method", "kind", "own size", "gap closed", *(f"{budget_text(b)} of full" for b in budgets)]
    lines = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    by_method: dict[str, dict[float | None, EvalRow]] = defaultdict(dict)
    for r in rows:
        by_method[display_method(r)][r.budget] = r
    for name, cells in by_method.items():
        own = cells.get(None)
        own_text = f"{_fmt(_value(own, metric), metric)} ({own.memory_slots:.0f} slots)" if own else ""
        share = gap_closed(rows, own, metric) if own and method_class(own.method).kind != "baseline" else None
        share_text = f"{share:.0%}" if share is not None else ""
        kind = method_class(next(iter(cells.values())).method).kind
        budget_cells = []
        gaps_at_budgets = False
        for b in budgets:
            row = cells.get(b)
            at = gap_closed(rows, row, metric) if row else None
            gaps_at_budgets = gaps_at_budgets or at is not None
            budget_cells.append(
                f"{_fmt(_value(row, metric), metric)} ({row.memory_slots:.0f}){f', {at:.0%}' if at is not None else ''}"
                if row
                else ""
            )
        if own is None and gaps_at_budgets:  # a budgeted method has no size of its own: its gap is in those cells
            share_text = "at each budget"
        lines.append("| " + " | ".join([name, kind, own_text, share_text, *budget_cells]) + " |")
    direction = "higher is better" if metric == "accuracy" else "lower is better"
    note = (
        f"\n{metric} ({direction}); in brackets: mean KV slots per layer, the system prompt's included; gap closed: "
        "(method - none) / (full - none)"
        + (", on log perplexity" if metric == "perplexity" else "")
        + (", also after each budget's slots" if budgets else "")
        + ".\n"
    )
    note += _small_gap_note(rows, metric)
    groups = dict.fromkeys(g for r in rows for g in r.extra.get("by", {}))
    return "\n".join(lines) + "\n" + note + "".join(group_table(rows, g) for g in groups)


def _leading_number(text: str) -> tuple[float, str]:
    digits = "".join(itertools.takewhile(str.isdigit, text))
    return (float(digits) if digits else float("inf"), text)


#: What a breakdown's values mean, where its name does not say it (the others are named as they are).
GROUP_MEANINGS = {
    "distance": "turns between the asked fact's last mention and the question",
    "kind": "whether the asked fact's kind appears in training",
    "corrected": "whether the dialog corrected the asked fact",
}


def group_table(rows: Sequence[EvalRow], group: str) -> str:
    """Markdown: accuracy of each method (at its own size, and budgeted ones at each budget) per value of ``group``
    (e.g. turns between the fact and the question), from the rows' per-example breakdown; empty when no row has
    one."""
    found = [r for r in rows if group in r.extra.get("by", {})]
    if not found:
        return ""
    values = sorted({v for r in found for v in r.extra["by"][group]}, key=_leading_number)
    meaning = f"{GROUP_MEANINGS[group]}; " if group in GROUP_MEANINGS else ""
    lines = [f"\nAccuracy by {group} ({meaning}n in brackets):\n",
             f"| method | {' | '.join(values)} |", "|---|" + "---|" * len(values)]  # fmt: skip
    for r in sorted(found, key=lambda r: (r.budget is not None, -(r.budget or 0))):
        cells = r.extra["by"][group]
        text = [f"{cells[v]['accuracy']:.2f} ({cells[v]['n']})" if v in cells else "" for v in values]
        name = display_method(r) + (f" at {budget_text(r.budget)}" if r.budget is not None else "")
        lines.append(f"| {name} | {' | '.join(text)} |")
    return "\n".join(lines) + "\n"


def learned_vs_training_free(rows: Sequence[EvalRow], budget: float = 1 / 8) -> list[str]:
    """Per accuracy task, each learned method against the best training-free method (a) at ``budget`` and (b) at
    the smallest budget where the training-free methods hold at least as many slots as the learned one (so the
    comparison never favours the learned method with more memory)."""
    notes = []
    for task in sorted({r.dataset for r in rows}):
        task_rows = [r for r in rows if r.dataset == task]
        if _metric(task_rows, task) != "accuracy":
            continue
        free = [r for r in task_rows if method_class(r.method).kind == "training-free" and r.budget is not None]
        if not free:
            continue
        budgets = sorted({r.budget for r in free if r.budget is not None})
        for row in (r for r in task_rows if method_class(r.method).kind == "learned" and r.budget is None):
            fair = [b for b in budgets if min(r.memory_slots for r in free if r.budget == b) >= row.memory_slots]
            chosen = dict.fromkeys([b for b in budgets if abs(b - budget) < 1e-9] + fair[:1])
            for b in chosen:
                best = max((r for r in free if r.budget == b), key=lambda r: r.accuracy or 0.0)
                verdict = "beats" if (row.accuracy or 0) > (best.accuracy or 0) else "does not beat"
                more = row.memory_slots / best.memory_slots if best.memory_slots else float("inf")
                notes.append(
                    f"{task}: {display_method(row)} ({row.accuracy:.3f}, {row.memory_slots:.0f} slots) {verdict} the "
                    f"best training-free method at {budget_text(b)} of full, {display_method(best)} "
                    f"({best.accuracy:.3f}, {best.memory_slots:.0f} slots)"
                    + (f", holding {more:.1f}x its slots" if more > 1.05 else "")
                )
            if not fair:
                notes.append(
                    f"{task}: {display_method(row)} holds more slots ({row.memory_slots:.0f}) than any budget tried"
                )
    return notes


def plot_quality(rows: Sequence[EvalRow], task: str, path: Path) -> Path:
    """Quality against KV bytes: a line per budgeted method, a point per other method, full/none as lines."""
    plt = _pyplot()
    metric = _metric(rows, task)
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    lines: dict[str, list[EvalRow]] = {}  # one line per method as the tables name it (variants apart)
    for r in rows:
        lines.setdefault(display_method(r), []).append(r)
    kinds = {name: method_class(group[0].method).kind for name, group in lines.items()}
    baselines = sorted(
        (n for n in lines if kinds[n] == "baseline"), key=lambda n: -_bytes(lines[n], lines[n][0].method)
    )
    for name in sorted(lines):
        points = sorted((r.memory_bytes / 1024, _value(r, metric)) for r in lines[name])
        points = [(x, y) for x, y in points if y is not None]
        if not points:
            continue
        if kinds[name] == "baseline":  # full and none: reference lines
            shade = "black" if name == baselines[0] else "grey"
            ax.axhline(points[0][1], linestyle="--", color=shade, linewidth=1)
            ax.annotate(name, (points[0][0], points[0][1]), textcoords="offset points", xytext=(4, 4), fontsize=8)
            ax.plot([points[0][0]], [points[0][1]], marker="s", color=shade)
            continue
        style = "-o" if len(points) > 1 else "*"
        ax.plot(
            [p[0] for p in points], [p[1] for p in points], style, label=name, markersize=7 if len(points) > 1 else 12
        )
    # symlog, not log: none without a system prompt (--system '') holds 0 bytes, and a log axis dropped its point
    # and label, leaving an unnamed dashed line
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("KV memory per example (KiB, log scale past 1)")
    ax.set_ylabel(metric + (" (lower is better)" if metric == "perplexity" else ""))
    if metric == "perplexity":
        ax.set_yscale("log")
    model = ", ".join(sorted({r.model for r in rows}))
    return _finish(plt, fig, ax, f"{TASKS[task].description if task in TASKS else task} ({model})", path)


def _finish(plt: Any, fig: Any, ax: Any, title: str, path: Path) -> Path:
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # only full and none: they are annotated lines, nothing to list
        ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bytes(rows: Sequence[EvalRow], method: str) -> float:
    return max(r.memory_bytes for r in rows if r.method == method)


def plot_decode(rows: Sequence[DecodeRow], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    for name in sorted({r.method for r in rows}):
        points = sorted((r.history_tokens, r.tokens_per_second) for r in rows if r.method == name)
        budget = next(r.budget for r in rows if r.method == name)
        label = name + (f" ({budget_text(budget)})" if budget else "")
        ax.plot([p[0] for p in points], [p[1] for p in points], "-o", label=label)
    ax.set_xlabel("history read before decoding (tokens)")
    ax.set_ylabel("greedy decode speed (tokens/s)")
    ax.set_ylim(bottom=0)  # differences of a few percent must not look large
    models = ", ".join(sorted({r.model for r in rows}))
    return _finish(plt, fig, ax, f"decode speed against history length ({models})", path)


def decode_table(rows: Sequence[DecodeRow]) -> str:
    lengths = sorted({r.history_tokens for r in rows})
    header = ["method", "budget", *(f"{n} tokens: tok/s (slots)" for n in lengths)]
    lines = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    for name in sorted({r.method for r in rows}):
        mine = {r.history_tokens: r for r in rows if r.method == name}
        budget = next(iter(mine.values())).budget
        cells = [f"{mine[n].tokens_per_second:.1f} ({mine[n].memory_slots})" if n in mine else "" for n in lengths]
        lines.append(f"| {name} | {budget_text(budget)} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def write_compare_report(
    rows: Sequence[EvalRow], decode_rows: Sequence[DecodeRow], out_dir: Path, *, header: str = ""
) -> dict[str, Path]:
    """``report.md``, ``report.html`` (self-contained) and the PNGs in ``out_dir``."""
    if not rows:
        raise ValueError("no result rows to report")
    out_dir.mkdir(parents=True, exist_ok=True)
    sections: list[tuple[str, str, Path | None]] = []
    paths: dict[str, Path] = {}
    for task in sorted({r.dataset for r in rows}, key=lambda t: list(TASKS).index(t) if t in TASKS else 99):
        task_rows = [r for r in rows if r.dataset == task]
        png = plot_quality(task_rows, task, out_dir / f"quality_vs_kv_{task}.png")
        paths[f"plot_{task}"] = png
        warnings = "".join(f"\n> **Not comparable**: {w}\n" for w in mismatches(task_rows))
        examples = max(r.examples for r in task_rows)
        title = f"{TASKS[task].description if task in TASKS else task} ({examples} examples)"
        sections.append((title, task_table(task_rows, task) + warnings, png))
    notes = learned_vs_training_free(rows)
    if notes:
        sections.append(("Learned against training-free at the same budget", "".join(f"- {n}\n" for n in notes), None))
    if decode_rows:
        speed = plot_decode(decode_rows, out_dir / "decode_speed.png")
        paths["plot_decode"] = speed
        sections.append(("Decode speed", decode_table(decode_rows), speed))
    md = [f"# ccmem compare\n\n{header}\n"]
    for title, body, image in sections:
        md.append(f"## {title}\n\n{body}\n" + (f"![{title}]({image.name})\n" if image else ""))
    paths["markdown"] = out_dir / "report.md"
    paths["markdown"].write_text("\n".join(md), encoding="utf-8")
    paths["html"] = out_dir / "report.html"
    paths["html"].write_text(_html(header, sections), encoding="utf-8")
    return paths


def _html(header: str, sections: Sequence[tuple[str, str, Path | None]]) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>ccmem compare</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}"
        "th{background:#f3f3f3}img{max-width:100%}blockquote{color:#a33}</style></head><body>",
        f"<h1>ccmem compare</h1><p>{html.escape(header)}</p>",
    ]
    for title, body, png in sections:
        parts.append(f"<h2>{html.escape(title)}</h2>{_markdown_to_html(body)}")
        if png is not None:
            data = base64.b64encode(png.read_bytes()).decode()
            parts.append(f"<img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _markdown_to_html(text: str) -> str:
    """The small markdown the report writes (tables, bullets, block quotes, paragraphs) as HTML."""
    out, table, items = [], [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            table.append([c.strip() for c in line.strip("|").split("|")])
            continue
        if table:
            head, *body = [r for r in table if not all(set(c) <= {"-"} for c in r)]
            out.append(
                "<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
                + "</table>"
            )  # fmt: skip
            table = []
        if line.startswith("- "):
            items.append(f"<li>{html.escape(line[2:])}</li>")
            continue
        if items:
            out.append("<ul>" + "".join(items) + "</ul>")
            items = []
        if line.startswith("> "):
            out.append(f"<blockquote>{html.escape(line[2:].replace('**', ''))}</blockquote>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    return "\n".join(out)
