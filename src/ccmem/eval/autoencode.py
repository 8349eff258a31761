"""How well an IC-Former's digests keep their context: the frozen LM writes the context back from the digests
and the AE marker (what ``icformer-pretrain`` trains), and the result is compared with the original.

Per text: the share of positions where the reconstruction has the original token (``token_accuracy``), whether
it is exact, and ROUGE-L of the decoded texts; the means over texts in one summary row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ccmem.eval.textmetrics import rouge_l
from ccmem.loading import LoadedModel
from ccmem.methods.base import Method


def autoencode(lm: LoadedModel, method: Method, texts: Sequence[str]) -> dict[str, Any]:
    """Reconstruction scores of ``texts`` (each cut to the method's ``max_seq_len`` tokens) for a method that can
    write its context back (``reconstruct``: IC-Former's AE marker)."""
    reconstruct = getattr(method, "reconstruct", None)
    if reconstruct is None:
        raise ValueError(f"method {method.name!r} cannot write its context back: autoencoding needs an AE objective")
    if not texts:
        raise ValueError("autoencoding needs at least one text")
    limit = int(getattr(method, "max_seq_len", 0)) or None
    rows = []
    for text in texts:
        ids = [int(t) for t in lm.tokenizer.encode(text, add_special_tokens=False)][:limit]
        if not ids:
            raise ValueError(f"text {text[:40]!r} has no tokens to reconstruct")
        out = reconstruct(lm, torch.tensor([ids], device=lm.device))
        decoded, original = str(lm.tokenizer.decode(out)), str(lm.tokenizer.decode(ids))
        rows.append(
            {
                "tokens": len(ids),
                "token_accuracy": sum(a == b for a, b in zip(out, ids, strict=True)) / len(ids),
                "exact": out == ids,
                "rouge_l": rouge_l(decoded, original),
            }
        )
    n = len(rows)
    return {
        "texts": n,
        "token_accuracy": sum(r["token_accuracy"] for r in rows) / n,
        "exact": sum(r["exact"] for r in rows) / n,
        "rouge_l": sum(r["rouge_l"] for r in rows) / n,
        "digests": getattr(method, "num_query_tokens", None),
        "rows": rows,
    }
