"""What a learned CCM-merge gate weighs: the share of the merged memory each turn of a dialog ends up with.

For held-out dialogs (``ccmem.data.dialogs``, the test split: facts among small talk, unseen wordings and kinds),
fold each exchange into a ``ccm-merge`` memory trained with ``weighting=learned`` (the API's ``remember``, as a
chat does) and read each turn's final weight from the running log-normaliser the memory carries:
``w_i = exp(s_i - log sum_j exp(s_j))``, per layer, head and slot, then averaged over them. The paper's running mean
gives every one of ``T`` turns ``1/T``; the report gives ``T·w`` (1.0 = the mean's weight) for turns that state or
correct a fact and for small-talk turns, and by position in the dialog (first, middle, last thirds); and how sharp
the single softmaxes are: the effective number of turns each merged slot holds, and per layer how much more than
their share the sharpest head and slot gives the fact turns.

Run:

    python benchmarks/merge_weights.py --adapter runs/merge8g/adapter.safetensors
    python benchmarks/merge_weights.py --adapter A --n 50 --turns 20 --out results/general/merge-weights.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import ccmem
from ccmem.data import dialogs
from ccmem.loading import DEFAULT_MODEL


def all_weights(norms: list[torch.Tensor]) -> torch.Tensor:
    """``[T, ...]`` final weight of each turn in every merged softmax (layer, batch, head, slot), from the
    log-normaliser after each turn (``norms[t]``: ``log sum_{i<=t} exp(s_i)``): ``s_t = N_t + log(1 - exp(N_{t-1} -
    N_t))``."""
    n = torch.stack([x.double() for x in norms])  # [T, ...]
    scores = n.clone()
    scores[1:] = n[1:] + torch.log1p(-torch.exp(n[:-1] - n[1:]).clamp(max=1 - 1e-12))
    return torch.exp(scores - n[-1])


def sharpness(weights: torch.Tensor, facts: list[bool]) -> tuple[list[float], float]:
    """Per layer, the weight the fact turns get over their share of the turns (1.0: no preference), the best head
    and slot of the layer; and the median over all softmaxes of the effective number of turns, ``exp(entropy)``
    (``T``: the mean; 1: one turn). ``weights``: ``[T, layers, batch, heads, slots]`` (:func:`all_weights`)."""
    fact = torch.tensor(facts)
    lift = weights[fact].sum(0) / fact.double().mean()  # [layers, batch, heads, slots]
    entropy = -(weights * weights.clamp_min(1e-300).log()).sum(0)
    return lift.flatten(1).max(1).values.tolist(), float(entropy.exp().median())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="a ccm-merge adapter trained with weighting=learned")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the model the adapter was trained for")
    parser.add_argument("--n", type=int, default=30, help="dialogs to fold (default 30)")
    parser.add_argument("--turns", type=int, default=20, help="turns per dialog (default 20)")
    parser.add_argument("--facts", default="3-5", help="facts per dialog, MIN-MAX (default 3-5)")
    parser.add_argument("--seed", type=int, default=0, help="dialog generator seed (default 0, the eval's draws)")
    parser.add_argument("--out", type=Path, help="also write the rows and the summary as JSON here")
    args = parser.parse_args()
    low, _, high = args.facts.partition("-")
    session = ccmem.load(args.model, "ccm-merge", adapter=args.adapter, system_prompt="You are a helpful assistant.")
    if getattr(session.method, "weighting", "mean") != "learned":
        parser.error(f"{args.adapter} was trained with weighting={session.method.weighting!r}: every turn weighs 1/T")
    if getattr(session.method, "banks", 1) != 1:
        parser.error(f"{args.adapter} merges into {session.method.banks} banks; this benchmark reads a single one")
    chatter = {user for user, _ in dialogs.small_talk()}
    start = session.memory
    rows = []
    for dialog in dialogs.generate(
        args.n, "test", seed=args.seed, facts=(int(low), int(high or low)), turns=(args.turns, args.turns)
    ):
        session.memory, norms = start, []
        for user, reply in dialog.turns:
            session.remember(user, reply)
            norms.append(session.memory.state["merge_log_norm"])
        every = all_weights(norms)  # [T, layers, batch, heads, slots]
        weights = (every.flatten(1).mean(1) * len(norms)).tolist()  # averaged; 1.0 = the running mean's 1/T
        facts = [user not in chatter for user, _ in dialog.turns]
        best_lift, effective = sharpness(every, facts) if any(facts) else ([], float("nan"))
        rows.append(
            {
                "id": dialog.id,
                "weights": weights,
                "fact_turns": [i for i, f in enumerate(facts) if f],
                "best_head_fact_lift_by_layer": best_lift,
                "effective_turns": effective,
            }
        )
        said = [round(w, 2) for w, f in zip(weights, facts, strict=True) if f]
        talk_mean = statistics.fmean([w for w, f in zip(weights, facts, strict=True) if not f] or [0])
        print(f"{dialog.id}: fact turns {said}, small talk mean {talk_mean:.2f}")
    fact = [w for r in rows for i, w in enumerate(r["weights"]) if i in r["fact_turns"]]
    talk = [w for r in rows for i, w in enumerate(r["weights"]) if i not in r["fact_turns"]]
    thirds = {
        name: statistics.fmean(w for r in rows for i, w in enumerate(r["weights"]) if part(i, len(r["weights"])))
        for name, part in (
            ("first third", lambda i, t: i < t / 3),
            ("middle third", lambda i, t: t / 3 <= i < 2 * t / 3),
            ("last third", lambda i, t: i >= 2 * t / 3),
        )
    }
    summary = {
        "adapter": session.method.adapter_hash,
        "dialogs": len(rows),
        "turns": args.turns,
        "fact_turn_weight": statistics.fmean(fact),
        "small_talk_weight": statistics.fmean(talk),
        "fact_over_small_talk": statistics.fmean(fact) / statistics.fmean(talk),
        **{f"{k}_weight": v for k, v in thirds.items()},
        # how far the sharpest head of each layer leans to the fact turns (1.0: not at all), mean over dialogs
        "best_head_fact_lift_by_layer": [
            round(statistics.fmean(layer), 3)
            for layer in zip(*(r["best_head_fact_lift_by_layer"] for r in rows), strict=True)
        ],
        "effective_turns_median": statistics.median(r["effective_turns"] for r in rows),
    }
    print(
        f"\nT·weight (1.0 = the running mean): fact turns {summary['fact_turn_weight']:.2f} ({len(fact)}), "
        f"small talk {summary['small_talk_weight']:.2f} ({len(talk)}), ratio {summary['fact_over_small_talk']:.2f}; "
        + ", ".join(f"{k} {v:.2f}" for k, v in thirds.items())
    )
    lifts = summary["best_head_fact_lift_by_layer"]
    print(
        f"effective turns per merged slot (median; {args.turns} = the mean): {summary['effective_turns_median']:.1f}; "
        f"the sharpest head's fact lift per layer: max {max(lifts):.2f} (layer {lifts.index(max(lifts))}), "
        f"median {statistics.median(lifts):.2f}"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
