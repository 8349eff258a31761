"""CCM on encoder-decoder models (T5): <COMP> tokens in the encoder, the decoder reads only what was compressed.

The fork's ``ccm_t5`` as ccmem does it, through the same methods (``ccm-concat``, ``ccm-merge``) and without a
forked model file: :class:`ccmem.methods.ccm.CCM` hands an encoder-decoder model to the functions here. ``gist``
(the fork's ``gist_t5``, :mod:`ccmem.methods.gist`) uses them too, with one <COMP> block after the whole context.

The encoder reads ``[sink][c1][C1][c2][C2]...[ck][Ck][query]`` with CCM's plan (:func:`ccmem.masks.build_plan`
with ``bidirectional=True``): causal over steps, as recurrence needs, but each step read in full as one encoder
forward reads it (a chunk never sees its own <COMP> tokens). The memory holds, per *encoder* layer, the
<COMP> tokens' self-attention keys/values (what later chunks and the query read) and, in
``Memory.state["encoder_out"]``, the encoder's final hidden states at the sink and <COMP> positions (what the
decoder cross-attends to). The decoder cross-attends to ``[encoder_out | the query's encoder outputs]`` only.

* concat: both grow by ``n_tok`` per chunk.
* merge: the keys/values are the running average ``(1-1/t)·Mem(t-1) + (1/t)·C_t`` (:meth:`CCMMerge.fold`), and so
  are the final hidden states, with the same weights: a merged slot is then exactly what the decoder would read
  of the average (the fork's ``ccm_t5`` averages <COMP> keys/values inside attention; it leaves the hidden states
  the decoder reads to its data layout, which ccmem does not copy). T5's relative position bias needs a
  position for a merged slot: it is read as sitting where the newest <COMP> block was written, in training and
  in inference alike.

T5's relative position bias is rebuilt from the true positions of queries and keys
(:func:`ccmem.patching.seq2seq.relative_bias`), so compressing step by step (:func:`add_chunk`) equals the
one masked forward of training (:func:`parallel_forward`); ``tests/methods/test_t5.py`` checks both, and that
the decoder's logits agree.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ccmem.data.samples import Sample
from ccmem.loading import LoadedModel
from ccmem.memory import KV, Memory, concat_layers, concat_positions, positions_for
from ccmem.methods.base import Method, logits_for
from ccmem.modules import GATE_KWARG, CompEmbeddings, LoRAGate, LoRASet, default_targets, embedding_rows
from ccmem.patching.attention import PLAN_KWARG, AttentionPlan, compression_attention
from ccmem.patching.seq2seq import encoder_of, relative_bias, teacher_forced

if TYPE_CHECKING:
    from ccmem.methods.ccm import CCM, CompState, CompTokens, ParallelBatch

ENCODER_OUT = "encoder_out"


def check_encoder_decoder(lm: LoadedModel, what: str) -> None:
    """Refuse a decoder-only model on the encoder-decoder path, naming both."""
    if not lm.is_encoder_decoder:
        raise ValueError(
            f"{what} compresses in an encoder and needs an encoder-decoder model (T5), but {lm.name} "
            f"({lm.model.config.model_type}) is decoder-only"
        )


# ---------------------------------------------------------------------------- state and attaching


def build(method: CompTokens, lm: LoadedModel) -> CompState:
    """<COMP> embeddings (from the shared vocabulary) and a LoRA on the encoder's attention only: the decoder
    never reads a <COMP> token, so a gated LoRA there would never be on."""
    from ccmem.methods.ccm import CompState

    check_encoder_decoder(lm, method.name)
    embed = embedding_rows(lm.model.get_input_embeddings())
    comp = CompEmbeddings(method.n_tok, embed.shape[1], init_from=embed).to(embed.device)
    targets = method.lora_targets or default_targets(lm.model)
    encoder = encoder_of(lm.model)
    lora = LoRASet(encoder, targets, method.lora_rank, method.lora_alpha, method.lora_dropout)
    return CompState(comp, lora)


def install(method: CompTokens, lm: LoadedModel, stack: ExitStack) -> None:
    """Hook the gated LoRA into the encoder, and switch attention to ccmem's (plans, memory prefix, true bias)."""
    state = method.state(lm)
    encoder = encoder_of(lm.model)
    gate = LoRAGate()
    stack.callback(gate.install(encoder).remove)
    for handle in state.lora.attach(encoder, gate):
        stack.callback(handle.remove)
    stack.enter_context(compression_attention(lm.model))


# ---------------------------------------------------------------------------- recurrent: reading with a memory


@dataclass
class Encoded:
    """One encoder forward with a memory: the new tokens' final hidden states and, per layer, keys/values."""

    hidden: torch.Tensor  # [1, n, d_model]
    layers: list[KV]


def slot_positions(memory: Memory) -> torch.Tensor:
    """``[1, slots]``: the position each memory slot was written at (the same in every layer and head here)."""
    if not memory.positions:
        return torch.zeros(1, 0, dtype=torch.long, device=memory.device)
    return memory.positions[0][:, 0]


def encode(
    lm: LoadedModel,
    memory: Memory,
    embeds: torch.Tensor,
    allowed: torch.Tensor,
    start: int,
    gate: torch.Tensor | None = None,
) -> Encoded:
    """Encode ``embeds`` (``[1, n, d]``, positions ``start..``) reading ``memory``'s keys/values in every layer.

    ``allowed`` (``[n, n]`` bool) says which new tokens each new token reads; every new token reads the whole
    memory. ``gate`` (``[1, n]``) turns the LoRA on at <COMP> tokens. Call it while the method is attached.
    """
    n = embeds.shape[1]
    device = embeds.device
    slots = memory.num_slots
    full = torch.cat([torch.ones(n, slots, dtype=torch.bool, device=device), allowed.to(device)], dim=1)
    plan = AttentionPlan.from_allowed(full, embeds.dtype, device)
    plan.prefix = memory.layers if slots else None
    plan.captured = {}
    queries = torch.arange(start, start + n, device=device)[None]
    plan.position_bias = relative_bias(lm.model, queries, torch.cat([slot_positions(memory).to(device), queries], 1))
    extra: dict[str, Any] = {PLAN_KWARG: plan}
    if gate is not None:
        extra[GATE_KWARG] = gate
    out = encoder_of(lm.model)(inputs_embeds=embeds, **extra)
    return Encoded(out.last_hidden_state, [plan.captured[i] for i in range(len(plan.captured))])


def _appended(memory: Memory, encoded: Encoded, n: int) -> tuple[list[KV], list[torch.Tensor]]:
    layers = concat_layers([memory.layers, encoded.layers])
    new = [positions_for(memory.next_position, n, k) for k, _ in encoded.layers]
    return layers, concat_positions([memory.positions, new])


def encoder_out(memory: Memory) -> torch.Tensor | None:
    """The final hidden states the decoder cross-attends to for ``memory`` (``None``: an empty memory)."""
    out = memory.state.get(ENCODER_OUT)
    if out is None and memory.num_slots:
        raise ValueError(
            "this memory holds no encoder outputs (state 'encoder_out'): it was not written by an encoder-decoder "
            "method, so an encoder-decoder model cannot read it"
        )
    return out


def append_raw(lm: LoadedModel, memory: Memory, ids: torch.Tensor, **changes: Any) -> Memory:
    """``memory`` with ``ids`` kept uncompressed after it: encoded reading the memory and themselves in full,
    their keys/values and final hidden states appended (other memory fields as in ``changes``)."""
    check_encoder_decoder(lm, "this memory")
    n = ids.shape[1]
    square = torch.ones(n, n, dtype=torch.bool)
    encoded = encode(lm, memory, lm.model.get_input_embeddings()(ids), square, memory.next_position)
    layers, positions = _appended(memory, encoded, n)
    previous = encoder_out(memory)
    out = encoded.hidden if previous is None else torch.cat([previous.to(encoded.hidden.dtype), encoded.hidden], 1)
    return memory.with_layers(layers, positions, advance=n, state={**memory.state, ENCODER_OUT: out}, **changes)


def add_sink(lm: LoadedModel, memory: Memory, ids: torch.Tensor) -> Memory:
    """Keep ``ids`` uncompressed at the front of the memory: their keys/values and final hidden states."""
    check_encoder_decoder(lm, "this memory")
    if memory.num_slots != memory.sink:
        raise ValueError("the attention sink must be added before any other context")
    return append_raw(lm, memory, ids, sink=memory.sink + ids.shape[1])


def compress_step(
    method: CompTokens, lm: LoadedModel, seen: Memory, ids: torch.Tensor, start: int
) -> tuple[list[KV], torch.Tensor]:
    """Keys/values and final hidden states of the <COMP> tokens after encoding chunk ``ids`` (from ``start``)
    with ``seen``; the chunk reads itself (not its <COMP> tokens), the <COMP> tokens read everything."""
    embeds, comp = method._comp_inputs(lm, ids)
    n, t = ids.shape[1], method.n_tok
    allowed = torch.ones(n + t, n + t, dtype=torch.bool)
    allowed[:n, n:] = False
    encoded = encode(lm, seen, embeds, allowed, start, comp)
    return [(k[..., -t:, :], v[..., -t:, :]) for k, v in encoded.layers], encoded.hidden[:, -t:]


def fold(method: CCM, memory: Memory, comp: list[KV], hidden: torch.Tensor, n_chunk: int) -> Memory:
    """``memory`` with a chunk's <COMP> keys/values folded in by the method's own rule (concat or merge), and its
    final hidden states folded into ``encoder_out`` with the same weights."""
    folded = method.fold(memory, comp, n_chunk)
    previous = encoder_out(memory)
    steps = int(folded.state.get("merge_steps", torch.tensor(0)))
    positions = folded.positions
    if method.update == "merge" and steps > 1 and previous is not None:
        s = memory.sink
        merged = previous[:, s:] * (1 - 1 / steps) + hidden / steps
        out = torch.cat([previous[:, :s], merged], dim=1)
        # A merged slot has no single position; the bias reads it where the newest <COMP> block was written.
        newest = memory.next_position + n_chunk
        positions = [torch.cat([p[..., :s], positions_for(newest, method.n_tok, p)], -1) for p in positions]
    else:
        out = hidden if previous is None else torch.cat([previous, hidden], dim=1)
    return folded.with_layers(folded.layers, positions, state={**folded.state, ENCODER_OUT: out})


def add_chunk(method: CCM, lm: LoadedModel, memory: Memory, ids: torch.Tensor) -> Memory:
    """One compression step in the encoder."""
    check_encoder_decoder(lm, method.name)
    seen = memory if method.recurrent else memory.prefix(memory.sink)
    comp, hidden = compress_step(method, lm, seen, ids, memory.next_position)
    return fold(method, memory, comp, hidden, ids.shape[-1])


def encoder_states(lm: LoadedModel, memory: Memory, query: torch.Tensor) -> torch.Tensor:
    """``[1, slots + n, d]``: what the decoder cross-attends to when answering ``query`` (``[1, n]``) from
    ``memory``: the memory's final hidden states, then the query's, encoded reading the memory."""
    check_encoder_decoder(lm, "reading a query with a memory")
    n = query.shape[1]
    if n == 0:  # nothing to encode: the decoder reads the memory alone
        held = encoder_out(memory)
        if held is None:
            raise ValueError("the decoder has nothing to read: the memory is empty and so is the query")
        return held
    square = torch.ones(n, n, dtype=torch.bool)
    encoded = encode(lm, memory, lm.model.get_input_embeddings()(query), square, memory.next_position)
    previous = encoder_out(memory)
    return encoded.hidden if previous is None else torch.cat([previous.to(encoded.hidden.dtype), encoded.hidden], 1)


class EncoderMemory(Method):
    """A method whose memory on an encoder-decoder model holds encoder outputs (``ccm-*``, ``gist``, ``full``,
    ``none``): the sink's encoder keys/values and final hidden states, and the decoder cross-attending to
    :func:`encoder_states`. On a decoder-only model the sink is the base method's."""

    def add_sink(self, lm: LoadedModel, memory: Memory, ids: torch.Tensor) -> Memory:
        if lm.is_encoder_decoder:
            return add_sink(lm, memory, ids)
        return super().add_sink(lm, memory, ids)

    def encoder_states(self, lm: LoadedModel, memory: Memory, query: torch.Tensor) -> torch.Tensor:
        return encoder_states(lm, memory, query)


def decoder_logits(lm: LoadedModel, encoder_hidden: torch.Tensor, labels: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The decoder's ``[B, A, vocab]`` logits for the answers ``labels`` (teacher forcing, -100 = padding)."""
    return logits_for(lm, teacher_forced(lm.model, encoder_hidden, labels, **kwargs).last_hidden_state)


def answer_loss(lm: LoadedModel, encoder_hidden: torch.Tensor, labels: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Mean loss of the decoder on the answer tokens (logits formed only where there is a label)."""
    labels = labels.to(encoder_hidden.device)
    out = teacher_forced(lm.model, encoder_hidden, labels, **kwargs)
    keep = labels != -100
    if not bool(keep.any()):
        raise ValueError("this batch has no answer tokens to train on (an encoder-decoder sample needs an answer)")
    return nn.functional.cross_entropy(logits_for(lm, out.last_hidden_state[keep]), labels[keep])


def recurrent_loss(method: CCM, lm: LoadedModel, sample: Sample) -> torch.Tensor:
    """The training loss computed the slow way (compress chunk by chunk, then answer): what
    :func:`training_loss` must equal."""
    memory = method.new_memory(lm)
    if sample.sink:
        memory = add_sink(lm, memory, torch.tensor([sample.sink], device=lm.device))
    for chunk in sample.chunks:
        memory = add_chunk(method, lm, memory, torch.tensor([chunk], device=lm.device))
    query, answer = split(sample)
    hidden = encoder_states(lm, memory, torch.tensor([query], device=lm.device))
    return answer_loss(lm, hidden, torch.tensor([answer], device=lm.device))


# ---------------------------------------------------------------------------- parallel training


def split(sample: Sample) -> tuple[list[int], list[int]]:
    """A sample's query (read by the encoder) and answer (written by the decoder)."""
    if sample.label_chunks:
        raise ValueError(
            "an encoder-decoder model trains on the answer only; samples with labelled chunks are for decoders"
        )
    return list(sample.tail[: sample.answer_start]), list(sample.tail[sample.answer_start :])


@dataclass
class Seq2SeqForward:
    """One masked encoder forward over a batch, and what the decoder reads of it."""

    encoder_hidden: torch.Tensor  # [B, L + M, d]: every position's final hidden state, then the merged <COMP> ones
    cross_mask: torch.Tensor  # [B, L + M] bool: what the decoder reads (sink, the last memory, the query)
    memory_mask: torch.Tensor  # [B, L + M] bool: the part of cross_mask that a memory's encoder_out holds
    labels: torch.Tensor  # [B, A] answers, -100 after each one's end
    logits: torch.Tensor | None = None  # [B, A, vocab]: the decoder's, teacher-forced on the answers


def _labels(samples: list[Sample], device: torch.device) -> torch.Tensor:
    answers = [split(s)[1] for s in samples]
    labels = torch.full((len(samples), max(1, *(len(a) for a in answers))), -100, dtype=torch.long)
    for b, answer in enumerate(answers):
        labels[b, : len(answer)] = torch.tensor(answer, dtype=torch.long)
    return labels.to(device)


def encoder_batch(method: CompTokens, batch: ParallelBatch) -> tuple[ParallelBatch, list[Sample]]:
    """The encoder's layout of a batch from ``make_batch``: its samples with the tail cut to the query, laid out
    by the method's own rule (CCM: a <COMP> block per chunk; gist: one after the whole context), bidirectional
    within each step (padding is masked, so its id does not matter)."""
    if not batch.samples:
        raise ValueError("this batch carries no samples; lay it out with make_batch")
    queries = [Sample(s.chunks, split(s)[0], s.sink) for s in batch.samples]
    return method.lay_out(queries, 0, bidirectional=True), batch.samples


def parallel_forward(
    method: CompTokens, lm: LoadedModel, batch: ParallelBatch, *, logits: bool = False
) -> Seq2SeqForward:
    """Every compression step of a batch in one masked encoder forward (call it while attached); ``logits``: also
    the decoder's on the answers, reading only what a memory and the query give it."""
    check_encoder_decoder(lm, method.name)
    laid, samples = encoder_batch(method, batch)
    device = lm.device
    ids, comp = laid.input_ids.to(device), laid.comp.to(device)
    embeds = method.state(lm).comp.fill(lm.model.get_input_embeddings()(ids), comp, laid.slots.to(device))
    plan = AttentionPlan.from_mask_plan(laid.plan, embeds.dtype, device)
    position_ids = laid.plan.position_ids.to(device)
    mix_index = plan.mix_index
    keys = torch.cat([position_ids, position_ids.gather(1, mix_index)], dim=1)  # a merged entry sits at its <COMP>
    plan.position_bias = relative_bias(lm.model, position_ids, keys)
    hidden = encoder_of(lm.model)(inputs_embeds=embeds, **{PLAN_KWARG: plan, GATE_KWARG: comp}).last_hidden_state
    dim = hidden.shape[-1]
    merged = plan.mix_weights.to(hidden.dtype) @ hidden.gather(1, mix_index[..., None].expand(-1, -1, dim))
    width = ids.shape[1]
    memory_mask = torch.zeros(ids.shape[0], width + mix_index.shape[1], dtype=torch.bool, device=device)
    query_mask = torch.zeros_like(memory_mask)
    for b, sample in enumerate(samples):
        memory_mask[b, : len(sample.sink)] = True
        query_mask[b, laid.tail_start[b] : laid.lengths[b]] = True
        if method.update == "concat":
            memory_mask[b, :width] |= comp[b]
        elif sample.chunks:  # merge: Mem(k), the merged entries of the last step
            end = width + method.n_tok * len(sample.chunks)
            memory_mask[b, end - method.n_tok : end] = True
    cross = memory_mask | query_mask
    if not bool(cross.any(dim=1).all()):
        raise ValueError("a sample gives the decoder nothing to read (no sink, no context and no query)")
    forward = Seq2SeqForward(torch.cat([hidden, merged], dim=1), cross, memory_mask, _labels(samples, device))
    if logits:
        forward.logits = decoder_logits(
            lm, forward.encoder_hidden, forward.labels, encoder_attention_mask=forward.cross_mask.long()
        )
    return forward


def training_loss(method: CompTokens, lm: LoadedModel, batch: ParallelBatch) -> torch.Tensor:
    """Mean decoder loss on the answers, the decoder cross-attending to the compressed positions and the query."""
    forward = parallel_forward(method, lm, batch)
    return answer_loss(lm, forward.encoder_hidden, forward.labels, encoder_attention_mask=forward.cross_mask.long())


__all__ = [
    "ENCODER_OUT",
    "Encoded",
    "EncoderMemory",
    "Seq2SeqForward",
    "add_chunk",
    "add_sink",
    "answer_loss",
    "append_raw",
    "build",
    "check_encoder_decoder",
    "compress_step",
    "decoder_logits",
    "encode",
    "encoder_out",
    "encoder_states",
    "fold",
    "install",
    "parallel_forward",
    "recurrent_loss",
    "training_loss",
]
