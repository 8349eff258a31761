"""Training throughput: one masked forward per batch (parallel) vs compressing step by step (recurrent).

Both compute the same loss and gradients (tests/methods/test_ccm_equivalence.py); this measures what the
parallel form saves, on the same samples, in one run, and prints the ratio. The recurrent form takes one
dialog at a time, so parallel is also timed at batch 1: that ratio is what the single masked forward saves
without the help of batching. Run:

    python benchmarks/train_throughput.py                       # SmolLM2-135M, ccm-concat, 32 persona dialogs
    python benchmarks/train_throughput.py --method ccm-merge --samples 16
    python benchmarks/train_throughput.py --device cuda --dtype bfloat16   # on a GPU (benchmarks/gpu.sh)
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ccmem.data.loaders import load_examples
from ccmem.data.records import to_sample
from ccmem.loading import DEFAULT_MODEL, load_model
from ccmem.registry import get_method
from ccmem.train.config import DataConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model to train (default: %(default)s)")
    parser.add_argument("--method", default="ccm-concat", choices=["ccm-concat", "ccm-merge"])
    parser.add_argument("--samples", type=int, default=32, help="persona training dialogs timed by both (default 32)")
    parser.add_argument("--batch-size", type=int, default=8, help="parallel batch size (default 8)")
    parser.add_argument("--k", type=int, default=3, help="most facts per dialog (default 3)")
    parser.add_argument("--small-talk", type=int, default=2, help="most small-talk turns per dialog (default 2)")
    parser.add_argument("--device", default="cpu", help="where the model trains: cpu or cuda (default: cpu)")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="the model's weights (default: float32)"
    )
    parser.add_argument("--out", help="append the result as a JSON line to this file")
    args = parser.parse_args()

    lm = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    on_gpu = lm.device.type == "cuda"
    method = get_method(args.method)
    for p in lm.model.parameters():
        p.requires_grad_(False)
    params = list(method.module_for(lm).parameters())  # type: ignore[union-attr]
    for p in params:
        p.requires_grad_(True)
    examples = load_examples(DataConfig(n_train=args.samples, k=args.k, small_talk=args.small_talk), "train")
    samples = [to_sample(lm.tokenizer, e, system="You are a helpful assistant.") for e in examples]
    tokens = sum(method.sample_length(s) for s in samples)
    pad = lm.tokenizer.pad_token_id or 0

    def parallel(batch_size: int) -> None:
        for i in range(0, len(samples), batch_size):
            loss = method.training_loss(lm, method.make_batch(samples[i : i + batch_size], pad))  # type: ignore[attr-defined]
            loss.backward()

    def recurrent() -> None:
        for s in samples:
            method.recurrent_loss(lm, s).backward()  # type: ignore[attr-defined]

    # The recurrent form runs one dialog at a time; "parallel_batch1" isolates what one masked forward saves
    # from what batching dialogs together saves.
    runs = [("parallel", lambda: parallel(args.batch_size))]
    if args.batch_size > 1:
        runs.append(("parallel_batch1", lambda: parallel(1)))
    runs.append(("recurrent", recurrent))
    results = {}
    for name, run in runs:
        method.training_loss(lm, method.make_batch(samples[:2], pad)).backward()  # type: ignore[attr-defined]  # warm-up
        if on_gpu:
            torch.cuda.synchronize()  # the warm-up's kernels are not this run's time
        started = time.perf_counter()
        run()
        if on_gpu:
            torch.cuda.synchronize()  # a backward returns before its kernels finish
        seconds = time.perf_counter() - started
        results[name] = {"seconds": round(seconds, 2), "tokens_per_second": round(tokens / seconds, 1)}
        print(f"{name:>9}: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.0f} tokens/s", flush=True)
    recurrent_tps = results["recurrent"]["tokens_per_second"]
    ratio = results["parallel"]["tokens_per_second"] / recurrent_tps
    print(
        f"parallel / recurrent throughput: {ratio:.1f}x ({args.method}, {args.model}, {len(samples)} dialogs, "
        f"batch {args.batch_size}, {lm.device} {args.dtype}"
        f"{'' if on_gpu else f', {torch.get_num_threads()} threads'})"
    )
    if "parallel_batch1" in results:
        print(f"parallel (batch 1) / recurrent: {results['parallel_batch1']['tokens_per_second'] / recurrent_tps:.1f}x")
    if args.out:
        row = {
            "benchmark": "train_throughput",
            "model": args.model,
            "method": args.method,
            "samples": len(samples),
            "batch_size": args.batch_size,
            "device": torch.cuda.get_device_name(lm.device) if on_gpu else "cpu",
            "dtype": args.dtype,
            "tokens": tokens,
            **results,
            "ratio": round(ratio, 2),
        }
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
