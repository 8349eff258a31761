"""``ccmem repro gsm8k``: the GSM8K fork's table, one row per placement policy of ``ccm-reason``.

Every policy solves the same problems with the same adapter, greedily, ``batch_size`` problems decoded together
(each compresses its own steps; the answers are those of one at a time): accuracy (the
final number, :func:`ccmem.data.gsm8k.is_correct`), <COMP> insertions per problem, the peak KV cache (MB,
question and memory included), wall time per problem, and for the classifier policies the time spent in the
classifier itself (its share of decoding). The fork measured 42.0% / 37.45 MB / 8.54 s per problem without
compression and 32.0% / 26.63 MB / 18.44 s with its classifier.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ccmem.data import gsm8k
from ccmem.fileio import atomic_path
from ccmem.loading import LoadedModel

#: Where the adapter is looked for when none is given: ccmem's recipe first (the fork's solves ~0 problems here).
DEFAULT_ADAPTERS = ("runs/gsm8k-ccm-reason-keep/adapter.safetensors", "runs/gsm8k-ccm-reason/adapter.safetensors")

#: Policies of the fork's table: ``none``, ``interval:N``, ``newline``, ``classifier:TAU``.
DEFAULT_POLICIES = ("none", "interval:32", "newline", "classifier:0.5", "classifier:0.7", "classifier:0.9")


def parse_policy(text: str) -> dict[str, Any]:
    """``"classifier:0.7"`` -> ``{"policy": "classifier", "threshold": 0.7}`` (the method's options)."""
    name, _, value = text.partition(":")
    try:
        if name == "interval":
            return {"policy": "interval", "interval": int(value or 32)}
        if name == "classifier":
            return {"policy": "classifier", "threshold": float(value or 0.5)}
    except ValueError:
        kind = "a whole number of tokens" if name == "interval" else "a threshold in (0, 1)"
        raise ValueError(f"policy {text!r}: {value!r} is not {kind} (e.g. interval:32, classifier:0.5)") from None
    if name in ("none", "newline") and not value:
        return {"policy": name}
    raise ValueError(f"unknown policy {text!r}; use none, interval:N, newline or classifier:TAU")


@dataclass
class GSM8KSettings:
    adapter: str | None = None  # a ccm-reason adapter; None: the first of DEFAULT_ADAPTERS that exists
    stage1: str | None = None  # the stage-1 LoRA run the adapter was trained on top of (ccmem train gsm8k-full)
    data: str | None = None  # GSM8K (a test.jsonl or the grade_school_math folder); None: generated problems
    n: int = 50
    policies: Sequence[str] = DEFAULT_POLICIES
    max_new_tokens: int = 256
    batch_size: int = 8  # problems decoded together (padded); 1: one at a time
    system: str | None = None  # None: the prompt the adapter was trained with; "": no system prompt
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Refuse, before the model loads, what would fail later: a policy or option the method refuses (a
        threshold outside (0, 1), ...), no policy at all, a data file with no problem."""
        from ccmem.registry import get_method

        if not self.policies:
            raise ValueError("policies names no policy; use none, interval:N, newline or classifier:TAU")
        placed = sorted({"policy", "interval", "threshold"} & set(self.options))
        if placed:
            raise ValueError(f"-O {placed[0]} is what --policies sets for each row (e.g. --policies classifier:0.7)")
        for p in self.policies:
            options = self.options | parse_policy(p)
            try:
                get_method("ccm-reason", **options)
            except (TypeError, ValueError) as err:
                raise ValueError(f"policy {p!r}: {err}") from None
        if self.n < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(
                f"n, max_new_tokens and batch_size must be at least 1, got {self.n}, {self.max_new_tokens}, "
                f"{self.batch_size}"
            )
        if self.data and not problems(self):
            raise ValueError(f"no GSM8K problem in {self.data}")

    @property
    def data_name(self) -> str:
        return (
            f"GSM8K test at {self.data}" if self.data else f"generated arithmetic problems ({gsm8k.GENERATOR_VERSION})"
        )


#: What to run to get an adapter (and its stage 1) for this table.
RECIPE = (
    "train one with `ccmem train gsm8k-full` then `ccmem train gsm8k-ccm-reason-keep load_path=runs/gsm8k-full`, "
    "and pass --stage1 runs/gsm8k-full (or use the shipped pair: --stage1 results/gsm8k/gsm8k-full.safetensors "
    "--adapter results/gsm8k/ccm-reason.safetensors)"
)


def resolve_adapter(given: str | None) -> str:
    """``given``, else the first of :data:`DEFAULT_ADAPTERS` that exists (relative to the working directory); none:
    a ``ValueError`` saying how to get one."""
    found = given or next((p for p in DEFAULT_ADAPTERS if Path(p).is_file()), None)
    if found is None:
        raise ValueError(f"no adapter given and none of {', '.join(DEFAULT_ADAPTERS)} exists; {RECIPE}")
    return found


def problems(settings: GSM8KSettings) -> list[gsm8k.Problem]:
    if settings.data:
        return gsm8k.read_split(settings.data, "test")[: settings.n]
    return gsm8k.generate(settings.n, "test", seed=settings.seed)


def run(
    lm: LoadedModel, settings: GSM8KSettings, progress: Callable[[str, int, int], None] | None = None
) -> list[dict[str, Any]]:
    """One row per policy (see the module docstring)."""
    import ccmem
    from ccmem.adapter import read_adapter
    from ccmem.chat import DEFAULT_SYSTEM_PROMPT
    from ccmem.generation import decode_batch

    settings.check()
    chosen = problems(settings)
    adapter = resolve_adapter(settings.adapter)
    system = (
        settings.system if settings.system is not None else read_adapter(adapter).trained_system(DEFAULT_SYSTEM_PROMPT)
    )
    attn = str(getattr(lm.model.config, "_attn_implementation", None) or "?")
    rows = []
    for text in settings.policies:
        session = ccmem.load(
            lm,
            "ccm-reason",
            adapter=adapter,
            stage1=settings.stage1,
            system_prompt=system or None,
            **settings.options,
            **parse_policy(text),
        )
        stops = session.format.stop_ids() | ({lm.tokenizer.eos_token_id} - {None})
        correct, insertions, peaks, seconds, tokens, classifier, silent = 0, 0, [], 0.0, 0, 0.0, 0
        for first in range(0, len(chosen), settings.batch_size):
            group = chosen[first : first + settings.batch_size]
            if progress:
                progress(text, first, len(chosen))
            stats: list[dict[str, Any]] = [{} for _ in group]
            queries = [session.query_ids(problem.question) for problem in group]
            outs: list[list[int]] = [[] for _ in group]
            started = time.perf_counter()
            for step in decode_batch(
                lm, session.method, [session.memory] * len(group), queries, settings.max_new_tokens,
                stop_ids=stops, stats=stats,
            ):  # fmt: skip
                for row, token in enumerate(step):
                    if token is not None:
                        outs[row].append(token)
            seconds += time.perf_counter() - started
            for problem, out, row_stats in zip(group, outs, stats, strict=True):
                answer = str(lm.tokenizer.decode(out, skip_special_tokens=True))
                correct += gsm8k.is_correct(answer, problem.answer)
                fired = int(row_stats.get("insertions", 0))
                insertions += fired
                silent += fired == 0
                peaks.append(row_stats.get("peak_kv_bytes", 0) / 2**20)
                tokens += len(out)
                classifier += float(row_stats.get("classifier_seconds", 0.0))
        n = len(chosen)
        rows.append(
            {
                "policy": text,
                "accuracy": correct / n,
                "insertions": insertions / n,
                "peak_kv_mb": sum(peaks) / n,
                "seconds_per_problem": seconds / n,
                "tokens_per_problem": tokens / n,
                "classifier_share": classifier / seconds if seconds else 0.0,
                "never_fired": silent if text != "none" else None,  # problems whose memory stayed raw
                "problems": n,
                "data": settings.data_name,
                "model": lm.name,
                "adapter": str(adapter),
                "stage1": settings.stage1,
                "max_new_tokens": settings.max_new_tokens,
                "batch_size": settings.batch_size,
                "n_tok": session.method.options()["n_tok"],
                "keep_last": session.method.options()["keep_last"],
                "min_segment": session.method.options()["min_segment"],
                "system": system or None,
                "attn": attn,
            }
        )
    return rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The fork's table, with the change against ``none`` where it was measured."""
    base = next((r for r in rows if r["policy"] == "none"), None)
    lines = [
        f"GSM8K reasoning compression: {rows[0]['problems']} problem{'' if rows[0]['problems'] == 1 else 's'} of "
        f"{rows[0]['data']}, {rows[0]['model']}, "
        f"adapter {rows[0]['adapter']}"
        + (f" on stage-1 LoRA {rows[0]['stage1']}" if rows[0].get("stage1") else "")
        + (
            f" ({rows[0]['n_tok']} <COMP> per step, last {rows[0]['keep_last']} raw tokens of a step kept)"
            if rows[0].get("keep_last")
            else ""
        )
        + (f", system prompt {rows[0]['system']!r}" if rows[0].get("system") else ", no system prompt")
        + f", greedy, up to {rows[0]['max_new_tokens']} new tokens, "
        f"{min(rows[0].get('batch_size', 1), rows[0]['problems'])} problems decoded together (time per problem: a "
        "batch's time / its size).",
        "",
        "| policy | accuracy | <COMP> insertions | peak KV MB | s / problem | classifier share | memory stayed raw |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        raw = "-" if r["never_fired"] is None else f"{r['never_fired']} of {r['problems']}"
        lines.append(
            f"| {r['policy']} | {r['accuracy']:.1%} | {r['insertions']:.2f} | {r['peak_kv_mb']:.2f} | "
            f"{r['seconds_per_problem']:.2f} | {r['classifier_share']:.1%} | {raw} |"
        )
    if base:
        lines += ["", "Against `none` (no compression):", ""]
        for r in rows:
            if r is base or not base["peak_kv_mb"]:
                continue
            saving = 1 - r["peak_kv_mb"] / base["peak_kv_mb"]
            time_ratio = r["seconds_per_problem"] / base["seconds_per_problem"] if base["seconds_per_problem"] else 0
            drop = f"{(base['accuracy'] - r['accuracy']) / base['accuracy']:.0%}" if base["accuracy"] else "n/a"
            kv = f"{saving:.0%} saved" if saving >= 0 else f"{-saving:.0%} more"
            lines.append(
                f"- {r['policy']}: peak KV {kv}, time x{time_ratio:.2f}, relative accuracy drop "
                f"{drop} (the fork: 24% at 29% saved, time x2.16)"
            )
    return "\n".join(lines) + "\n"


def write(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """``rows.jsonl``, ``report.md`` and ``accuracy-vs-kv.png`` in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "rows.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with atomic_path(out_dir / "report.md") as tmp:
        tmp.write_text(markdown(rows))
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["peak_kv_mb"], 100 * r["accuracy"])
        ax.annotate(r["policy"], (r["peak_kv_mb"], 100 * r["accuracy"]), fontsize=8)
    ax.set_xlabel("peak KV cache (MB)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = out_dir / "accuracy-vs-kv.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return [out_dir / "rows.jsonl", out_dir / "report.md", png]
