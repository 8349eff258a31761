"""CCM: Compressed Context Memory (Kim et al., ICLR 2024, arXiv:2312.03414).

After each context chunk, ``n_tok`` <COMP> tokens are run through the model with a conditional LoRA
that is active only at their positions; their keys/values become the memory. *concat* keeps every
step's <COMP> keys/values; *merge* keeps their running average, so memory stays ``n_tok`` slots (ccmem's
``banks`` option keeps several running averages, each over every ``banks``-th step: a step stated early then
weighs ``1/ceil(t/banks)`` rather than ``1/t`` at constant ``banks · n_tok`` slots).

Two ways to run the same computation, proven equal by ``tests/methods/test_ccm_equivalence.py``:
``add`` (recurrent inference, one chunk at a time) and ``parallel_forward`` (training: a whole
interaction in one masked forward, see :mod:`ccmem.masks`).

ccm-concat's ``keep`` (decoder-only) holds some tokens of every chunk raw beside its <COMP> slots, for good:
``keep='digits'`` the tokens whose decoded text has a digit, so that numbers, dates and codes are read back as
written instead of through their compression (the memory's clearest loss on hand-written dialogs). They keep their
own positions; in the parallel forward every later chunk and the tail may attend to them, as ``add`` keeps them in
the cache.

On an encoder-decoder model (T5) the same methods compress in the encoder and the decoder reads only the
compressed positions: :mod:`ccmem.methods.ccm_seq2seq` (tested by ``tests/methods/test_t5.py``).

:class:`CompTokens` holds what CCM and gist (:mod:`ccmem.methods.gist`) share: the <COMP> embeddings and
the conditional LoRA (one ``nn.Module``, :class:`CompState`), attaching them, and the parallel training forward.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from ccmem.data.samples import Sample
from ccmem.loading import LoadedModel
from ccmem.masks import MaskPlan, build_plan, collate_plans
from ccmem.memory import KV, Memory, concat_layers, concat_positions, constant_positions, positions_for
from ccmem.methods import ccm_seq2seq
from ccmem.methods.base import LoRAOptions, answer_loss, logits_for, option, read_batch, run_decoder
from ccmem.modules import GATE_KWARG, CompEmbeddings, LoRAGate, LoRASet, default_targets, embedding_rows
from ccmem.patching.attention import (
    PLAN_KWARG,
    AttentionPlan,
    check_routes_attention,
    compression_attention,
    merge_scores,
)
from ccmem.registry import register

#: What ``keep`` can hold raw in memory: ``digits``, the tokens whose text has a digit; ``values``, every token of a
#: word (text between spaces) that has a digit or an ``@``: whole dates, codes, e-mail addresses, "BA2490";
#: ``names``, those of ``values`` and every token of a capitalised word inside a sentence (not "I"): names of
#: people, pets, places, brands ("called Biscuit", "moved to Porto"); and a sentence's capitalised first word when
#: it is no common word (:class:`CommonWords`: "Aoife works as..." but not "Totally", "The", "Hmm").
KEEP_CLASSES = {
    "nothing": None,
    "digits": re.compile(r"[0-9]"),
    "values": re.compile(r"[0-9@]"),
    "names": re.compile(r"[0-9@]"),
}
#: The text of a token that ends a sentence (the next word is capitalised whatever it is).
SENTENCE_END = re.compile(r"[.!?:;\n\"“”]\s*$")
#: Chat interjections that a vocabulary spells in pieces but that are no names ("Hmm, ...", "Ooh, nice!").
INTERJECTIONS = frozenset(
    {
        "hmm",
        "hm",
        "hmmm",
        "ooh",
        "oooh",
        "brr",
        "ugh",
        "wow",
        "bye",
        "ouch",
        "congratulations",
        "congrats",
        "haha",
        "hehe",
        "yay",
        "aww",
        "aw",
        "oops",
        "whoa",
        "yikes",
        "phew",
        "meh",
        "argh",
        "ahh",
        "ohh",
        "uh",
        "um",
    }
)


class CommonWords:
    """Whether a sentence's capitalised first word is a common word rather than a name: the tokenizer spells its
    lower-case form (after a space) in as few tokens as " the", i.e. it is a word of its own in the vocabulary
    ("Totally", "Parcels"), or it is a chat interjection; "Aoife", "Hannah", "Kraków" are not. A vocabulary
    stands in for a word list, so no list ships for each language; common first names that a vocabulary holds
    whole ("Tom") count as common words at a sentence's start (inside a sentence every capitalised word is kept)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.budget = self._pieces("the")
        self.seen: dict[str, bool] = {}

    def _pieces(self, word: str) -> int:
        return len(self.tokenizer.encode(" " + word, add_special_tokens=False))

    def __call__(self, word: str) -> bool:
        word = re.split(r"['’]", word.strip().lower())[0].strip('.,!?;:"“”()')
        if word not in self.seen:
            self.seen[word] = not word.isalpha() or word in INTERJECTIONS or self._pieces(word) <= self.budget
        return self.seen[word]


def token_texts(lm: LoadedModel) -> list[str]:
    """The text each token id of ``lm``'s embedding table stands for, as decoding writes it (byte-fallback pieces
    such as ``<0x0A>`` are the byte, not their spelling), and ``""`` for special tokens and ids the tokenizer lacks."""
    tokenizer = lm.tokenizer
    size = int(cast(torch.Tensor, lm.model.get_input_embeddings().weight).shape[0])
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special |= {i for i, token in added.items() if getattr(token, "special", False)}
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    return ["" if p is None or i in special else tokenizer.convert_tokens_to_string([p]) for i, p in enumerate(pieces)]


#: How CCM-merge weighs the steps it averages (``ccm-merge``'s ``weighting`` option).
MERGE_WEIGHTINGS = ("mean", "learned")


def _split_read(layers: list[KV], n_tok: int, raw: int) -> tuple[list[KV], list[KV]]:
    """The last ``n_tok`` slots of a read (the <COMP> tokens'), and the ``raw`` slots before them."""
    comp = [(k[..., -n_tok:, :], v[..., -n_tok:, :]) for k, v in layers]
    kept = [(k[..., -n_tok - raw : -n_tok, :], v[..., -n_tok - raw : -n_tok, :]) for k, v in layers] if raw else []
    return comp, kept


class CompState(nn.Module):
    """The trainable state of a <COMP>-token method: ``comp`` embeddings and the conditional ``lora`` (and, for
    CCM-merge with ``weighting=learned``, the ``merge_gate`` that scores each step's <COMP> values)."""

    def __init__(self, comp: CompEmbeddings, lora: LoRASet):
        super().__init__()
        self.comp = comp
        self.lora = lora
        self.merge_gate: nn.Parameter | None = None  # set by CCMMerge.build


@dataclass
class ParallelBatch:
    """Model inputs for one masked forward over a batch of interactions."""

    input_ids: torch.Tensor  # [B, L]; <COMP> positions hold a placeholder id
    labels: torch.Tensor  # [B, L]; the token at each answer position, -100 elsewhere
    comp: torch.Tensor  # [B, L] bool
    slots: torch.Tensor  # [B, L] slot index at <COMP> positions, 0 elsewhere
    plan: MaskPlan
    lengths: list[int]
    tail_start: list[int]
    samples: list[Sample] = field(default_factory=list)  # as given (an encoder-decoder model lays them out anew)


def lay_out(
    samples: list[Sample],
    pad_id: int,
    *,
    n_tok: int,
    update: str,
    recurrent: bool,
    bidirectional: bool = False,
    banks: int = 1,
    recent: int = 0,
) -> ParallelBatch:
    """Lay out each sample as ``[sink][c1][C]...[ck][C][tail]`` and build the batched attention plan
    (``bidirectional``: an encoder's plan, see :func:`ccmem.masks.build_plan`)."""
    plans, rows, slots, tail_start, chunk_labels = [], [], [], [], []
    for s in samples:
        plan = build_plan(
            [len(c) for c in s.chunks],
            n_tok,
            len(s.tail),
            sink_length=len(s.sink),
            update=update,
            recurrent=recurrent,
            bidirectional=bidirectional,
            banks=banks,
            recent=recent,
        )
        row = list(s.sink)
        labelled: list[int] = []  # positions of chunk tokens that are trained on (a reasoning trace's segments)
        for chunk in s.chunks:
            if s.label_chunks:
                labelled += range(len(row), len(row) + len(chunk))
            row += list(chunk) + [pad_id] * n_tok
        chunk_labels.append(labelled)
        tail_start.append(len(row))
        row += list(s.tail)
        plans.append(plan)
        rows.append(row)
        slot = torch.zeros(len(row), dtype=torch.long)
        slot[plan.comp] = torch.arange(n_tok).repeat(len(s.chunks))
        slots.append(slot)
    lengths = [len(r) for r in rows]
    width = max(lengths)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    comp_mask = torch.zeros(len(rows), width, dtype=torch.bool)
    slot_ids = torch.zeros(len(rows), width, dtype=torch.long)
    for b, (row, sample) in enumerate(zip(rows, samples, strict=True)):
        input_ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        answer = tail_start[b] + sample.answer_start
        labels[b, answer : len(row)] = input_ids[b, answer : len(row)]
        if chunk_labels[b]:
            index = torch.tensor(chunk_labels[b], dtype=torch.long)
            labels[b, index] = input_ids[b, index]
        comp_mask[b, : len(row)] = plans[b].comp
        slot_ids[b, : len(row)] = slots[b]
    plan = collate_plans(plans)
    return ParallelBatch(input_ids, labels, comp_mask, slot_ids, plan, lengths, tail_start, list(samples))


@dataclass
class CompTokens(ccm_seq2seq.EncoderMemory, LoRAOptions):
    """<COMP> tokens with a conditional LoRA (shared by CCM and gist; not registered itself)."""

    kind: ClassVar[str] = "learned"
    trainable: ClassVar[bool] = True
    needs_adapter: ClassVar[bool] = True
    batchable: ClassVar[bool] = True
    runtime_options: ClassVar[frozenset[str]] = frozenset({"lora_dropout", "max_chunk_tokens"})
    update: ClassVar[str] = "concat"

    n_tok: int = option(4, "<COMP> tokens per compression step: the memory slots one step writes")

    def check_options(self) -> None:
        if self.n_tok < 1:
            raise ValueError(
                f"n_tok must be at least 1 (got {self.n_tok}): it is the number of <COMP> tokens per chunk"
            )
        self.check_lora_options()

    # ------------------------------------------------------------------ state and attaching

    def build(self, lm: LoadedModel) -> CompState:
        if lm.is_encoder_decoder:
            return ccm_seq2seq.build(self, lm)
        check_routes_attention(lm.model)  # before the LoRA, whose target hint would lead nowhere on such a model
        embed = embedding_rows(lm.model.get_input_embeddings())
        comp = CompEmbeddings(self.n_tok, embed.shape[1], init_from=embed).to(embed.device)
        targets = self.lora_targets or default_targets(lm.model)
        lora = LoRASet(lm.model.base_model, targets, self.lora_rank, self.lora_alpha, self.lora_dropout)
        return CompState(comp, lora)

    def state(self, lm: LoadedModel) -> CompState:
        return cast(CompState, self.module_for(lm))

    def changes_reading(self, lm: LoadedModel) -> bool:
        return False  # the LoRA is gated off outside <COMP> tokens, and reading passes no mask plan

    def install(self, lm: LoadedModel, stack: ExitStack) -> None:
        """Hook the gated LoRA into the decoder, and switch attention to the variant that reads mask plans."""
        if lm.is_encoder_decoder:
            return ccm_seq2seq.install(self, lm, stack)
        state = self.state(lm)
        self._gate = LoRAGate()
        stack.callback(self._gate.install(lm.model.base_model).remove)
        for handle in state.lora.attach(lm.model.base_model, self._gate):
            stack.callback(handle.remove)
        stack.enter_context(compression_attention(lm.model))

    def warm_start(
        self, differing: dict[str, tuple[Any, Any]], tensors: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor] | None:
        """Start from an adapter with another ``n_tok``: its LoRA as it is, and its first ``n_tok`` <COMP>
        embeddings (a run with more <COMP> tokens than the adapter repeats its embeddings in turn)."""
        if set(differing) != {"n_tok"}:
            return None
        weight = tensors["comp.weight"]
        return tensors | {"comp.weight": weight[torch.arange(self.n_tok) % weight.shape[0]].clone()}

    @classmethod
    def legacy_adapter(
        cls, state: dict[str, torch.Tensor], meta: dict[str, str]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Options and tensors of an adapter written by ccmem before the generic format (format version 1)."""
        options: dict[str, Any] = {
            "n_tok": int(meta["n_tok"]),
            "lora_rank": int(meta["lora_rank"]),
            "lora_alpha": float(meta["lora_alpha"]),
            "lora_targets": tuple(sorted({k.split(".")[-2] for k in state if k.startswith("lora.")})),
        }
        if "recurrent" in meta and any(f == "recurrent" for f in cls.__dataclass_fields__):
            options["recurrent"] = meta["recurrent"] == "True"
        tensors = {"comp.weight": state["comp_embeddings"]}
        for key, value in state.items():
            if key.startswith("lora."):
                path, part = key[len("lora.") :].rsplit(".", 1)
                tensors[f"lora.pairs.{path.replace('.', '/')}.{part}"] = value
        return options, tensors

    # ------------------------------------------------------------------ recurrent inference

    def _comp_inputs(self, lm: LoadedModel, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of ``ids`` followed by the <COMP> tokens, and the <COMP> mask."""
        embeds = lm.model.get_input_embeddings()(ids)
        comp = self.state(lm).comp.weight.to(embeds.dtype)[None].expand(ids.shape[0], -1, -1)
        mask = torch.zeros(ids.shape[0], ids.shape[1] + self.n_tok, dtype=torch.bool, device=ids.device)
        mask[:, ids.shape[1] :] = True
        return torch.cat([embeds, comp], dim=1), mask

    def compress_step(self, lm: LoadedModel, seen: Memory, ids: torch.Tensor, start: int) -> list[KV]:
        """Keys/values of the <COMP> tokens after reading chunk ``ids`` (from position ``start``) with ``seen``."""
        return self.read_chunk(lm, seen, ids, start)[0]

    def read_chunk(
        self, lm: LoadedModel, seen: Memory, ids: torch.Tensor, start: int, raw: int = 0
    ) -> tuple[list[KV], list[KV]]:
        """:meth:`compress_step`'s <COMP> keys/values, and those of the chunk's last ``raw`` tokens."""
        cache = seen.to_cache()
        embeds, comp = self._comp_inputs(lm, ids)
        run_decoder(lm, None, cache, start, inputs_embeds=embeds, **{GATE_KWARG: comp})
        return _split_read(Memory.layers_of(cache), self.n_tok, min(raw, ids.shape[-1]))

    def compress_batch(self, lm: LoadedModel, seen: list[Memory], ids: list[torch.Tensor]) -> list[list[KV]]:
        """:meth:`compress_step` for several chunks, each read with its own memory, in one padded forward
        (each memory's ``next_position`` is where its chunk starts)."""
        return [comp for comp, _ in self.read_chunks(lm, seen, ids)]

    def read_chunks(
        self, lm: LoadedModel, seen: list[Memory], ids: list[torch.Tensor], raw: int = 0
    ) -> list[tuple[list[KV], list[KV]]]:
        """:meth:`read_chunk` for several chunks in one padded forward, as :meth:`compress_batch`."""
        inputs = [self._comp_inputs(lm, chunk)[0] for chunk in ids]
        read = read_batch(lm, seen, inputs, embeds=True, gate_last=self.n_tok)
        return [
            _split_read(layers, self.n_tok, min(raw, chunk.shape[-1]))
            for layers, chunk in zip(read.layers, ids, strict=True)
        ]

    def comp_positions(self, comp: list[KV], start: int) -> list[torch.Tensor]:
        return [positions_for(start, self.n_tok, k) for k, _ in comp]

    # ------------------------------------------------------------------ parallel training

    def lay_out(self, samples: list[Sample], pad_id: int, *, bidirectional: bool = False) -> ParallelBatch:
        """The masked layout of ``samples`` for one parallel forward (``bidirectional``: an encoder's, T5)."""
        raise NotImplementedError

    def make_batch(self, samples: list[Sample], pad_id: int = 0) -> ParallelBatch:
        return self.lay_out(samples, pad_id)

    def _parallel_inputs(self, lm: LoadedModel, batch: ParallelBatch) -> dict[str, Any]:
        device = lm.device
        ids = batch.input_ids.to(device)
        comp = batch.comp.to(device)
        embeds = lm.model.get_input_embeddings()(ids)
        embeds = self.state(lm).comp.fill(embeds, comp, batch.slots.to(device))
        plan = AttentionPlan.from_mask_plan(batch.plan, embeds.dtype, device)
        plan.merge_gate = self.scaled_gate()
        return {
            "inputs_embeds": embeds,
            "attention_mask": plan.mask[..., : ids.shape[1]],
            "position_ids": batch.plan.position_ids.to(device),
            "use_cache": False,
            PLAN_KWARG: plan,
            GATE_KWARG: comp,
        }

    def parallel_forward(self, lm: LoadedModel, batch: ParallelBatch, **kwargs: Any) -> Any:
        """One masked forward of the full model over ``batch``: every compression step at once.

        With gradient checkpointing, call it (and ``backward``) inside ``with method.attached(lm):``: backward
        recomputes layers, and they must see the same hooks.
        """
        with self.attached(lm):
            if lm.is_encoder_decoder:  # the encoder's masked forward and the decoder's logits on the answers
                return ccm_seq2seq.parallel_forward(self, lm, batch, logits=True)
            # through the decoder stack, whose hook sets the <COMP> gate: OPT's CausalLM calls past that module
            out = lm.model.base_model(**self._parallel_inputs(lm, batch), **kwargs)
            return CausalLMOutputWithPast(logits=logits_for(lm, out.last_hidden_state), cache=out.cache)

    def training_loss(self, lm: LoadedModel, batch: ParallelBatch) -> torch.Tensor:
        """Mean next-token loss over the answer tokens of one masked forward (logits only at labels)."""
        with self.attached(lm):
            if lm.is_encoder_decoder:
                return ccm_seq2seq.training_loss(self, lm, batch)
            hidden = lm.model.base_model(**self._parallel_inputs(lm, batch)).last_hidden_state
            return answer_loss(lm, hidden, batch.labels)

    def sample_length(self, sample: Sample) -> int:
        return super().sample_length(sample) + self.n_tok * len(sample.chunks)

    def scaled_gate(self) -> torch.Tensor | None:
        """The gate that scores steps for a learned merge (``[layers, kv_heads, head_dim]``), else ``None``."""
        return None

    def step_scores(self, comp: list[KV]) -> torch.Tensor | None:
        """``[layers, batch, kv_heads, n_tok]`` scores of one step's <COMP> keys/values under a learned merge's
        gate (:func:`~ccmem.patching.attention.merge_scores`), else ``None``: every step weighs the same."""
        gate = self.scaled_gate()
        return None if gate is None else torch.stack([merge_scores(v, gate[i]) for i, (_, v) in enumerate(comp)])


@dataclass
class CCM(CompTokens):
    """Compressed Context Memory with <COMP> tokens and a conditional LoRA."""

    paper: ClassVar[str] = "Kim et al., Compressed Context Memory for Online Language Model Interaction, ICLR 2024"
    #: On T5-family models the <COMP> tokens go into the encoder (:mod:`ccmem.methods.ccm_seq2seq`).
    encoder_decoder: ClassVar[bool] = True
    #: ``recent`` changes what is kept beside the compressed slots, not what the weights mean.
    runtime_options: ClassVar[frozenset[str]] = CompTokens.runtime_options | {"recent"}

    recurrent: bool = option(
        True, "compress each chunk with the memory so far (False: each chunk alone, as for ICL demonstrations)"
    )
    max_chunk_tokens: int = option(512, "longest chunk compressed in one step; longer context is split")
    recent: int = option(
        0,
        "keys/values of the latest chunk's last `recent` tokens kept raw beside the compressed memory (a window "
        "of recent text that the next chunk replaces; memory grows by at most this many slots; 0: none)",
    )

    def check_options(self) -> None:
        super().check_options()
        if self.max_chunk_tokens < 1:
            raise ValueError(f"max_chunk_tokens must be at least 1 (got {self.max_chunk_tokens})")
        if self.recent < 0:
            raise ValueError(f"recent must be 0 or more tokens (got {self.recent})")

    def check_model(self, lm: LoadedModel) -> None:
        super().check_model(lm)
        if self.recent:
            self.refuse_raw_tokens(lm, f"recent={self.recent}", "recent=0")

    def refuse_raw_tokens(self, lm: LoadedModel, setting: str, fix: str) -> None:
        """Raw tokens beside the memory (``recent``, ``keep``) hold their place in the cache of a decoder-only model
        with full attention only: refuse ``setting`` on any other ``lm``, naming ``fix``."""
        if lm.is_encoder_decoder or lm.sliding_window is not None:
            raise ValueError(
                f"{self.name} {setting} keeps raw tokens beside the memory of decoder-only models with full "
                f"attention; {lm.name} has {'an encoder' if lm.is_encoder_decoder else 'sliding-window layers'}"
                f": use {fix}"
            )

    def _chunks(self, ids: torch.Tensor) -> list[torch.Tensor]:
        return [ids[:, i : i + self.max_chunk_tokens] for i in range(0, ids.shape[1], self.max_chunk_tokens)]

    def fit_sample(self, sample: Sample) -> Sample:
        """``sample`` with its chunks cut as :meth:`add` cuts context: one longer than ``max_chunk_tokens`` becomes
        several compression steps, an empty one none."""
        step = self.max_chunk_tokens
        if all(0 < len(c) <= step for c in sample.chunks):
            return sample
        chunks = [c[i : i + step] for c in sample.chunks for i in range(0, len(c), step)]
        return dataclasses.replace(sample, chunks=chunks)

    def positions_needed(self, memory: Memory, n_tokens: int) -> int:
        return n_tokens + -(-n_tokens // self.max_chunk_tokens) * self.n_tok

    def parts(self, ids: torch.Tensor) -> list[torch.Tensor]:
        return self._chunks(ids)  # each chunk is a compression step of its own

    def add(self, lm: LoadedModel, memory: Memory, ids: torch.Tensor) -> Memory:
        for chunk in self._chunks(ids):
            memory = self.add_chunk(lm, memory, chunk)
        return memory

    def add_chunk(self, lm: LoadedModel, memory: Memory, ids: torch.Tensor) -> Memory:
        """One compression step: chunk ``ids`` and its <COMP> tokens, the <COMP> keys/values kept (and, with
        ``recent``, the chunk's last raw tokens in place of the previous chunk's)."""
        if lm.is_encoder_decoder:
            return ccm_seq2seq.add_chunk(self, lm, memory, ids)
        memory = memory.without_window()  # the last chunk's raw tokens: already compressed into its <COMP>
        seen = memory if self.recurrent else memory.prefix(memory.sink)
        kept = self.kept_positions(lm, ids[0])
        if kept is not None and ids.shape[0] != 1:
            raise ValueError(f"{self.name} keeps each interaction's own tokens: add one at a time, or use add_batch")
        comp, raw = self.read_chunk(
            lm, seen, ids, memory.next_position, ids.shape[-1] if kept is not None else self.recent
        )
        return self._update(memory, comp, raw, ids.shape[-1], kept)

    def _update(self, memory: Memory, comp: list[KV], raw: list[KV], n: int, kept: torch.Tensor | None) -> Memory:
        """``memory`` after a chunk of ``n`` tokens: its kept tokens (``raw`` then holds the whole chunk), its
        <COMP> slots, and its last ``recent`` tokens (those not kept already) as the window."""
        start = memory.next_position
        if kept is None:  # ``raw`` holds the chunk's last ``recent`` tokens (or none)
            last = torch.arange(raw[0][0].shape[-2], device=raw[0][0].device) if raw else torch.arange(0)
            r = len(last)
            return self._append_raw(self.fold(memory, comp, n), raw, last, start + n - r, window=True)
        memory = self.fold(self._append_raw(memory, raw, kept, start), comp, n)
        recent = torch.arange(max(0, n - self.recent), n, device=kept.device)
        return self._append_raw(memory, raw, recent[~torch.isin(recent, kept)], start, window=True)

    @staticmethod
    def _append_raw(memory: Memory, raw: list[KV], index: torch.Tensor, start: int, window: bool = False) -> Memory:
        """``memory`` with the chunk tokens at ``index`` (``raw``: the chunk read from position ``start``)."""
        if not len(index):
            return memory
        layers = [(k.index_select(-2, index), v.index_select(-2, index)) for k, v in raw]
        at = start + index
        positions = [at.to(k.device).expand(k.shape[0], k.shape[1], len(index)).clone() for k, _ in layers]
        changes = {"window": len(index)} if window else {}
        return memory.with_layers(
            concat_layers([memory.layers, layers]), concat_positions([memory.positions, positions]), **changes
        )

    def kept_positions(self, lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor | None:
        """Indices of the tokens of ``ids`` (1-D) kept raw in memory for good, or ``None``: none (ccm-concat's
        ``keep`` holds some)."""
        return None

    def fold(self, memory: Memory, comp: list[KV], n_chunk: int) -> Memory:
        """``memory`` updated with the <COMP> keys/values of a chunk of ``n_chunk`` tokens (concat: appended)."""
        start = memory.next_position + n_chunk
        layers = concat_layers([memory.layers, comp])
        positions = concat_positions([memory.positions, self.comp_positions(comp, start)])
        return memory.with_layers(layers, positions, advance=n_chunk + self.n_tok)

    def add_batch(self, lm: LoadedModel, memories: list[Memory], ids: list[torch.Tensor]) -> list[Memory]:
        """Step t compresses the t-th chunk of every interaction that has one, in one padded forward."""
        if lm.is_encoder_decoder:  # one interaction at a time
            return [self.add(lm, m, i) for m, i in zip(memories, ids, strict=True)]
        chunks = [self._chunks(i) for i in ids]
        out = list(memories)
        for t in range(max(len(c) for c in chunks)):
            rows = [b for b, c in enumerate(chunks) if t < len(c)]
            for b in rows:
                out[b] = out[b].without_window()
            seen = [out[b] if self.recurrent else out[b].prefix(out[b].sink) for b in rows]
            kept = [self.kept_positions(lm, chunks[b][t][0]) for b in rows]
            whole = any(k is not None for k in kept)  # then every row reads its chunk's keys/values back whole
            reads = self.read_chunks(
                lm, seen, [chunks[b][t] for b in rows], self.max_chunk_tokens if whole else self.recent
            )
            for b, (comp, raw), k in zip(rows, reads, kept, strict=True):
                out[b] = self._update(out[b], comp, raw, chunks[b][t].shape[-1], k)
        return out

    def make_batch(self, samples: list[Sample], pad_id: int = 0) -> ParallelBatch:
        return self.lay_out([self.fit_sample(s) for s in samples], pad_id)

    def lay_out(self, samples: list[Sample], pad_id: int, *, bidirectional: bool = False) -> ParallelBatch:
        return lay_out(
            samples,
            pad_id,
            n_tok=self.n_tok,
            update=self.update,
            recurrent=self.recurrent,
            bidirectional=bidirectional,
            banks=getattr(self, "banks", 1),  # ccm-merge's option
            recent=self.recent,
        )

    def show_raw(
        self, batch: ParallelBatch, samples: list[Sample], pick: Callable[[list[int]], torch.Tensor], recurrent: bool
    ) -> None:
        """Let whatever reads the memory after each chunk of ``samples`` (laid out in ``batch``) attend to the chunk
        tokens ``pick(chunk)`` indexes: the raw tokens that inference keeps in the cache beside its <COMP> slots
        (every later position; only the tail's where chunks are compressed alone, not ``recurrent``)."""
        for b, sample in enumerate(samples):
            start = len(sample.sink)
            for chunk in sample.chunks:
                end = start + len(chunk)
                readers = end + self.n_tok if recurrent else batch.tail_start[b]
                batch.plan.allowed[b, readers : batch.lengths[b], start + pick(chunk)] = True
                start = end + self.n_tok

    def recurrent_loss(self, lm: LoadedModel, sample: Sample) -> torch.Tensor:
        """The same loss computed the slow way: compress chunk by chunk (backpropagating through the
        memory), then read the tail with it. The reference that ``training_loss`` must equal, and the
        baseline of ``benchmarks/train_throughput.py``."""
        sample = self.fit_sample(sample)
        with self.attached(lm):
            if lm.is_encoder_decoder:
                return ccm_seq2seq.recurrent_loss(self, lm, sample)
            memory = self.new_memory(lm)
            if sample.sink:
                memory = self.add_sink(lm, memory, torch.tensor([sample.sink], device=lm.device))
            for chunk in sample.chunks:
                memory = self.add_chunk(lm, memory, torch.tensor([chunk], device=lm.device))
            tail = torch.tensor([sample.tail], device=lm.device)
            hidden = run_decoder(lm, tail, memory.to_cache(), memory.next_position).last_hidden_state
            labels = torch.full_like(tail, -100)
            labels[:, sample.answer_start :] = tail[:, sample.answer_start :]
            return answer_loss(lm, hidden, labels)


@register
@dataclass
class CCMConcat(CCM):
    """CCM-concat: memory grows by ``n_tok`` slots per chunk (all <COMP> keys/values are kept)."""

    name: ClassVar[str] = "ccm-concat"
    update: ClassVar[str] = "concat"
    #: ``keep`` too: it adds raw slots beside the compressed ones, it does not change what the weights mean.
    runtime_options: ClassVar[frozenset[str]] = CCM.runtime_options | {"keep"}

    keep: str = option(
        "nothing",
        "tokens of each chunk kept raw in memory beside its <COMP> slots, for good: 'digits' (every token whose text "
        "has a digit: numbers, dates, codes come back as written; memory grows by those tokens), 'values' (every "
        "token of a word with a digit or an @: whole codes, dates, e-mail addresses), 'names' ('values' and every "
        "capitalised word inside a sentence, or first in it and no common word: names of people, pets, places) or "
        "'nothing'",
    )

    def check_options(self) -> None:
        super().check_options()
        if self.keep not in KEEP_CLASSES:
            raise ValueError(f"keep must be one of {', '.join(KEEP_CLASSES)}, got {self.keep!r}")

    def build(self, lm: LoadedModel) -> CompState:
        state = super().build(lm)
        if self.keeps:
            self.keep_vocab(lm)
        return state

    @property
    def keeps(self) -> bool:
        return KEEP_CLASSES[self.keep] is not None

    def check_model(self, lm: LoadedModel) -> None:
        super().check_model(lm)
        if self.keeps:
            self.refuse_raw_tokens(lm, f"keep={self.keep!r}", "keep=nothing")

    def kept_positions(self, lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor | None:
        """Indices of the tokens of ``ids`` (1-D) that ``keep`` holds raw, or ``None`` without ``keep``."""
        if not self.keeps:
            return None
        self.keep_vocab(lm)
        return self._kept(ids.cpu()).to(ids.device)

    def _kept(self, ids: torch.Tensor) -> torch.Tensor:
        """:meth:`kept_positions` with the tables of the last tokenizer (``ids``: 1-D, on the CPU)."""
        matches, starts = self.keep_vocab()
        ids = ids.clamp(0, len(matches) - 1)
        hit = matches[ids]
        if self.keep == "names":
            hit = hit | self._name_starts(ids.tolist(), starts)
        if self.keep in ("values", "names"):  # every token of a word with a match: a word starts at a spaced token
            word = torch.cumsum(starts[ids].long(), 0)
            hit = torch.isin(word, word[hit])
        return torch.nonzero(hit, as_tuple=True)[0]

    def _name_starts(self, ids: list[int], starts: torch.Tensor) -> torch.Tensor:
        """Where a name starts: a token whose text begins with a capital (not "I"), led by a space or after a
        whitespace token, either inside a sentence (no sentence end, ``.!?:;``, a line break, a quote or a special
        token, since the word before it) or first in its sentence and no common word (:class:`CommonWords`)."""
        capital, blank, ends, texts, common = self._name_vocab
        out = torch.zeros(len(ids), dtype=torch.bool)
        first, after_space = True, True  # a chunk starts a sentence
        for p, token in enumerate(ids):
            if blank[token]:  # whitespace: a line break starts a sentence, a space a word
                first, after_space = first or ends[token], True
                continue
            if capital[token] and (after_space or bool(starts[token])):
                out[p] = not first or not common(self._word_at(ids, p, starts, texts))
            first, after_space = ends[token], False
        return out

    @staticmethod
    def _word_at(ids: list[int], p: int, starts: torch.Tensor, texts: list[str]) -> str:
        """The word whose first token is ``ids[p]``: it and the tokens after it that continue it with letters."""
        word, q = texts[ids[p]], p + 1
        while q < len(ids) and not starts[ids[q]] and texts[ids[q]][:1].isalpha():
            word, q = word + texts[ids[q]], q + 1
        return word

    def _kept_in(self, chunk: list[int]) -> torch.Tensor:
        return self._kept(torch.tensor(chunk, dtype=torch.long))

    def keep_vocab(self, lm: LoadedModel | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``[vocab]`` bools: the token ids whose text ``keep``'s class matches, and those whose text starts a word
        (computed once per tokenizer; without ``lm``, the last one's: what laying out a batch reads after
        :meth:`build`)."""
        cached = getattr(self, "_keep_vocab", None)
        if lm is None or (cached is not None and cached[0] is lm.tokenizer and cached[2] == self.keep):
            if cached is None:
                raise RuntimeError(f"{self.name} keep={self.keep!r}: build the method for a model before use")
            return cast(tuple[torch.Tensor, torch.Tensor], cached[1])
        pattern = KEEP_CLASSES[self.keep]
        assert pattern is not None
        texts = token_texts(lm)
        matches = torch.tensor([bool(pattern.search(t)) for t in texts], dtype=torch.bool)
        starts = torch.tensor([not t or t[0].isspace() for t in texts], dtype=torch.bool)
        if self.keep == "names":
            # tokens whose text begins with a capital ("I" and "I'm" are no names), whitespace-only tokens, and
            # tokens after which a sentence starts (its end, a line break, a quote; special tokens, whose text is "")
            words = [t.strip() for t in texts]
            self._name_vocab = (
                [w[:1].isupper() and w != "I" and not w.startswith(("I'", "I’")) for w in words],
                [bool(t) and not w for t, w in zip(texts, words, strict=True)],
                [not t or bool(SENTENCE_END.search(t)) for t in texts],
                texts,
                CommonWords(lm.tokenizer),
            )
        self._keep_vocab = (lm.tokenizer, (matches, starts), self.keep)
        return matches, starts

    def make_batch(self, samples: list[Sample], pad_id: int = 0) -> ParallelBatch:
        samples = [self.fit_sample(s) for s in samples]
        batch = self.lay_out(samples, pad_id)
        if self.keeps:  # a chunk's kept tokens stay readable by whatever reads the memory after it, as in add
            self.show_raw(batch, samples, self._kept_in, recurrent=self.recurrent)
        return batch


@register
@dataclass
class CCMMerge(CCM):
    """CCM-merge: memory is the running average ``(1-1/t)·Mem(t-1) + (1/t)·h(t)``, at most ``banks``·``n_tok`` slots
    however long the context (``banks`` running averages of ``n_tok`` slots each, step t in bank ``(t-1) mod
    banks``: the memory grows by ``n_tok`` slots a step until every bank holds one, then stays that size; the
    sink and ``recent`` raw tokens are beside them)."""

    name: ClassVar[str] = "ccm-merge"
    update: ClassVar[str] = "merge"

    weighting: str = option(
        "mean",
        "how each step weighs in the merged slots: 'mean' (the paper's running average, 1/t each) or 'learned' (a "
        "softmax over steps of a learned score of each step's <COMP> values, per layer, head and slot; starts as "
        "the mean)",
    )

    gate_scale: float = option(
        64.0,
        "weighting=learned: a step's score is gate_scale·(gate·value/|value|); like lora_alpha, a re-parametrisation "
        "(larger: the zero-initialised gate moves the scores faster at the same learning rate)",
    )

    banks: int = option(
        1,
        "groups of merged slots: step t (1, 2, ...) merges into group (t-1) mod banks, so memory is banks·n_tok "
        "slots and a step weighs 1/ceil(t/banks) in its group instead of 1/t (1: the paper's single running "
        "average); an adapter keeps the value it was trained with (a run may start from another's: init_from)",
    )

    def check_options(self) -> None:
        super().check_options()
        if self.banks < 1:
            raise ValueError(f"banks must be at least 1 (got {self.banks})")
        if self.weighting not in MERGE_WEIGHTINGS:
            raise ValueError(f"weighting must be one of {MERGE_WEIGHTINGS}, got {self.weighting!r}")
        if not 0 < self.gate_scale < float("inf"):  # inf: a learned merge's slots came out NaN
            raise ValueError(f"gate_scale must be positive and finite (got {self.gate_scale})")

    def scaled_gate(self) -> torch.Tensor | None:
        gate = cast(CompState, self._module).merge_gate if self._module is not None else None
        return None if gate is None else gate * self.gate_scale

    def build(self, lm: LoadedModel) -> CompState:
        state = super().build(lm)
        if self.banks > 1 and lm.is_encoder_decoder:
            raise ValueError("ccm-merge banks > 1 works on decoder-only models; use banks=1 on T5")
        if self.weighting == "learned":
            if lm.is_encoder_decoder:
                raise ValueError(
                    "ccm-merge weighting='learned' works on decoder-only models; use weighting='mean' on T5"
                )
            shape = lm.kv_shape
            state.merge_gate = nn.Parameter(torch.zeros(shape.layers, shape.kv_heads, shape.head_dim, device=lm.device))
        return state

    def warm_start(
        self, differing: dict[str, tuple[Any, Any]], tensors: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor] | None:
        """Also start learned weighting from a mean-merge (or concat) adapter: its gate at zero, the mean; and from
        a gate trained with another ``gate_scale``: rescaled, so that every score stays as it was."""
        differing = dict(differing)
        differing.pop("banks", None)  # banks group the same slots differently: no tensor changes
        weighting = differing.pop("weighting", None)
        if weighting == ("mean", "learned"):
            tensors = tensors | {"merge_gate": fresh["merge_gate"]}
        elif weighting is not None:
            theirs, ours = weighting
            raise ValueError(
                f"trained with weighting={theirs!r}, this run has weighting={ours!r} (a learned gate has no "
                f"mean-merge counterpart); set method.weighting={theirs} or start from scratch"
            )
        if "gate_scale" in differing:
            theirs, ours = differing.pop("gate_scale")
            if "merge_gate" in tensors:
                tensors = tensors | {"merge_gate": tensors["merge_gate"] * (theirs / ours)}
        return tensors if not differing else super().warm_start(differing, tensors, fresh)

    def check_memory(self, memory: Memory) -> None:
        """A merge continues from its step count, and a learned merge from each bank's log-normaliser."""
        compressed = memory.segment_lengths()["compressed"] if memory.layers else 0
        steps = memory.state.get("merge_steps")
        if steps is None:
            if compressed:
                raise ValueError("its merged slots have no step count (state merge_steps)")
            return
        if steps.numel() != 1 or steps.is_floating_point() or int(steps) < 1:
            raise ValueError(f"its step count (state merge_steps) must be a whole number >= 1, got {steps.tolist()}")
        banks = min(int(steps), getattr(self, "banks", 1))
        if compressed != banks * self.n_tok:
            raise ValueError(
                f"it holds {compressed} merged slots, not {banks} bank(s) of {self.n_tok} after {int(steps)} steps"
            )
        if self.scaled_gate() is None:
            return
        norm = memory.state.get("merge_log_norm")
        k = memory.layers[0][0]
        wanted = (len(memory.layers), k.shape[0], k.shape[1], compressed)
        if norm is None or tuple(norm.shape) != wanted or not bool(torch.isfinite(norm).all()):
            got = "none" if norm is None else f"{tuple(norm.shape)}"
            raise ValueError(f"a learned merge needs finite state merge_log_norm of shape {wanted}, got {got}")

    def fold(self, memory: Memory, comp: list[KV], n_chunk: int) -> Memory:
        """Step ``t`` goes into bank ``(t-1) mod banks``. The first ``banks`` steps are appended as they are; from
        then on the bank to update is always the one updated longest ago, the first block after the sink, so it is
        merged and moved to the end: the cache holds the banks in the order of their last step, which is the
        order of the merged columns in parallel training (:func:`ccmem.masks.build_plan`)."""
        t = int(memory.state.get("merge_steps", torch.tensor(0))) + 1
        state = {**memory.state, "merge_steps": torch.tensor(t)}
        scores = self.step_scores(comp)
        if t <= self.banks:  # Mem(t) = h(t) in a bank of its own: appended after the sink and earlier banks
            first = super().fold(memory, comp, n_chunk)
            if scores is not None:
                held = memory.state.get("merge_log_norm")
                state["merge_log_norm"] = scores if held is None else torch.cat([held, scores], -1)
            return first.with_layers(first.layers, first.positions, state=state)
        count = (t - 1) // self.banks + 1  # steps in this bank, this one included
        n, s = self.n_tok, memory.sink
        keep: list[Any] = [1 - 1 / count] * len(comp)  # the running mean
        take: list[Any] = [1 / count] * len(comp)
        if scores is not None:  # Mem(t) = sum_i exp(s_i) h(i) / sum_i exp(s_i), with a running log-normaliser
            held = memory.state["merge_log_norm"]
            norm = torch.logaddexp(held[..., :n], scores)
            state["merge_log_norm"] = torch.cat([held[..., n:], norm], -1)
            keep = list((held[..., :n] - norm).exp()[..., None].unbind(0))
            take = list((scores - norm).exp()[..., None].unbind(0))
        layers = []
        for (k, v), (ck, cv), a, b in zip(memory.layers, comp, keep, take, strict=True):
            if isinstance(a, torch.Tensor):
                a, b = a.to(k.dtype), b.to(k.dtype)
            mk = k[..., s : s + n, :] * a + ck * b
            mv = v[..., s : s + n, :] * a + cv * b
            layers.append(
                (
                    torch.cat([k[..., :s, :], k[..., s + n :, :], mk], -2),
                    torch.cat([v[..., :s, :], v[..., s + n :, :], mv], -2),
                )
            )
        positions = [
            torch.cat([p[..., :s], p[..., s + n :], constant_positions(-1, n, p)], -1) for p in memory.positions
        ]
        return memory.with_layers(layers, positions, advance=n_chunk + n, state=state)
