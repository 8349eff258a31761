"""How much of a context an IC-Former's digests keep: the frozen LM writes the context back from the digests and
the AE marker (``ccmem.eval.autoencode``), for untrained formers (the paper's layout and ccmem's ``locality``
start) and trained ones, on the same texts.

    python benchmarks/icformer_autoencode.py --adapter runs/icformer-pretrain/adapter.safetensors
    python benchmarks/icformer_autoencode.py --adapter A.safetensors --adapter B.safetensors --texts 8 --tokens 512
    python benchmarks/icformer_autoencode.py --tokens 512 --no-greedy      # teacher-forced scores only (fast)

Texts are spans of the packaged plays' test split (documents never trained on; ``ccmem.data.text``), cut to
``--tokens`` tokens. Teacher-forced: loss and accuracy of each token after the digests, the AE marker and the
true earlier tokens (one forward); greedy: the reconstruction written token by token, as long as the context.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import ccmem
from ccmem.data import text
from ccmem.eval.autoencode import autoencode
from ccmem.loading import DEFAULT_MODEL, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--adapter", action="append", default=[], help="a trained icformer adapter (icformer-pretrain's); repeatable"
    )
    parser.add_argument("--no-greedy", action="store_true", help="teacher-forced scores only (skips the slow part)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--texts", type=int, default=4, help="texts reconstructed by each former")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per text")
    parser.add_argument("--out", type=Path, default=Path("results/icformer/autoencode.json"))
    args = parser.parse_args()
    lm = load_model(args.model)
    texts = []
    for example in text.examples(args.texts, "test", context_chars=args.tokens * 8, answer_chars=50):
        ids = lm.tokenizer.encode("".join(example.context), add_special_tokens=False)[: args.tokens]
        texts.append(str(lm.tokenizer.decode(ids)))
    rows = []
    formers: list[tuple[str, str | None, dict[str, bool]]] = [
        ("untrained, paper layout", None, {"locality": False}),
        ("untrained, locality", None, {"locality": True}),
    ]
    formers += [("trained", adapter, {}) for adapter in args.adapter]
    for label, adapter, options in formers:
        started = time.perf_counter()
        if adapter is None:  # built directly: ccmem.load would pick up the former that ships for this model
            torch.manual_seed(0)
            method = ccmem.get_method("icformer", **options)
        else:
            method = ccmem.load(lm, "icformer", adapter=adapter, system_prompt=None).method
        scores = autoencode(lm, method, texts, greedy=not args.no_greedy)
        scores.pop("rows")
        rows.append(
            {"former": label, "adapter": str(adapter), **scores, "seconds": round(time.perf_counter() - started)}
        )
        print(json.dumps(rows[-1]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "tokens": args.tokens, "data": "packaged plays, test split",
                                    "rows": rows}, indent=2) + "\n")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
