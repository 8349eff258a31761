"""How well an IC-Former's digests keep their context: the frozen LM writes the context back from the digests
and the AE marker (what ``icformer-pretrain`` trains), and the result is compared with the original.

Per text: the share of positions where the reconstruction has the original token (``token_accuracy``), whether
it is exact, and ROUGE-L of the decoded texts; and, teacher-forced (one forward over ``[digests][AE][context]``,
where a greedy reconstruction that goes wrong once stays wrong), the cross-entropy of the context's tokens
(``forced_loss``, nats per token) and the share the LM predicts right (``forced_accuracy``). The means over
texts in one summary row. ``greedy=False`` skips the (slow, token by token) reconstruction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.nn import functional as F

from ccmem.eval.textmetrics import rouge_l
from ccmem.loading import LoadedModel
from ccmem.methods.base import Method


def autoencode(lm: LoadedModel, method: Method, texts: Sequence[str], *, greedy: bool = True) -> dict[str, Any]:
    """Reconstruction scores of ``texts`` (each cut to the method's ``max_seq_len`` tokens) for a method that can
    write its context back (``reconstruct`` and ``reconstruction_logits``: IC-Former's AE marker)."""
    reconstruct = getattr(method, "reconstruct", None)
    forced = getattr(method, "reconstruction_logits", None)
    if reconstruct is None or forced is None:
        raise ValueError(f"method {method.name!r} cannot write its context back: autoencoding needs an AE objective")
    if not texts:
        raise ValueError("autoencoding needs at least one text")
    limit = int(getattr(method, "max_seq_len", 0)) or None
    rows = []
    for text in texts:
        ids = [int(t) for t in lm.tokenizer.encode(text, add_special_tokens=False)][:limit]
        if not ids:
            raise ValueError(f"text {text[:40]!r} has no tokens to reconstruct")
        context = torch.tensor([ids], device=lm.device)
        with torch.no_grad():
            logits = forced(lm, context).float()
        target = context[0]
        row: dict[str, Any] = {
            "tokens": len(ids),
            "forced_loss": float(F.cross_entropy(logits, target)),
            "forced_accuracy": float((logits.argmax(-1) == target).float().mean()),
        }
        if greedy:
            out = reconstruct(lm, context)
            decoded, original = str(lm.tokenizer.decode(out)), str(lm.tokenizer.decode(ids))
            row["token_accuracy"] = sum(a == b for a, b in zip(out, ids, strict=True)) / len(ids)
            row["exact"] = out == ids
            row["rouge_l"] = rouge_l(decoded, original)
        rows.append(row)
    n = len(rows)
    keys = ["forced_loss", "forced_accuracy"] + (["token_accuracy", "exact", "rouge_l"] if greedy else [])
    return {
        "texts": n,
        **{key: sum(float(r[key]) for r in rows) / n for key in keys},
        "digests": getattr(method, "num_query_tokens", None),
        "rows": rows,
    }
