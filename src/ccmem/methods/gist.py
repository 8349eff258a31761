"""Gisting (Mu et al., NeurIPS 2023, arXiv:2304.08467): the whole context compressed once into gist tokens.

The baseline CCM builds on: one <COMP> block after the *entire* context, no recurrence. In a growing
interaction each ``add`` therefore recompresses everything seen so far (kept in ``Memory.state`` as
``context_ids``, which is not key/value memory), which costs a pass over the whole history per turn but keeps
memory at ``n_tok`` slots. Trained with the same recipe as CCM (the reference's ``comp_type fixed``): the
parallel layout is CCM's with the whole context as one chunk.

On an encoder-decoder model (T5; the fork's ``gist_t5``) the gist tokens follow the context in the *encoder*
input, as in the paper's T5 experiments: the context reads itself in full, the gist tokens read it, and the
query and the decoder read only the sink and the gist positions (the context's raw encoder states are dropped).
The encoder side is CCM's (:mod:`ccmem.methods.ccm_seq2seq`) with one <COMP> block after the whole context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ccmem.data.samples import Sample
from ccmem.loading import LoadedModel
from ccmem.memory import Memory, concat_layers, concat_positions
from ccmem.methods import ccm_seq2seq
from ccmem.methods.base import ContextTooLongError, check_context_ids
from ccmem.methods.ccm import CompTokens, ParallelBatch, lay_out
from ccmem.registry import register


@register
@dataclass
class Gist(CompTokens):
    """Gist tokens: ``n_tok`` <COMP> slots summarising the whole context at once."""

    name: ClassVar[str] = "gist"
    paper: ClassVar[str] = "Mu et al., Learning to Compress Prompts with Gist Tokens, NeurIPS 2023"
    #: On T5-family models the gist tokens go into the encoder, after the context.
    encoder_decoder: ClassVar[bool] = True
    # CompTokens' without max_chunk_tokens, an option gist has not (it reads its context at once)
    runtime_options: ClassVar[frozenset[str]] = frozenset({"lora_dropout"})

    def positions_needed(self, memory: Memory, n_tokens: int) -> int:
        # The context restarts right after the sink each time; only the first add places the gist tokens.
        return n_tokens + (0 if "context_ids" in memory.state else self.n_tok)

    def positions_fix(self) -> str:
        return (
            "gist reads the whole context again at every add, so adding it in parts cannot help: a shorter context, "
            "fewer gist tokens (a smaller n_tok), a new conversation (Python: reset()), or a method that compresses "
            "turn by turn (ccm-concat, ccm-merge)"
        )

    def check_memory(self, memory: Memory) -> None:
        check_context_ids(memory, lambda n: self.n_tok)

    def add(self, lm: LoadedModel, memory: Memory, ids: torch.Tensor) -> Memory:
        return self.add_batch(lm, [memory], [ids])[0]

    def add_batch(self, lm: LoadedModel, memories: list[Memory], ids: list[torch.Tensor]) -> list[Memory]:
        if len(memories) != len(ids):
            raise ValueError(f"{len(memories)} memories but {len(ids)} id sequences")
        contexts = [self._context(memory, new) for memory, new in zip(memories, ids, strict=True)]
        for memory, context in zip(memories, contexts, strict=True):
            self._check_positions(lm, memory.sink, int(context.shape[-1]))
        if lm.is_encoder_decoder:  # one interaction at a time
            return [self._add_encoder(lm, m, c) for m, c in zip(memories, contexts, strict=True)]
        bases = []
        for memory in memories:
            # The sink occupies positions 0..sink-1, so the context always starts right after it.
            base = memory.prefix(memory.sink)
            bases.append(base.with_layers(base.layers, base.positions, next_position=memory.sink))
        out = []
        for base, context, comp in zip(bases, contexts, self.compress_batch(lm, bases, contexts), strict=True):
            start = base.sink + context.shape[-1]
            out.append(
                base.with_layers(
                    concat_layers([base.layers, comp]),
                    concat_positions([base.positions, self.comp_positions(comp, start)]),
                    next_position=start + self.n_tok,
                    state={"context_ids": context},
                )
            )
        return out

    def _check_positions(self, lm: LoadedModel, sink: int, context: int) -> None:
        """Gist re-reads the whole context after the sink at every add, so moving the memory's slots to lower
        positions (what lets other methods go on past the model's limit) cannot make room: refuse instead."""
        limit = None if lm.is_encoder_decoder else lm.max_positions
        needed = sink + context + self.n_tok
        if limit is not None and needed > limit:
            raise ContextTooLongError(
                f"gist reads the whole context again at every add: the sink ({sink}), the {context} tokens of context "
                f"so far and {self.n_tok} gist tokens need {needed} positions, but the model allows "
                f"{limit}; start a new conversation (Python: reset()), or use a method that compresses turn by turn "
                "(ccm-concat, ccm-merge)",
                positions=limit,
            )

    @staticmethod
    def _context(memory: Memory, new: torch.Tensor) -> torch.Tensor:
        """Everything added so far after the sink: what the gist tokens summarise (again) this time."""
        previous = memory.state.get("context_ids")
        return new if previous is None else torch.cat([previous.to(new.device), new], dim=-1)

    def _add_encoder(self, lm: LoadedModel, memory: Memory, context: torch.Tensor) -> Memory:
        """Encoder-decoder: the whole context and the gist tokens in one encoder step after the sink; the memory
        keeps the gist tokens' encoder keys/values and final hidden states (``encoder_out``) after the sink's."""
        ccm_seq2seq.check_encoder_decoder(lm, self.name)
        sink = memory.sink
        held = ccm_seq2seq.encoder_out(memory)
        sink_out = held[:, :sink] if held is not None and sink else None
        base = memory.prefix(sink)
        comp, hidden = ccm_seq2seq.compress_step(self, lm, base, context, sink)
        start = sink + context.shape[-1]
        out = hidden if sink_out is None else torch.cat([sink_out.to(hidden.dtype), hidden], dim=1)
        return base.with_layers(
            concat_layers([base.layers, comp]),
            concat_positions([base.positions, self.comp_positions(comp, start)]),
            next_position=start + self.n_tok,
            state={"context_ids": context, ccm_seq2seq.ENCODER_OUT: out},
        )

    def lay_out(self, samples: list[Sample], pad_id: int, *, bidirectional: bool = False) -> ParallelBatch:
        whole = [Sample([[t for c in s.chunks for t in c]], s.tail, s.sink, s.answer_start) for s in samples]
        return lay_out(whole, pad_id, n_tok=self.n_tok, update="concat", recurrent=True, bidirectional=bidirectional)

    def sample_length(self, sample: Sample) -> int:
        return len(sample.tokens) + self.n_tok
