"""The one decoding loop: token ids one at a time, reading a query with a memory, calling the method each step.

Chat, the server, evaluation and tests all generate through :func:`decode`, so a method's
:meth:`~ccmem.methods.base.Method.decode_step` (evict, compress a finished segment) runs wherever text is
generated. The memory itself is never changed: the loop works on a copy in a transformers cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ccmem.loading import LoadedModel
from ccmem.memory import Memory
from ccmem.methods.base import DecodeState, Method, positions


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked: greedy (``temperature=0``) or sampled with nucleus ``top_p``."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be 0 (greedy) or positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (the probability mass sampled from), got {self.top_p}")

    def pick(self, logits: torch.Tensor, generator: torch.Generator) -> int:
        if self.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < self.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=generator))


def decode(
    lm: LoadedModel,
    method: Method,
    memory: Memory,
    query: torch.Tensor,
    max_new_tokens: int,
    *,
    sampling: Sampling = Sampling(),
    stop_ids: set[int] = frozenset(),  # type: ignore[assignment]
) -> Iterator[int]:
    """Yield generated token ids one by one after reading ``query`` (``[1, n]``) with ``memory``.

    The method is attached for each model call only (and not at all if it does not change reading), so a
    generator left half-consumed never leaves hooks on the model. Generation stops after a token in
    ``stop_ids`` (which is yielded) or ``max_new_tokens``.
    """
    generator = torch.Generator(device=lm.device)
    if sampling.seed is not None:
        generator.manual_seed(sampling.seed)
    state = DecodeState(cache=memory.to_cache(), position=memory.next_position, memory=memory, tokens=[])
    inputs = query
    for _ in range(max_new_tokens):
        with torch.no_grad(), method.attached(lm, reading=True):
            out = lm.model(
                input_ids=inputs,
                cache=state.cache,
                position_ids=positions(state.position, inputs.shape[1], lm.device),
                use_cache=True,
                logits_to_keep=1,
            )
            state.position += inputs.shape[1]
            token = sampling.pick(out.logits[0, -1], generator)
            state.tokens.append(token)
            method.decode_step(lm, state)
        yield token
        if token in stop_ids:
            return
        inputs = torch.tensor([[token]], device=lm.device)
