"""The case list every contract test runs over: one line per method (with the options it is tested with).

Adding a method to ccmem means adding its line here; ``test_every_registered_method_has_a_case`` fails until
then. ``growth`` is what ``add`` must do to the memory: the slots beyond the sink after each chunk of
:data:`CHUNKS` is added (5, 4 and 3 tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CHUNKS = [[10, 11, 12, 13, 14], [20, 21, 22, 23], [30, 31, 32]]


@dataclass(frozen=True)
class Case:
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    growth: tuple[int, ...] = ()

    @property
    def id(self) -> str:
        return self.method + "".join(f"-{k}={v}" for k, v in self.options.items())


CASES = [
    Case("full", growth=(5, 9, 12)),
    Case("none", growth=(0, 0, 0)),
    Case("ccm-concat", {"n_tok": 3}, growth=(3, 6, 9)),
    Case("ccm-concat", {"n_tok": 2, "recurrent": False}, growth=(2, 4, 6)),
    Case("ccm-merge", {"n_tok": 3}, growth=(3, 3, 3)),  # constant as turns grow
    Case("ccm-merge", {"n_tok": 3, "weighting": "learned"}, growth=(3, 3, 3)),  # steps weighed by a learned gate
    Case("ccm-merge", {"n_tok": 2, "banks": 2}, growth=(2, 4, 4)),  # two banks of 2 slots, then constant
    # the latest chunk's last 3 (4) raw tokens beside the compressed slots: 2+3, 4+3, 6+3 and 2+4, 4+4, 4+3
    Case("ccm-concat", {"n_tok": 2, "recent": 3}, growth=(5, 7, 9)),
    Case("ccm-merge", {"n_tok": 2, "banks": 2, "recent": 4}, growth=(6, 8, 7)),
    # Tokens with a digit kept raw: CHUNKS hold none (ids 51-60 are the tiny tokenizer's digits), so concat's growth;
    # test_ccm_equivalence.py checks chunks that hold some.
    Case("ccm-concat", {"n_tok": 2, "keep": "digits"}, growth=(2, 4, 6)),
    # Context is compressed as by ccm-concat; its own policies act while it generates (tests/methods/test_reasoning.py).
    Case("ccm-reason", {"n_tok": 3, "policy": "interval", "interval": 2}, growth=(3, 6, 9)),
    Case("gist", {"n_tok": 3}, growth=(3, 3, 3)),
    # IC-Former: the whole context so far -> num_query_tokens digests per chunk, then the FT marker.
    Case("icformer", {"num_query_tokens": 3, "num_hidden_layers": 2}, growth=(4, 4, 4)),
    # Chunks of <= 4 tokens: 5 -> 2 chunks, 9 -> 3, 12 -> 3 (equal cuts of 4).
    Case("icformer", {"num_query_tokens": 2, "use_chunk": True, "max_chunk_len": 4}, growth=(5, 7, 7)),
    # Training-free eviction at half the context: floor(0.5 * 5), floor(0.5 * 9), floor(0.5 * 12) entries.
    Case("streaming-llm", {"ratio": 0.5}, growth=(2, 4, 6)),
    Case("h2o", {"ratio": 0.5}, growth=(2, 4, 6)),
    Case("h2o", {"ratio": 0.5, "recent": 2}, growth=(2, 4, 6)),
    Case("snapkv", {"ratio": 0.5, "window_size": 2}, growth=(2, 4, 6)),
    Case("tova", {"ratio": 0.5}, growth=(2, 4, 6)),
    Case("knorm", {"ratio": 0.5}, growth=(2, 4, 6)),
    Case("expected-attention", {"ratio": 0.5, "n_future_positions": 16}, growth=(2, 4, 6)),
    Case("knorm", {"max_slots": 16}, growth=(4, 4, 4)),  # a slot cap: 16 slots in all, 12 of them the sink
    # Ren et al.'s three sparse methods at compression ratio 0.5 keep 5 - 2, 9 - 4, 12 - 6 entries of the context.
    Case("sentinel", {"compression_ratio": 0.5}, growth=(3, 5, 6)),
    # Whole sentences overshoot by less than one sentence (each chunk is one here) and the next add makes it up.
    Case("sentinel", {"compression_ratio": 0.5, "spans": "sentence"}, growth=(1, 5, 6)),
    Case("local", {"compression_ratio": 0.5}, growth=(3, 5, 6)),
    Case("scattered", {"compression_ratio": 0.5}, growth=(3, 5, 6)),
]


def cases(**flags: bool) -> list[Any]:
    """pytest params of the cases whose method has the given capability flags (e.g. ``trainable=True``)."""
    import pytest

    from ccmem.registry import method_class

    chosen = [c for c in CASES if all(getattr(method_class(c.method), k) == v for k, v in flags.items())]
    return [pytest.param(c, id=c.id) for c in chosen]
