"""Compression latency: IC-Former vs CCM vs gist on the same 512-token contexts, in one run.

IC-Former runs a small former (``--layers``: 3 by default, as the paper) over the context's embeddings and the LM
over its digests only; CCM and gist (the ICAE-like baseline) run the whole LM over the context plus their <COMP>
tokens. Each method compresses the same contexts (interleaved, so a busy machine slows all alike), each timed
``--repeats`` times after one warm-up; the fastest of the repeats per context (the least disturbed by other
processes), then the median over contexts, is reported with the FLOPs per compressed context token counted by
``torch.utils.flop_counter`` (matrix products: the former, the LM, the LoRA). Two IC-Former rows: ``icformer`` is
the whole ``add`` (the former, then the LM's keys/values of the digests: ccmem's memory), ``icformer-digests`` the
former alone (what the paper times as compression; the LM reads the digests afterwards, as the prompt is read). The
methods keep the same number of memory slots (``--slots``). Weights are untrained (latency does not depend on
them).
Run:

    python benchmarks/icformer_latency.py                       # SmolLM2-135M, 5 contexts of 512 tokens
    python benchmarks/icformer_latency.py --contexts 10 --out results/icformer_latency.json
    python benchmarks/icformer_latency.py --slots 32 --layers 1     # the shipped former's size (16:1 at 512)
    python benchmarks/icformer_latency.py --slots 32 --layers 1 --dtype bfloat16
    python benchmarks/icformer_latency.py --quantize float16        # float16 weights for every method (ccmem.quantize)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from torch.utils.flop_counter import FlopCounterMode

from ccmem.data.text import text_files
from ccmem.loading import DEFAULT_MODEL, load_model
from ccmem.methods.base import Method
from ccmem.quantize import quantize_weights
from ccmem.registry import get_method

#: The precisions ``--dtype`` takes.
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def contexts(tokenizer, n: int, length: int) -> list[torch.Tensor]:
    """``n`` spans of ``length`` tokens from different packaged plays."""
    out = []
    for path in text_files(None)[: n * 3 : 3]:
        ids = tokenizer.encode(path.read_text(encoding="utf-8", errors="replace")[20000:60000])
        out.append(torch.tensor([ids[:length]]))
    return out[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="target LM (default: %(default)s)")
    parser.add_argument("--contexts", type=int, default=5, help="contexts timed (default 5)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per context (default 512)")
    parser.add_argument("--slots", type=int, default=128, help="memory slots of every method (default 128)")
    parser.add_argument(
        "--layers", type=int, default=3, help="layers of the former (default 3, the paper's; the shipped one has 1)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timings per context and method (default 3)")
    parser.add_argument(
        "--dtype",
        choices=sorted(COMPUTE_DTYPES),
        default="float32",
        help="precision the LM and every method compute in (default float32; bfloat16 as on a GPU)",
    )
    parser.add_argument(
        "--quantize",
        choices=["none", "float16"],
        default="none",
        help="the LM's weights while timed: none (as --dtype) or float16 linear layers (ccmem.quantize; needs "
        "float32). FLOPs are counted with float32 layers either way: packed ones do the same products",
    )
    parser.add_argument("--out", help="write the result as JSON to this file")
    args = parser.parse_args()

    if args.quantize != "none" and args.dtype != "float32":
        parser.error("--quantize packs float32 weights; drop --dtype")
    torch.set_grad_enabled(False)
    lm = load_model(args.model, dtype=COMPUTE_DTYPES[args.dtype])
    methods = {
        "icformer": get_method(
            "icformer", num_query_tokens=args.slots, num_hidden_layers=args.layers, max_seq_len=args.tokens
        ),
        "ccm-concat": get_method("ccm-concat", n_tok=args.slots, max_chunk_tokens=args.tokens),
        "gist": get_method("gist", n_tok=args.slots),
    }
    spans = contexts(lm.tokenizer, args.contexts, args.tokens)

    def add(method: Method, span: torch.Tensor) -> None:
        with method.attached(lm):  # the <COMP> methods' gated LoRA is hooked in for the scope
            method.add(lm, method.new_memory(lm), span)

    former = methods["icformer"]
    steps: dict[str, Callable[[torch.Tensor], object]] = {name: partial(add, m) for name, m in methods.items()}
    steps["icformer-digests"] = lambda span: former.soft_prompt(lm, span)  # type: ignore[attr-defined]
    times: dict[str, list[float]] = {name: [] for name in steps}
    flops: dict[str, float] = {}
    for name, step in steps.items():  # warm-up and FLOPs
        step(spans[0])
        counter = FlopCounterMode(display=False)
        with counter:
            step(spans[0])
        flops[name] = counter.get_total_flops() / spans[0].shape[1]
    if args.quantize != "none":  # the FLOPs above were counted on float layers, which the counter sees
        quantize_weights(lm, args.quantize)
        for step in steps.values():  # warm-up of the packed kernels
            step(spans[0])
    for span in spans:
        for name, step in steps.items():
            runs = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                step(span)
                runs.append(time.perf_counter() - start)
            times[name].append(min(runs))
    base = statistics.median(times["icformer"])
    rows = {
        name: {
            "seconds": round(statistics.median(t), 4),
            "times_icformer": round(statistics.median(t) / base, 2),
            "times_icformer_digests": round(statistics.median(t) / statistics.median(times["icformer-digests"]), 1),
            "gflops_per_context_token": round(flops[name] / 1e9, 4),
            "flops_vs_icformer": round(flops[name] / flops["icformer"], 2),
            "flops_vs_icformer_digests": round(flops[name] / flops["icformer-digests"], 1),
        }
        for name, t in times.items()
    }
    result = {
        "model": lm.name,
        "contexts": len(spans),
        "tokens": args.tokens,
        "slots": args.slots,
        "former_layers": args.layers,
        "repeats": args.repeats,
        "dtype": args.dtype,
        "weights": lm.quantized or args.dtype,
        "threads": torch.get_num_threads(),
        "methods": rows,
    }
    print(f"{'method':<18}{'seconds':>9}{'x add':>7}{'x digests':>11}{'GFLOPs/token':>14}{'FLOPs x add':>13}")
    for name, row in rows.items():
        print(
            f"{name:<18}{row['seconds']:>9.3f}{row['times_icformer']:>7.2f}{row['times_icformer_digests']:>11.1f}"
            f"{row['gflops_per_context_token']:>14.4f}{row['flops_vs_icformer']:>13.2f}"
        )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
