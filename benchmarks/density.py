"""Memory density: sessions per GiB of key/value memory, and what each storage precision costs in quality.

For every method and storage precision (float32, bfloat16, float16, int8; :mod:`ccmem.precision`) it measures

* **density**: the bytes held by the memory of one ~2k-token chat history (persona test dialogs chained
  exchange after exchange, each exchange one compression step, as a chat server folds them) at that precision,
  the file size, and the sessions that fit in 1 GiB of key/value memory;
* **quality**: persona-benchmark accuracy (option scoring, summed log-likelihood, as ``ccmem eval``) when every
  example's memory is stored at that precision and expanded again before answering, its agreement with float32
  (examples whose chosen option is the same) and the mean change of the answer's log-likelihood.

Each example's context is compressed once per method and scored at every precision from that one memory
(``ccmem eval --memory-dtype`` gives the same numbers, recompressing for each precision). One JSON row per
(method, precision) is written to ``--out`` (the file is replaced).

    python benchmarks/density.py --n 30
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import ccmem
from ccmem.api import CompressedLM, score_batch
from ccmem.data.loaders import load_examples
from ccmem.data.records import MemoryExample, to_sample
from ccmem.eval.harness import adapter_provenance, read_context
from ccmem.fileio import atomic_path
from ccmem.loading import load_model
from ccmem.memory import Memory
from ccmem.options import OptionError, parse_pairs
from ccmem.precision import STORAGE_DTYPES, storage_name
from ccmem.train.config import DataConfig

GIB = 2**30


def history_memory(session: CompressedLM, dialogs: list[MemoryExample], tokens: int) -> tuple[Memory, int, int]:
    """The memory after chaining the dialogs' exchanges until at least ``tokens`` chat tokens were read; with the
    exchanges and chat tokens read (the text's tokens, not the positions <COMP> tokens also take)."""
    session.reset()
    exchanges = read = 0
    for example in dialogs:
        for user, assistant in example.context:
            if read >= tokens:
                return session.memory, exchanges, read
            turn = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
            read += len(
                session.lm.tokenizer.encode(session.format.delta(session.history, turn), add_special_tokens=False)
            )
            session.remember(user, assistant)
            exchanges += 1
    raise ValueError(f"the dialogs hold fewer than {tokens} tokens of history; give more (--history-dialogs)")


def persona_scores(
    session: CompressedLM, examples: list[MemoryExample], dtypes: list[str]
) -> dict[str, list[tuple[int, bool, float]]]:
    """Per precision, per example: (the chosen option, whether it is the answer, the answer's log-likelihood)."""
    lm = session.lm
    out: dict[str, list[tuple[int, bool, float]]] = {d: [] for d in dtypes}
    for example in examples:
        sample = to_sample(lm.tokenizer, example, system=session.system_prompt)
        query = sample.tail[: sample.answer_start]
        options = [list(lm.tokenizer.encode(o, add_special_tokens=False)) for o in example.options]
        with torch.no_grad():
            read_context(session, example)
        memories = [session.memory.compact(d).expanded() for d in dtypes]
        scores = score_batch(lm, session.method, [(m, query, options) for m in memories])
        at = example.options.index(example.answer)
        for dtype, s in zip(dtypes, scores, strict=True):
            best = max(range(len(s)), key=s.__getitem__)
            out[dtype].append((best, best == at, s[at]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Rows: one per method x precision.")
    parser.add_argument("--model", default="smollm2-135m", help="Built-in model name or local folder.")
    parser.add_argument("--methods", default="ccm-concat,ccm-merge,full", help="Comma-separated methods.")
    parser.add_argument("--dtypes", default=",".join(STORAGE_DTYPES), help="Storage precisions to compare.")
    parser.add_argument("--history-tokens", type=int, default=2048, help="Chat history read before measuring bytes.")
    parser.add_argument("--history-dialogs", type=int, default=40, help="Persona test dialogs chained into it.")
    parser.add_argument("--n", type=int, default=30, help="Persona examples scored (0: density only).")
    parser.add_argument("--k", type=int, default=3, help="Facts per persona dialog.")
    parser.add_argument("--small-talk", type=int, default=5, help="Small-talk turns per persona dialog.")
    parser.add_argument("--seed", type=int, default=0, help="Persona generator seed.")
    parser.add_argument("--out", type=Path, default=Path("results/serve/density.jsonl"), help="JSONL rows (replaced).")
    parser.add_argument(
        "-O", "--option", action="append", default=[], help="Method option KEY=VALUE for every method (repeatable)."
    )
    args = parser.parse_args()
    try:
        options = parse_pairs(args.option)
    except OptionError as err:
        parser.error(str(err))

    dtypes = [storage_name(d) for d in args.dtypes.split(",") if d.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    lm = load_model(args.model)
    cfg = DataConfig(dataset="persona", n_eval=args.n, k=args.k, small_talk=args.small_talk, seed=args.seed)
    examples = load_examples(cfg, "test")[: args.n] if args.n else []
    chat = DataConfig(dataset="persona", n_eval=args.history_dialogs, k=args.k, small_talk=args.small_talk, seed=99)
    dialogs = load_examples(chat, "test")[: args.history_dialogs]
    rows: list[dict[str, Any]] = []
    for name in methods:
        session = ccmem.load(lm, name, **options)
        t0 = time.perf_counter()
        memory, exchanges, history_tokens = history_memory(session, dialogs, args.history_tokens)
        history_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        scored = persona_scores(session, examples, dtypes) if examples else {}
        persona_seconds = time.perf_counter() - t0
        adapter, _ = adapter_provenance(session)
        reference = "float32" if "float32" in dtypes else dtypes[0]
        for dtype in dtypes:
            compact = memory.compact(dtype)
            with tempfile.TemporaryDirectory() as tmp:
                file_bytes = compact.save(Path(tmp) / "m.safetensors").stat().st_size
            row: dict[str, Any] = {
                "model": lm.name,
                "method": name,
                "options": {**options, **({"keep": session.method.keep} if hasattr(session.method, "keep") else {})},
                "adapter": adapter,
                "memory_dtype": dtype,
                "history_tokens": history_tokens,
                "history_exchanges": exchanges,
                "memory_slots": memory.num_slots,
                "kv_bytes": compact.nbytes,
                "file_bytes": file_bytes,
                "sessions_per_gib": round(GIB / compact.nbytes, 1),
                "history_seconds": round(history_seconds, 1),
            }
            if examples:
                results, base = scored[dtype], scored[reference]
                row |= {
                    "persona_examples": len(results),
                    "persona_k": args.k,
                    "persona_small_talk": args.small_talk,
                    "persona_seed": args.seed,
                    "accuracy": round(sum(r[1] for r in results) / len(results), 4),
                    "reference_dtype": reference,  # what the two columns below compare with
                    "same_choice": round(
                        sum(a[0] == b[0] for a, b in zip(results, base, strict=True)) / len(results), 4
                    ),
                    "answer_loglik_change": round(
                        sum(abs(a[2] - b[2]) for a, b in zip(results, base, strict=True)) / len(results), 5
                    ),
                    "persona_seconds": round(persona_seconds, 1),
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
        write_rows(args.out, rows)  # after each method, so an interrupted run keeps what it measured
    print(f"wrote {len(rows)} rows to {args.out}")


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace ``path`` with ``rows`` as JSON lines, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    main()
