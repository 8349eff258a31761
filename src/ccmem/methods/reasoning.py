"""Reasoning compression (the CCM fork for GSM8K): while the model writes its solution, each finished step is
compressed into <COMP> keys/values and its raw keys/values are dropped.

A *policy* says where a step ends: every ``interval`` tokens (CCM's fixed chunks), at line ends (the fork's
baseline), or where a small classifier on the LM's last hidden state says so with probability above
``threshold`` (the fork's learned placement). When it fires after a token (and the step holds at least
``min_segment`` tokens), the ``n_tok`` <COMP> tokens are fed with the conditional LoRA on, the step's raw
entries leave the cache, and the next token is predicted from the last <COMP> token, exactly as training lays
it out: ``[question][s1][C][s2][C]...[sk]``, every step read with the question and the <COMP> entries of the
steps before it, labels on every solution token and none on <COMP> (:class:`ccmem.data.samples.Sample`
``label_chunks``).

The classifier is a linear head on the last hidden state (``hidden -> 1``), trained with the LoRA in the same
masked forward (binary cross-entropy at every solution token: does a labelled step end after it?), saved in the
adapter. Deciding costs one dot product per generated token, and a segment is compressed once, when it ends:
the fork ran its classifier as a separate pass and recompressed at every step, which made it twice as slow as
not compressing.

Where a step's end is known when its last token is *picked* (the interval and newline policies, and the
classifier trained with ``lookahead``: it reads the state the token is picked from and that token's input
embedding), the token and the step's <COMP> tokens are fed in one forward
(:meth:`~ccmem.methods.base.Method.feed_after`), so compressing costs no forward of its own. The fork's
classifier reads the state after the token, so its <COMP> tokens need a forward of their own: on a 56-token
solution of 3.5 steps, 6% more forwards than not compressing.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, replace
from typing import ClassVar, cast

import torch
from torch import nn

from ccmem.chat import line_break_ids
from ccmem.data.samples import Sample
from ccmem.loading import LoadedModel
from ccmem.memory import drop_entries
from ccmem.methods.base import DecodeRows, DecodeState, answer_loss, option, run_decoder
from ccmem.methods.ccm import CCMConcat, CompState, ParallelBatch
from ccmem.modules import GATE_KWARG
from ccmem.registry import register

POLICIES = ("classifier", "newline", "interval", "none")


class ReasoningState(CompState):
    """:class:`CompState` plus the step-end classifier: a linear head on the last hidden state, or with
    ``lookahead`` on that state and the input embedding of the token just picked (``[hidden; embedding]``)."""

    def __init__(self, state: CompState, hidden_size: int, lookahead: bool = False):
        super().__init__(state.comp, state.lora)
        self.classifier = nn.Linear(hidden_size * (2 if lookahead else 1), 1)
        nn.init.zeros_(self.classifier.weight)
        nn.init.constant_(self.classifier.bias, -2.0)  # untrained: rarely fires


@dataclass
class ReasoningBatch(ParallelBatch):
    """A parallel CCM batch plus the classifier's targets (1 where a labelled step ends after the token)."""

    step_end: torch.Tensor | None = None  # [B, L] float: 1 / 0 at solution tokens, -1 elsewhere


@register
@dataclass
class CCMReasoning(CCMConcat):
    """CCM over the model's own reasoning: each finished step of a generated solution is compressed (GSM8K fork)."""

    name: ClassVar[str] = "ccm-reason"
    paper: ClassVar[str] = "Kim et al., CCM (ICLR 2024), as forked for GSM8K reasoning with learned <COMP> placement"
    encoder_decoder: ClassVar[bool] = False  # it compresses a decoder's own trace while it writes
    unsupported_options: ClassVar[frozenset[str]] = frozenset({"recent", "keep"})  # keep_last instead
    # CCMConcat's without the ones this method has not (`ccmem methods ccm-reason` listed keep and recent)
    runtime_options: ClassVar[frozenset[str]] = (CCMConcat.runtime_options - unsupported_options) | {
        "policy",
        "interval",
        "threshold",
        "min_segment",
        "keep_last",
    }
    # `lookahead` is not a runtime option: it says what the classifier was trained to read.

    policy: str = option("classifier", f"where a reasoning step ends: {', '.join(POLICIES)}")
    interval: int = option(32, "tokens per step for policy=interval")
    threshold: float = option(0.5, "classifier probability above which a step ends (policy=classifier)")
    min_segment: int = option(4, "fewest tokens a step holds before it may be compressed")
    classifier_weight: float = option(1.0, "weight of the classifier's loss beside the LM loss in training")
    keep_last: int = option(
        0, "last raw tokens of a compressed step kept in the cache (where its result is written); 0: drop all (fork)"
    )
    lookahead: bool = option(
        False,
        "the classifier decides when a step's last token is picked (from the state it is picked from and the "
        "token's embedding), so that token and its <COMP> go in one forward; false: from the state after it, "
        "one extra forward per step (fork)",
    )

    def check_options(self) -> None:
        super().check_options()
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1) (a probability), got {self.threshold}")
        if self.interval < 1 or self.min_segment < 1:
            raise ValueError(f"interval and min_segment must be at least 1, got {self.interval}, {self.min_segment}")
        if self.recent:
            raise ValueError(
                f"ccm-reason keeps a step's raw tokens with keep_last, not recent (got recent={self.recent}); "
                "use keep_last"
            )
        if self.keeps:
            raise ValueError(
                f"ccm-reason keeps a step's raw tokens with keep_last, not keep (got keep={self.keep!r}); use keep_last"
            )
        if self.keep_last < 0:
            raise ValueError(f"keep_last must not be negative (raw tokens kept per step), got {self.keep_last}")

    def build(self, lm: LoadedModel) -> ReasoningState:
        state = ReasoningState(super().build(lm), lm.model.config.get_text_config().hidden_size, self.lookahead)
        return state.to(lm.device)

    def reasoning(self, lm: LoadedModel) -> ReasoningState:
        return cast(ReasoningState, self.module_for(lm))

    # ------------------------------------------------------------------ where steps end

    def cuts(self, sample: Sample) -> list[int]:
        """Answer-token offsets where this policy compresses ``sample``'s solution (the greedy rule decoding uses:
        a step end at least ``min_segment`` tokens after the last cut)."""
        n = len(sample.tail) - sample.answer_start
        if self.policy == "none":
            ends: list[int] = []
        elif self.policy == "interval":  # as decoding: a step ends once it holds interval and min_segment tokens
            every = max(self.interval, self.min_segment)
            ends = list(range(every, n, every))
        else:
            ends = sample.steps.get("labelled" if self.policy == "classifier" else "newline", [])
        out, last = [], 0
        for end in ends:
            if end - last >= self.min_segment and end < n:
                out.append(end)
                last = end
        return out

    def segmented(self, sample: Sample) -> Sample:
        """``sample`` laid out for training: the question as the sink, the solution cut into chunks."""
        answer = sample.tail[sample.answer_start :]
        cuts = [0, *self.cuts(sample), len(answer)]
        pieces = [answer[a:b] for a, b in itertools.pairwise(cuts)]
        return replace(
            sample,
            sink=sample.sink + sample.tail[: sample.answer_start],
            chunks=pieces[:-1],
            tail=pieces[-1],
            answer_start=0,
            label_chunks=True,
        )

    def sample_length(self, sample: Sample) -> int:
        return super().sample_length(self.segmented(sample)) if sample.steps else super().sample_length(sample)

    # ------------------------------------------------------------------ training

    def _last_kept(self, piece: list[int]) -> torch.Tensor:
        """A step's last ``keep_last`` tokens (indices into the step)."""
        return torch.arange(max(0, len(piece) - self.keep_last), len(piece))

    def make_batch(self, samples: list[Sample], pad_id: int = 0) -> ReasoningBatch:
        laid = [self.segmented(s) if s.steps or s.label_chunks else self.fit_sample(s) for s in samples]
        batch = self.lay_out(laid, pad_id)
        if self.keep_last:  # a step's last raw tokens stay readable by every later step, as decoding keeps them
            self.show_raw(batch, laid, self._last_kept, recurrent=True)  # decoding keeps them for every later token
        step_end = torch.full(batch.input_ids.shape, -1.0)
        # With lookahead, answer token k's target is whether a step ends after token k + 1 (read with that
        # token's embedding); a piece's last token has none (<COMP> follows it, not the next token).
        ahead = int(self.lookahead)
        for b, (s, row) in enumerate(zip(samples, laid, strict=True)):
            ends = set(s.steps.get("labelled", []))
            position, offset = len(row.sink), 0  # where answer token `offset` sits in the row
            for piece in [*row.chunks, row.tail]:
                for i in range(len(piece)):
                    offset += 1
                    if not (ahead and i == len(piece) - 1):
                        step_end[b, position] = float(offset + ahead in ends)
                    position += 1
                position += self.n_tok if piece is not row.tail else 0
        return ReasoningBatch(**vars(batch), step_end=step_end)

    def training_loss(self, lm: LoadedModel, batch: ParallelBatch) -> torch.Tensor:
        with self.attached(lm):
            hidden = lm.model.base_model(**self._parallel_inputs(lm, batch)).last_hidden_state
            loss = answer_loss(lm, hidden, batch.labels)
            step_end = getattr(batch, "step_end", None)
            if step_end is None or self.classifier_weight == 0:
                return loss
            target = step_end.to(hidden.device)
            seen = target >= 0
            following = torch.roll(batch.input_ids.to(hidden.device), -1, dims=1)  # the token picked from each state
            logits = self.reasoning(lm).classifier(self._head_input(lm, hidden, following)[seen]).squeeze(-1).float()
            return loss + self.classifier_weight * nn.functional.binary_cross_entropy_with_logits(logits, target[seen])

    # ------------------------------------------------------------------ decoding

    def decode_positions(self, max_new_tokens: int) -> int:
        """The tokens, and ``n_tok`` <COMP> positions for each step that can end among them: a step holds at least
        ``min_segment`` tokens (and ``interval`` under that policy)."""
        if self.policy == "none":
            return max_new_tokens
        shortest = max(self.min_segment, self.interval if self.policy == "interval" else 1)
        return max_new_tokens + self.n_tok * (max_new_tokens // shortest)

    @property
    def decides_at_pick(self) -> bool:
        """Whether a step's end is known when its last token is picked, before that token is fed: then the token
        and the step's <COMP> tokens are fed in one forward (:meth:`feed_after`). Only the fork's classifier
        (without ``lookahead``) reads the state after the token, which costs a forward of its own per step."""
        return self.policy in ("interval", "newline") or (self.policy == "classifier" and self.lookahead)

    def step_ends(self, lm: LoadedModel, state: DecodeState) -> bool:
        """Whether the policy ends the step after its newest token (``state.tokens[-1]``). The classifier reads
        ``state.hidden``: the state after that token, or with :attr:`lookahead` the state it was picked from and
        the token's embedding."""
        if self.policy == "none" or not state.tokens:
            return False
        generated = self._step_length(state)
        if generated < self.min_segment:
            return False
        if self.policy == "interval":
            return generated >= self.interval
        if self.policy == "newline":
            return state.tokens[-1] in newline_ids(lm)
        assert state.hidden is not None
        started = time.perf_counter()
        head = self.reasoning(lm).classifier
        picked = torch.tensor([state.tokens[-1]], device=state.hidden.device)
        probability = torch.sigmoid(head(self._head_input(lm, state.hidden, picked).to(head.weight.dtype))).item()
        state.extra["classifier_seconds"] = state.extra.get("classifier_seconds", 0.0) + time.perf_counter() - started
        return probability > self.threshold

    def feed_after(self, lm: LoadedModel, state: DecodeState) -> torch.Tensor | None:
        """If the step ends with the token just picked: its <COMP> embeddings, for the loop to feed right after
        it in one forward (the next :meth:`decode_logits` drops the step's raw entries)."""
        if not self.decides_at_pick or not self.step_ends(lm, state):
            return None
        return self._compress_after(lm, state)

    def decode_logits(self, lm: LoadedModel, state: DecodeState) -> torch.Tensor:
        """Before the next token is picked: if the step just ended, compress it (its <COMP> tokens read the
        question, the earlier <COMP> entries and the step; the step's raw entries are dropped) and predict the
        next token from the last <COMP> token. The <COMP> tokens came with the step's last token
        (:meth:`feed_after`), or, for the fork's classifier, are fed here in a forward of their own."""
        n_step = state.extra.pop("compressing", None)
        if n_step is None and not self.decides_at_pick and self.step_ends(lm, state):
            n_step = self._step_length(state)
            embeds = self.state(lm).comp.weight[None].to(lm.model.dtype)
            gate = torch.ones(1, self.n_tok, dtype=torch.bool, device=lm.device)
            with self.attached(lm):
                out = run_decoder(lm, None, state.cache, state.position, inputs_embeds=embeds, **{GATE_KWARG: gate})
            state.position += self.n_tok
            state.hidden = out.last_hidden_state[:, -1]
        if n_step is None:
            return super().decode_logits(lm, state)
        total = int(state.cache.layers[0].keys.shape[-2])
        a, b = total - self.n_tok - n_step, total - self.n_tok - min(self.keep_last, n_step)  # the entries to drop
        for layer in state.cache.layers:  # drop the step's raw entries but its last `keep_last`; keep its <COMP>
            drop_entries(layer, a, b)
        self._step_compressed(state)
        return super().decode_logits(lm, state)

    def decode_logits_batch(self, lm: LoadedModel, batch: DecodeRows) -> torch.Tensor:
        """:meth:`decode_logits` for a padded batch, without forwards of its own: a row whose step just ended had
        its <COMP> tokens fed by the loop (with the step's last token, or, for the fork's classifier, set here as
        ``feed`` for the next forward, beside the other rows' tokens); once they are read, the step's raw entries
        are dropped from the mask and the next token is predicted from the last <COMP> token."""
        logits = super().decode_logits_batch(lm, batch)
        for i, row in enumerate(batch.rows):
            n_step = row.extra.pop("compressing", None)
            if n_step is not None:  # its <COMP> tokens were just read: its last n_tok real entries
                real = batch.attention_mask[i].nonzero().flatten()
                end = len(real) - self.n_tok - min(self.keep_last, n_step)
                batch.attention_mask[i, real[len(real) - self.n_tok - n_step : end]] = 0
                self._step_compressed(row)
            elif not self.decides_at_pick and self.step_ends(lm, row):
                row.feed = self._compress_after(lm, row)
        return logits

    def _head_input(self, lm: LoadedModel, hidden: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
        """What the step-end classifier reads: ``hidden``, or with :attr:`lookahead` ``[hidden; embedding of the
        token picked from it]`` (``picked``: ids shaped as ``hidden`` without its last dimension)."""
        if not self.lookahead:
            return hidden
        return torch.cat([hidden, lm.model.get_input_embeddings()(picked)], dim=-1)

    @staticmethod
    def _step_length(state: DecodeState) -> int:
        """Tokens of the current step so far (since the last compressed one)."""
        return len(state.tokens) - state.extra.get("segment_start", 0)

    def _compress_after(self, lm: LoadedModel, state: DecodeState) -> torch.Tensor:
        """Mark the current step as being compressed and return its <COMP> embeddings, for the loop to feed; once
        they are read, :meth:`decode_logits` / :meth:`decode_logits_batch` drop the step's raw entries."""
        state.extra["compressing"] = self._step_length(state)
        return self.state(lm).comp.weight.to(lm.model.dtype)

    @staticmethod
    def _step_compressed(state: DecodeState) -> None:
        state.extra["segment_start"] = len(state.tokens)
        state.extra["insertions"] = state.extra.get("insertions", 0) + 1


def newline_ids(lm: LoadedModel) -> frozenset[int]:
    """Token ids whose text holds a line break (the newline policy ends a step after one), found once per
    tokenizer (one method instance may decode for models with other vocabularies)."""
    return line_break_ids(lm.tokenizer, lm.model.config.get_text_config().vocab_size)
