"""Decoding with a cache that has room for the answer (``Memory.to_cache(room)``, new) against a plain
``DynamicCache`` that concatenates every layer's whole cache at each step (old), side by side in one run.

Three workloads, each decoded both ways, the runs interleaved and the fastest of ``--repeats`` kept:

1. one ``ccm-concat`` session with the compressed memory of a ~``--history-tokens`` chat (shipped adapter);
2. one ``full`` session holding that whole chat;
3. ``--sessions`` such ``ccm-concat`` sessions decoded together in one batch (``decode_batch``).

Each decodes ``--new-tokens`` tokens per session after reading a question, and the tokens of the two caches are
checked to be the same. Printed: tokens/s of each and the ratio new / old; rows are appended to ``--out``::

    python benchmarks/decode_cache.py --threads 1 --clock cpu --quantize float16
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from serve_decode import QUESTION, add_timing_arguments, chat_history, parse_timing_arguments, session_with
from transformers.cache_utils import DynamicLayer

import ccmem
from ccmem.chat import ChatFormat
from ccmem.eval.harness import append_row
from ccmem.generation import decode, decode_batch
from ccmem.loading import DEFAULT_MODEL
from ccmem.memory import Memory, RoomyLayer


@dataclass(frozen=True)
class CacheRow:
    workload: str
    room_tokens_per_s: float
    plain_tokens_per_s: float
    ratio: float  # room / plain
    same_tokens: bool
    clock: str
    model: str
    threads: int
    weights: str
    run: str


@contextmanager
def plain_cache() -> Iterator[None]:
    """Decoding loops get plain ``DynamicCache`` layers (no room), as before ``to_cache`` and ``pad_rows`` took
    one: the memory, or a padded batch's layout, copied into them."""
    original, holding = Memory.to_cache, RoomyLayer.holding

    def plain_layer(keys: torch.Tensor, values: torch.Tensor, held: int, room: int) -> DynamicLayer:
        layer = DynamicLayer()
        layer.update(keys[..., :held, :], values[..., :held, :])
        return layer

    Memory.to_cache = lambda self, room=0: original(self)  # type: ignore[method-assign]
    RoomyLayer.holding = plain_layer  # type: ignore[assignment,method-assign]
    try:
        yield
    finally:
        Memory.to_cache = original  # type: ignore[method-assign]
        RoomyLayer.holding = holding  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="built-in model or path (default: %(default)s)")
    add_timing_arguments(parser, Path("results/serve/decode_cache.jsonl"))
    args = parse_timing_arguments(parser)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    lm = ccmem.load_model(args.model, quantize=args.quantize)
    fmt = ChatFormat(lm.tokenizer)
    histories = [chat_history(fmt, args.history_tokens, seed)[0] for seed in range(args.sessions)]
    n = args.new_tokens
    print(f"building the memories of {args.sessions} {args.history_tokens}-token chats...", flush=True)
    concat = [session_with(lm, "ccm-concat", h) for h in histories]
    full = session_with(lm, "full", histories[0])

    def single(session: ccmem.CompressedLM) -> Callable[[], list[int]]:
        query = session.query_ids(QUESTION)
        return lambda: list(decode(lm, session.method, session.memory, query, n))

    queries = [s.query_ids(QUESTION) for s in concat]

    def batched() -> list[int]:
        steps = decode_batch(lm, concat[0].method, [s.memory for s in concat], queries, n)
        return [t for step in steps for t in step if t is not None]

    workloads = {"ccm-concat, 1 session": (single(concat[0]), 1), "full, 1 session": (single(full), 1)}
    workloads[f"ccm-concat, {args.sessions} sessions batched"] = (batched, args.sessions)
    best = {(name, cache): float("inf") for name in workloads for cache in ("room", "plain")}
    tokens: dict[tuple[str, str], list[int]] = {}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not timed
        for name, (run, _) in workloads.items():
            for cache in ("room", "plain"):
                with plain_cache() if cache == "plain" else _nothing():
                    started = clock()
                    tokens[name, cache] = run()
                    if repeat:
                        best[name, cache] = min(best[name, cache], clock() - started)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(f"\n{lm.name}, {torch.get_num_threads()} threads, {lm.quantized or 'float32'} weights, {args.clock} clock")
    print(f"{'workload':<36} {'room tok/s':>11} {'plain tok/s':>12} {'room / plain':>13}  same tokens")
    for name, (_, sessions) in workloads.items():
        room, plain = (n * sessions / best[name, c] for c in ("room", "plain"))
        same = tokens[name, "room"] == tokens[name, "plain"]
        print(f"{name:<36} {room:>11.1f} {plain:>12.1f} {room / plain:>12.2f}x  {'yes' if same else 'NO'}")
        row = CacheRow(
            name, round(room, 2), round(plain, 2), round(room / plain, 3), same, args.clock, lm.name,
            torch.get_num_threads(), lm.quantized or "float32", stamp,
        )  # fmt: skip
        append_row(args.out, row)
    print(f"rows appended to {args.out}")


@contextmanager
def _nothing() -> Iterator[None]:
    yield


if __name__ == "__main__":
    main()
