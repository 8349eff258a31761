"""Tables, verdicts and plots of ``ccmem repro sentinel`` rows (:mod:`ccmem.repro.sentinel`).

Tables have the seed's shape: one line per method, one column per compression ratio. A verdict counts the
ratios at which the claim holds on the rows given, so the README can state it with the numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: (row key, title, lower is better)
METRICS = {
    "ppl": [("perplexity", "Perplexity", True)],
    "generate": [
        ("rouge_l", "ROUGE-L", False),
        ("bertscore_f1", "BERTScore F1", False),
        ("judge_perplexity", "Judge perplexity", True),
    ],
}
#: Claim 1 says "approximately as low as (or lower than)": sentinel within this share of the best baseline.
APPROXIMATELY = 0.02


def _ratios(rows: Sequence[dict[str, Any]]) -> list[float]:
    return sorted({r["ratio"] for r in rows if r["method"] != "full"})


def _methods(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows if r["method"] != "full"))


def table(rows: Sequence[dict[str, Any]], key: str, title: str) -> str:
    """Markdown: method x ratio for one metric, the reference (``full``) in its own line."""
    ratios = _ratios(rows)
    value = {(r["method"], r["ratio"]): r[key] for r in rows}
    lines = [f"| {title} | " + " | ".join(f"r={x:g}" for x in ratios) + " |", "|---" * (len(ratios) + 1) + "|"]
    for method in _methods(rows):
        cells = [_cell(value.get((method, x), "")) for x in ratios]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    reference = [r for r in rows if r["method"] == "full"]
    if reference:
        lines.append(f"| full (not finetuned) | {_cell(reference[0][key])} |" + " |" * (len(ratios) - 1))
    return "\n".join(lines)


def _cell(value: float | str | None) -> str:
    """A table cell: a number to 4 digits, ``-`` where it was not measured (a cell whose continuations were all
    empty has no BERTScore), blank where the run had no such cell."""
    return "-" if value is None else value if isinstance(value, str) else f"{value:.4g}"


def verdict_ppl(rows: Sequence[dict[str, Any]]) -> str:
    """Claim 1 on these rows: at how many ratios sentinel's perplexity is the lowest, or within 2% of it."""
    value = {(r["method"], r["ratio"]): r["perplexity"] for r in rows}
    baselines_at = {x: [value[m, x] for m in ("local", "scattered") if (m, x) in value] for x in _ratios(rows)}
    ratios = [x for x, baselines in baselines_at.items() if ("sentinel", x) in value and baselines]
    if not ratios:  # --methods without sentinel, or without a baseline: nothing to compare, not a failed claim
        return "Claim 1 is not tested on these rows: it needs sentinel and local or scattered at the same ratio."
    lowest, close = [], []
    for x in ratios:
        baselines = baselines_at[x]
        if value["sentinel", x] <= min(baselines):
            lowest.append(x)
        if value["sentinel", x] <= min(baselines) * (1 + APPROXIMATELY):
            close.append(x)
    holds = len(close) == len(ratios)
    return (
        f"Claim 1 {'holds' if holds else 'does not hold'} on this setup: sentinel's perplexity is the lowest at "
        f"{len(lowest)} of {len(ratios)} ratios ({_list(lowest)}) and within {APPROXIMATELY:.0%} of the best "
        f"baseline at {len(close)} of {len(ratios)} ({_list(close)})."
    )


def verdict_generate(rows: Sequence[dict[str, Any]]) -> str:
    """Claim 2 on these rows: per metric, at how many ratios sentinel beats local."""
    parts = []
    everywhere = True
    for key, title, lower in METRICS["generate"]:
        value = {(r["method"], r["ratio"]): r[key] for r in rows if r[key] is not None}
        ratios = [x for x in _ratios(rows) if ("sentinel", x) in value and ("local", x) in value]
        better = [x for x in ratios if (value["sentinel", x] < value["local", x]) == lower]
        better = [x for x in better if value["sentinel", x] != value["local", x]]
        everywhere = everywhere and len(better) == len(ratios)
        parts.append(f"{title}: sentinel better at {len(better)} of {len(ratios)} ratios ({_list(better)})")
    return f"Claim 2 {'holds' if everywhere else 'does not hold'} on this setup. " + "; ".join(parts) + "."


def _list(ratios: Sequence[float]) -> str:
    return ", ".join(f"{x:g}" for x in ratios) or "none"


def markdown(claim: str, rows: Sequence[dict[str, Any]], seconds: float) -> str:
    """The report of one claim: what was measured on what, the tables, the verdict and the time it took."""
    first = next(r for r in rows if r["method"] != "full")
    head = [
        f"# Sentinel-token reproduction, claim {1 if claim == 'ppl' else 2} ({claim})",
        "",
        f"Model: {first['model']}; data: {first['data']}; LoRA finetuning: {first['train_steps']} steps at batch "
        f"{first['batch_size']}, lr {first['lr']:g} per (method, ratio).",
    ]
    if claim == "ppl":
        head.append(
            f"Perplexity of {first['blocks']} test blocks of {first['block_size']} tokens, each read in one masked "
            "forward (every real token after the first is scored)."
        )
    else:
        head.append(
            f"{first['docs']} documents: {first['prefix_tokens']}-token prefixes compressed into memory, "
            f"{first['continuation_tokens']} tokens sampled (top_p={first['top_p']}, temperature 1, one seed per "
            f"document shared by every method). ROUGE-L by rouge-score; BERTScore on {first['encoder']}; "
            f"naturalness: perplexity of the continuation given its prefix under {first['judge']}."
        )
    body = [table(rows, key, title) for key, title, _ in METRICS[claim]]
    if claim == "ppl" and all("kv_bytes_share" in r for r in rows):
        body.append(
            "KV memory after one block, measured on the memory object, as a share of full's:\n\n"
            + table(rows, "kv_bytes_share", "KV bytes / full")
        )
    empty = [r for r in rows if r.get("empty")]
    if claim == "generate" and empty:  # the cells' BERTScore and judge perplexity are then means over fewer documents
        body.append(
            "Empty continuations (ROUGE-L counts them as 0; BERTScore and judge perplexity are over the others): "
            + ", ".join(f"{r['method']} at r={r['ratio']:g}: {r['empty']} of {r['docs']}" for r in empty)
            + "."
        )
    verdict = verdict_ppl(rows) if claim == "ppl" else verdict_generate(rows)
    return "\n".join(head) + "\n\n" + "\n\n".join(body) + f"\n\n{verdict}\n\nTotal time: {seconds / 60:.1f} min.\n"


def plot(claim: str, rows: Sequence[dict[str, Any]], folder: Path) -> list[Path]:
    """A PNG per metric against the ratio: a line per method, the reference as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, title, _ in METRICS[claim]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in _methods(rows):
            points = sorted((r["ratio"], r[key]) for r in rows if r["method"] == method and r[key] is not None)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        for r in rows:
            if r["method"] == "full" and r[key] is not None:
                ax.axhline(r[key], linestyle="--", color="grey", label="full (not finetuned)")
        ax.set_xlabel("compression ratio r (share of the KV cache evicted)")
        ax.set_ylabel(title)
        ax.legend()
        ax.grid(alpha=0.3)
        path = folder / f"{claim}-{key}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
