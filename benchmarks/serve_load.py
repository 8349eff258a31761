"""Load on ``ccmem serve``: many concurrent clients, each with its own session and its own secret.

Starts the server on loopback (uvicorn in this process, the real default model unless ``--model``), then:

1. **Concurrency** (``--clients``, default 32): every client creates a session, tells it a secret number, talks
   for ``--turns`` more turns, then asks for the number back. Reports requests/s, generated tokens/s, latency
   percentiles, errors, and leaks: an answer that contains *another* session's secret, or a stored transcript
   that holds another session's message. Targets: 0 errors, 0 leaks.
2. **Batching** (``--batch-sessions``, default 8): the same requests of that many sessions sent one at a time,
   then all at once; the ratio of generated tokens/s (target >= 3x).

Rows go to ``--out`` (JSONL) and a table is printed. Usage::

    python benchmarks/serve_load.py                    # SmolLM2-135M, ccm-concat, 32 clients
    python benchmarks/serve_load.py --clients 8 --turns 1 --method ccm-merge
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

try:
    import httpx2 as httpx  # what the openai client and starlette use now
except ImportError:  # pragma: no cover - older environments
    import httpx  # type: ignore[no-redef]

import ccmem
from ccmem.serve.engine import Engine, Limits
from ccmem.serve.server import bind, create_app
from ccmem.serve.sessions import SessionStore

SMALL_TALK = [
    "I spent the morning reading about old sailing ships.",
    "The weather here has been grey all week.",
    "I am thinking of learning to play the piano.",
    "My neighbour just adopted a very loud parrot.",
    "I tried a new recipe for lentil soup yesterday.",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="model name or folder (default: smollm2-135m)")
    parser.add_argument("--method", default="ccm-concat", help="context method served (default: ccm-concat)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients, one session each (default 32)")
    parser.add_argument("--turns", type=int, default=2, help="small-talk turns between secret and question")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated per answer (default 16)")
    parser.add_argument("--batch-sessions", type=int, default=8, help="sessions in the batching comparison")
    parser.add_argument("--max-batch", type=int, default=32, help="server's --max-batch (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the secrets and small talk")
    parser.add_argument("--out", type=Path, default=Path("results/serve/load.jsonl"), help="JSONL rows (appended)")
    return parser.parse_args(argv)


class Server:
    """uvicorn serving an Engine on a free loopback port, in a background thread."""

    def __init__(self, engine: Engine):
        import uvicorn

        self.sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


async def conversation(
    http: httpx.AsyncClient, model: str, name: str, secret: str, turns: list[str], max_tokens: int
) -> dict:
    """One client's session: secret, small talk, question. Returns latencies, tokens, errors and the last answer."""
    latencies, tokens, errors = [], 0, []
    made = await http.post("/v1/sessions", json={"name": name})
    if made.status_code != 201:
        return {"latencies": [], "tokens": 0, "errors": [made.text], "answer": ""}
    answer = ""
    for text in [f"Please remember this: my locker code is {secret}.", *turns, "What is my locker code?"]:
        body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}
        start = time.perf_counter()
        response = await http.post("/v1/chat/completions", json=body | {"session": name})
        latencies.append(time.perf_counter() - start)
        if response.status_code != 200:
            errors.append(f"{response.status_code}: {response.text[:200]}")
            continue
        reply = response.json()
        tokens += reply["usage"]["completion_tokens"]
        answer = reply["choices"][0]["message"]["content"]
    return {"latencies": latencies, "tokens": tokens, "errors": errors, "answer": answer}


async def run_clients(url: str, model: str, plans: list[tuple[str, str, list[str]]], max_tokens: int, together: bool):
    limits = httpx.Limits(max_connections=len(plans) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        if together:
            results = await asyncio.gather(*(conversation(http, model, n, s, t, max_tokens) for n, s, t in plans))
        else:
            results = [await conversation(http, model, n, s, t, max_tokens) for n, s, t in plans]
        return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    base = ccmem.load(args.model, method=args.method)
    model_id = f"{args.model}:{args.method}"
    store_root = Path(tempfile.mkdtemp(prefix="ccmem-load-"))
    engine = Engine(
        base,
        SessionStore(store_root),
        model_id=model_id,
        limits=Limits(max_batch=args.max_batch, max_sessions=10 * args.clients + 100),
    )
    secrets = rng.sample(range(10_000, 100_000), args.clients + args.batch_sessions * 2)

    def plans(prefix: str, n: int, offset: int) -> list[tuple[str, str, list[str]]]:
        return [(f"{prefix}{i}", str(secrets[offset + i]), rng.sample(SMALL_TALK, args.turns)) for i in range(n)]

    rows = []
    with Server(engine) as server:
        load = plans("load-", args.clients, 0)
        results, seconds = asyncio.run(run_clients(server.url, model_id, load, args.max_tokens, together=True))
        latencies = [x for r in results for x in r["latencies"]]
        errors = [e for r in results for e in r["errors"]]
        own = {name: secret for name, secret, _ in load}
        leaks = 0
        for (name, _, _), result in zip(load, results, strict=True):
            others = [s for n, s in own.items() if n != name]
            leaks += sum(s in result["answer"] for s in others)
            transcript = " ".join(m["content"] for m in engine.store.get(name).transcript)
            leaks += sum(s in transcript for s in others)
        recalled = sum(own[name] in r["answer"] for (name, _, _), r in zip(load, results, strict=True))
        tokens = sum(r["tokens"] for r in results)
        rows.append(
            {
                "benchmark": "serve-load",
                "model": args.model,
                "method": args.method,
                "clients": args.clients,
                "requests": len(latencies),
                "seconds": round(seconds, 2),
                "requests_per_s": round(len(latencies) / seconds, 2),
                "tokens_per_s": round(tokens / seconds, 1),
                "latency_p50_s": round(percentile(latencies, 0.5), 3),
                "latency_p90_s": round(percentile(latencies, 0.9), 3),
                "latency_p99_s": round(percentile(latencies, 0.99), 3),
                "errors": len(errors),
                "leaks": leaks,
                "secret_recalled": f"{recalled}/{args.clients}",
                "largest_batch": engine.stats()["largest_batch"],
                "answers_per_step": engine.stats()["answers_per_step"],
            }
        )
        for e in errors[:5]:
            print("error:", e, file=sys.stderr)

        speeds, occupancy = {}, {}
        for mode, offset in (("one at a time", args.clients), ("together", args.clients + args.batch_sessions)):
            group = plans(f"batch-{mode[:3]}-", args.batch_sessions, offset)
            steps, stepped = engine.worker.steps, engine.worker.rows_stepped
            out, secs = asyncio.run(
                run_clients(server.url, model_id, group, args.max_tokens, together=mode == "together")
            )
            speeds[mode] = sum(r["tokens"] for r in out) / secs
            occupancy[mode] = (engine.worker.rows_stepped - stepped) / max(1, engine.worker.steps - steps)
        rows.append(
            {
                "benchmark": "serve-batching",
                "model": args.model,
                "method": args.method,
                "sessions": args.batch_sessions,
                "tokens_per_s_one_at_a_time": round(speeds["one at a time"], 1),
                "tokens_per_s_together": round(speeds["together"], 1),
                "ratio": round(speeds["together"] / speeds["one at a time"], 2),
                "answers_per_step_together": round(occupancy["together"], 2),  # 1.0 one at a time
            }
        )
    engine.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    for row in rows:
        print(json.dumps(row))
    load_row, batch_row = rows
    print(
        f"\n{args.clients} clients: {load_row['requests']} requests, {load_row['errors']} errors, "
        f"{load_row['leaks']} leaks, p50 {load_row['latency_p50_s']} s, p99 {load_row['latency_p99_s']} s, "
        f"{load_row['tokens_per_s']} tokens/s; {args.batch_sessions} sessions together / one at a time: "
        f"{batch_row['ratio']}x (target >= 3x)"
    )
    return 0 if load_row["errors"] == 0 and load_row["leaks"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
