"""Training throughput with ``train.group_by_length`` off and on: the same dialogs, one epoch each, in one run.

Batches of dialogs of mixed lengths are padded to their longest; grouping dialogs of similar length
(transformers' LengthGroupedSampler) computes less padding. Both runs train on exactly the same dialogs
(``data.n_train`` = steps x batch size), so they see the same real tokens, and this prints the tokens/s of
each, the share of padding, and the ratio. Run:

    python benchmarks/length_grouping.py                      # persona-ccm-concat, 24 steps of 8 dialogs
    python benchmarks/length_grouping.py --preset persona-ccm-merge --steps 12
"""

from __future__ import annotations

import argparse
import json
import tempfile

from ccmem.train.config import load_config
from ccmem.train.trainer import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="persona-ccm-concat", help="training preset (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps per run (default 24)")
    parser.add_argument("--out", help="append the result as a JSON line to this file")
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for grouped in (False, True):
            config = load_config(
                args.preset,
                [
                    f"output_dir={tmp}",
                    f"run_id=grouped-{grouped}",
                    f"data.n_train={args.steps * 8}",
                    "data.n_eval=8",
                    "train.batch_size=8",
                    f"train.max_steps={args.steps}",
                    f"train.eval_steps={args.steps}",
                    f"train.save_steps={args.steps}",
                    "train.patience=0",
                    f"train.group_by_length={grouped}",
                ],
            )
            train(config)
            summary = json.loads((config.run_dir / "summary.json").read_text())
            name = "grouped" if grouped else "random"
            results[name] = {k: summary[k] for k in ("tokens_this_session", "tokens_per_second", "padding_fraction")}
            print(
                f"{name:>8}: {summary['tokens_per_second']:.0f} tokens/s, "
                f"{summary['padding_fraction']:.0%} of the computed positions were padding",
                flush=True,
            )
    ratio = results["grouped"]["tokens_per_second"] / results["random"]["tokens_per_second"]
    print(f"group_by_length / random order: {ratio:.2f}x tokens/s ({args.preset}, {args.steps} steps of 8 dialogs)")
    if args.out:
        row = {"benchmark": "length_grouping", "preset": args.preset, "steps": args.steps, **results}
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row | {"ratio": round(ratio, 2)}) + "\n")


if __name__ == "__main__":
    main()
