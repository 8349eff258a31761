"""What compressing a reasoning trace costs per generated token: ``ccm-reason`` with a policy against the same
adapter with ``policy=none``, the same problems, exactly ``--tokens`` tokens each (no stop tokens, so both decode
the same number of tokens whatever they write), interleaved ``--repeats`` times in one run.

``ccmem repro gsm8k`` times whole solutions, which differ in length between policies (a worse answer rambles),
and decodes 8 problems together (a batch waits for its longest row); this isolates the cost of the compression
itself: the <COMP> forwards, the LoRA hooks they run, dropping a step's entries, and what the shorter cache
saves back. Give several adapters to compare them in one run (e.g. the fork's classifier, which feeds <COMP> in a
forward of its own, against one trained with ``lookahead``, which feeds it with the step's last token)::

    python benchmarks/reason_decode.py --stage1 results/gsm8k/gsm8k-full.safetensors \\
        --adapter results/gsm8k/ccm-reason.safetensors --adapter runs/gsm8k-reason-ahead/adapter.safetensors

Rows (one per adapter: ms per token with and without compression, their ratio, <COMP> insertions) are appended
to ``--out`` as JSON lines and printed as a table.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import ccmem
from ccmem.api import CompressedLM
from ccmem.data import gsm8k
from ccmem.generation import decode
from ccmem.loading import DEFAULT_MODEL, LoadedModel, load_model


def timed(
    lm: LoadedModel, session: CompressedLM, queries: list[torch.Tensor], policy: str, n: int
) -> tuple[float, int, int]:
    """Seconds to decode ``n`` tokens after each query with ``policy``, the tokens decoded, <COMP> insertions."""
    session.method.policy = policy  # type: ignore[attr-defined]
    started, tokens, insertions = time.perf_counter(), 0, 0
    for query in queries:
        stats: dict = {}
        tokens += sum(1 for _ in decode(lm, session.method, session.memory, query, n, stats=stats))
        insertions += int(stats.get("insertions", 0))
    return time.perf_counter() - started, tokens, insertions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", action="append", required=True, help="a ccm-reason adapter (repeatable)")
    parser.add_argument("--stage1", help="the stage-1 LoRA the adapters were trained on (default: none)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="built-in model or path (default: %(default)s)")
    parser.add_argument("--policy", default="classifier", help="the compressing policy (default: %(default)s)")
    parser.add_argument("--problems", type=int, default=6, help="generated test problems (default: 6)")
    parser.add_argument("--tokens", type=int, default=60, help="tokens decoded per problem (default: 60)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timings of each policy (default: 3)")
    parser.add_argument("--out", type=Path, default=Path("results/gsm8k/decode-overhead.jsonl"))
    args = parser.parse_args()
    if args.problems < 1 or args.tokens < 1 or args.repeats < 1:
        parser.error("--problems, --tokens and --repeats must be at least 1")

    lm = load_model(args.model)
    chosen = gsm8k.generate(args.problems, "test", seed=0)
    rows = []
    for adapter in args.adapter:
        session = ccmem.load(lm, "ccm-reason", adapter=adapter, stage1=args.stage1)
        queries = [session.query_ids(p.question) for p in chosen]

        timed(lm, session, queries, "none", args.tokens)  # warm-up
        seconds = {"none": 0.0, args.policy: 0.0}
        for _ in range(args.repeats):
            for policy in seconds:
                spent, tokens, fired = timed(lm, session, queries, policy, args.tokens)
                seconds[policy] += spent
                if policy != "none":
                    insertions = fired  # the same every repeat: decoding is greedy
        lookahead = bool(getattr(session.method, "lookahead", False))
        rows.append(
            {
                "adapter": adapter,
                "lookahead": lookahead,
                "policy": args.policy,
                "problems": args.problems,
                "tokens": tokens,
                "insertions": insertions,
                "ms_per_token_none": 1000 * seconds["none"] / (tokens * args.repeats),
                "ms_per_token": 1000 * seconds[args.policy] / (tokens * args.repeats),
                "ratio": seconds[args.policy] / seconds["none"],
                "repeats": args.repeats,
                "threads": torch.get_num_threads(),
                "model": args.model,
                "run": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        )
    print(f"{args.problems} problems x {args.tokens} tokens, {args.repeats} interleaved repeats, {args.policy} vs none")
    print(f"{'adapter':56} {'lookahead':>9} {'<COMP>':>6} {'ms/token none':>13} {'ms/token':>8} {'ratio':>6}")
    for r in rows:
        print(
            f"{r['adapter'][-56:]:56} {r['lookahead']!s:>9} {r['insertions']:>6} {r['ms_per_token_none']:>13.1f} "
            f"{r['ms_per_token']:>8.1f} {r['ratio']:>6.3f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"rows appended to {args.out}")


if __name__ == "__main__":
    main()
