"""Decoding speed for serving: a compressed chat memory against an empty and a full context, and several
sessions decoded together (``decode_batch``) against one at a time. Everything is measured side by side in one
run, the configurations interleaved and the fastest of ``--repeats`` timings kept, so the ratios compare like
with like on a shared machine.

1. **One session.** Greedy tokens/s after a ~``--history-tokens`` chat history (dialogs from
   ``ccmem.data.dialogs``, folded in turn by turn as a chat does) held by each compressed method (shipped
   adapters), against the same method with no history (empty context: the system prompt only) and against
   ``full`` holding the whole history. Targets: compressed >= 0.9x empty, >= 1.5x full.
2. **Concurrent sessions.** ``--sessions`` sessions, each with its own history (of different lengths, so of
   different memory sizes), answer one question each: in one ``decode_batch`` (one padded forward per step)
   against one after another. Aggregate tokens/s; target >= 3x.
3. **Concurrent sessions against full.** The same sessions held by ``--baseline`` (the whole histories), decoded
   together the same way: what a server decoding many sessions at once gains from their compressed memories.
   Reported beside the single-session ratio of 1. (same target, 1.5x): at one session a small model's step is
   bound by reading its weights, which a batch shares, while each session's cached history is its own.

Each timing decodes exactly ``--new-tokens`` tokens per session (no stop tokens) and includes reading the
question. Rows go to ``--out`` as JSON lines (speeds, then the ratios with their targets) and a table is
printed. Run::

    python benchmarks/serve_decode.py                                # SmolLM2-135M, the defaults below
    python benchmarks/serve_decode.py --history-tokens 1000 --sessions 4 --repeats 2
    python benchmarks/serve_decode.py --threads 1 --clock cpu        # on a machine busy with other work
    python benchmarks/serve_decode.py --quantize float16             # float16 weights (ccmem.quantize)
    python benchmarks/serve_decode.py --device cuda --dtype bfloat16 # on a GPU (benchmarks/gpu.sh)

Both clocks are recorded in every row; ``--clock`` picks the one the ratios use.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

import ccmem
from ccmem.api import CompressedLM
from ccmem.chat import ChatFormat
from ccmem.data import dialogs
from ccmem.eval.harness import append_row
from ccmem.generation import decode, decode_batch
from ccmem.loading import DEFAULT_MODEL, LoadedModel

QUESTION = "What was the first thing I asked you in this conversation?"


@dataclass
class SpeedRow:
    """Decoding speed of one configuration (``sessions`` decoded together or one after another)."""

    kind: str  # "speed"
    benchmark: str  # "single" or "concurrent"
    variant: str  # "empty", "history", "one-at-a-time", "batched"
    method: str
    sessions: int
    history_tokens: int  # per session (mean)
    memory_slots: int  # per session (mean)
    memory_bytes: int  # all sessions
    new_tokens: int  # per session
    seconds: float  # fastest of the repeats, wall clock
    tokens_per_second: float  # all sessions together, wall clock
    cpu_seconds: float  # fastest of the repeats, CPU time of this process (all its threads)
    cpu_tokens_per_second: float
    model: str
    threads: int
    config_hash: str
    run: str  # when the run started (UTC): the rows of one run share it
    weights: str = "float32"  # the model's linear layers: float32, bfloat16 (--dtype), or float16 (--quantize)
    device: str = "cpu"  # "cpu", or the GPU's name (--device cuda)


@dataclass
class RatioRow:
    """One ratio of two speeds, with its target."""

    kind: str  # "ratio"
    name: str
    ratio: float
    target: float
    clock: str  # "wall" or "cpu": which seconds the ratio divides
    met: bool
    model: str
    config_hash: str
    run: str
    weights: str = "float32"
    device: str = "cpu"


def chat_history(fmt: ChatFormat, tokens: int, seed: int) -> tuple[list[tuple[str, str]], int]:
    """(user, assistant) turns of generated dialogs until their chat-formatted text holds ``tokens`` tokens,
    and the tokens they hold."""
    turns: list[tuple[str, str]] = []
    history: list[dict[str, str]] = []
    count = 0
    for dialog in dialogs.generate(1000, "validation", seed=seed, turns=(20, 20)):
        for user, assistant in dialog.turns:
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
            count += len(fmt.tokenizer.encode(fmt.delta(history, messages), add_special_tokens=False))
            history += messages
            turns.append((user, assistant))
            if count >= tokens:
                return turns, count
    raise ValueError(f"1000 dialogs hold fewer than {tokens} tokens")


def session_with(lm: LoadedModel, method: str, turns: list[tuple[str, str]]) -> CompressedLM:
    session = ccmem.load(lm, method=method)
    for user, assistant in turns:
        session.remember(user, assistant)
    return session


def fastest(runs: dict[str, Callable[[], int]], repeats: int) -> dict[str, tuple[float, float]]:
    """Wall and CPU seconds of the fastest of ``repeats`` calls of each run (each clock's own fastest), the runs
    interleaved after one warm-up each."""
    for run in runs.values():
        run()
    wall = dict.fromkeys(runs, float("inf"))
    cpu = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            run()
            cpu[name] = min(cpu[name], time.process_time() - started_cpu)
            wall[name] = min(wall[name], time.perf_counter() - started)
    return {name: (wall[name], cpu[name]) for name in runs}


def decode_one(session: CompressedLM, query: torch.Tensor, n: int) -> Callable[[], int]:
    def run() -> int:
        return sum(1 for _ in decode(session.lm, session.method, session.memory, query, n))

    return run


def add_timing_arguments(parser: argparse.ArgumentParser, out: Path) -> None:
    """The options every decoding-speed benchmark here shares: the histories, what is timed, how, and where the
    rows go (``out`` by default)."""
    parser.add_argument(
        "--history-tokens", type=int, default=2000, help="chat history per session, in tokens (default: 2000)"
    )
    parser.add_argument(
        "--new-tokens", type=int, default=32, help="tokens decoded per session in each timing (default: 32)"
    )
    parser.add_argument("--sessions", type=int, default=8, help="concurrent sessions (default: 8)")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timings per configuration; the fastest is kept (default: 5)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--quantize",
        choices=["none", "float16"],
        default="none",
        help="the model's weights: none (float32) or float16 linear layers (ccmem.quantize), which read half the "
        "bytes per token on a CPU (default: none)",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="seconds the ratios divide: wall clock, or this process's CPU time, which other processes on a "
        "shared machine disturb far less (with --threads 1 the two agree on an idle machine) (default: wall)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=out,
        help="JSONL file the rows are appended to (default: %(default)s)",
    )


def parse_timing_arguments(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The parsed arguments, the counts checked, torch's threads set."""
    args = parser.parse_args()
    if min(args.history_tokens, args.new_tokens, args.sessions, args.repeats) < 1:
        parser.error("--history-tokens, --new-tokens, --sessions and --repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="built-in model or path (default: %(default)s)")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["ccm-concat", "ccm-merge"],
        help="compressed methods timed with the history, each with its shipped adapter (default: %(default)s)",
    )
    parser.add_argument(
        "--baseline", default="full", help="method that keeps the whole history, compared against (default: full)"
    )
    parser.add_argument(
        "--batch-method",
        default="ccm-concat",
        help="method of the concurrent sessions, batched vs one at a time (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="dialog generator seed of the first session (default 0)")
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu or cuda (default: cpu)")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="the model's weights (default: float32)"
    )
    add_timing_arguments(parser, Path("results/serve/decode.jsonl"))
    args = parse_timing_arguments(parser)
    threads = torch.get_num_threads()
    run = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    config_hash = hashlib.sha256(json.dumps(vars(args), default=str, sort_keys=True).encode()).hexdigest()[:12]

    lm = ccmem.load_model(args.model, quantize=args.quantize, device=args.device, dtype=getattr(torch, args.dtype))
    weights = lm.quantized or args.dtype
    if lm.device.type == "cuda" and args.clock == "cpu":
        parser.error("--clock cpu times the CPU; on a GPU use the wall clock")
    device = torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else "cpu"
    fmt = ChatFormat(lm.tokenizer)
    histories, history_tokens = zip(
        *(chat_history(fmt, args.history_tokens, args.seed + i) for i in range(args.sessions)), strict=True
    )
    n = args.new_tokens
    rows: list[SpeedRow] = []

    def per_second(r: SpeedRow) -> float:
        return r.tokens_per_second if args.clock == "wall" else r.cpu_tokens_per_second

    def row(
        benchmark: str, variant: str, method: str, sessions: list[CompressedLM], times: tuple[float, float]
    ) -> SpeedRow:
        history = 0 if variant == "empty" else statistics.mean(history_tokens[: len(sessions)])
        out = SpeedRow(
            "speed", benchmark, variant, method, len(sessions), round(history),
            round(statistics.mean(s.memory.num_slots for s in sessions)), sum(s.memory.nbytes for s in sessions),
            n, round(times[0], 4), round(n * len(sessions) / times[0], 2), round(times[1], 4),
            round(n * len(sessions) / times[1], 2), lm.name, threads, config_hash, run, weights, device,
        )  # fmt: skip
        rows.append(out)
        return out

    # 1. One session: the compressed methods, each empty and with the history, and the full history.
    print(f"building memories of a {args.history_tokens}-token chat ({len(histories[0])} turns)...", flush=True)
    single = {f"{m} history": session_with(lm, m, histories[0]) for m in [*args.methods, args.baseline]}
    single |= {f"{m} empty": ccmem.load(lm, method=m) for m in args.methods}
    queries = {name: s.query_ids(QUESTION) for name, s in single.items()}
    times = fastest({name: decode_one(s, queries[name], n) for name, s in single.items()}, args.repeats)
    speed = {}
    for name, s in single.items():
        method, variant = name.split()
        speed[name] = per_second(row("single", variant, method, [s], times[name]))

    # 2. Concurrent sessions, batched vs one at a time.
    print(f"building {args.sessions} {args.batch_method} sessions...", flush=True)
    sessions = [session_with(lm, args.batch_method, h) for h in histories]
    batch_queries = [s.query_ids(QUESTION) for s in sessions]

    def one_at_a_time() -> int:
        return sum(decode_one(s, q, n)() for s, q in zip(sessions, batch_queries, strict=True))

    def batched() -> int:
        memories = [s.memory for s in sessions]
        steps = decode_batch(lm, sessions[0].method, memories, batch_queries, n)
        return sum(t is not None for step in steps for t in step)

    print(f"building {args.sessions} {args.baseline} sessions...", flush=True)
    whole = [session_with(lm, args.baseline, h) for h in histories]
    whole_queries = [s.query_ids(QUESTION) for s in whole]

    def batched_whole() -> int:
        steps = decode_batch(lm, whole[0].method, [s.memory for s in whole], whole_queries, n)
        return sum(t is not None for step in steps for t in step)

    runs = {"one-at-a-time": one_at_a_time, "batched": batched, "baseline batched": batched_whole}
    times = fastest(runs, args.repeats)
    for variant in ("one-at-a-time", "batched"):
        speed[variant] = per_second(row("concurrent", variant, args.batch_method, sessions, times[variant]))
    whole_row = row("concurrent", "batched", args.baseline, whole, times["baseline batched"])
    speed["baseline batched"] = per_second(whole_row)

    ratios = []
    full = speed[f"{args.baseline} history"]
    for m in args.methods:
        ratios.append((f"{m} history / {m} empty", speed[f"{m} history"] / speed[f"{m} empty"], 0.9))
        ratios.append((f"{m} history / {args.baseline} history", speed[f"{m} history"] / full, 1.5))
    ratios.append((f"{args.sessions} sessions batched / one at a time", speed["batched"] / speed["one-at-a-time"], 3.0))
    ratios.append(
        (
            f"{args.sessions} sessions batched: {args.batch_method} / {args.baseline}",
            speed["batched"] / speed["baseline batched"],
            1.5,
        )
    )
    ratio_rows = [
        RatioRow("ratio", name, round(r, 2), t, args.clock, r >= t, lm.name, config_hash, run, weights, device)
        for name, r, t in ratios
    ]

    for r in [*rows, *ratio_rows]:
        append_row(args.out, r)
    where = device if lm.device.type == "cuda" else f"{threads} threads"
    print(f"\n{lm.name} ({weights} weights), {where}, {n} new tokens per session, best of {args.repeats}:")
    print(f"{'configuration':<30} {'sessions':>8} {'history':>8} {'slots':>6} {'tokens/s':>9} {'tokens/CPU-s':>13}")
    for r in rows:
        name = f"{r.method} {r.variant}"
        print(
            f"{name:<30} {r.sessions:>8} {r.history_tokens:>8} {r.memory_slots:>6} {r.tokens_per_second:>9.1f} "
            f"{r.cpu_tokens_per_second:>13.1f}"
        )
    print(f"\n{'ratio (' + args.clock + ' clock)':<56} {'measured':>8} {'target':>7}  met")
    for rr in ratio_rows:
        print(f"{rr.name:<56} {rr.ratio:>7.2f}x {rr.target:>6.1f}x  {'yes' if rr.met else 'NO'}")
    print(f"rows appended to {args.out}")


if __name__ == "__main__":
    main()
